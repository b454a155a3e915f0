"""Early exits (BranchyNet) on Fashion-MNIST: LeNet-5 (from the committed baseline) and the
registry's resnet_small (trained here). Exit heads are trained on the frozen backbone with
distillation from the final head (so the final head is exactly the original model); thresholds
are calibrated on the validation split to 0.5 and 1.0 accuracy points below the original;
accuracy, exit shares and mean MACs per sample on the test split; latency at batch 1 (per
sample, over test images, so each sample takes its own exit) and batch 256, interleaved
against the original model.

Training/accuracy parts and timing parts are separate, so that on a shared machine the training
runs under a CPU-sharing lock and only the timing runs alone:

    heavy python bench/early_exit.py --only lenet5 --only resnet_small --no-latency
    quiet python bench/early_exit.py --only latency   # torch latency of the committed models
    quiet python bench/early_exit.py --only onnx      # ONNX Runtime part, from the committed models
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepshrink as ds
from _common import RESULTS, write_results
from deepshrink.checkpoint import read_metadata
from deepshrink.data import load_fashion_mnist
from deepshrink.early_exit import (
    CalibrationConfig,
    ExitConfig,
    ExitTrainConfig,
    add_exits,
    calibrate,
    evaluate_exits,
    train_exits,
)
from deepshrink.early_exit.policy import score_policies
from deepshrink.train import TrainConfig, evaluate, train

BUDGETS = (0.5, 1.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def interleaved(fns: dict[str, Any], inputs: list[torch.Tensor], rounds: int) -> dict[str, Any]:
    """Total time of each fn over all ``inputs``, alternating fns round by round; ratios of the
    first fn (the original) to each other, per round: median and range."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():  # warm-up
            for x in inputs[:5]:
                f(x)
        for _ in range(rounds):
            for name, f in fns.items():
                t0 = time.perf_counter()
                for x in inputs:
                    f(x)
                times[name].append(time.perf_counter() - t0)
    base = next(iter(fns))
    out: dict[str, Any] = {}
    for name in fns:
        ratios = [b / t for b, t in zip(times[base], times[name], strict=True)]
        out[name] = {"ms_per_call": 1e3 * statistics.median(times[name]) / len(inputs),
                     "speedup_vs_original": statistics.median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios)}
    return out


def latency(original: torch.nn.Module, multi: Any, data: Any, n_b1: int, rounds: int) -> dict[str, Any]:
    xs = data.test.tensors[0]
    b1 = [xs[i:i + 1] for i in range(n_b1)]
    b256 = [xs[i:i + 256] for i in range(0, 256 * 8, 256)]
    return {"batch1": {"samples": n_b1, "rounds": rounds,
                       **interleaved({"original": original, "exits": multi}, b1, rounds)},
            "batch256": {"batches": len(b256), "rounds": rounds,
                         **interleaved({"original": original, "exits": multi}, b256, rounds)}}


