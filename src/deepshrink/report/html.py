"""One self-contained HTML report per run or search: inline SVG charts and CSS, no scripts, no
network. Rendered from the ``results.json`` dict alone, so ``deepshrink report results.json``
regenerates it exactly."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from deepshrink.fileio import atomic_write_text
from deepshrink.report.svg import PALETTE, Series, bars, scatter, strips
from deepshrink.workflow.pareto import pareto_front

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.chosen td{background:#eaf6e9}
.charts{display:flex;flex-wrap:wrap;gap:12px}svg.chart{border:1px solid #eee;font-size:11px}
svg .t{font-weight:600;font-size:12px}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
.note{color:#555}
"""


def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if key.endswith("top1"):
            return f"{100 * v:.2f}%"
        if key.endswith("_pt"):
            return f"{v:+.2f}" if key.startswith("d") else f"{v:.2f}"
        if "ratio" in key or "speedup" in key:
            return f"{v:.2f}x"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return escape(str(v))


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str], *, table_id: str = "",
          highlight: Callable[[dict[str, Any]], bool] | None = None) -> str:
    left = {"stage", "label", "layer", "name", "trial", "knobs", "file", "status", "model"}
    head = "".join(f'<th class="{"l" if c in left else ""}">{escape(c)}</th>' for c in cols)
    body = []
    for r in rows:
        cls = ' class="chosen"' if highlight and highlight(r) else ""
        body.append(f"<tr{cls}>" + "".join(
            f'<td class="{"l" if c in left else ""}">{_fmt(r.get(c), c)}</td>' for c in cols) + "</tr>")
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><tr>{head}</tr>{''.join(body)}</table>"


def _xy(pts: Sequence[dict[str, Any]], x: str, y: str, scale_y: float = 100.0
        ) -> list[tuple[float, float, str]]:
    return [(float(p[x]), scale_y * float(p[y]), str(p.get("label", ""))) for p in pts
            if p.get(x) is not None and p.get(y) is not None]


def tradeoff_charts(points: Sequence[dict[str, Any]], original: dict[str, Any],
                    chosen: Sequence[dict[str, Any]] = ()) -> str:
    """Accuracy vs size and accuracy vs latency speedup, the Pareto fronts drawn as lines."""
    out = []
    for x, label, log, minimize, cid in (("bytes", "bytes on disk", True, True, "chart-size"),
                                         ("speedup", "latency speedup vs original (b1)", False, False,
                                          "chart-latency")):
        front = pareto_front([*points, original], x, "val_top1", minimize_x=minimize)
        series = [Series("candidates", _xy(points, x, "val_top1"), PALETTE[0]),
                  Series("Pareto front", _xy(front, x, "val_top1"), PALETTE[1], line=True, size=3),
                  Series("original", _xy([original], x, "val_top1"), PALETTE[3], marker="square", size=6)]
        if chosen:
            series.append(Series("chosen", _xy(chosen, x, "val_top1"), PALETTE[2], marker="star", size=5))
        out.append(scatter(series, title=f"validation accuracy vs {label}", x_label=label,
                           y_label="val top-1 (%)", log_x=log, chart_id=cid))
    return '<div class="charts">' + "".join(out) + "</div>"


def layer_charts(layers: Sequence[dict[str, Any]], title: str) -> str:
    """Per-layer sparsity, bits, kept channels and rank (when any layer has one)."""
    layers = [r for r in layers if len(r.get("shape", [])) >= 2 or r.get("rank")]
    if not layers:
        return '<p class="empty">no per-layer data</p>'
    names = [r["name"] for r in layers]
    charts = [bars(names, [100 * r.get("sparsity", 0.0) for r in layers], title=f"{title}: sparsity",
                   y_label="% weights zero", y_max=100, chart_id="chart-layer-sparsity"),
              bars(names, [float(r.get("bits", 32)) for r in layers], title=f"{title}: bits per weight",
                   y_label="bits", y_max=32, chart_id="chart-layer-bits", color=PALETTE[2]),
              bars(names, [100 * r.get("channels", 0) / max(1, r.get("channels_original", 1))
                           for r in layers], title=f"{title}: kept output channels",
                   y_label="% of original", y_max=100, chart_id="chart-layer-channels", color=PALETTE[4])]
    if any("rank" in r for r in layers):
        charts.append(bars(names, [float(r.get("rank", 0)) for r in layers], title=f"{title}: rank",
                           y_label="rank", chart_id="chart-layer-rank", color=PALETTE[5]))
    return '<div class="charts">' + "".join(charts) + "</div>"


def latency_chart(latency: dict[str, Any]) -> str:
    if not latency:
        return '<p class="note">latency was not measured</p>'
    out = []
    for b, lat in latency.items():
        out.append(strips(lat["samples_ms"], title=f"latency per call, batch {b} (interleaved run)",
                          x_label="ms per call", chart_id=f"chart-latency-b{b}"))
    return '<div class="charts">' + "".join(out) + "</div>"


def _demo_table(demo: dict[str, Any] | None) -> str:
    """``deepshrink demo`` adds its whole results table (every technique, test split)."""
    if not demo or not demo.get("rows"):
        return ""
    cols = list(dict.fromkeys(k for r in demo["rows"] for k in r))
    return f"<h2>{escape(demo.get('title', 'demo'))}</h2>" + table(demo["rows"], cols, table_id="demo-table")


