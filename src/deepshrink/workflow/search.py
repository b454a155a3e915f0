"""Search to a target: per-layer sensitivity, then successive halving over compositions of
techniques, selection on the validation split only.

1. Sensitivity: every prunable layer pruned alone at several ratios, validation accuracy each.
   A target sparsity is spread over the layers greedily, cheapest accuracy per removed weight
   first (the big first layer takes the most, the classifier the least — Han et al.'s pattern,
   found from data instead of by hand).
2. Candidates: the family's published setting first (:data:`SEEDS`), then knob settings drawn
   (seeded, stratified) from the objective's space, each compiled to a recipe — size: iterative
   pruning with KD from the original, spread by sensitivity or Han et al.'s even rule, k-means
   sharing (2-4 bits) with centroid fine-tuning, Huffman-coded .dsz with fp16 codebooks;
   latency / MACs: channel pruning with KD, static int8 run by ONNX Runtime.
3. Successive halving: every candidate runs with a short fine-tune budget; the best 1/``eta``
   by the objective (among those within ``max_drop`` plus a slack that shrinks per rung, on the
   validation split) run again with a longer one, and so on; the last rung gets the hand-tuned
   Deep Compression schedule. With a size target, a promoted candidate's pruning ratio first
   moves so that its file just meets the target (:func:`toward_target`: size is cheap to
   predict from the trial's own bytes per non-zero weight, accuracy is not). With a time
   budget, one last-rung trial's estimated cost is kept aside while the earlier rungs run
   (they are cut short instead), so the finalist is trained.
4. Selection and report: the Pareto fronts (bytes, latency) over all finished trials on
   validation accuracy; the chosen model meets ``max_drop`` on validation and, with a target,
   the target (most accurate such model), else is the smallest / fastest; a candidate run again
   at a later rung replaces its shorter run. Only then is the test
   split read, once, for the chosen and the front models.

State (sensitivity, every finished trial) is written atomically to ``search-state.json`` after
each trial; running again with the same ``out_dir`` and config resumes where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from deepshrink import checkpoint, distributed
from deepshrink.config import Config, check
from deepshrink.data import DataBundle
from deepshrink.errors import ConfigError
from deepshrink.fileio import atomic_write_text
from deepshrink.progress import make_progress
from deepshrink.train import evaluate
from deepshrink.workflow.allocation import allocate, allocate_even, sensitivity
from deepshrink.workflow.latency import interleaved_latency, latency_summary
from deepshrink.workflow.pareto import pareto_front
from deepshrink.workflow.recipe import machine_info, parse_recipe, run_recipe

OBJECTIVES = ("size", "latency", "macs")
# Fine-tune budget per rung: (pruning rounds, epochs per round, epochs after sharing / channels).
# The last is the hand-tuned Deep Compression schedule (bench/pruning.py: 8 rounds x 4 epochs,
# then 8 epochs of centroid tuning): the finalist gets what a person would have given it.
# Rung r of a search with R rungs gets RUNG_BUDGET[r], except its last, which always gets the last.
RUNG_BUDGET = ((2, 1, 1), (3, 2, 2), (8, 4, 8))


def rung_budget(rung: int, rungs: int) -> tuple[int, int, int]:
    return RUNG_BUDGET[-1] if rung == rungs - 1 else RUNG_BUDGET[rung]


@dataclasses.dataclass
class SearchConfig(Config):
    """What to search for. ``target``: a size such as ``50KB`` / ``1.5MB`` / ``20000B``, or a
    factor such as ``2x`` (smaller for size, faster for latency, fewer MACs for macs)."""

    objective: str = "size"
    max_drop: float = 0.5  # validation top-1 points below the original
    target: str | None = None
    time_budget: float | None = None  # seconds, over all sessions of a resumed search
    # "wall", or "cpu": this process's CPU seconds (with one thread, the wall time the search
    # would take on an idle machine; fair budgets on a machine shared with other jobs)
    budget_clock: str = "wall"
    candidates: int = 8  # drawn for rung 0
    eta: int = 2  # each rung keeps the best 1/eta and gives them eta-fold (or more) fine-tuning
    rungs: int = 3
    epochs_scale: float = 1.0  # multiplies every fine-tune's epochs (rounded, at least 1)
    lr: float = 1e-3
    kd_temperature: float = 4.0
    seed: int = 0
    device: str = "cpu"  # the trials' fine-tunes: cpu | cuda (this process's GPU) | cuda:N | auto

    def validate(self) -> None:
        n = type(self).__name__
        check(self.objective in OBJECTIVES, n, "objective",
              f"must be one of {OBJECTIVES}, got {self.objective!r}")
        check(0 <= self.max_drop <= 100, n, "max_drop", f"must be in [0, 100] points, got {self.max_drop}")
        check(self.candidates >= 1, n, "candidates", f"must be >= 1, got {self.candidates}")
        check(self.eta >= 2, n, "eta", f"must be >= 2, got {self.eta}")
        check(1 <= self.rungs <= len(RUNG_BUDGET), n, "rungs", f"must be in [1, {len(RUNG_BUDGET)}]")
        check(self.epochs_scale > 0, n, "epochs_scale", "must be > 0")
        check(self.budget_clock in ("wall", "cpu"), n, "budget_clock",
              f"must be wall or cpu, got {self.budget_clock!r}")
        check(self.time_budget is None or self.time_budget > 0, n, "time_budget", "must be > 0")
        check(re.fullmatch(r"cpu|cuda(:\d+)?|auto", self.device) is not None, n, "device",
              f"must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.target is not None:
            parse_target(self.target, self.objective)


def parse_target(text: str, objective: str) -> tuple[str, float]:
    """``("bytes", n)`` for a size, ``("factor", f)`` for ``Nx``; errors name the option."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|B|KB|KiB|MB|MiB)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"SearchConfig.target: {text!r} is not a size (50KB) or a factor (2x)")
    value, unit = float(m.group(1)), (m.group(2) or "x").lower()
    if unit == "x":
        if value < 1:
            raise ConfigError(f"SearchConfig.target: factor must be >= 1, got {text!r}")
        return "factor", value
    if objective != "size":
        raise ConfigError(f"SearchConfig.target: a size ({text!r}) needs --objective size")
    scale = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2}[unit]
    return "bytes", value * scale


