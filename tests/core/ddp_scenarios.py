"""Training scenarios run both in one process (by the test) and under
``torchrun --nproc_per_node=2`` (this file as the script): see test_distributed.py.

Launched as a script, every rank runs every scenario, saves its final weights as
``<out>/<scenario>.rank<r>.safetensors`` (test bookkeeping, written by every rank on purpose) and
logs each file the library renamed into place (``os.replace``: how deepshrink.fileio publishes
every output) to ``<out>/replaced.rank<r>.json``, so the test can tell which rank wrote what.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import deepshrink as ds
from deepshrink import distributed
from deepshrink.data import load_digits
from deepshrink.train import Callback, TrainConfig, train


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ds.create_model("lenet300", in_size=8)


# 1078 training digits, global batch 100: the last batch (78) splits 39/39; batch 96 would
# leave 22 = 11/11. Odd sizes are covered by `plain` (batch 75 -> last batch 28... and 75 = 38+37).
def plain(out: Path) -> nn.Module:
    m = _base()
    train(m, load_digits(), TrainConfig(epochs=2, batch_size=75, augment="shift", progress=True,
                                        checkpoint=str(out / "plain" / "model.safetensors")))
    return m


def masked(out: Path) -> nn.Module:
    from deepshrink.pruning import MaskCallback, UnstructuredConfig, get_masks, prune_unstructured

    m = _base()
    prune_unstructured(m, UnstructuredConfig(ratio=0.7))
    if distributed.rank() == 1:  # a rank that scored differently: rank 0's masks must win
        for mask in get_masks(m).values():
            mask[:, :3] = True
    train(m, load_digits(), TrainConfig(epochs=1, batch_size=64, weight_decay=1e-3, progress=False),
          callbacks=[MaskCallback()])
    return m


def qat(out: Path) -> nn.Module:
    from deepshrink.quantization import QATConfig, prepare_qat

    data = load_digits()
    m = _base()
    calib = data.train.tensors[0][:128]
    prepare_qat(m, QATConfig(bits=4, act_bits=8), calibration=calib)
    train(m, data, TrainConfig(epochs=1, batch_size=64, lr=5e-4, progress=False))
    return m


def distill_cached(out: Path) -> nn.Module:
    from deepshrink.distill import KDConfig, distill

    data = load_digits()
    teacher = _base(1)
    student = ds.create_model("mlp", in_size=8, hidden=16)
    distill(student, KDConfig(cache=True, hints={"2": "2"}), teacher=teacher, data=data,
            train_config=TrainConfig(epochs=1, batch_size=64, progress=False))
    return student


def centroid(out: Path) -> nn.Module:
    from deepshrink.sharing import CentroidFineTune, KMeansConfig, share

    m = _base()
    share(m, KMeansConfig(bits=3))
    train(m, load_digits(), TrainConfig(epochs=1, batch_size=64, progress=False),
          callbacks=[CentroidFineTune()])
    return m


class _Crash(Callback):
    """Stops training after the first epoch, as a killed job would (its state file is saved)."""

    def on_epoch_end(self, state, metrics):
        state.stop = True


def resumed(out: Path) -> nn.Module:
    cfg = TrainConfig(epochs=2, batch_size=64, progress=False, resume=True,
                      checkpoint=str(out / "resumed" / "model.safetensors"))
    train(_base(), load_digits(), cfg, callbacks=[_Crash()])
    m = _base(7)  # a fresh process would rebuild the model: its weights come from the state file
    train(m, load_digits(), cfg, callbacks=[Callback()])
    return m


def uninterrupted(out: Path) -> nn.Module:
    m = _base()
    train(m, load_digits(), TrainConfig(epochs=2, batch_size=64, progress=False))
    return m


def _cli(*args: str) -> None:
    from deepshrink.cli import app
    from deepshrink.cli.common import quiet_unless_main

    quiet_unless_main()  # what the `deepshrink` entry point does first
    app(list(args), standalone_mode=False)


def cli_train_prune(out: Path) -> nn.Module:
    """`deepshrink train` then `deepshrink prune --epochs 1` (masked fine-tune), as torchrun
    would run them (`torchrun --no-python deepshrink ...`)."""
    trained, pruned = out / "cli" / "trained.safetensors", out / "cli" / "pruned.safetensors"
    _cli("train", "-m", "mlp", "--model-args", '{"hidden": 16}', "-o", str(trained), "--epochs", "1",
         "--device", "cpu")
    _cli("prune", str(trained), "-o", str(pruned), "--ratio", "0.5", "--epochs", "1",
         "--format", "dense")
    return ds.load(pruned)


def early_exit(out: Path) -> nn.Module:
    """Exit heads trained jointly with the backbone through the shared loop (issue 11's family)."""
    from deepshrink.early_exit import ExitConfig, ExitTrainConfig, add_exits, train_exits

    multi = add_exits(_base(), ExitConfig(), example_inputs=torch.rand(2, 1, 8, 8))
    train_exits(multi, load_digits(), ExitTrainConfig(
        mode="joint", train=TrainConfig(epochs=1, batch_size=64, progress=False)))
    return multi


def search_trials(out: Path) -> nn.Module:
    """The target search (issue 14): its trials fine-tune data-parallel; rank 0 decides and
    writes. Rank 1's budget clock runs 10,000x fast here, as a process on a slower or busier
    node would see it: if ranks decided the budget on their own, rank 1 would stop after its
    first trial and leave rank 0 waiting in the next fine-tune's all-reduce (the test's timeout).
    Writes what this rank's search returned to ``search.rank<r>.json`` (test bookkeeping)."""
    from deepshrink import checkpoint
    from deepshrink.workflow import search as search_mod

    data = load_digits()
    m = _base()
    train(m, data, TrainConfig(epochs=2, batch_size=64, progress=False))
    model_file = out / "search-model.safetensors"
    distributed.on_main(checkpoint.save, m, model_file)
    real = search_mod.CLOCKS["wall"]
    if distributed.rank() == 1:
        search_mod.CLOCKS["wall"] = lambda: 1e4 * real()
    try:
        res = search_mod.search(m, data, search_mod.SearchConfig(
            candidates=2, rungs=2, epochs_scale=0.34, max_drop=100.0, time_budget=3600.0),
            out / "search", model_file=model_file, log=lambda s: None)
    finally:
        search_mod.CLOCKS["wall"] = real
    r = res.results
    summary = {"chosen": r["chosen"], "trials": {t["trial"]: t["val_top1"] for t in r["trials"]},
               "bytes": {t["trial"]: t["bytes"] for t in r["trials"]}, "stopped": r["stopped"],
               "elapsed": r["seconds"]}
    (out / f"search.rank{distributed.rank()}.json").write_text(json.dumps(summary))
    chosen = next(t for t in r["selected"] if t["role"] == "chosen")
    return ds.load(out / "search" / chosen["file"])


HAS_EARLY_EXIT = importlib.util.find_spec("deepshrink.early_exit") is not None

SCENARIOS: dict[str, Callable[[Path], nn.Module]] = {
    "plain": plain, "masked": masked, "qat": qat, "distill_cached": distill_cached,
    "centroid": centroid, "resumed": resumed, "uninterrupted": uninterrupted,
    "cli_train_prune": cli_train_prune, "search": search_trials,
    **({"early_exit": early_exit} if HAS_EARLY_EXIT else {}),
}


def _log_replacements(out: Path) -> list[str]:
    replaced: list[str] = []
    real = os.replace

    def spy(src, dst, *a, **k):
        dst_path = Path(dst).resolve()
        inside = dst_path.is_relative_to(out.resolve())
        replaced.append(str(dst_path.relative_to(out.resolve()) if inside else dst_path))
        return real(src, dst, *a, **k)

    os.replace = spy
    return replaced


def main(out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    distributed.setup("cpu")
    replaced = _log_replacements(out)
    r = distributed.rank()
    for name in names:
        model = SCENARIOS[name](out)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(out / f"{name}.rank{r}.safetensors"))
    (out / f"replaced.rank{r}.json").write_text(json.dumps(replaced))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(SCENARIOS))
