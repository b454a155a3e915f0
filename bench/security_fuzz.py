"""The fuzzing campaign of issue 16: every input deepshrink reads, mutated, with the outcome of
each case counted (see tests/security/fuzzing.py for the generators and the outcome rules).

    nice -n 10 .venv/bin/python bench/security_fuzz.py --dsz 45000 --safetensors 45000 \\
        --idx 6000 --cli 4000

Cases run in chunks, each in a worker subprocess with a memory cap (resource.setrlimit) and one
thread; a worker that dies (segfault, kill) is counted as a crash of its chunk. Writes
bench/results/security_fuzz.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "security" / "fuzzing.py"
OUTCOMES = ["clean", "loaded", "other", "hang", "memory", "different", "code-ran", "crash"]


def run_chunk(family: str, cases: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, str(WORKER), "--family", family, "--cases", str(cases),
                            "--seed", str(seed), "--out", str(out)], env=env, capture_output=True,
                           text=True, start_new_session=True)
        if p.returncode != 0 or not out.exists():
            return {"counts": {"crash": cases}, "bad": [{"outcome": "crash", "detail": p.stderr[-1500:]}]}
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    for fam, n in (("dsz", 45000), ("safetensors", 45000), ("idx", 6000), ("cli", 4000)):
        ap.add_argument(f"--{fam}", type=int, default=n)
    ap.add_argument("--chunk", type=int, default=2500)
    ap.add_argument("--families", default="dsz,safetensors,idx,cli")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "security_fuzz.json")
    ap.add_argument("--merge", type=Path, nargs="*", help="combine the rows of earlier runs' JSON")
    a = ap.parse_args()
    rows, t0 = [], time.perf_counter()
    if a.merge:
        parts = [json.loads(p.read_text()) for p in a.merge]
        rows = [r for part in parts for r in part["rows"]]
        write(a.out, rows, [part["command"] for part in parts], max(p["seconds"] for p in parts))
        return
    for fam in a.families.split(","):
        total, counts, bad, seed = getattr(a, fam), Counter(), [], a.seed
        start = time.perf_counter()
        while sum(counts.values()) < total:
            n = min(a.chunk, total - sum(counts.values()))
            r = run_chunk(fam, n, seed)
            counts.update(r["counts"])
            bad += [{"seed": seed, **b} for b in r["bad"]][: max(0, 20 - len(bad))]
            seed += 1
            print(f"{fam}: {sum(counts.values())}/{total} {dict(counts)}", file=sys.stderr, flush=True)
        rows.append({"family": fam, "inputs": total, **{o: counts.get(o, 0) for o in OUTCOMES},
                     "seconds": round(time.perf_counter() - start), "bad_examples": bad})
    write(a.out, rows, " ".join(["nice -n 10", "python", *sys.argv]), round(time.perf_counter() - t0))


def write(out: Path, rows: list[dict], command: object, seconds: int) -> None:
    total = {o: sum(r[o] for r in rows) for o in ["inputs", *OUTCOMES]}
    res = {"command": command, "rows": rows, "total": total, "seconds": seconds}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    cols = ["family", "inputs", *OUTCOMES]
    print(" | ".join(cols))
    for r in [*rows, {"family": "total", **total}]:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
