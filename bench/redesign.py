"""Architecture redesign: low-rank factorization and depthwise-separable substitution (issue 10).

Parts (each writes its section of bench/results/redesign.json; run all, or some with --only):

* ``cnn-baseline``: trains the registry's ``vgg_small`` on Fashion-MNIST to its own baseline
  -> bench/results/vgg_small.safetensors (skipped when that file exists, unless --retrain).
* ``lowrank-lenet300``: LeNet-300-100 (bench/results/lenet300.safetensors) factorized at several
  global parameter budgets (ranks by measured sensitivity), KD fine-tuned from the original;
  the smallest model within 0.5 pt of the baseline *on validation* is committed as
  bench/results/lenet300-lowrank.safetensors; test accuracy is reported for every point.
* ``mlp-seed``: the seed MLP (Dense 128) on digits, its hidden layer factorized at fixed ranks.
* ``conv-forms``: conv SVD (k x k with r filters + 1 x 1) vs Tucker-2 on the trained CNN's convs
  at equal parameter counts: output error and layer latency (why the default form is chosen).
* ``separable``: the CNN's convs -> depthwise + pointwise (least-squares fit on calibration data,
  KD fine-tune) -> bench/results/vgg_small-separable.safetensors; MACs of the replaced layers vs
  1/N + 1/k^2; latency b1/b256 interleaved against the original; accuracy.
* ``bert``: low-rank FFN and attention projections of a random-init transformers BERT encoder.
* ``compose``: separable CNN -> int8 ONNX, low-rank LeNet-300 -> .dsz: sizes and accuracies.

    nice .venv/bin/python bench/redesign.py                 # everything (~25 min, 1 thread)
    .venv/bin/python bench/redesign.py --only lowrank-lenet300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results
from deepshrink import load, save
from deepshrink.data import load_fashion_mnist
from deepshrink.measure import count_macs, count_params, file_bytes
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, evaluate, train

CNN = "vgg_small"
CNN_TRAIN = TrainConfig(epochs=2, batch_size=128, lr=2e-3, keep_best=True, seed=0)


def _acc(model: Any, data: Any, split: str) -> float:
    return evaluate(model, data.loader(split, 500))["top1"]


def cnn_baseline(args: argparse.Namespace) -> dict[str, Any]:
    path = RESULTS / f"{CNN}.safetensors"
    data = load_fashion_mnist()
    if path.exists() and not args.retrain:
        model = load(path)
        meta_note = "loaded (trained by an earlier run of this part)"
        train_s = None
    else:
        torch.manual_seed(0)
        model = create_model(CNN, in_size=data.in_size, num_classes=data.num_classes)
        t0 = time.perf_counter()
        train(model, data, CNN_TRAIN)
        train_s = time.perf_counter() - t0
        meta_note = "trained"
        save(model, path, extra={"dataset": "fashion-mnist", "train": CNN_TRAIN.to_dict()})
    x = data.test.tensors[0][:1]
    return {"model": CNN, "note": meta_note, "train_config": CNN_TRAIN.to_dict(), "train_seconds": train_s,
            "val_top1": _acc(model, data, "val"), "test_top1": _acc(model, data, "test"),
            "params": count_params(model)[0], "macs": count_macs(model, x)[0],
            "checkpoint": f"bench/results/{path.name}", "bytes": file_bytes(path)}


PARTS = {"cnn-baseline": cnn_baseline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(PARTS))
    ap.add_argument("--retrain", action="store_true", help="retrain the CNN baseline even if saved")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prev: dict[str, Any] = {}
    if (RESULTS / "redesign.json").exists():
        prev = json.loads((RESULTS / "redesign.json").read_text()).get("parts", {})
    for name in args.only or list(PARTS):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        res = PARTS[name](args)
        res["seconds"] = time.perf_counter() - t0
        prev[name] = res
        cmd = "python bench/redesign.py" + (f" --only {name}" if args.only else "")
        prev[name]["command"] = cmd
        write_results("redesign", {"command": "python bench/redesign.py", "threads": args.threads,
                                   "parts": prev})
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, default=str),
              flush=True)


if __name__ == "__main__":
    main()
