"""Architecture redesign: low-rank factorization and depthwise-separable substitution (issue 10).

Parts (each writes its section of bench/results/redesign.json; run all, or some with --only):

* ``cnn-baseline``: trains the registry's ``vgg_small`` on Fashion-MNIST to its own baseline
  -> bench/results/vgg_small.safetensors (skipped when that file exists, unless --retrain).
* ``lowrank-lenet300``: LeNet-300-100 (bench/results/lenet300.safetensors) factorized at several
  global parameter budgets (ranks by measured sensitivity), KD fine-tuned from the original;
  the smallest model within 0.5 pt of the baseline *on validation* is committed as
  bench/results/lenet300-lowrank.safetensors; test accuracy is reported for every point.
* ``mlp-seed``: the seed MLP (Dense 128) on digits, its hidden layer factorized at fixed ranks.
* ``conv-forms``: conv SVD (k x k with r filters + 1 x 1) vs Tucker-2 vs CP on the trained CNN's convs
  at equal parameter counts: output error and layer latency (why the default form is chosen).
* ``separable``: the CNN's convs -> depthwise + pointwise (least-squares fit on calibration data,
  KD fine-tune) -> bench/results/vgg_small-separable.safetensors; MACs of the replaced layers vs
  1/N + 1/k^2 (``separable-measure``, with the accuracy).
* ``separable-latency``: b1/b256 latency of the committed separable CNN against the original,
  interleaved, in eager PyTorch (NCHW and channels-last) and ONNX Runtime (run it alone).
* ``bert``: low-rank FFN and attention projections of a random-init transformers BERT encoder.
* ``compose``: separable CNN -> int8 ONNX, low-rank LeNet-300 -> .dsz: sizes and accuracies.

    nice .venv/bin/python bench/redesign.py                 # everything (~25 min, 1 thread)
    .venv/bin/python bench/redesign.py --only lowrank-lenet300
    .venv/bin/python bench/redesign.py --only separable-latency   # timing only, on a quiet machine
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results
from deepshrink import load, save
from deepshrink.data import load_digits, load_fashion_mnist
from deepshrink.distill import KDConfig
from deepshrink.measure import compare_latency, count_macs, count_params, file_bytes
from deepshrink.models import create_model
from deepshrink.redesign import (
    LowRankConfig,
    SeparableConfig,
    factorize_with_report,
    recover,
    separate_with_report,
)
from deepshrink.redesign import common as rd_common
from deepshrink.redesign import lowrank as rd_lowrank
from deepshrink.train import TrainConfig, evaluate, train

CNN = "vgg_small"
CNN_TRAIN = TrainConfig(epochs=2, batch_size=128, lr=2e-3, keep_best=True, seed=0)
SEP_STEPS = None  # one full epoch of KD fine-tuning


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


LENET_BUDGETS = (0.5, 0.33, 0.25, 0.2, 0.15, 0.1)
LENET_FT = TrainConfig(epochs=3, batch_size=128, lr=5e-4, keep_best=True, seed=0, progress=False)
KD = KDConfig(temperature=4.0, alpha=0.9)


def _point(model: Any, data: Any, base_params: int, x: Any) -> dict[str, Any]:
    params = count_params(model)[0]
    return {"params": params, "params_ratio": base_params / params, "macs": count_macs(model, x)[0],
            "val_top1": _acc(model, data, "val"), "test_top1": _acc(model, data, "test")}


def lowrank_lenet300(args: argparse.Namespace) -> dict[str, Any]:
    data = load_fashion_mnist()
    base = load(RESULTS / "lenet300.safetensors")
    x = data.test.tensors[0][:1]
    base_row = _point(base, data, count_params(base)[0], x)
    bp = base_row["params"]
    curve, energy_curve = [], []
    for e in (0.5, 0.7, 0.8, 0.9, 0.95):  # kept energy, no fine-tuning: what the SVD alone keeps
        m = copy.deepcopy(base)
        rep = factorize_with_report(m, LowRankConfig(energy=e, check_speed=False), example_inputs=x)
        energy_curve.append({"energy": e, "ranks": {r.name: r.rank for r in rep.rewritten},
                             **_point(m, data, bp, x)})
    best = None
    for budget in LENET_BUDGETS:
        m = copy.deepcopy(base)
        cfg = LowRankConfig(budget=budget, calibration_batches=8, speed_batch=256)
        rep = factorize_with_report(m, cfg, calibration=data)
        before = _acc(m, data, "val")
        recover(m, data, LENET_FT, teacher=base, kd=KD)
        row = {"budget": budget, "ranks": {r.name: r.rank for r in rep.rewritten},
               "skipped": {r.name: r.reason for r in rep.skipped}, "notes": rep.notes,
               "val_top1_before_finetune": before, **_point(m, data, bp, x)}
        row["val_drop_pt"] = 100 * (base_row["val_top1"] - row["val_top1"])
        row["test_drop_pt"] = 100 * (base_row["test_top1"] - row["test_top1"])
        curve.append(row)
        print(f"  budget {budget}: {row['params']} params ({row['params_ratio']:.2f}x), val "
              f"{100 * row['val_top1']:.2f}% test {100 * row['test_top1']:.2f}%", flush=True)
        if row["val_drop_pt"] <= 0.5 and (best is None or row["params"] < best[0]["params"]):
            best = (row, m)
    # The KD switch: the same budget recovered with plain cross-entropy.
    m = copy.deepcopy(base)
    factorize_with_report(m, LowRankConfig(budget=0.2, calibration_batches=8, speed_batch=256),
                          calibration=data)
    recover(m, data, LENET_FT)
    no_kd = {"budget": 0.2, **_point(m, data, bp, x)}
    out: dict[str, Any] = {"baseline": base_row, "energy_no_finetune": energy_curve, "budget_curve": curve,
                           "budget_0.2_without_kd": no_kd, "finetune": LENET_FT.to_dict(), "kd": KD.to_dict()}
    if best is not None:
        row, m = best
        path = save(m, RESULTS / "lenet300-lowrank.safetensors",
                    extra={"dataset": "fashion-mnist", "budget": row["budget"],
                           "test_top1": row["test_top1"]})
        reloaded = _acc(load(path), data, "test")
        out["chosen"] = {"budget": row["budget"], "params_ratio": row["params_ratio"],
                         "test_top1": row["test_top1"], "test_drop_pt": row["test_drop_pt"],
                         "checkpoint": "bench/results/lenet300-lowrank.safetensors",
                         "bytes": file_bytes(path),
                         "reloaded_test_top1": reloaded,
                         "floor": "params_ratio >= 3 and test_drop_pt <= 0.5",
                         "meets_floor": row["params_ratio"] >= 3 and row["test_drop_pt"] <= 0.5}
    return out


def mlp_seed(args: argparse.Namespace) -> dict[str, Any]:
    """The seed's narrow layer: Dense(128) of the seed MLP on digits -> Linear(64, r) Linear(r, 128)."""
    data = load_digits()
    torch.manual_seed(0)
    base = create_model("mlp", in_size=data.in_size, num_classes=data.num_classes)
    train(base, data, TrainConfig(epochs=40, batch_size=64, lr=2e-3, keep_best=True, seed=0, progress=False))
    x = data.test.tensors[0][:1]
    bp = count_params(base)[0]
    rows = [{"rank": None, **_point(base, data, bp, x)}]
    for rank in (32, 16, 8, 4):
        m = copy.deepcopy(base)
        cfg = LowRankConfig(rank=rank, ignore=("4",), check_speed=False)
        rep = factorize_with_report(m, cfg, example_inputs=x)
        fitted = _acc(m, data, "test")
        recover(m, data, TrainConfig(epochs=20, batch_size=64, lr=1e-3, keep_best=True, seed=0,
                                     progress=False), teacher=base, kd=KD)
        rows.append({"rank": rank, "layer": next(r.to_dict() for r in rep.layers if r.name == "2"),
                     "test_top1_before_finetune": fitted, **_point(m, data, bp, x)})
    return {"dataset": "digits", "model": "mlp (Flatten -> Dense 128 -> Dense 10)",
            "break_even_rank": 64 * 128 / (64 + 128), "rows": rows}


