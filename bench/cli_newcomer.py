"""Times of the README's command-line path (issue 17) on this machine: every `deepshrink` line of
the README's "Command line" section, run in order in a temporary directory from the repository's
examples, on the real data (Fashion-MNIST from Debian's dataset-fashion-mnist; digits; the
tiny text model). Writes each command's wall time and exit code to
bench/results/cli_newcomer.json.

Run: ``/work/bin/heavy .venv/bin/python bench/cli_newcomer.py`` (the README path; a few minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_results

ROOT = Path(__file__).resolve().parents[1]


def commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Command line"):text.index("## Data-parallel training")]
    cmds = []
    for body in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def main() -> None:
    env = {**os.environ, "DEEPSHRINK_NO_PROGRESS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "examples", Path(tmp) / "examples")
        t_all = time.perf_counter()
        for cmd in commands():
            t0 = time.perf_counter()
            r = subprocess.run(cmd, shell=True, cwd=tmp, env=env, capture_output=True, text=True)
            rows.append({"command": cmd, "seconds": round(time.perf_counter() - t0, 1),
                         "exit_code": r.returncode, "stdout_tail": r.stdout[-600:],
                         "stderr_tail": r.stderr[-300:]})
            print(f"{rows[-1]['seconds']:7.1f} s  rc={r.returncode}  {cmd}", flush=True)
        total = time.perf_counter() - t_all
    write_results("cli_newcomer", {"total_seconds": round(total, 1), "load": os.getloadavg(),
                                   "rows": rows,
                                   "command": "/work/bin/heavy .venv/bin/python bench/cli_newcomer.py"})


if __name__ == "__main__":
    main()
