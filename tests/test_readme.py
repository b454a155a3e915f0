"""Every code block in the README runs as written.

Python blocks are executed in order in one namespace; shell blocks run line by line from a fresh
shell (the installed ``deepshrink`` console script), in a temporary directory. Where the README
uses Fashion-MNIST, a small stand-in of the same shape (digits upscaled to 28x28, in IDX files)
takes its place through ``$DEEPSHRINK_FASHION_MNIST``, so the commands are the README's own.
Lines naming ``make`` are the setup itself and are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepshrink.data import load_digits, write_idx

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def shell_commands() -> list[str]:
    """The README's shell lines: comments dropped, continuation lines joined, `make` skipped."""
    cmds: list[str] = []
    for body in blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#") and not line.startswith("make"):
                cmds.append(line)
    return cmds


@pytest.fixture(scope="module")
def fashion_standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5,600 train + 400 test 28x28 images in IDX files (the loader keeps 5,000 for validation)."""
    d = tmp_path_factory.mktemp("fmnist")
    digits = load_digits()
    x = np.concatenate([digits.train.tensors[0].numpy(), digits.val.tensors[0].numpy(),
                        digits.test.tensors[0].numpy()])[:, 0]
    y = np.concatenate([digits.train.tensors[1].numpy(), digits.val.tensors[1].numpy(),
                        digits.test.tensors[1].numpy()])
    big = np.kron(x, np.ones((3, 3), np.float32))  # 24x24, padded to 28x28
    big = (np.pad(big, ((0, 0), (2, 2), (2, 2))) * 255).astype(np.uint8)
    reps = np.resize(np.arange(len(big)), 6000)
    write_idx(d / "train-images-idx3-ubyte.gz", big[reps[:5600]])
    write_idx(d / "train-labels-idx1-ubyte.gz", y[reps[:5600]].astype(np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte.gz", big[reps[5600:]])
    write_idx(d / "t10k-labels-idx1-ubyte.gz", y[reps[5600:]].astype(np.uint8))
    return d


def test_readme_has_code_to_check() -> None:
    assert blocks("python") and shell_commands()
    assert not any("..." in c for c in shell_commands()), "placeholder command in the README"


def test_python_blocks_run_as_written(fashion_standin: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSHRINK_FASHION_MNIST", str(fashion_standin))
    monkeypatch.setenv("DEEPSHRINK_NO_PROGRESS", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~90 s alone; a shared machine can make it many times longer
def test_shell_blocks_run_as_written(fashion_standin: Path, tmp_path: Path) -> None:
    exe = shutil.which("deepshrink", path=str(Path(sys.executable).parent))
    assert exe, "the deepshrink console script is not installed beside this Python"
    shutil.copytree(README.parent / "examples", tmp_path / "examples")  # as in a fresh clone's root
    env = {**os.environ, "DEEPSHRINK_FASHION_MNIST": str(fashion_standin), "DEEPSHRINK_NO_PROGRESS": "1",
           "PATH": f"{Path(exe).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for cmd in shell_commands():
        r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, cmd