def _same_params_tucker(layer: Any, target: int) -> list[int]:
    """Tucker-2 ranks (same fraction of each channel mode) with about ``target`` weights."""
    o, i = layer.weight.shape[:2]
    best = [1, 1]
    for f in range(1, 1001):
        r = [max(1, round(i * f / 1000)), max(1, round(o * f / 1000))]
        if rd_lowrank.weight_params(layer, "tucker2", r) <= target:
            best = r
    return best


def conv_forms(args: argparse.Namespace) -> dict[str, Any]:
    """SVD vs Tucker-2 on the trained CNN's convs at equal weight counts."""
    data = load_fashion_mnist()
    base = load(RESULTS / f"{CNN}.safetensors")
    batches = rd_common.batches_for(None, data, 2)
    convs = [(n, m) for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    seen = rd_common.capture_inputs(base, [n for n, _ in convs], batches)
    rows = []
    for name, layer in convs:
        xs = torch.cat(seen[name].x)
        xt = rd_common.speed_input(seen[name], 64)
        with torch.no_grad():
            y = layer(xs)
        for frac in (0.5, 0.25):
            target = int(frac * layer.weight.numel())
            r_svd = [max(1, target // rd_lowrank.weight_params(layer, "conv_svd", [1]))]
            r_tk = _same_params_tucker(layer, target)
            r_cp = [max(1, target // rd_lowrank.weight_params(layer, "cp", [1]))]
            row: dict[str, Any] = {"layer": name, "shape": list(layer.weight.shape), "weights_fraction": frac}
            for form, r in (("conv_svd", r_svd), ("tucker2", r_tk), ("cp", r_cp)):
                new = rd_lowrank.factorized(layer, form, r).eval()
                with torch.no_grad():
                    err = rd_common.relative_error(new(xs), y)
                row[form] = {"rank": r, "weights": rd_lowrank.weight_params(layer, form, r),
                             "output_error": err, "speedup_b64": rd_common.speed_ratio(layer, new, xt)}
            rows.append(row)
    forms = ("conv_svd", "tucker2", "cp")
    lowest_error = {f: sum(min(forms, key=lambda g: r[g]["output_error"]) == f for r in rows) for f in forms}
    fastest = {f: sum(max(forms, key=lambda g: r[g]["speedup_b64"]) == f for r in rows) for f in forms}
    slower = {f: sum(r[f]["speedup_b64"] < 1 for r in rows) for f in forms}
    return {"layers": rows, "points": len(rows), "lowest_output_error_count": lowest_error,
            "fastest_count": fastest, "slower_than_original_count": slower,
            "load_avg_1_5_15": os.getloadavg()}


def conv_forms_model(args: argparse.Namespace) -> dict[str, Any]:
    """The CNN with every conv (but the 1-channel stem) at half its weights in each form, no
    fine-tuning: validation accuracy."""
    from deepshrink.modeling import set_submodule

    data = load_fashion_mnist()
    base = load(RESULTS / f"{CNN}.safetensors")
    out: dict[str, Any] = {"baseline_val_top1": _acc(base, data, "val")}
    for form in ("conv_svd", "tucker2", "cp"):
        m = copy.deepcopy(base)
        ranks = {}
        for name, layer in list(m.named_modules()):
            if isinstance(layer, torch.nn.Conv2d) and layer.in_channels > 1:
                target = layer.weight.numel() // 2
                r = (_same_params_tucker(layer, target) if form == "tucker2"
                     else [max(1, target // rd_lowrank.weight_params(layer, form, [1]))])
                ranks[name] = r
                set_submodule(m, name, rd_lowrank.factorized(layer, form, r))
        out[form] = {"ranks": ranks, "params": count_params(m)[0], "val_top1": _acc(m, data, "val")}
    return out


def separable(args: argparse.Namespace) -> dict[str, Any]:
    data = load_fashion_mnist()
    base = load(RESULTS / f"{CNN}.safetensors")
    sep = copy.deepcopy(base)
    cfg = SeparableConfig(calibration_batches=8, speed_batch=256)
    rep = separate_with_report(sep, cfg, calibration=data)
    fitted_val = _acc(sep, data, "val")
    print(f"  fitted (no fine-tuning): val {100 * fitted_val:.2f}%", flush=True)
    # A short recovery (one epoch): the least-squares fit already keeps most of the accuracy.
    # The teacher runs live on each batch (no caching pass over the whole training set).
    ft = TrainConfig(epochs=1, max_steps=SEP_STEPS, batch_size=128, lr=1e-3, seed=0, progress=False)
    kd = KDConfig(temperature=4.0, alpha=0.9, cache=False)
    t0 = time.perf_counter()
    recover(sep, data, ft, teacher=base, kd=kd)
    ft_s = time.perf_counter() - t0
    path = save(sep, RESULTS / f"{CNN}-separable.safetensors",
                extra={"dataset": "fashion-mnist", "separable": cfg.to_dict(), "finetune": ft.to_dict()})
    return {"config": cfg.to_dict(), "report": rep.to_dict(), "fitted_val_top1": fitted_val,
            "finetune": ft.to_dict(), "finetune_seconds": ft_s, "kd": kd.to_dict(),
            "checkpoint": f"bench/results/{path.name}"}


def separable_measure(args: argparse.Namespace) -> dict[str, Any]:
    """The committed separable CNN against the original: MACs of the replaced layers (counted)
    vs 1/N + 1/k^2, latency b1/b256 interleaved, test accuracy, file reload."""
    data = load_fashion_mnist()
    base = load(RESULTS / f"{CNN}.safetensors")
    path = RESULTS / f"{CNN}-separable.safetensors"
    sep = load(path)
    x = data.test.tensors[0][:1]
    base_macs, sep_macs = count_macs(base, x)[1], count_macs(sep, x)[1]
    layers = []
    for name, mod in sep.named_modules():
        if not (isinstance(mod, torch.nn.Sequential) and name and isinstance(mod[0], torch.nn.Conv2d)
                and mod[0].groups > 1):
            continue
        o, i, kh, kw = base.get_submodule(name).weight.shape
        counted = sum(v for k, v in sep_macs.items() if k.startswith(name + "."))
        layers.append({"layer": name, "shape": [o, i, kh, kw], "macs_before": base_macs[name],
                       "macs_after_counted": counted, "ratio": counted / base_macs[name],
                       "hand_ratio_1/N+1/k2": 1 / o + 1 / (kh * kw)})
    before = sum(v["macs_before"] for v in layers)
    after = sum(v["macs_after_counted"] for v in layers)
    base_test, sep_test = _acc(base, data, "test"), _acc(sep, data, "test")
    drop = 100 * (base_test - sep_test)
    return {"layers": layers, "replaced_macs_ratio": before / after,
            "baseline_test_top1": base_test, "test_top1": sep_test, "test_drop_pt": drop,
            "params": [count_params(base)[0], count_params(sep)[0]],
            "macs": [count_macs(base, x)[0], count_macs(sep, x)[0]],
            "checkpoint": f"bench/results/{path.name}", "bytes": file_bytes(path),
            "original_bytes": file_bytes(RESULTS / f"{CNN}.safetensors"),
            "floor": "replaced MACs >= 4x fewer and drop <= 1.0 pt here; >= 1.5x faster at b256 in "
                     "the separable-latency part",
            "meets_macs_and_accuracy_floors": before / after >= 4 and drop <= 1.0}


def _paths(base: Any, sep: Any, x: Any, tmp: Path) -> dict[str, tuple[Any, Any, Any]]:
    """The same two models on three execution paths: (original, separable, input)."""
    from deepshrink.quantization import OrtModel, export_onnx

    cl = torch.channels_last
    onnx = {}
    for name, m in (("original", base), ("separable", sep)):
        export_onnx(m, tmp / f"{name}.onnx", x[:1])
        onnx[name] = OrtModel(tmp / f"{name}.onnx", threads=1)
    return {"torch": (base, sep, x),
            "torch_channels_last": (copy.deepcopy(base).to(memory_format=cl),
                                    copy.deepcopy(sep).to(memory_format=cl), x.contiguous(memory_format=cl)),
            "onnxruntime": (onnx["original"], onnx["separable"], x)}


def separable_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Latency of the committed separable CNN against the original, b1 and b256, on three
    execution paths, each applied to both models alike: eager PyTorch (NCHW, as loaded), eager
    PyTorch in channels-last memory format, and ONNX Runtime (1 thread). Interleaved: each round
    times the original then the separable model; the ratio's median and range over rounds."""
    import tempfile

    data = load_fashion_mnist()
    base = load(RESULTS / f"{CNN}.safetensors").eval()
    sep = load(RESULTS / f"{CNN}-separable.safetensors").eval()
    out: dict[str, Any] = {"load_avg_1_5_15_before": os.getloadavg(), "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for b in (1, 256):
            xb = data.test.tensors[0][:b].contiguous()
            for path, (m0, m1, xin) in _paths(base, sep, xb, Path(tmp)).items():
                ratios, ms = [], []
                for _ in range(args.rounds):
                    t = compare_latency({"original": m0, "separable": m1}, xin, rounds=1,
                                        repeats=5 if b > 1 else 50)
                    ratios.append(t["original"].median_ms / t["separable"].median_ms)
                    ms.append((t["original"].median_ms, t["separable"].median_ms))
                out.setdefault(path, {})[f"b{b}"] = {
                    "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                    "speedup_max": max(ratios), "original_ms_median": statistics.median(m[0] for m in ms),
                    "separable_ms_median": statistics.median(m[1] for m in ms)}
                print(f"  {path} b{b}: {statistics.median(ratios):.2f}x "
                      f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    out["load_avg_1_5_15_after"] = os.getloadavg()
    out["floor"] = "separable >= 1.5x faster than the original at batch 256 (median of rounds)"
    out["meets_floor_by_path"] = {p: out[p]["b256"]["speedup_median"] >= 1.5
                                  for p in ("torch", "torch_channels_last", "onnxruntime")}
    return out


BERT = {"model_type": "bert", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024, "vocab_size": 1000, "max_position_embeddings": 128}


def bert(args: argparse.Namespace) -> dict[str, Any]:
    """Low-rank FFN and attention projections of a random-init BERT encoder: sizes, MACs, speed,
    save -> load. Random weights have flat spectra, so no accuracy claim is made (the output
    error is reported to show what rank 64 of 256 costs an untrained network)."""
    import tempfile

    from deepshrink.modeling import forward

    torch.manual_seed(0)
    base = create_model("hf", arch="BertModel", config=BERT).eval()
    ids = torch.randint(0, BERT["vocab_size"], (8, 128))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = copy.deepcopy(base)
    cfg = LowRankConfig(rank=64, ignore=(r"pooler\..*",), speed_batch=8)
    rep = factorize_with_report(model, cfg, example_inputs=inputs)
    ref, out = forward(base, inputs), forward(model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        back = load(save(model, Path(tmp) / "bert-lowrank.safetensors"))
        reload_diff = float((forward(back, inputs) - out).abs().max())
    ratios = []
    for _ in range(5):
        t = compare_latency({"original": base, "lowrank": model}, inputs, rounds=1, repeats=3)
        ratios.append(t["original"].median_ms / t["lowrank"].median_ms)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean()
    return {"config": BERT, "inputs": "batch 8 x seq 128", "lowrank": cfg.to_dict(),
            "rewritten": len(rep.rewritten), "skipped": {r.name: r.reason for r in rep.skipped},
            "encoder_linear_params": rep.totals(), "params": [count_params(base)[0], count_params(model)[0]],
            "macs": [count_macs(base, inputs)[0], count_macs(model, inputs)[0]],
            "speedup_b8_median": statistics.median(ratios), "speedup_b8_range": [min(ratios), max(ratios)],
            "output_cosine_vs_original_random_init": float(cos), "save_load_max_abs_diff": reload_diff}


def compose(args: argparse.Namespace) -> dict[str, Any]:
    """The redesigned models through the other families: separable CNN -> static int8 ONNX;
    low-rank LeNet-300 -> 5-bit weight sharing -> .dsz (Huffman-coded)."""
    import tempfile

    from deepshrink.dsz import pack
    from deepshrink.quantization import OrtModel, PTQConfig, export_onnx, quantize
    from deepshrink.sharing import KMeansConfig, share

    data = load_fashion_mnist()
    test = data.loader("test", 500)
    res: dict[str, Any] = {}
    sep = load(RESULTS / f"{CNN}-separable.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        q = quantize(copy.deepcopy(sep), PTQConfig(mode="static", bits=8, calibration_batches=8),
                     calibration=data)
        onnx = export_onnx(q, Path(tmp) / "sep-int8.onnx", data.test.tensors[0][:1])
        res["separable_int8_onnx"] = {
            "from": f"bench/results/{CNN}-separable.safetensors",
            "fp32_bytes": file_bytes(RESULTS / f"{CNN}-separable.safetensors"),
            "int8_onnx_bytes": len(onnx), "fp32_test_top1": evaluate(sep, test)["top1"],
            "int8_onnx_test_top1": evaluate(OrtModel(Path(tmp) / "sep-int8.onnx"), test)["top1"],
            "original_fp32_bytes": file_bytes(RESULTS / f"{CNN}.safetensors")}
        lr = load(RESULTS / "lenet300-lowrank.safetensors")
        shared = share(copy.deepcopy(lr), KMeansConfig(bits=5))
        rep = pack(shared, Path(tmp) / "lenet300-lowrank.dsz")
        back = load(Path(tmp) / "lenet300-lowrank.dsz")
        res["lowrank_dsz"] = {
            "from": "bench/results/lenet300-lowrank.safetensors",
            "fp32_bytes": file_bytes(RESULTS / "lenet300-lowrank.safetensors"), "dsz_bytes": rep.bytes,
            "original_lenet300_bytes": file_bytes(RESULTS / "lenet300.safetensors"),
            "fp32_test_top1": evaluate(lr, test)["top1"], "dsz_test_top1": evaluate(back, test)["top1"],
            "sharing": "5-bit k-means per layer, no centroid fine-tuning"}
    return res


PARTS = {"cnn-baseline": cnn_baseline, "lowrank-lenet300": lowrank_lenet300, "mlp-seed": mlp_seed,
         "conv-forms": conv_forms, "conv-forms-model": conv_forms_model, "separable": separable,
         "separable-measure": separable_measure, "separable-latency": separable_latency,
         "bert": bert, "compose": compose}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(PARTS))
    ap.add_argument("--retrain", action="store_true", help="retrain the CNN baseline even if saved")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of latency parts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.only or list(PARTS):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        res = PARTS[name](args)
        res["seconds"] = time.perf_counter() - t0
        prev: dict[str, Any] = {}  # re-read: other parts may have been run meanwhile
        if (RESULTS / "redesign.json").exists():
            prev = json.loads((RESULTS / "redesign.json").read_text()).get("parts", {})
        prev[name] = res
        cmd = "python bench/redesign.py" + (f" --only {name}" if args.only else "")
        prev[name]["command"] = cmd
        write_results("redesign", {"command": "python bench/redesign.py", "threads": args.threads,
                                   "parts": prev})
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, default=str),
              flush=True)


if __name__ == "__main__":
    main()