def run_model(name: str, original: torch.nn.Module, data: Any, exit_cfg: ExitConfig,
              train_cfg: ExitTrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    test_loader, val_loader = data.loader("test", 500), data.loader("val", 500)
    orig_test = evaluate(original, test_loader)["top1"]
    orig_val = evaluate(original, val_loader)["top1"]
    log(f"{name}: original test {100 * orig_test:.2f} %, val {100 * orig_val:.2f} %")
    import copy

    multi = add_exits(copy.deepcopy(original), exit_cfg, example_inputs=data.test.tensors[0][:2])
    t0 = time.perf_counter()
    hist = train_exits(multi, data, train_cfg)
    log(f"{name}: exits {multi.points} trained in {time.perf_counter() - t0:.0f} s")
    result: dict[str, Any] = {"original": {"test_top1": orig_test, "val_top1": orig_val},
                              "exit_config": exit_cfg.to_dict(), "train_config": train_cfg.to_dict(),
                              "train_seconds": time.perf_counter() - t0, "history": hist.history[-1],
                              "points": multi.points, "heads": multi.head_specs, "budgets": {}}
    chosen = {}
    for budget in BUDGETS:
        cal_cfg = CalibrationConfig(budget=budget, holdout=args.holdout)
        cal = calibrate(multi, cal_cfg, calibration=data, reference=original)
        rep = evaluate_exits(multi, test_loader, costs=cal.costs)
        chosen[budget] = list(multi.thresholds)
        result["budgets"][str(budget)] = {
            "calibration": cal_cfg.to_dict(),
            "thresholds": cal.thresholds, "val_top1": cal.val_top1, "val_shares": cal.shares,
            "test": rep.to_dict(), "test_drop_pt": 100 * (orig_test - rep.top1)}
        log(f"{name} budget {budget}: test {100 * rep.top1:.2f} % (drop "
            f"{100 * (orig_test - rep.top1):.2f} pt), {rep.mac_reduction:.2f}x fewer MACs, shares "
            f"{[round(s, 3) for s in rep.shares]}")
        if budget == BUDGETS[0]:
            result["costs"] = cal.costs.to_dict()
            curve = cal.curve
            test_pts = score_policies(multi, [p.thresholds for p in curve], test_loader)
            result["curve"] = [{"thresholds": p.thresholds, "val_top1": p.val_top1,
                                "test_top1": t.val_top1, "mean_macs": p.mean_macs,
                                "test_mean_macs": t.mean_macs, "val_shares": p.shares}
                               for p, t in zip(curve, test_pts, strict=True)]
    multi.set_policy(chosen[BUDGETS[0]])
    path = RESULTS / f"{name}-exits.safetensors"
    ds.save(multi, path, extra={"dataset": "fashion-mnist", "budget_pt": BUDGETS[0],
                                "test": result["budgets"][str(BUDGETS[0])]["test"]})
    back = ds.load(path)
    x = data.test.tensors[0][:512]
    result["reload_identical"] = bool(torch.equal(back(x), multi(x)))
    result["file"] = str(path.relative_to(RESULTS.parent.parent))
    if not args.no_latency:
        result["latency"] = measure(name, original, multi, data, args)
    return result


def measure(name: str, original: torch.nn.Module, multi: Any, data: Any,
            args: argparse.Namespace) -> dict[str, Any]:
    log(f"{name}: latency (batch 1 over {args.b1} test images, batch 256)")
    load_before = os.getloadavg()
    lat = latency(original, multi, data, args.b1, args.rounds)
    lat["load_avg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
    log(f"{name}: b1 {lat['batch1']['exits']['speedup_vs_original']:.2f}x, "
        f"b256 {lat['batch256']['exits']['speedup_vs_original']:.2f}x")
    return lat


def latency_part(data: Any, args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """Torch latency of the committed multi-exit models against their committed originals."""
    for name in ("lenet5", "resnet_small"):
        if name not in payload:
            continue
        original = ds.load(RESULTS / f"{name}.safetensors").eval()
        multi = ds.load(RESULTS / f"{name}-exits.safetensors").eval()
        payload[name]["latency"] = measure(name, original, multi, data, args)


def lenet5(data: Any, args: argparse.Namespace) -> dict[str, Any]:
    original = ds.load(RESULTS / "lenet5.safetensors")
    cfg = ExitConfig(pool=4, hidden=0)  # after pool1 (20x12x12) and pool2 (50x4x4)
    tc = ExitTrainConfig(mode="heads", alpha=0.5, train=TrainConfig(epochs=args.lenet_epochs, lr=2e-3,
                                                                     progress=False))
    return run_model("lenet5", original, data, cfg, tc, args)


def resnet_baseline(data: Any, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The registry's resnet_small trained here (the epoch with the best validation accuracy is
    kept) -> bench/results/resnet_small.safetensors; reused unless --retrain."""
    path = RESULTS / "resnet_small.safetensors"
    cfg = TrainConfig(epochs=args.resnet_epochs, lr=2e-3, batch_size=128, progress=True,
                      max_steps=args.resnet_steps, keep_best=True, seed=0)
    if path.exists() and not args.retrain:
        log("resnet_small: baseline loaded from the committed file")
        return ds.load(path), {"note": "loaded from the committed file (trained by an earlier run)",
                               "extra": read_metadata(path).get("extra")}
    torch.manual_seed(0)
    original = ds.create_model("resnet_small")
    t0 = time.perf_counter()
    hist = train(original, data, cfg)
    info = {"train_config": cfg.to_dict(), "train_seconds": time.perf_counter() - t0,
            "best_val_top1": hist.best_val_top1, "history": hist.history}
    log(f"resnet_small: baseline trained in {info['train_seconds']:.0f} s, best val {hist.best_val_top1}")
    ds.save(original, path, extra={"dataset": "fashion-mnist", "train": json.dumps(cfg.to_dict())})
    return original, info


def resnet_small(data: Any, args: argparse.Namespace) -> dict[str, Any]:
    original, info = resnet_baseline(data, args)
    cfg = ExitConfig(points=("stem", "layers.0", "layers.1"), pool=4, hidden=128)
    heads = TrainConfig(epochs=args.head_epochs, lr=2e-3, progress=False, max_steps=args.head_steps)
    tc = ExitTrainConfig(mode="heads", alpha=0.5, train=heads)
    res = run_model("resnet_small", original, data, cfg, tc, args)
    res["baseline_training"] = info
    res["baseline_file"] = "bench/results/resnet_small.safetensors"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("lenet5", "resnet_small", "latency", "onnx"), action="append")
    ap.add_argument("--no-latency", action="store_true", help="skip timing (run --only latency alone)")
    ap.add_argument("--retrain", action="store_true", help="retrain resnet_small even if committed")
    ap.add_argument("--holdout", type=float, default=0.5, help="validation share that only checks the budget")
    ap.add_argument("--lenet-epochs", type=int, default=2)
    ap.add_argument("--resnet-epochs", type=int, default=4)
    ap.add_argument("--head-epochs", type=int, default=2)
    ap.add_argument("--resnet-steps", type=int, default=None, help="cap on baseline optimizer steps")
    ap.add_argument("--head-steps", type=int, default=None, help="cap on exit-head optimizer steps")
    ap.add_argument("--b1", type=int, default=300, help="test images timed one by one")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist()
    out_path = RESULTS / "early_exit.json"
    payload: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    payload.pop("machine", None)
    command = "python bench/early_exit.py " + " ".join(sys.argv[1:])
    only = args.only or ["lenet5", "resnet_small"]
    for part in only:
        payload.setdefault("commands", {})[part] = command
    parts = {"lenet5": lenet5, "resnet_small": resnet_small}
    for name, fn in parts.items():
        if name in only:
            payload[name] = fn(data, args)
            write_results("early_exit", payload)
    if "latency" in only:
        latency_part(data, args, payload)
    if "onnx" in only:
        from early_exit_onnx import onnx_part

        payload["onnx"] = onnx_part(data, args)
    write_results("early_exit", payload)
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
