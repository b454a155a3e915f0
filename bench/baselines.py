"""Baselines: LeNet-300-100 and LeNet-5 on Fashion-MNIST, the seed MLP on digits.

Writes bench/results/baselines.json and the checkpoints bench/results/lenet300.safetensors and
bench/results/lenet5.safetensors that the pruning, quantization and sharing benches start from.

    .venv/bin/python bench/baselines.py            # all three
    .venv/bin/python bench/baselines.py --only mlp-digits
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results
from deepshrink import save
from deepshrink.data import load_digits, load_fashion_mnist
from deepshrink.measure import compare_latency, count_macs, count_params, file_bytes
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, evaluate, train

RUNS = {
    # name: (model, dataset, config, checkpoint file or None, accuracy floor)
    "lenet300-fmnist": ("lenet300", "fashion-mnist",
                        TrainConfig(epochs=25, batch_size=128, lr=1e-3, keep_best=True, seed=0),
                        "lenet300.safetensors", 0.890),
    "lenet5-fmnist": ("lenet5", "fashion-mnist",
                      TrainConfig(epochs=20, batch_size=128, lr=1e-3, augment="shift",
                                  keep_best=True, seed=0),
                      "lenet5.safetensors", 0.905),
    "mlp-digits": ("mlp", "digits",
                   TrainConfig(epochs=40, batch_size=64, lr=2e-3, keep_best=True, seed=0),
                   None, 0.95),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", action="append", choices=sorted(RUNS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for training (latency is timed with the default count)")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    out: dict[str, dict] = {}
    for name in args.only or list(RUNS):
        model_name, dataset, cfg, ckpt, floor = RUNS[name]
        data = load_fashion_mnist() if dataset == "fashion-mnist" else load_digits()
        torch.manual_seed(cfg.seed)
        model = create_model(model_name, in_size=data.in_size, num_classes=data.num_classes)
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        res = train(model, data, cfg)
        train_s = time.perf_counter() - t0
        torch.set_num_threads(default_threads)
        test = evaluate(model, data.loader("test", 1000))
        params, _ = count_params(model)
        macs, _ = count_macs(model, data.test.tensors[0][:1])
        lat = {b: compare_latency({"fp32": model}, data.test.tensors[0][:1].expand(
            b, *data.input_shape).contiguous())["fp32"].to_dict() for b in (1, 256)}
        row = {"model": model_name, "dataset": dataset, "splits": data.sizes(),
               "train_config": cfg.to_dict(), "train_seconds": train_s, "train_threads": args.threads,
               "best_val_top1": res.best_val_top1, "test": test, "params": params, "macs": macs,
               "latency": lat, "floor": floor, "meets_floor": test["top1"] >= floor}
        if ckpt:
            path = save(model, RESULTS / ckpt, extra={"dataset": dataset, "test": test,
                                                     "train": cfg.to_dict()})
            row.update(checkpoint=f"bench/results/{ckpt}", bytes=file_bytes(path))
        out[name] = row
        print(f"{name}: test top-1 {100 * test['top1']:.2f}% (floor {100 * floor:.1f}%), "
              f"{train_s:.0f} s", flush=True)
    prev = {}
    if (RESULTS / "baselines.json").exists() and args.only:
        import json

        prev = json.loads((RESULTS / "baselines.json").read_text()).get("runs", {})
    write_results("baselines", {"command": "python bench/baselines.py", "runs": {**prev, **out}})


if __name__ == "__main__":
    main()