def _machine(res: dict[str, Any]) -> str:
    m = res.get("machine", {})
    rows = "".join(f'<tr><th class="l">{escape(str(k))}</th><td class="l">{escape(str(v))}</td></tr>'
                   for k, v in m.items())
    return (f"<h2>Machine and reproduction</h2><table>{rows}</table>"
            f"<p>command:</p><pre>{escape(str(res.get('command', '')))}</pre>")


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{CSS}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>')


def render_run(res: dict[str, Any]) -> str:
    stages = res["stages"]
    for s in stages:
        s["speedup"] = (s.get("latency") or {}).get("1", {}).get("speedup")
    orig, rest = stages[0], stages[1:]
    cols = ["index", "label", "file", "bytes", "size_ratio", "params", "nonzero", "macs", "macs_ratio",
            "val_top1", "test_top1", "val_drop_pt", "test_drop_pt", "speedup", "seconds"]
    last = stages[-1]
    body = [f'<p>recipe <b>{escape(res["recipe"]["name"])}</b> on '
            f'<b>{escape(str(res.get("model_file")))}</b>, data <b>{escape(str(res.get("data")))}</b>; '
            f'{res.get("seconds", 0):.0f} s. Bytes are real files, '
            "accuracy that of each artifact loaded back; speedups from one interleaved run.</p>",
            "<h2>Stages</h2>", table(stages, cols, table_id="stage-table"),
            "<h2>Trade-off</h2>", tradeoff_charts(rest, orig),
            "<h2>Per layer (final stage)</h2>", layer_charts(last.get("layers", []), last["label"]),
            "<h2>Latency distribution</h2>", latency_chart(res.get("latency", {})),
            _demo_table(res.get("demo_table")), _machine(res), "<h2>Recipe (configs)</h2>",
            f"<pre>{escape(json.dumps(res['recipe'], indent=2))}</pre>"]
    return _page(f"deepshrink run: {res['recipe']['name']}", "".join(body))


def render_search(res: dict[str, Any]) -> str:
    trials = [t for t in res["trials"] if t.get("status") == "done"]
    orig = res["original"]
    finals = [t for t in trials if t.get("final")] or trials
    chosen = res.get("selected", [])
    chosen_ids = {c["trial"] for c in chosen}
    cols = ["trial", "rung", "knobs", "bytes", "size_ratio", "macs_ratio", "speedup", "val_top1",
            "val_drop_pt", "seconds"]
    sel_cols = ["trial", "role", "knobs", "bytes", "size_ratio", "speedup", "val_top1", "val_drop_pt",
                "test_top1", "test_drop_pt"]
    best = chosen[0] if chosen else None
    body = [f'<p>objective <b>{escape(str(res["objective"]))}</b>, max drop <b>{res["max_drop"]}</b> pt '
            f'(validation), target <b>{escape(str(res.get("target")))}</b>, model '
            f'<b>{escape(str(res.get("model_file")))}</b>, data <b>{escape(str(res.get("data")))}</b>; '
            f'{len(trials)} trials in {res.get("seconds", 0):.0f} s. Selection used the validation split '
            "only; test accuracy was measured once, for the models listed below.</p>",
            "<h2>Chosen models (test accuracy reported once)</h2>",
            table(chosen, sel_cols, table_id="chosen-table"),
            "<h2>Trade-off (every finished trial, validation accuracy)</h2>",
            tradeoff_charts(finals, orig, [c for c in chosen if c.get("role") == "chosen"])]
    if best and best.get("layers"):
        body += ["<h2>Per layer (chosen model)</h2>", layer_charts(best["layers"], best["trial"])]
    if best and best.get("stages"):
        body += ["<h2>Stages of the chosen model</h2>",
                 table(best["stages"], ["label", "bytes", "size_ratio", "val_top1", "val_drop_pt",
                                        "seconds"])]
    body += ["<h2>Latency distribution (front models vs original)</h2>",
             latency_chart(res.get("latency", {})),
             "<h2>All trials</h2>", table(res["trials"], [*cols, "status"], table_id="trials-table",
                                          highlight=lambda r: r.get("trial") in chosen_ids),
             _sensitivity(res.get("sensitivity")), _machine(res),
             "<h2>Recipes of the chosen models</h2>",
             "".join(f"<p>{escape(c['trial'])}</p><pre>{escape(json.dumps(c.get('recipe'), indent=2))}</pre>"
                     for c in chosen)]
    return _page(f"deepshrink search: {res['objective']}", "".join(body))


def _sensitivity(sens: dict[str, Any] | None) -> str:
    if not sens:
        return ""
    series = [Series(name, [(r, 100 * a, f"{name} {r:.2f}")
                            for r, a in zip(sens["ratios"], accs, strict=True)],
                     PALETTE[i % len(PALETTE)], line=True, size=3)
              for i, (name, accs) in enumerate(sens["top1"].items())]
    return ("<h2>Per-layer sensitivity (validation)</h2>" +
            scatter(series, title="val top-1 with one layer pruned", x_label="fraction of weights removed",
                    y_label="val top-1 (%)", chart_id="chart-sensitivity"))


def render_report(results: dict[str, Any]) -> str:
    kind = results.get("kind")
    if kind == "run":
        return render_run(results)
    if kind == "search":
        return render_search(results)
    from deepshrink.errors import FormatError

    raise FormatError(f"results kind {kind!r} is not 'run' or 'search'")


def write_report(results: dict[str, Any], path: str | Path, *, png: bool = True) -> Path:
    """Write the HTML report (atomically) and, when matplotlib is installed, ``<stem>-pareto.png``."""
    path = Path(path)
    atomic_write_text(path, render_report(results))
    if png:
        from deepshrink.report.png import pareto_png

        pareto_png(results, path.with_name(path.stem + "-pareto.png"))
    return path
