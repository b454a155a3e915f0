"""Pruning bench. Part "unstructured": LeNet-300-100 on Fashion-MNIST, iterative magnitude pruning
(Han et al. 2015) from the committed baseline to >= 92 % of weights removed at <= 0.3 pt test drop.
Eight prune -> fine-tune rounds (4 epochs each, masks kept by MaskCallback) on Zhu & Gupta's cubic
spacing; the fine-tune loss mixes cross-entropy with soft targets from the dense baseline
(``--kd 0``: plain cross-entropy).

Writes bench/results/pruning.json (its "unstructured" entry; other parts are kept) and
bench/results/lenet300-sparse.safetensors (masks made permanent: an ordinary checkpoint with zeros).

    .venv/bin/python bench/pruning.py                      # --part unstructured (default)
    .venv/bin/python bench/pruning.py --part structured    # runs bench/pruning_structured.py's part
    .venv/bin/python bench/pruning.py --part all

All choices (which weights survive each round, the best epoch) use the validation split; the
test split is read only for the report. Training and timing run on one thread (the machine is
shared; latency under contention is noisy, which is why every ratio comes from one interleaved run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results
from deepshrink import load, save
from deepshrink.data import load_fashion_mnist
from deepshrink.measure import compare_latency, count_params, file_bytes, layer_stats
from deepshrink.pruning import (
    MaskCallback,
    UnstructuredConfig,
    iterative_prune,
    make_permanent,
    measure_crossover,
    save_sparse,
    sensitivity_scan,
    to_sparse_inference,
)
from deepshrink.train import TrainConfig, evaluate, train

BASELINE = RESULTS / "lenet300.safetensors"
OUT_MODEL = RESULTS / "lenet300-sparse.safetensors"
# Han et al. 2015's LeNet-300-100 pattern (92 / 91 / 74 % per layer), shifted toward the big first
# layer so the whole model just clears 92 % of weights removed while the small, sensitive layers
# (see the sensitivity scan in the results) keep more: 784x300 at 92.5 %, 300x100 at 90 %, 100x10 at 70 %.
CONFIG = UnstructuredConfig(ratio=0.925, overrides={"4": 0.90, "6": 0.70})
# The alternative: one magnitude threshold over fc1 + fc2 (same total), the classifier at 70 %.
GLOBAL_CONFIG = UnstructuredConfig(ratio=0.9214, scope="global", overrides={"6": 0.70})
TARGET_REMOVED, TARGET_DROP_PT = 0.92, 0.3


def _baseline_top1() -> float | None:
    path = RESULTS / "baselines.json"
    if not path.exists():
        return None
    run = json.loads(path.read_text()).get("runs", {}).get("lenet300-fmnist")
    return run["test"]["top1"] if run else None


def _weights(model: torch.nn.Module) -> tuple[int, int]:
    """(total, non-zero) over the Linear weights only (what the pruning targets)."""
    rows = [r for r in layer_stats(model) if r.type in ("Linear", "PackedLayer", "SparseLinear")]
    return sum(r.params for r in rows), sum(r.nonzero for r in rows)


def kd_loss(teacher: torch.nn.Module, temperature: float = 4.0, alpha: float = 0.5) -> Any:
    """Cross-entropy plus Hinton's soft-target term from the dense baseline (fine-tuning aid)."""
    teacher.eval()

    def loss(outputs: torch.Tensor, targets: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            soft = F.softmax(teacher(batch[0]) / temperature, dim=1)
        kd = F.kl_div(F.log_softmax(outputs / temperature, dim=1), soft, reduction="batchmean")
        ce = F.cross_entropy(outputs, targets)
        return {"loss": (1 - alpha) * ce + alpha * temperature**2 * kd, "ce": ce, "kd": kd}

    return loss


def run_unstructured(rounds: int, epochs: int, final_epochs: int, baseline: Path,
                     out_model: Path = OUT_MODEL, lr: float = 1e-3, final_lr: float = 3e-4,
                     kd: float = 0.0, spacing: str = "geometric", scope: str = "layer") -> dict[str, Any]:
    t0 = time.perf_counter()
    data = load_fashion_mnist()
    model = load(baseline)
    test = data.loader("test", 1000)
    base_eval = evaluate(model, test)
    recorded = _baseline_top1() if baseline == BASELINE else None
    if recorded is not None and abs(recorded - base_eval["top1"]) > 1e-9:
        raise SystemExit(f"baseline accuracy {base_eval['top1']} differs from baselines.json {recorded}")
    dense = copy.deepcopy(model)
    base_params, base_nz = count_params(model)
    # Per-layer sensitivity of the baseline on the val split (informs the per-layer ratios above).
    sens = sensitivity_scan(model, data.loader("val", 1000), ratios=(0.5, 0.7, 0.8, 0.9, 0.925, 0.95))

    # Fine-tuning without the baseline's shift augmentation: on the val split, shift-augmented
    # fine-tuning lost ~2 pt against plain fine-tuning. Each round restarts a cosine schedule.
    ft = TrainConfig(epochs=epochs, batch_size=128, lr=lr, scheduler="cosine", augment="none",
                     keep_best=True, progress=False)
    loss_fn = kd_loss(dense, alpha=kd) if kd else None
    cfg = CONFIG if scope == "layer" else GLOBAL_CONFIG
    _, hist = iterative_prune(model, cfg, data, ft, rounds=rounds, loss_fn=loss_fn, spacing=spacing)
    final = TrainConfig(epochs=final_epochs, batch_size=128, lr=final_lr, scheduler="cosine", augment="none",
                        keep_best=True, progress=False, seed=100)
    res_final, final_kept = None, False
    if final_epochs:  # a last low-LR fine-tune, kept only if it helps on the val split
        val = data.loader("val", 1000)
        before_val, before_state = evaluate(model, val)["top1"], copy.deepcopy(model.state_dict())
        res_final = train(model, data, final, callbacks=[MaskCallback()], loss_fn=loss_fn)
        final_kept = evaluate(model, val)["top1"] > before_val
        if not final_kept:
            model.load_state_dict(before_state)
    make_permanent(model)
    train_s = time.perf_counter() - t0

    pruned_eval = evaluate(model, test)
    val_top1 = evaluate(model, data.loader("val", 1000))["top1"]
    params, nz = count_params(model)
    w_total, w_nz = _weights(model)
    save(model, out_model, extra={"dataset": "fashion-mnist", "test": pruned_eval,
                                  "pruning": cfg.to_dict(), "from": "bench/results/lenet300.safetensors"})
    with tempfile.TemporaryDirectory() as d:
        compact = save_sparse(model, Path(d) / "lenet300-sparse.compact.safetensors")
        compact_bytes = file_bytes(compact)
        reloaded = load(compact)
        x = data.test.tensors[0][:512]
        with torch.no_grad():
            identical = bool(torch.equal(reloaded(x), model(x)))
    dense_file = load(out_model)
    assert torch.equal(dense_file(data.test.tensors[0][:64]), model(data.test.tensors[0][:64]))

    # Sparse matmul: crossover on this CPU for the three layer shapes, then the pruned model with
    # each layer swapped only where its sparsity is past the crossover at that batch size.
    cross = measure_crossover([(300, 784), (100, 300), (10, 100)], batches=(1, 256),
                              sparsities=(0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.98))
    latency: dict[str, Any] = {}
    for b in (1, 256):
        plan = {}
        for name, r in ((r.name, r) for r in layer_stats(model)):
            c = cross.crossover.get(f"{r.shape[0]}x{r.shape[1]}@b{b}")
            plan[name] = {"sparsity": r.sparsity, "crossover": c, "swap": c is not None and r.sparsity >= c}
        sparse_model = to_sparse_inference(copy.deepcopy(model), plan=plan)
        x = data.test.tensors[0][:1].expand(b, 1, 28, 28).contiguous()
        models = {"baseline": dense, "pruned_dense": model, "pruned_sparse_matmul": sparse_model}
        lat = compare_latency(models, x, rounds=3)
        latency[str(b)] = {"plan": plan, **{k: v.to_dict() for k, v in lat.items()},
                           "speedup_pruned_sparse_vs_baseline": lat["baseline"].median_ms
                           / lat["pruned_sparse_matmul"].median_ms}

    layers = {r.name: {"shape": list(r.shape), "params": r.params, "nonzero": r.nonzero,
                       "sparsity": r.sparsity} for r in layer_stats(model)}
    drop_pt = 100 * (base_eval["top1"] - pruned_eval["top1"])
    removed = 1 - w_nz / w_total
    return {
        "command": "python bench/pruning.py --part unstructured",
        "baseline": {"checkpoint": str(baseline), "test": base_eval, "params": base_params,
                     "nonzero": base_nz, "bytes": file_bytes(baseline)},
        "sensitivity": sens.to_json_dict(),
        "config": cfg.to_dict(), "spacing": spacing, "rounds": rounds, "epochs_per_round": epochs,
        "final_epochs": final_epochs, "lr": lr, "final_lr": final_lr,
        "fine_tune_loss": f"{1 - kd:g} CE + {kd:g} T^2 KL(baseline || pruned, T=4)" if kd else "CE",
        "round_history": [h.to_dict() for h in hist],
        "final_best_val_top1": res_final.best_val_top1 if res_final else None,
        "final_fine_tune_kept": final_kept,
        "pruned": {"checkpoint": str(out_model), "test": pruned_eval,
                   "val_top1": val_top1, "params": params, "nonzero": nz, "weights": w_total,
                   "weights_nonzero": w_nz, "layers": layers},
        "test_top1_drop_pt": drop_pt,
        "weights_removed": removed,
        "nonzero_reduction_x": base_nz / nz,
        "bytes": {"dense_fp32_file": file_bytes(out_model), "compact_sparse_file": compact_bytes,
                  "baseline_file": file_bytes(baseline),
                  "ratio_dense_over_compact": file_bytes(out_model) / compact_bytes,
                  "compact_reload_identical": identical},
        "crossover": cross.to_dict(),
        "latency": latency,
        "targets": {"weights_removed": TARGET_REMOVED, "max_drop_pt": TARGET_DROP_PT,
                    "met": removed >= TARGET_REMOVED and base_nz / nz >= 12 and drop_pt <= TARGET_DROP_PT},
        "threads": torch.get_num_threads(),
        "seconds": {"prune_and_finetune": train_s, "total": time.perf_counter() - t0},
    }


def run_structured() -> dict[str, Any]:
    """The structured part, from bench/pruning_structured.py (LeNet-5 channels, transformers)."""
    import pruning_structured

    return {"lenet5_fmnist": pruning_structured.lenet5_part(),
            "transformers": pruning_structured.hf_part((1, 8))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("unstructured", "structured", "all"), default="unstructured")
    # Defaults chosen on the val split among trial runs (val top-1 after pruning to 92.1 %; the
    # baseline's is 91.14 %): plain CE 6x3 epochs 90.04, 8x5 90.24; distillation 0.5 6x3 90.56,
    # 0.9 6x3 90.40, 0.5 8x4 90.68, 0.5 8x4 global scope 90.80, 0.5 8x4 cubic spacing 90.94.
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4, help="fine-tune epochs per round")
    ap.add_argument("--final-epochs", type=int, default=0, help="extra masked fine-tune at the end")
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate per round")
    ap.add_argument("--final-lr", type=float, default=3e-4)
    ap.add_argument("--kd", type=float, default=0.5,
                    help="weight of soft targets from the dense baseline in the fine-tune loss (0: plain CE)")
    ap.add_argument("--spacing", choices=("geometric", "cubic"), default="cubic")
    ap.add_argument("--scope", choices=("layer", "global"), default="layer")
    ap.add_argument("--trial", action="store_true", help="write results and model to the temp dir")
    ap.add_argument("--baseline", type=Path, default=BASELINE)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # A run from another baseline is a trial: its files go to a temp dir, not bench/results.
    official = args.baseline.resolve() == BASELINE.resolve() and not args.trial
    name = "pruning" if official else f"pruning-trial-{os.getpid()}"
    out_model = OUT_MODEL if official else Path(tempfile.gettempdir()) / f"{name}.safetensors"
    path = RESULTS / f"{name}.json" if official else Path(tempfile.gettempdir()) / f"{name}.json"
    prev = json.loads(path.read_text()) if path.exists() else {}
    prev.pop("machine", None)
    if args.part in ("unstructured", "all"):
        if not args.baseline.exists():
            raise SystemExit(f"{args.baseline} missing: run bench/baselines.py first")
        prev["unstructured"] = run_unstructured(args.rounds, args.epochs, args.final_epochs, args.baseline,
                                                out_model, args.lr, args.final_lr, args.kd, args.spacing,
                                                args.scope)
        u = prev["unstructured"]
        print(f"unstructured: test top-1 {100 * u['baseline']['test']['top1']:.2f}% -> "
              f"{100 * u['pruned']['test']['top1']:.2f}% (drop {u['test_top1_drop_pt']:.2f} pt), "
              f"{100 * u['weights_removed']:.1f}% weights removed, {u['nonzero_reduction_x']:.1f}x fewer "
              f"non-zeros, file {u['bytes']['dense_fp32_file']} -> {u['bytes']['compact_sparse_file']} B, "
              f"targets met: {u['targets']['met']}", flush=True)
    if args.part in ("structured", "all"):
        prev["structured"] = run_structured()
    if official:
        print(f"-> {write_results(name, prev)}")
    else:
        trial = path
        trial.write_text(json.dumps(prev, indent=2, default=str))
        print(f"-> {trial}")


if __name__ == "__main__":
    main()
