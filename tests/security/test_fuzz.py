"""The standing fuzz suite: seeded mutations of .dsz files, safetensors checkpoints (crafted
metadata naming dangerous callables), IDX directories and CLI invocations. Each family runs in a
subprocess whose address space is capped (resource.setrlimit), so an allocation bomb fails the
test instead of the machine.

A few thousand cases by default; ``DEEPSHRINK_FUZZ_CASES=100000`` scales every family up (the
campaign with a results table is ``bench/security_fuzz.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzzing.py")
# Share of the total per family (default total: 2,400 cases, about 40 s on a quiet machine).
SHARES = {"dsz": 0.42, "safetensors": 0.42, "idx": 0.12, "cli": 0.04}
TOTAL = int(os.environ.get("DEEPSHRINK_FUZZ_CASES", "2400"))
SEED = int(os.environ.get("DEEPSHRINK_FUZZ_SEED", "16"))


@pytest.mark.parametrize("family", sorted(SHARES))
def test_fuzz_family(family: str, tmp_path: Path) -> None:
    cases = max(20, int(TOTAL * SHARES[family]))
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            "--family",
            family,
            "--cases",
            str(cases),
            "--seed",
            str(SEED),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60 + cases,
        start_new_session=True,
    )
    assert p.returncode == 0, f"worker died (crash or memory cap): {p.stderr[-3000:]}"
    res = json.loads(out.read_text())
    counts = res["counts"]
    assert sum(counts.values()) == cases
    bad = {k: v for k, v in counts.items() if k not in ("clean", "loaded")}
    assert not bad, json.dumps(res["bad"], indent=1)[:4000]
    assert counts.get("clean", 0) > 0
    if family in ("dsz", "safetensors", "idx"):
        assert counts.get("loaded", 0) > 0  # some accepted inputs were checked against the file
