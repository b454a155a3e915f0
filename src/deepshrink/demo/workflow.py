"""Demo stage: a recipe run through the workflow (prune -> share -> Huffman .dsz), measured
after every stage; its results become the demo's HTML report (written at the end of the run)."""

from __future__ import annotations

import copy
from typing import Any

from deepshrink.checkpoint import load
from deepshrink.demo.context import DemoContext
from deepshrink.workflow import parse_recipe, run_recipe

#: The shipped deep-compression recipe, sized for the demo's digits model.
RECIPE: dict[str, Any] = {
    "name": "demo deep-compression",
    "description": "prune 90% (classifier 60%) with KD -> share 4 bits -> fp16 codebooks, Huffman",
    "stages": [
        {"stage": "prune", "config": {"type": "UnstructuredConfig", "ratio": 0.9, "overrides": {"6": 0.6}},
         "rounds": 2, "spacing": "cubic", "teacher": {"alpha": 0.5, "temperature": 4.0},
         "finetune": {"epochs": 6, "batch_size": 64, "lr": 1e-3, "keep_best": True}},
        {"stage": "share", "config": {"bits": 4, "bias_bits": 5},
         "finetune": {"epochs": 5, "batch_size": 64, "lr": 5e-4, "keep_best": True}},
        {"stage": "pack", "config": {"codebook_dtype": "float16"}},
    ],
}


def demo_stage(ctx: DemoContext) -> None:
    raw = copy.deepcopy(RECIPE)
    if ctx.quick:
        for s in raw["stages"]:
            if "finetune" in s:
                s["finetune"]["epochs"] = 3
    res = run_recipe(parse_recipe(raw, "demo"), ctx.fresh_baseline(), ctx.data, ctx.out_dir / "recipe",
                     model_file=ctx.out_dir / "baseline.safetensors", progress=False,
                     command="deepshrink demo", log=lambda s: None)
    path = ctx.out_dir / "recipe" / res.results["stages"][-1]["file"]
    rep = ctx.measure(load(path), "workflow-recipe", file=path)
    ctx.add_row("recipe: prune + share 4b + Huffman (workflow)", rep)
    ctx.shared["workflow_results"] = res.results
