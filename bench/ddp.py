"""Data-parallel training: LeNet-5 on Fashion-MNIST, 1 vs 2 processes under torchrun (gloo, CPU).

Each run is a real ``torchrun --standalone --nproc_per_node=N`` launch of this file in worker
mode: the same model init, seed and *global* batch (128) for both, so they see the same batches
(the 2-process run splits each into 64 + 64). The gradients agree up to float rounding
(tests/core/test_distributed.py: |dw| < 1e-6 after ~30 steps), but over an epoch (430 Adam steps)
rounding differences grow, mostly in weights whose gradients are near zero, where Adam's
normalised step turns noise into full-size updates; a control run (1 process, 2 torch threads:
only the summation order inside the kernels changes) measures how far rounding alone goes.
Runs alternate 1, 2, 1, 2, ... (one interleaved sequence, since other agents load this
machine); the speed figure is the median over runs of (1-process epoch time / 2-process
epoch time), with its spread. One torch thread per process, so 2 processes use 2 cores and
1 process 1 core: the ratio is what adding a second worker buys here, not a GPU figure (no
GPU was available to this session).

    .venv/bin/python bench/ddp.py                 # 1 epoch, 2 runs each -> bench/results/ddp.json
    .venv/bin/python bench/ddp.py --epochs 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

BATCH, LR, SEED = 128, 1e-3, 0


def worker(out: Path, epochs: int, threads: int = 1) -> None:
    """One training run (every rank runs this; rank 0 writes the result)."""
    from deepshrink import distributed
    from deepshrink.data import load_fashion_mnist
    from deepshrink.models import create_model
    from deepshrink.train import Callback, TrainConfig, evaluate, train

    torch.set_num_threads(threads)
    distributed.setup("cpu")
    data = load_fashion_mnist()
    torch.manual_seed(SEED)
    model = create_model("lenet5", in_size=28, num_classes=10)

    times: list[float] = []

    class Clock(Callback):  # wall time of each epoch's training steps (validation excluded)
        def on_epoch_begin(self, state: Any) -> None:
            distributed.barrier()
            self.t0 = self.t1 = time.perf_counter()

        def on_step_end(self, state: Any) -> None:
            self.t1 = time.perf_counter()

        def on_epoch_end(self, state: Any, metrics: dict[str, float]) -> None:
            times.append(self.t1 - self.t0)

    res = train(model, data, TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, seed=SEED,
                                         progress=False), callbacks=[Clock()])
    test = evaluate(model, data.loader("test", 1000))
    if distributed.is_main():
        flat = torch.cat([p.detach().flatten() for p in model.state_dict().values()])
        torch.save(flat, out.with_suffix(".weights.pt"))
        out.write_text(json.dumps({
            "processes": distributed.world_size(), "threads": threads, "epoch_seconds": times,
            "steps": res.steps, "history": res.history, "test_top1": test["top1"],
            "val_top1": res.history[-1].get("val_top1")}))
    distributed.shutdown()


def launch(n: int, epochs: int, tmp: Path, k: int, threads: int = 1) -> dict[str, Any]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp / f"run{k}-n{n}-t{threads}.json"
    cmd = [torchrun, "--standalone", f"--nproc_per_node={n}", __file__, "--worker", str(out),
           "--epochs", str(epochs), "--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    res = json.loads(out.read_text())
    res["launch_seconds"] = time.perf_counter() - t0
    res["weights"] = torch.load(out.with_suffix(".weights.pt"), weights_only=True)
    return res


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    one = [r for r in runs if r["processes"] == 1 and r["threads"] == 1]
    two = [r for r in runs if r["processes"] == 2]
    control = [r for r in runs if r["threads"] == 2]
    # Pair each 2-process run with the 1-process run just before it, epoch by epoch.
    ratios = [a / b for r1, r2 in zip(one, two, strict=False)
              for a, b in zip(r1["epoch_seconds"], r2["epoch_seconds"], strict=True)]
    return {
        "pairs": len(ratios),
        "speedup_2_over_1_median": statistics.median(ratios) if ratios else None,
        "speedup_2_over_1_min": min(ratios, default=None),
        "speedup_2_over_1_max": max(ratios, default=None),
        "epoch_seconds_1proc": [t for r in one for t in r["epoch_seconds"]],
        "epoch_seconds_2proc": [t for r in two for t in r["epoch_seconds"]],
        "test_top1_1proc": [r["test_top1"] for r in one],
        "test_top1_2proc": [r["test_top1"] for r in two],
        "max_abs_weight_diff_2proc_vs_1proc":
            max(float((r["weights"] - one[0]["weights"]).abs().max()) for r in two) if two else None,
        "mean_abs_weight_diff_2proc_vs_1proc":
            max(float((r["weights"] - one[0]["weights"]).abs().mean()) for r in two) if two else None,
        "max_abs_weight_diff_1proc_repeats":
            max(float((r["weights"] - one[0]["weights"]).abs().max()) for r in one),
        # Control: the same 1-process run with 2 torch threads (only the float summation order
        # inside the kernels changes) shows how far rounding alone moves the weights.
        "control_1proc_2threads_max_abs_weight_diff":
            float((control[0]["weights"] - one[0]["weights"]).abs().max()) if control else None,
        "control_1proc_2threads_mean_abs_weight_diff":
            float((control[0]["weights"] - one[0]["weights"]).abs().mean()) if control else None,
        "control_1proc_2threads_test_top1": control[0]["test_top1"] if control else None,
    }


def save(runs: list[dict[str, Any]], args: argparse.Namespace, load_before: tuple[float, ...],
         complete: bool) -> Path:
    return write_results("ddp", {
        "what": "LeNet-5 on Fashion-MNIST (55k train / 5k val / 10k test), Adam lr 1e-3 cosine, "
                f"global batch {BATCH}, seed {SEED}, {args.epochs} epoch(s); torchrun --standalone, "
                "gloo on CPU, 1 torch thread per process; epoch time = training steps only "
                "(validation excluded); runs interleaved 1,2,1,2, then one control run: 1 process "
                "with 2 torch threads",
        "command": f"python bench/ddp.py --epochs {args.epochs} --repeats {args.repeats}",
        "complete": complete,
        "gpu": "none available to this session: the nccl/cuda path was not run",
        "load_average_before": load_before, "load_average_now": os.getloadavg(),
        "load_note": "2-core machine shared with other agents: a load average above 2 means "
                     "these processes competed for CPU with other work, so absolute times are "
                     "inflated and the ratio is noisy",
        "summary": summarize(runs),
        "runs": [{k: v for k, v in r.items() if k != "weights"} for r in runs],
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.epochs, args.threads)
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for n in (1, 2):  # interleaved: 1, 2, 1, 2, ...
                runs.append(launch(n, args.epochs, Path(tmp), k))
                r = runs[-1]
                print(f"run {k} n={n}: epochs {[round(t, 1) for t in r['epoch_seconds']]} s, "
                      f"test top-1 {100 * r['test_top1']:.2f}%, load {os.getloadavg()[0]:.1f}",
                      flush=True)
            path = save(runs, args, load_before, complete=False)
        runs.append(launch(1, args.epochs, Path(tmp), args.repeats, threads=2))
        path = save(runs, args, load_before, complete=True)
    for key, v in summarize(runs).items():
        print(f"{key}: {v}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