# --- the space: knobs -> recipe ---------------------------------------------------------------

# The size space is the Deep Compression family: heavy pruning (how it is spread over the layers:
# ``alloc``), few-bit sharing, KD from the original during every fine-tune, Huffman-coded .dsz
# with fp16 codebooks (at <= 4 bits a codebook is a few bytes; fp32 ones never paid off).
SPACES: dict[str, dict[str, tuple[Any, ...]]] = {
    "size": {"sparsity": (0.9, 0.92, 0.93, 0.94, 0.95, 0.96), "bits": (2, 3, 4), "kd": (0.5, 0.7),
             "alloc": ("even", "sens")},
    "latency": {"channels": (0.0, 0.25, 0.5, 0.65), "int8": (True, False), "kd": (0.0, 0.7)},
    "macs": {"channels": (0.3, 0.5, 0.65, 0.8), "kd": (0.0, 0.7)},
}


def knob_key(knobs: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(knobs.items()))


# The first candidate of each space: the published setting of the family (Han et al. 2016 on
# LeNet-300-100: 92 % pruned with the classifier spared, 3-bit sharing, Huffman; KD as in
# bench/pruning.py). A prior, not a verdict: it competes in successive halving like the others.
SEEDS: dict[str, dict[str, Any]] = {
    "size": {"sparsity": 0.92, "bits": 3, "kd": 0.5, "alloc": "even"},
    "latency": {"channels": 0.25, "int8": True, "kd": 0.7},
    "macs": {"channels": 0.5, "kd": 0.7},
}


