"""Search to a target on Fashion-MNIST, from the committed baselines, against the hand-tuned benches.

For LeNet-300-100 and LeNet-5 (bench/results/lenet300.safetensors, lenet5.safetensors) this runs
``deepshrink.workflow.search`` — sensitivity, successive halving over compositions (pruning,
sharing, codebook precision, KD / channels, int8), selection on the validation split only, test
read once for the returned models — with objective ``size`` and ``latency``. The size searches
get the compute the hand-tuned pipeline took (bench/pruning.py + bench/deep_compression.py for
LeNet-300, bench/deep_compression.py for LeNet-5), counted in CPU seconds of this one-thread
process so that other jobs on a shared machine do not shrink the budget. Writes
bench/results/search.json, search-report.html (LeNet-300 size search) with its Pareto PNG, and a
report per other part. ``--stretch`` also runs the shipped max-compression recipe.

    nice .venv/bin/python bench/search.py                      # ~25 min CPU, one thread
    .venv/bin/python bench/search.py --only lenet300-size      # one part (others' results kept)
    .venv/bin/python bench/search.py --only lenet5-size --tag @3x --budget-scale 3   # kept beside
    .venv/bin/python bench/search.py --only reproduce          # the hand-tuned knobs on today's code
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
from deepshrink import load
from deepshrink.data import load_fashion_mnist
from deepshrink.report import write_report
from deepshrink.workflow import load_recipe, run_recipe
from deepshrink.workflow.search import SearchConfig, search

THREADS = 1
ROOT = Path(__file__).resolve().parent.parent


def hand_tuned() -> dict[str, Any]:
    """The hand-tuned results and the CPU seconds they took, from the committed bench JSON."""
    dc = json.loads((RESULTS / "deep_compression.json").read_text())
    pr = json.loads((RESULTS / "pruning.json").read_text())
    out: dict[str, Any] = {}
    for m in ("lenet300", "lenet5"):
        c = dc[m]["chosen"]
        out[m] = {"deep_compression": {"bytes": c["bytes"], "ratio": c["ratio_vs_fp32_file"],
                                       "test_drop_pt": c["test_drop_pt"], "val_drop_pt": c["val_drop_pt"],
                                       "cpu_seconds": dc[m]["cpu_seconds"]}}
    u = pr["unstructured"]
    out["lenet300"]["pruning"] = {"bytes": u["bytes"]["compact_sparse_file"],
                                  "ratio": u["bytes"]["baseline_file"] / u["bytes"]["compact_sparse_file"],
                                  "test_drop_pt": u["test_top1_drop_pt"], "seconds": u["seconds"]["total"]}
    # LeNet-300's 50x came from the pruning bench's sparse model plus deep_compression.py's sharing.
    out["lenet300"]["budget_cpu_seconds"] = u["seconds"]["total"] + dc["lenet300"]["cpu_seconds"]
    out["lenet5"]["budget_cpu_seconds"] = dc["lenet5"]["cpu_seconds"]
    q = RESULTS / "quantization.json"
    if q.exists():
        out["quantization_json"] = "bench/results/quantization.json (int8 static: LeNet-300 -0.03 pt, "\
                                   "LeNet-5 -0.08 pt, 3.89x smaller; see README)"
    return out


PARTS = {
    "lenet300-size": ("lenet300", "size"), "lenet5-size": ("lenet5", "size"),
    "lenet300-latency": ("lenet300", "latency"), "lenet5-latency": ("lenet5", "latency"),
}


def run_part(part: str, data: Any, work: Path, ref: dict[str, Any], args: argparse.Namespace
             ) -> dict[str, Any]:
    name, objective = PARTS[part]
    ckpt = RESULTS / f"{name}.safetensors"
    budget = (ref[name]["budget_cpu_seconds"] * args.budget_scale if objective == "size"
              else args.latency_budget)
    cfg = SearchConfig(objective=objective, max_drop=0.5, time_budget=budget, budget_clock="cpu",
                       candidates=args.candidates, eta=args.eta,
                       rungs=args.rungs if objective == "size" else 2,
                       target=args.target if objective == "size" else None, epochs_scale=args.epochs_scale)
    w0, c0 = time.perf_counter(), time.process_time()
    key = part + args.tag
    res = search(load(ckpt), data, cfg, work / key, model_file=ckpt, command=" ".join(["python", *sys.argv]))
    r = res.results
    html = RESULTS / ("search-report.html" if key == "lenet300-size" else f"search-report-{key}.html")
    write_report(r, html)  # and <stem>-pareto.png beside it
    keep = ("trial", "role", "knobs", "bytes", "size_ratio", "macs_ratio", "speedup", "speedup_final",
            "val_top1", "val_drop_pt", "test_top1", "test_drop_pt", "recipe")
    chosen = next((s for s in r["selected"] if s["role"] == "chosen"), None)
    return {"config": cfg.to_dict(), "budget_cpu_seconds": budget, "original": r["original"],
            "sensitivity": r["sensitivity"], "stopped": r["stopped"], "trials": len(r["trials"]),
            "trial_table": [{k: t.get(k) for k in keep if k != "recipe"} | {"rung": t["rung"]}
                            for t in r["trials"]],
            "chosen": {k: chosen.get(k) for k in keep} if chosen else None,
            "front_size": [{k: s.get(k) for k in keep if k != "recipe"} for s in r["selected"]
                           if s["trial"] in r["fronts"]["size"]],
            "front_latency": [{k: s.get(k) for k in keep if k != "recipe"} for s in r["selected"]
                              if s["trial"] in r["fronts"]["latency"]],
            "report": str(html.relative_to(ROOT)),
            # The search's own clock over all its sessions (resumed runs included) and any notes
            # the state carries (e.g. a trial run in a parallel process and merged into it).
            "search_clock_seconds": r["seconds"],
            "state_notes": json.loads((work / key / "search-state.json").read_text()).get("notes", []),
            "wall_seconds": time.perf_counter() - w0, "cpu_seconds": time.process_time() - c0}


def stretch(name: str, data: Any, work: Path) -> dict[str, Any]:
    """The shipped max-compression recipe, as is (no knob chosen for this run)."""
    ckpt = RESULTS / f"{name}.safetensors"
    rec = load_recipe(ROOT / "recipes" / "max-compression.yaml")
    c0 = time.process_time()
    res = run_recipe(rec, load(ckpt), data, work / f"stretch-{name}", model_file=ckpt,
                     command=f"deepshrink run recipes/max-compression.yaml --model {ckpt.relative_to(ROOT)} "
                             "--data fashion-mnist")
    final = res.results["stages"][-1]
    return {k: final.get(k) for k in ("bytes", "size_ratio", "val_top1", "test_top1", "val_drop_pt",
                                      "test_drop_pt")} | {"cpu_seconds": time.process_time() - c0,
                                                          "stages": [{k: s.get(k) for k in (
                                                              "label", "bytes", "size_ratio", "val_top1",
                                                              "test_top1")} for s in res.results["stages"]]}


def summary(payload: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Per size search (tagged reruns too): what it chose on validation, and the floor checked
    both ways: on validation (what the search can see) and on test (read once, afterwards)."""
    out: dict[str, Any] = {}
    for key, part in payload.items():
        m = key.split("-")[0]
        if not key.startswith(f"{m}-size") or m not in ("lenet300", "lenet5") or not part:
            continue
        hand = {"hand_tuned_ratio": ref[m]["deep_compression"]["ratio"],
                "hand_tuned_val_drop_pt": ref[m]["deep_compression"]["val_drop_pt"],
                "hand_tuned_test_drop_pt": ref[m]["deep_compression"]["test_drop_pt"],
                "budget_cpu_seconds": part["budget_cpu_seconds"], "trials": part["trials"]}
        if not part.get("chosen"):  # nothing met max_drop on validation: say so, and what came closest
            near = [t for t in part["front_size"] if t["size_ratio"] >= 50]
            best = min(near, key=lambda t: t["val_drop_pt"]) if near else None
            out[key] = {"chosen": None, "floor_50x_at_0.5pt_met_on_val": False,
                        "closest_at_50x_on_val": best and {k: best[k] for k in (
                            "trial", "size_ratio", "val_drop_pt", "test_drop_pt")}, **hand}
            continue
        c = part["chosen"]
        big = c["size_ratio"] >= 50
        out[key] = {"chosen": c["trial"], "search_ratio": c["size_ratio"],
                    "search_val_drop_pt": c["val_drop_pt"], "search_test_drop_pt": c["test_drop_pt"], **hand,
                    "floor_50x_at_0.5pt_met_on_val": big and c["val_drop_pt"] <= 0.5,
                    "floor_50x_at_0.5pt_met_on_test": big and c["test_drop_pt"] <= 0.5}
    return out


