"""Parts of bench/pruning_structured.py added in turn 3: BERT floors, the architecture table,
group vs producer importance after the same fine-tune."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import deepshrink
from deepshrink.data import load_fashion_mnist
from deepshrink.measure import count_macs, count_params
from deepshrink.modeling import call, output_tensor
from deepshrink.models import create_model
from deepshrink.pruning import ChannelConfig, prune_channels
from deepshrink.train import TrainConfig, evaluate, train

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_ratio(base: nn.Module, pruned: nn.Module, x: Any, rounds: int,
                      min_s: float = 0.03) -> dict[str, Any]:
    """Alternate base, pruned, base, pruned ...; each turn times ``reps`` back-to-back calls
    (enough for ``min_s`` of the base model). Both the thread's CPU time and wall time are
    recorded: on this machine (2 cores, load ~18) a process waits most of its wall time for a
    core, so the CPU-time ratio (one thread) is the figure that says how much less work the
    pruned model does; the wall-clock ratio is reported next to it. Speedups are medians of the
    per-round ratios with their p10/p90 spread."""
    base.eval()
    pruned.eval()
    cpu: dict[str, list[float]] = {"base": [], "pruned": []}
    wall: dict[str, list[float]] = {"base": [], "pruned": []}
    with torch.inference_mode():
        for m in (base, pruned):  # warm-up
            call(m, x)
        t0 = time.thread_time()
        call(base, x)
        reps = max(1, int(min_s / max(time.thread_time() - t0, 1e-6)))
        for _ in range(rounds):
            for key, m in (("base", base), ("pruned", pruned)):
                c0, w0 = time.thread_time(), time.perf_counter()
                for _ in range(reps):
                    call(m, x)
                cpu[key].append((time.thread_time() - c0) / reps)
                wall[key].append((time.perf_counter() - w0) / reps)

    def summary(t: dict[str, list[float]]) -> tuple[float, list[float]]:
        ratios = sorted(b / p for b, p in zip(t["base"], t["pruned"], strict=True))
        q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
        return statistics.median(ratios), [q(0.1), q(0.9)]

    (s_cpu, spread_cpu), (s_wall, spread_wall) = summary(cpu), summary(wall)
    return {"speedup_median": s_cpu, "speedup_p10_p90": spread_cpu, "clock": "thread CPU time",
            "wall_speedup_median": s_wall, "wall_speedup_p10_p90": spread_wall,
            "base_cpu_ms_median": 1e3 * statistics.median(cpu["base"]),
            "pruned_cpu_ms_median": 1e3 * statistics.median(cpu["pruned"]), "rounds": rounds, "reps": reps,
            "threads": torch.get_num_threads()}


def _save_load_identical(model: nn.Module, x: Any) -> bool:
    with tempfile.TemporaryDirectory() as d:
        again = deepshrink.load(deepshrink.save(model, Path(d) / "m.safetensors"))
    with torch.no_grad():
        return bool(torch.equal(output_tensor(call(again, x)), output_tensor(call(model.eval(), x))))


BERT = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
        "intermediate_size": 1536, "vocab_size": 30522, "num_labels": 2}


def bert_part() -> dict[str, Any]:
    t0 = time.perf_counter()
    base = create_model("hf", arch="BertForSequenceClassification", config=BERT, seed=0)
    x = torch.randint(0, 30522, (8, 128), generator=torch.Generator().manual_seed(0))
    pruned = copy.deepcopy(base)
    res = prune_channels(pruned, ChannelConfig(ratio=0.5, hidden=True), example_inputs=x[:2, :16])
    p0, p1 = count_params(base)[0], count_params(pruned)[0]
    m0, m1 = count_macs(base, x[:1])[0], count_macs(pruned, x[:1])[0]
    lat = interleaved_ratio(base, pruned, x, rounds=11, min_s=0.0)
    c = pruned.config
    row = {"config": BERT, "prune_config": {"ratio": 0.5, "hidden": True}, "params": [p0, p1],
           "params_ratio": p0 / p1, "macs_b1_s128": [m0, m1], "macs_ratio": m0 / m1,
           "latency_b8_s128": lat, "config_after": {k: getattr(c, k) for k in
                                                    ("hidden_size", "num_attention_heads",
                                                     "intermediate_size")},
           "ffn_width_after": pruned.bert.encoder.layer[0].intermediate.dense.out_features,
           "save_load_identical": _save_load_identical(pruned, x[:2, :16]),
           "floors": {"params_le_9M": p1 <= 9_000_000, "speedup_ge_3x": lat["speedup_median"] >= 3.0},
           "groups_pruned": len(res.pruned), "seconds": time.perf_counter() - t0}
    print(f"bert6x384: params {p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M, MACs x{m0 / m1:.2f}, "
          f"speedup b8xs128 x{lat['speedup_median']:.2f} {lat['speedup_p10_p90']} (CPU time), "
          f"wall x{lat['wall_speedup_median']:.2f} {lat['wall_speedup_p10_p90']}", flush=True)
    return row


def _ids(vocab: int = 100, offset: int = 0, n: int = 2):
    return lambda n=n: torch.randint(0, vocab, (n, 16), generator=torch.Generator().manual_seed(0)) + offset


def _img(size: int = 32):
    return lambda n=2: torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
        "vocab_size": 1000, "max_position_embeddings": 64}
ARCHS: dict[str, tuple[str, dict[str, Any], Any]] = {
    "bert": ("BertForSequenceClassification", {"model_type": "bert", **TEXT}, _ids(1000)),
    "roberta": ("RobertaForSequenceClassification", {"model_type": "roberta", **TEXT}, _ids(997, 3)),
    "distilbert": ("DistilBertForSequenceClassification",
                   {"model_type": "distilbert", "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 256,
                    "vocab_size": 1000, "max_position_embeddings": 64}, _ids(1000)),
    "gpt2": ("GPT2LMHeadModel", {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                 "vocab_size": 1000, "n_positions": 64, "use_cache": False,
                                 "bos_token_id": 0, "eos_token_id": 0}, _ids(1000)),
    "llama-gqa": ("LlamaForCausalLM", {"model_type": "llama", **TEXT, "num_key_value_heads": 2,
                                       "use_cache": False}, _ids(1000)),
    "vit": ("ViTForImageClassification", {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, "intermediate_size": 256,
                                          "image_size": 32, "patch_size": 4, "num_labels": 10}, _img()),
    "swin": ("SwinForImageClassification", {"model_type": "swin", "embed_dim": 32, "depths": [2, 2],
                                            "num_heads": [2, 4], "window_size": 4, "image_size": 32,
                                            "patch_size": 2, "num_labels": 10}, _img()),
    "convnext": ("ConvNextForImageClassification", {"model_type": "convnext", "hidden_sizes": [32, 64],
                                                    "depths": [2, 2], "num_stages": 2, "num_labels": 10},
                 _img(64)),
    "mobilenetv2": ("MobileNetV2ForImageClassification",
                    {"model_type": "mobilenet_v2", "depth_multiplier": 0.5, "image_size": 64,
                     "num_labels": 10}, _img(64)),
    "resnet": ("ResNetForImageClassification", {"model_type": "resnet", "embedding_size": 32,
                                                "hidden_sizes": [32, 64], "depths": [2, 2],
                                                "layer_type": "basic", "num_labels": 10}, _img(64)),
}


def arch_part() -> dict[str, Any]:
    rows: dict[str, Any] = {}
    makers = {name: (lambda a=arch, c=cfg: create_model("hf", arch=a, config=c, seed=0), make)
              for name, (arch, cfg, make) in ARCHS.items()}
    makers["lenet5"] = (lambda: create_model("lenet5"), lambda n=2: torch.rand(n, 1, 28, 28))
    makers["resnet_small"] = (lambda: create_model("resnet_small"), lambda n=2: torch.rand(n, 1, 28, 28))
    for name, (build, make) in makers.items():
        for hidden in (False, True):
            base = build().eval()
            pruned = copy.deepcopy(base)
            prune_channels(pruned, ChannelConfig(ratio=0.5, hidden=hidden), example_inputs=make(2))
            p0, p1 = count_params(base)[0], count_params(pruned)[0]
            m0, m1 = count_macs(base, make(1))[0], count_macs(pruned, make(1))[0]
            lat = interleaved_ratio(base, pruned, make(8), rounds=9)
            row = {"params": [p0, p1], "params_ratio": p0 / p1, "macs_ratio": m0 / m1,
                   "latency_b8": lat, "save_load_identical": _save_load_identical(pruned, make(2))}
            rows[f"{name}{' +hidden' if hidden else ''}"] = row
            print(f"{name:13s} hidden={hidden!s:5s} params x{p0 / p1:.2f} MACs x{m0 / m1:.2f} "
                  f"b8 x{lat['speedup_median']:.2f} save/load {row['save_load_identical']}", flush=True)
    return rows


def _resnet_baseline(data: Any) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet_small")
    train(model, data, TrainConfig(epochs=1, batch_size=64, lr=2e-3, max_steps=250, seed=0, progress=False))
    return model.eval()


def importance_part(seeds: int) -> dict[str, Any]:
    """Same 50 % cut and the same short fine-tune, group vs producer scores, several seeds."""
    data = load_fashion_mnist()
    # Subsets keep the 12 runs within ~25 min on the shared machine: 2,000 validation images
    # (read after the cut and after the fine-tune) and the first 5,000 test images.
    val = DataLoader(Subset(data.val, range(2000)), batch_size=1000)
    test = DataLoader(Subset(data.test, range(5000)), batch_size=1000)
    print("importance: training the resnet_small baseline", flush=True)
    bases = {"lenet5": deepshrink.load(RESULTS / "lenet5.safetensors"),
             "resnet_small": _resnet_baseline(data)}
    steps = {"lenet5": 150, "resnet_small": 60}  # short: the machine is shared by ~8 jobs
    x = data.test.tensors[0][:2]
    out: dict[str, Any] = {}
    for name, base in bases.items():
        rows: dict[str, Any] = {"base_test_top1": evaluate(base, test)["top1"], "finetune_steps": steps[name],
                                "val_images": 2000, "test_images": 5000}
        for over in ("group", "producers"):
            runs = []
            for seed in range(seeds):
                m = copy.deepcopy(base)
                prune_channels(m, ChannelConfig(ratio=0.5, score_over=over), example_inputs=x)
                before = evaluate(m, val)["top1"]
                tcfg = TrainConfig(epochs=1, batch_size=64, lr=1e-3, max_steps=steps[name], seed=seed,
                                   progress=False)
                train(m, data, tcfg)
                runs.append({"seed": seed, "val_top1_after_cut": before, "val_top1": evaluate(m, val)["top1"],
                             "test_top1": evaluate(m, test)["top1"]})
                print(f"{name} {over} seed {seed}: val {before:.4f} -> {runs[-1]['val_top1']:.4f}",
                      flush=True)
            rows[over] = {"runs": runs, "val_top1_mean": statistics.mean(r["val_top1"] for r in runs),
                          "test_top1_mean": statistics.mean(r["test_top1"] for r in runs),
                          "val_top1_after_cut": runs[0]["val_top1_after_cut"]}
        rows["better_on_val"] = max(("group", "producers"), key=lambda o: rows[o]["val_top1_mean"])
        out[name] = rows
    return out
