"""Data-parallel training under torchrun (2 processes, gloo, CPU) against one process.

One torchrun launch runs every scenario of ddp_scenarios.py (process start-up with a torch import
costs seconds, so they share it); the test process runs the same scenarios alone and compares.

Tolerance: the two runs see the same global batches in the same order, but the 2-process
gradient is the average of two half-batch means, summed in a different order than one
full-batch mean, so weights agree to float32 rounding amplified over a few dozen Adam steps,
not bit for bit: |a - b| <= 5e-6 + 1e-5 |b| (observed max 5.5e-7 on these runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepshrink import distributed
from deepshrink.errors import ConfigError, FormatError

HERE = Path(__file__).parent
SCRIPT = HERE / "ddp_scenarios.py"
ATOL, RTOL = 5e-6, 1e-5


def _scenarios():
    spec = importlib.util.spec_from_file_location("ddp_scenarios", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this python")
    out = tmp_path_factory.mktemp("ddp")
    logs = out / "logs"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "3",
           str(SCRIPT), str(out)]
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, no orphans.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish in 240 s")
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stderr.log")}
    assert proc.returncode == 0, err[-3000:] + "\n".join(v[-3000:] for v in rank_logs.values())
    return out, rank_logs


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("one")


@pytest.fixture(scope="module")
def single(single_dir):
    """The same scenarios in this one process (no process group)."""
    mod = _scenarios()
    torch.set_num_threads(1)
    return {name: {k: v.detach().clone() for k, v in fn(single_dir).state_dict().items()}
            for name, fn in mod.SCENARIOS.items()}


def _weights(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{name}.rank{rank}.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=f"{what}: {k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.parametrize("name", ["plain", "masked", "qat", "distill_cached", "centroid", "resumed",
                                  "cli_train_prune", "early_exit"])
def test_two_processes_match_one(launch, single, name):
    out, _ = launch
    if name not in single:
        pytest.skip(f"{name}: its package is not on this branch yet")
    r0, r1 = _weights(out, name, 0), _weights(out, name, 1)
    for k in r0:  # DDP keeps the ranks bit-identical (same averaged gradient, same step)
        assert torch.equal(r0[k], r1[k]), f"{name}: ranks differ on {k}"
    _assert_close(r0, single[name], f"{name}: 2 processes vs 1")


def test_masks_are_rank0s_and_stay_zero(launch, single):
    out, _ = launch
    for k, w in _weights(out, "masked", 0).items():
        if k.endswith("weight"):
            assert torch.equal(w == 0, single["masked"][k] == 0), k  # rank 1's altered mask lost
            assert (w == 0).float().mean() > 0.6, k


def test_resume_after_restart_equals_uninterrupted(launch, single):
    out, _ = launch
    _assert_close(_weights(out, "resumed", 0), _weights(out, "uninterrupted", 0), "resumed (2 proc)")
    _assert_close(single["resumed"], single["uninterrupted"], "resumed (1 proc)")


def test_only_rank0_writes_and_prints(launch):
    out, rank_logs = launch
    written = {r: json.loads((out / f"replaced.rank{r}.json").read_text()) for r in (0, 1)}
    # Relative paths are inside the output directory; rank 1 may only use its private scratch
    # directories (the search's trials: artifacts it reloads to measure, as rank 0 does).
    assert [p for p in written[1] if not Path(p).is_absolute()] == []
    scratch = [Path(p).relative_to(tempfile.gettempdir()).parts[0] for p in written[1]]
    assert all(d.startswith("deepshrink-") for d in scratch), scratch
    assert {"search/search-state.json", "search/search.json"} <= set(written[0])
    assert any(p.startswith("search/trials/r1-") and p.endswith(".dsz") for p in written[0])
    assert {"plain/model.safetensors", "plain/model.safetensors.resume.pt"} <= set(written[0])
    assert sorted(p.name for p in (out / "plain").iterdir()) == ["model.safetensors",
                                                                 "model.safetensors.resume.pt"]
    assert {"cli/trained.safetensors", "cli/pruned.safetensors"} <= set(written[0])
    assert "epoch 2 train_loss" in rank_logs[0]  # the plain scenario's per-epoch lines
    assert "train_loss" not in rank_logs[1]


def test_search_ranks_agree_and_match_one_process(launch, single, single_dir):
    """Rank 1 ran every trial although its own clock said the budget was spent: rank 0's
    clock decides. Both ranks return rank 0's result; 2 processes pick what 1 process picks."""
    out, _ = launch
    r0, r1 = (json.loads((out / f"search.rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((single_dir / "search.rank0.json").read_text())
    assert r0 == r1
    assert r0["stopped"] is None and len(r0["trials"]) == 3  # 2 candidates, then the best one again
    assert r0["elapsed"] < 3600  # rank 0's clock (rank 1's read ~10,000x more)
    assert r0["trials"].keys() == one["trials"].keys() and r0["chosen"] == one["chosen"]
    for name, top1 in one["trials"].items():  # same weights up to float rounding (see above)
        assert abs(r0["trials"][name] - top1) <= 0.02, name
    r0w = _weights(out, "search", 0)
    assert all(torch.equal(r0w[k], v) for k, v in _weights(out, "search", 1).items())


def test_cli_prints_on_rank0_only(launch):
    out, _ = launch
    stdout = {int(p.parent.name): p.read_text() for p in (out / "logs").glob("*/attempt_0/*/stdout.log")}
    assert "test top-1" in stdout[0] and "-> " in stdout[0]  # train's line, prune's table
    assert stdout[1].strip() == ""


def test_device_selection_logic():
    sel = distributed.select_device
    assert sel("cpu", cuda_available=True, cuda_count=2) == torch.device("cpu")
    assert sel("auto", cuda_available=False) == torch.device("cpu")
    assert sel("auto", cuda_available=True, cuda_count=2, local=1) == torch.device("cuda", 1)
    assert sel("cuda", cuda_available=True, cuda_count=4, local=3) == torch.device("cuda", 3)
    assert sel("cuda:2", cuda_available=True, cuda_count=4, local=0) == torch.device("cuda", 2)
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        sel("cuda", cuda_available=False)
    with pytest.raises(ConfigError, match="only 2 visible"):
        sel("cuda", cuda_available=True, cuda_count=2, local=2)
    with pytest.raises(ConfigError, match="must be cpu, cuda"):
        sel("tpu")


def test_single_process_helpers_are_no_ops():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    t = torch.tensor([1.0, 5.0])
    assert distributed.all_reduce(t, "max") is t and t.tolist() == [1.0, 5.0]
    assert distributed.all_reduce_floats([2, 3]) == [2.0, 3.0]
    assert distributed.global_extremes(torch.tensor([[3.0, -1.0], [2.0, 7.0]])).tolist() == [-1.0, 7.0]
    assert [distributed.shard_range(10, i, 3) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]


def test_bad_resume_file_is_a_format_error(tmp_path):
    from deepshrink.data import load_digits
    from deepshrink.models import create_model
    from deepshrink.train import TrainConfig, train

    ckpt = tmp_path / "m.safetensors"
    (tmp_path / "m.safetensors.resume.pt").write_bytes(b"not a torch file")
    with pytest.raises(FormatError, match="not a readable training-state file"):
        train(create_model("mlp", in_size=8, hidden=8), load_digits(),
              TrainConfig(epochs=1, resume=True, checkpoint=str(ckpt), progress=False))
    with pytest.raises(ConfigError, match="resume"):
        TrainConfig(resume=True)
    with pytest.raises(ConfigError, match="device"):
        TrainConfig(device="gpu")


def test_epoch_order_depends_only_on_seed_and_epoch():
    """What makes a resumed run see the batches an uninterrupted one would: every epoch's order
    comes from (seed, epoch), for the DataBundle path and for a caller's seeded DataLoader
    (including a BatchSampler wrapped around a RandomSampler, as transfer_loader builds)."""
    from torch.utils.data import TensorDataset

    from deepshrink.distill import transfer_loader
    from deepshrink.train.batches import LoaderBatches, TensorBatches

    ds = TensorDataset(torch.arange(20).float()[:, None], torch.arange(20))

    def order(batches, epoch):
        return [b[1].tolist() for b, _ in batches.epoch(epoch)]

    for make in (lambda: TensorBatches(ds, 6, seed=3), lambda: LoaderBatches(transfer_loader(ds, 6, seed=3))):
        a, b = make(), make()
        order(a, 0)
        assert order(a, 1) == order(b, 1) != order(b, 0)
        assert sorted(i for batch in order(b, 2) for i in batch) == list(range(20))  # each once
        assert [n for _, n in b.epoch(0)] == [6, 6, 6, 2] and len(b) == 4


def test_first_epoch_order_is_the_data_bundle_loaders():
    """One process, epoch 0: the same batches DataBundle.loader("train", seed=s) gives."""
    from deepshrink.data import load_digits
    from deepshrink.train.batches import TensorBatches

    d = load_digits()
    ours = [b[1] for b, _ in TensorBatches(d.train, 64, seed=5).epoch(0)]
    theirs = [y for _, y in d.loader("train", 64, seed=5)]
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