# The hand-tuned LeNet-300 pipeline (bench/pruning.py's schedule, then deep_compression.py's
# sharing of its sparse model) as one recipe, run on today's code: the same knobs a person chose.
HAND_RECIPE = {"name": "hand-tuned-lenet300", "stages": [
    {"stage": "prune", "config": {"type": "UnstructuredConfig", "ratio": 0.925, "scope": "layer",
                                  "overrides": {"4": 0.9, "6": 0.7}},
     "rounds": 8, "spacing": "cubic", "finetune": {"epochs": 4, "lr": 1e-3, "keep_best": True},
     "teacher": {"alpha": 0.5, "temperature": 4.0}},
    {"stage": "share", "config": {"bits": 3, "conv_bits": 4, "bias_bits": 4},
     "finetune": {"epochs": 8, "lr": 1e-4, "keep_best": True}, "teacher": {"alpha": 0.7, "temperature": 2.0}},
    {"stage": "pack", "config": {"entropy": "huffman", "codebook_dtype": "float16"}}]}


def reproduce(data: Any, work: Path) -> dict[str, Any]:
    """Where the hand-tuned 50.1x comes from: (1) deep_compression.py's sharing step from the
    committed sparse model, with its KD (alpha 0.7, T 2) and with the search's (0.5, T 4);
    (2) the whole hand-tuned pipeline re-run from the dense baseline as a recipe."""
    from deepshrink.dsz import PackConfig
    from deepshrink.sharing import CompressConfig, KMeansConfig, compress
    from deepshrink.train import TrainConfig
    from deepshrink.workflow import parse_recipe

    base, sparse = load(RESULTS / "lenet300.safetensors"), load(RESULTS / "lenet300-sparse.safetensors")
    out: dict[str, Any] = {"sharing_from_committed_sparse": {}}
    for alpha, temp in ((0.7, 2.0), (0.5, 4.0)):
        c0 = time.process_time()
        cfg = CompressConfig(prune=None, sharing=KMeansConfig(bits=3, bias_bits=4),
                             finetune=TrainConfig(epochs=8, lr=1e-4, batch_size=128, augment="none",
                                                  keep_best=True, progress=False),
                             pack=PackConfig(codebook_dtype="float16"), distill_alpha=alpha,
                             distill_temperature=temp)
        rows = compress(sparse, data, cfg, None, reference=base).table.rows
        out["sharing_from_committed_sparse"][f"kd{alpha}-T{temp:g}"] = {
            "stages": [{k: r[k] for k in ("stage", "bytes", "val_top1", "top1")} for r in rows],
            "cpu_seconds": time.process_time() - c0}
    c0 = time.process_time()
    res = run_recipe(parse_recipe(HAND_RECIPE), base, data, work / "hand-recipe",
                     model_file=RESULTS / "lenet300.safetensors", latency=False, progress=False)
    out["hand_recipe_now"] = {"recipe": HAND_RECIPE, "cpu_seconds": time.process_time() - c0,
                              "stages": [{k: st.get(k) for k in ("label", "bytes", "size_ratio", "val_top1",
                                                                 "test_top1", "val_drop_pt", "test_drop_pt")}
                                         for st in res.results["stages"]],
                              "rounds": res.results["stages"][1]["info"]["rounds"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", action="append", choices=[*PARTS, "stretch", "reproduce"])
    ap.add_argument("--summary-only", action="store_true",
                    help="recompute the summary of bench/results/search.json (no search is run)")
    ap.add_argument("--stretch", action="store_true", help="also run recipes/max-compression.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deepshrink-search-bench"),
                    help="trial artifacts and resumable state (same dir resumes an interrupted run)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="size-search budget as a fraction of the hand-tuned benches' CPU seconds")
    ap.add_argument("--latency-budget", type=float, default=100.0, help="CPU seconds per latency search")
    ap.add_argument("--candidates", type=int, default=7, help="first-rung candidates (the seed included)")
    ap.add_argument("--rungs", type=int, default=2, help="successive-halving rungs of the size searches")
    ap.add_argument("--eta", type=int, default=3, help="successive halving keeps 1/eta per rung")
    ap.add_argument("--target", default="50x", help="size target of the size searches (the floor)")
    ap.add_argument("--stretch-model", action="append", choices=("lenet300", "lenet5"),
                    help="the stretch part's models (default both; others' results are kept)")
    ap.add_argument("--tag", default="", help="suffix of the part's key and report (e.g. @3x: a run with "
                    "another budget kept beside the default one)")
    ap.add_argument("--epochs-scale", type=float, default=1.0,
                    help="multiplies every fine-tune's epochs (LeNet-5's budget fits ~14 epochs)")
    args = ap.parse_args()
    if args.tag and not args.tag.startswith("@"):
        ap.error("--tag must start with @ (e.g. @3x)")
    args.stretch_model = args.stretch_model or ["lenet300", "lenet5"]
    torch.set_num_threads(THREADS)
    parts = args.only or [*PARTS, *(["stretch"] if args.stretch else [])]
    ref = hand_tuned()
    if args.summary_only:
        old = json.loads((RESULTS / "search.json").read_text())
        write_results("search", {**old, "summary": summary(old, ref)})
        print(json.dumps(summary(old, ref), indent=2))
        return
    data = load_fashion_mnist()
    t0 = time.perf_counter()
    command = " ".join(["python", *sys.argv])
    payload: dict[str, Any] = {"command": command, "threads": THREADS,
                               "hand_tuned": ref, "notes": [
                                   "selection on the validation split only; test read once for the "
                                   "returned models",
                                   "size-search budgets: the hand-tuned benches' CPU seconds (1 thread)",
                                   "bytes are real files; ratios vs the fp32 baseline checkpoint file",
                                   "speedups: interleaved runs vs the original, batch 1, 1 thread, "
                                   "shared machine"]}
    prev = RESULTS / "search.json"
    done: dict[str, Any] = {}
    for p in parts:
        print(f"== {p}", flush=True)
        if p == "reproduce":
            done["reproduce"] = reproduce(data, args.work)
        elif p == "stretch":
            previous = (json.loads(prev.read_text()) if prev.exists() else {}).get("stretch", {})
            done["stretch"] = {**previous, **{m: stretch(m, data, args.work) for m in args.stretch_model}}
        else:
            done[p + args.tag] = run_part(p, data, args.work, ref, args)
        # Keep the other parts' results, re-read now: parts may run in parallel processes.
        old = json.loads(prev.read_text()) if args.only and prev.exists() else {}
        merged = {**{k: v for k, v in old.items() if k.split("@")[0] in (*PARTS, "stretch", "reproduce")},
                  **done}
        cmds = {**old.get("commands", {}), **dict.fromkeys(done, command)}
        write_results("search", {**payload, **merged, "commands": cmds, "summary": summary(merged, ref),
                                 "seconds": time.perf_counter() - t0})
    payload["summary"] = summary(done, ref)
    print(json.dumps(payload["summary"], indent=2))


if __name__ == "__main__":
    main()