def draw_candidates(cfg: SearchConfig) -> list[dict[str, Any]]:
    """``cfg.candidates`` distinct knob settings, seeded: the space's published setting
    (:data:`SEEDS`) first, then stratified draws: each knob's values are dealt out in turn
    (shuffled), so every value of every knob appears once there are as many candidates as the
    knob has values (a Latin-hypercube-like cover of the grid)."""
    space = SPACES[cfg.objective]
    rng = random.Random(cfg.seed)
    n = cfg.candidates - 1
    columns = {}
    for k, vals in space.items():
        col: list[Any] = []
        while len(col) < n:
            chunk = list(vals)
            rng.shuffle(chunk)
            col.extend(chunk)
        columns[k] = col
    out, seen = [SEEDS[cfg.objective]], {knob_key(SEEDS[cfg.objective])}
    for i in range(n):
        knobs = {k: columns[k][i] for k in space}
        if knob_key(knobs) not in seen:
            seen.add(knob_key(knobs))
            out.append(knobs)
    return out


def _epochs(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def build_recipe(knobs: dict[str, Any], rung: int, cfg: SearchConfig, sens: dict[str, Any] | None
                 ) -> dict[str, Any]:
    """The recipe (a plain mapping, as in a recipe file) for one candidate at one rung."""
    rounds, ep, ep2 = rung_budget(rung, cfg.rungs)
    ft = {"epochs": _epochs(ep, cfg.epochs_scale), "lr": cfg.lr, "batch_size": 128, "keep_best": True,
          "augment": "none", "device": cfg.device}
    teacher = {"alpha": knobs["kd"], "temperature": cfg.kd_temperature} if knobs.get("kd") else None
    stages: list[dict[str, Any]] = []

    def add(stage: str, config: dict[str, Any], kd: bool = True, **kw: Any) -> None:
        stages.append({"stage": stage, "config": config, **({"teacher": teacher} if teacher and kd else {}),
                       **kw})

    if cfg.objective == "size":
        spread = allocate_even if knobs.get("alloc") == "even" else allocate
        layer = spread(sens, knobs["sparsity"]) if sens else {}
        add("prune", {"type": "UnstructuredConfig", "ratio": knobs["sparsity"], "scope": "layer",
                      "overrides": {re.escape(n): r for n, r in layer.items()}},
            rounds=rounds, spacing="cubic", finetune=ft)
        b = knobs["bits"]
        add("share", {"bits": b, "conv_bits": b + 1, "bias_bits": max(4, b + 1)},
            finetune={**ft, "epochs": _epochs(ep2, cfg.epochs_scale), "lr": cfg.lr / 10})
        add("pack", {"codebook_dtype": knobs.get("codebook", "float16")}, kd=False)
    else:
        if knobs.get("channels"):
            add("channels", {"ratio": knobs["channels"], "importance": "activation"},
                finetune={**ft, "epochs": _epochs(ep2 + rounds * ep // 2, cfg.epochs_scale)})
        if knobs.get("int8"):
            add("quantize", {"type": "PTQConfig", "mode": "static", "bits": 8}, kd=False)
            add("export", {"format": "onnx"}, kd=False)
        if not stages:  # nothing to do: the original itself, as saved
            add("quantize", {"type": "PTQConfig", "mode": "weight-only", "bits": 8}, kd=False)
    return {"name": f"r{rung}-{knob_key(knobs)}", "seed": cfg.seed, "stages": stages}


# --- state and clock ----------------------------------------------------------------------------
#
# Under torchrun every process runs the search (each trial's fine-tunes are collective), but one
# process decides: rank 0 reads the state, measures, keeps the budget clock and writes every
# file; the others receive its state, records and decisions (distributed.broadcast_json), so all
# take the same branch at every step and none waits forever in a collective the others skipped.

@dataclasses.dataclass
class SearchState:
    path: Path
    data: dict[str, Any]

    @classmethod
    def open(cls, out_dir: Path, cfg: SearchConfig, model_file: str) -> SearchState:
        """Rank 0 reads (and checks) the state on disk; every process gets its copy."""
        path = out_dir / "search-state.json"
        got = distributed.broadcast_json(_read_state(path, cfg, model_file) if distributed.is_main()
                                         else None)
        if "error" in got:  # raised by every process, not only the one that read the file
            raise ConfigError(got["error"], hint=got["hint"])
        return cls(path, got["data"])

    def save(self) -> None:
        distributed.on_main(atomic_write_text, self.path, json.dumps(self.data, indent=2, default=str))


def _read_state(path: Path, cfg: SearchConfig, model_file: str) -> dict[str, Any]:
    """``{"data": state}`` (fresh when there is no file), or ``{"error", "hint"}``."""
    if not path.exists():
        return {"data": {"config": cfg.to_dict(), "model_file": model_file, "elapsed": 0.0,
                         "trials": {}, "sensitivity": None}}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {"error": f"{path}: unreadable search state: {exc}",
                "hint": "delete it or choose another --out to start over"}
    keep = ("time_budget",)  # a resumed search may be given more time
    old = {k: v for k, v in (data.get("config") or {}).items() if k not in keep}
    new = {k: v for k, v in cfg.to_dict().items() if k not in keep}
    if old != new or data.get("model_file") != model_file:
        return {"error": f"{path}: this directory holds a search with another config or model",
                "hint": "use a new --out directory, or the same options to resume"}
    return {"data": data}


# The budget clocks, looked up at each reading (tests replace one to simulate a slow process).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class BudgetClock:
    """Seconds spent on the search over all its sessions, as rank 0 measures them: every
    process reads the same number, so every process takes the same budget decisions."""

    def __init__(self, kind: str, spent_before: float) -> None:
        self.kind, self.before, self.start = kind, spent_before, CLOCKS[kind]()

    def elapsed(self) -> float:
        mine = self.before + CLOCKS[self.kind]() - self.start
        # A collective: every process calls it at the same points of the (identical) control flow.
        return distributed.all_reduce_floats([mine if distributed.is_main() else 0.0])[0]


# --- the search -------------------------------------------------------------------------------

@dataclasses.dataclass
class SearchResult:
    results: dict[str, Any]
    path: Path


@dataclasses.dataclass
class _Session:
    """One run of :func:`search` (a fresh start or a resume): what every step needs."""

    model: nn.Module
    data: DataBundle
    cfg: SearchConfig
    state: SearchState
    clock: BudgetClock
    out: Path
    model_file: str
    log: Callable[[str], None]
    max_trials: int | None = None
    progress: bool = False
    new: int = 0  # trials run (not replayed from the state) in this session


def _score(t: dict[str, Any], cfg: SearchConfig, slack: float) -> tuple[int, float]:
    """Sort key (lower is better): feasible trials by the objective, then the rest by drop."""
    if t["status"] != "done":
        return (2, 0.0)
    if t["val_drop_pt"] > cfg.max_drop + slack:
        return (1, t["val_drop_pt"])
    obj = {"size": t["bytes"], "latency": -(t.get("speedup") or 0.0), "macs": t["macs"]}[cfg.objective]
    return (0, obj)


def _promote_key(t: dict[str, Any], cfg: SearchConfig, slack: float) -> tuple[int, float]:
    """Who goes on to the next rung. With a target, the user has said how small / fast is
    enough: the most accurate trials (validation) that meet it go first, as :func:`choose`
    will pick; without one, the best by the objective within the drop plus ``slack``."""
    if cfg.target is None or t["status"] != "done":
        return _score(t, cfg, slack)
    return (0 if _meets_target(t, cfg) else 1, -t["val_top1"])


def _meets_target(t: dict[str, Any], cfg: SearchConfig) -> bool:
    kind, value = parse_target(cfg.target or "1x", cfg.objective)
    metric = {"size": "size_ratio", "latency": "speedup", "macs": "macs_ratio"}[cfg.objective]
    return t["bytes"] <= value if kind == "bytes" else (t.get(metric) or 0) >= value


def _trial(s: _Session, knobs: dict[str, Any], rung: int) -> dict[str, Any]:
    """Run one candidate at one rung (every process: its fine-tunes are data-parallel); rank 0
    measures the artifact it wrote and every process returns rank 0's record."""
    raw = build_recipe(knobs, rung, s.cfg, s.state.data["sensitivity"])
    tid = raw["name"]
    done = s.state.data["trials"].get(tid)
    if done is not None:
        s.log(f"  {tid}: resumed from state")
        return done
    t0 = time.perf_counter()
    recipe = parse_recipe(raw, tid)
    with make_progress(s.progress) as bar:  # one bar per trial over its stages (rank 0, terminal)
        task = bar.add_task(tid, total=len(recipe.stages), info="")
        res = run_recipe(recipe, s.model, s.data, s.out / "trials" / tid, model_file=s.model_file,
                         test=False, latency=False, progress=False,
                         log=lambda line: bar.update(task, advance=1, info=line.split(": ", 1)[-1]))
    rec = _record(s, knobs, rung, raw, res.results["stages"], t0) if distributed.is_main() else None
    rec = distributed.broadcast_json(rec)
    s.log(f"  {tid}: {rec['bytes']:,} B ({rec['size_ratio']:.1f}x), {rec['speedup']:.2f}x faster, "
          f"val {100 * rec['val_top1']:.2f}% ({rec['val_drop_pt']:+.2f} pt) in {rec['seconds']:.0f} s")
    return rec


def _record(s: _Session, knobs: dict[str, Any], rung: int, raw: dict[str, Any],
            stages: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """A finished trial's record: the last stage's measured row and its b1 latency vs the original."""
    tid, final = raw["name"], stages[-1]
    runner = _load(s.out / "trials" / tid / final["file"])
    samples = interleaved_latency({"original": s.model, "trial": runner}, s.data.test.tensors[0][:1],
                                  rounds=20)
    summ = latency_summary(samples, "original")
    return {"trial": tid, "rung": rung, "knobs": knob_key(knobs), "knob_values": knobs, "status": "done",
            "recipe": raw, "file": str(Path("trials") / tid / final["file"]),
            **{k: final[k] for k in ("bytes", "params", "nonzero", "macs", "val_top1", "size_ratio",
                                     "macs_ratio", "val_drop_pt")},
            "speedup": summ["trial"]["speedup"], "layers": final["layers"],
            "stages": [{k: st.get(k) for k in ("label", "bytes", "size_ratio", "val_top1", "val_drop_pt",
                                               "seconds")} for st in stages],
            "seconds": time.perf_counter() - t0}


def _estimate(state: SearchState, rung: int, cfg: SearchConfig) -> float:
    """Expected budget-clock seconds of the next trial at ``rung``: the mean of that rung's
    trials so far, else the previous rung's scaled by the fine-tuning epochs."""
    def mean(r: int) -> float | None:
        secs = [t["clock_seconds"] for t in state.data["trials"].values()
                if t["rung"] == r and "clock_seconds" in t]
        return sum(secs) / len(secs) if secs else None

    def epochs(r: int) -> int:  # + 1: a trial's fixed costs (packing, measuring) weigh about an epoch
        # As build_recipe scales them: with epochs_scale 0.3 the last rung runs 8 x 1 + 2 epochs,
        # not 8 x 4 + 8 (unscaled, the estimate was 3.7x too high and no finalist ever fitted).
        rounds, ep, ep2 = rung_budget(r, cfg.rungs)
        return rounds * _epochs(ep, cfg.epochs_scale) + _epochs(ep2, cfg.epochs_scale) + 1

    for r in range(rung, -1, -1):
        m = mean(r)
        if m is not None:
            return m * epochs(rung) / epochs(r)
    return 0.0


def _ort(path: Path) -> Any:
    from deepshrink.quantization import OrtModel

    return OrtModel(path, threads=1)


def search(model: nn.Module, data: DataBundle, config: SearchConfig, out_dir: str | Path, *,
           model_file: str | Path, command: str | None = None, max_trials: int | None = None,
           log: Callable[[str], None] | None = None, progress: bool = False) -> SearchResult:
    """Run (or resume) the search; write ``search.json`` into ``out_dir`` (render it with
    :func:`deepshrink.report.write_report`). Under torchrun, run it on every process: trials
    train data-parallel, rank 0 writes the files and every process returns the same result.

    ``max_trials`` stops after that many *new* trials (as an interrupt would), leaving the state
    to resume from. ``progress``: a live bar per trial (its stages) on a terminal.
    """
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    distributed.setup(config.device)  # under torchrun: join the group before the first collective
    out = Path(out_dir)
    model = copy.deepcopy(model).eval()
    state = SearchState.open(out, config, str(model_file))
    s = _Session(model, data, config, state, BudgetClock(config.budget_clock, state.data["elapsed"]),
                 out, str(model_file), lambda m: say(m) if distributed.is_main() else None, max_trials,
                 progress)
    if state.data["sensitivity"] is None:
        s.log("sensitivity scan (validation split) ...")
        sens = sensitivity(model, data) if distributed.is_main() else None
        state.data["sensitivity"] = distributed.broadcast_json(sens)
        state.data["elapsed"] = s.clock.elapsed()
        state.save()
    stopped = _halving(s)
    if stopped:
        s.log(f"search {stopped}")
        if max_trials is not None and "new trial" in stopped:
            return SearchResult({"stopped": stopped, "trials": list(state.data["trials"].values())},
                                state.path)
    return _finish(s, command, stopped)


def _halving(s: _Session) -> str | None:
    """Successive halving over the candidates; why it stopped early, or None."""
    pool = draw_candidates(s.cfg)
    for rung in range(s.cfg.rungs):
        s.log(f"rung {rung}: {len(pool)} candidate(s), budget {rung_budget(rung, s.cfg.rungs)}")
        rung_trials, stopped, final = _rung(s, pool, rung)
        if final or rung + 1 == s.cfg.rungs:
            return stopped
        if stopped:  # a cut rung: promote from what ran, the finalist's budget stays reserved
            s.log(f"rung {rung}: {stopped}")
        if not rung_trials:  # nothing fitted at this rung: the leader so far goes on alone
            pool = pool[:1]
            continue
        # Early rungs fine-tune less, so accuracy recovers later: be lenient there, or only the
        # lightly compressed candidates survive (the low-fidelity bias of successive halving).
        slack = (s.cfg.rungs - 1 - rung) * max(1.25, 2 * s.cfg.max_drop)
        ranked = sorted(rung_trials, key=lambda t: _promote_key(t, s.cfg, slack))
        # ceil: with few candidates, floor division would leave one survivor per rung; the time
        # budget, not the rounding, should decide how many get the long fine-tune.
        promoted = ranked[: max(1, math.ceil(len(ranked) / s.cfg.eta))]
        pool = _dedupe([toward_target(t, s.cfg, s.state.data["sensitivity"]) for t in promoted])
    return None


def _dedupe(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two promoted candidates may land on the same knobs once moved toward the target."""
    out: dict[str, dict[str, Any]] = {}
    for knobs in pool:
        out.setdefault(knob_key(knobs), knobs)
    return list(out.values())


# A file's bytes move by a few percent between rungs at the same knobs (the weights, hence the
# Huffman codes, differ; on LeNet-300 the long fine-tune made them 2.4-3.2 % larger: 50.6x at
# rung 0 became 49.4x, 53.1x became 51.4x).
TARGET_MARGIN = 0.05


def toward_target(trial: dict[str, Any], cfg: SearchConfig, sens: dict[str, Any] | None,
                  margin: float = TARGET_MARGIN) -> dict[str, Any]:
    """A promoted size candidate's knobs with its sparsity moved so that its file just meets the
    size target (plus ``margin``): less pruning where the trial had room to spare (accuracy for
    free), more where it missed. Size is cheap to predict, accuracy is not: the trial's own
    bytes per non-zero weight (its bits, its index) stay as measured; only the count moves.
    Other objectives, or no target, leave the knobs as they are."""
    knobs = trial["knob_values"]
    if cfg.objective != "size" or cfg.target is None or not sens or "sparsity" not in knobs:
        return knobs
    kind, value = parse_target(cfg.target, cfg.objective)
    goal = value if kind == "bytes" else trial["bytes"] * trial["size_ratio"] / value
    weights = sum(sens["params"].values())  # the prunable weights the sparsity is a share of
    unpruned = trial["nonzero"] - (1 - knobs["sparsity"]) * weights  # biases, other layers
    keep = (goal / (1 + margin) / (trial["bytes"] / trial["nonzero"]) - unpruned) / weights
    # Rounded up to the next 0.25 %: the step errs toward meeting the target.
    sparsity = min(0.99, max(0.5, math.ceil((1 - keep) * 400 - 1e-6) / 400))
    return {**knobs, "sparsity": sparsity}


def _rung(s: _Session, pool: list[dict[str, Any]], rung: int
          ) -> tuple[list[dict[str, Any]], str | None, bool]:
    """Every candidate of ``pool`` at ``rung`` while the budget lasts: (records, why it was cut,
    whether the search must stop). Before the last rung, one last-rung trial's estimated cost
    stays reserved, so the budget always pays for the finalist's long fine-tune."""
    cfg, trials, last = s.cfg, s.state.data["trials"], s.cfg.rungs - 1
    records: list[dict[str, Any]] = []
    for i, knobs in enumerate(pool):
        # A trial already in the state costs nothing now: resuming replays it, budget or not.
        known = any(t["knobs"] == knob_key(knobs) and t["rung"] == rung for t in trials.values())
        c0 = s.clock.elapsed()
        reserve = _estimate(s.state, last, cfg) if rung < last else 0.0
        if not known and cfg.time_budget is not None and (
                c0 + _estimate(s.state, rung, cfg) + reserve > cfg.time_budget):
            why = (f"time budget of {cfg.time_budget:.0f} s spent (next trial would not fit"
                   + (f" beside the {reserve:.0f} s kept for the last rung)" if reserve else ")"))
            return records, why, rung == last
        if not known and s.max_trials is not None and s.new >= s.max_trials:
            return records, f"stopped after {s.max_trials} new trial(s)", True
        s.log(f"[trial {i + 1}/{len(pool)}, rung {rung}, {c0:.0f} s]")
        rec = _trial(s, knobs, rung)
        rec.setdefault("clock_seconds", s.clock.elapsed() - c0)
        s.new += 0 if known else 1
        trials[rec["trial"]] = rec
        s.state.data["elapsed"] = s.clock.elapsed()
        s.state.save()
        records.append(rec)
    return records, None, False


def choose(trials: list[dict[str, Any]], cfg: SearchConfig) -> dict[str, Any] | None:
    """The chosen trial, from validation numbers only (see the module docstring). A candidate
    fine-tuned again at a later rung supersedes its shorter run: the same architecture timed
    twice differs only by timing noise, and picking the earlier copy for it would throw away
    the longer fine-tune."""
    def key(t: dict[str, Any]) -> str:
        return t.get("knobs", t["trial"])

    last = {key(t): t.get("rung", 0) for t in sorted(trials, key=lambda t: t.get("rung", 0))}
    ok = [t for t in trials if t["status"] == "done" and t["val_drop_pt"] <= cfg.max_drop
          and t.get("rung", 0) == last[key(t)]]
    if cfg.target is not None:
        met = [t for t in ok if _meets_target(t, cfg)]
        if met:
            return max(met, key=lambda t: (t["val_top1"], t["trial"]))
    if not ok:
        return None
    return min(ok, key=lambda t: (_score(t, cfg, 0.0), t["trial"]))


def _finish(s: _Session, command: str | None, stopped: str | None) -> SearchResult:
    """Select (validation only), then read test once for the returned models; rank 0 measures
    and writes ``search.json``, every process returns its results."""
    seconds = s.clock.elapsed()
    results = _select_and_measure(s, command, stopped, seconds) if distributed.is_main() else None
    results = distributed.broadcast_json(results)
    path = s.out / "search.json"
    distributed.on_main(atomic_write_text, path, json.dumps(results, indent=2, default=str))
    chosen = next((t for t in results["selected"] if t["role"] == "chosen"), None)
    if chosen is None:
        s.log(f"no trial stayed within {s.cfg.max_drop} pt on validation")
    else:
        s.log(f"chosen {chosen['trial']}: {chosen['bytes']:,} B ({chosen['size_ratio']:.1f}x), "
              f"val {100 * chosen['val_top1']:.2f}%, "
              f"test {100 * chosen['test_top1']:.2f}% ({chosen['test_drop_pt']:+.2f} pt)")
    return SearchResult(results, path)


def _select_and_measure(s: _Session, command: str | None, stopped: str | None,
                        seconds: float) -> dict[str, Any]:
    cfg = s.cfg
    trials = sorted(s.state.data["trials"].values(), key=lambda t: (t["rung"], t["trial"]))
    chosen = choose(trials, cfg)
    fronts = {"size": pareto_front(trials, "bytes", "val_top1"),
              "latency": pareto_front(trials, "speedup", "val_top1", minimize_x=False)}
    picked: dict[str, dict[str, Any]] = {}
    if chosen is not None:
        picked[chosen["trial"]] = {**chosen, "role": "chosen"}
    for name, front in fronts.items():
        for t in front:
            picked.setdefault(t["trial"], {**t, "role": f"{name} front"})
    selected = list(picked.values())
    # Selection is over. Now, and only now, the test split: once per returned model.
    orig = _original(s.model, s.data, s.model_file)
    runners = {"original": s.model}
    for t in selected:
        runners[t["trial"]] = runner = _load(s.out / t["file"])
        t["test_top1"] = evaluate(runner, s.data.loader("test", 1000))["top1"]
        t["test_drop_pt"] = 100 * (orig["test_top1"] - t["test_top1"])
    samples = interleaved_latency(runners, s.data.test.tensors[0][:1])
    summ = latency_summary(samples, "original")
    for t in selected:
        t["speedup_final"] = summ[t["trial"]]["speedup"]
    return {"kind": "search", "objective": cfg.objective, "max_drop": cfg.max_drop, "target": cfg.target,
            "config": cfg.to_dict(), "model_file": s.model_file, "data": s.data.name,
            "command": command or " ".join(sys.argv), "machine": machine_info(), "original": orig,
            "sensitivity": s.state.data["sensitivity"], "trials": trials,
            "chosen": chosen["trial"] if chosen else None, "selected": selected,
            "fronts": {k: [t["trial"] for t in v] for k, v in fronts.items()},
            "latency": {"1": {"samples_ms": samples, "summary": summ}},
            "stopped": stopped, "seconds": seconds, "world_size": distributed.world_size()}


def _load(path: Path) -> Any:
    return _ort(path) if path.suffix == ".onnx" else checkpoint.load(path)


def _original(model: nn.Module, data: DataBundle, model_file: str | Path) -> dict[str, Any]:
    from deepshrink.measure import count_macs, count_params, file_bytes

    total, nonzero = count_params(model)
    return {"label": "original", "bytes": file_bytes(model_file), "params": total, "nonzero": nonzero,
            "macs": count_macs(model, data.train.tensors[0][:1])[0], "speedup": 1.0, "size_ratio": 1.0,
            "val_top1": evaluate(model, data.loader("val", 1000))["top1"],
            "test_top1": evaluate(model, data.loader("test", 1000))["top1"]}


__all__ = ["CLOCKS", "SEEDS", "SPACES", "BudgetClock", "SearchConfig", "SearchResult", "allocate",
           "allocate_even", "build_recipe", "choose", "draw_candidates", "parse_target", "search",
           "toward_target"]
