"""Tiny inline-SVG charts (scatter with a front line, bars, latency strips): the report must
render with no network and no plotting library, so the charts are written as SVG text."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from html import escape

W, H = 560, 340
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 30, 48
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@dataclasses.dataclass
class Series:
    """Points ``(x, y, label)``; ``line`` joins them in x order (a Pareto front)."""

    name: str
    points: list[tuple[float, float, str]]
    color: str = PALETTE[0]
    marker: str = "circle"  # circle | square | star
    line: bool = False
    size: float = 4.0


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        ticks = [10.0**e * m for e in range(a, b + 1) for m in (1, 2, 5) if lo <= 10.0**e * m <= hi]
        return ticks if len(ticks) >= 2 else [lo, hi]
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:.4g}"


class _Axes:
    def __init__(self, xs: Sequence[float], ys: Sequence[float], log_x: bool) -> None:
        self.log_x = log_x and all(x > 0 for x in xs)
        lo, hi = min(xs), max(xs)
        if self.log_x:
            lo, hi = lo / 1.3, hi * 1.3
        else:
            span = (hi - lo) or abs(hi) or 1.0
            lo, hi = lo - 0.06 * span, hi + 0.06 * span
        ylo, yhi = min(ys), max(ys)
        yspan = (yhi - ylo) or 1.0
        self.x0, self.x1, self.y0, self.y1 = lo, hi, ylo - 0.08 * yspan, yhi + 0.08 * yspan

    def px(self, x: float) -> float:
        if self.log_x:
            t = (math.log(x) - math.log(self.x0)) / (math.log(self.x1) - math.log(self.x0))
        else:
            t = (x - self.x0) / ((self.x1 - self.x0) or 1)
        return PAD_L + t * (W - PAD_L - PAD_R)

    def py(self, y: float) -> float:
        return H - PAD_B - (y - self.y0) / ((self.y1 - self.y0) or 1) * (H - PAD_T - PAD_B)


def _frame(ax: _Axes, title: str, x_label: str, y_label: str) -> list[str]:
    out = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
           'fill="#fff" stroke="#999"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>',
           f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 8}" text-anchor="middle">{escape(x_label)}</text>',
           f'<text transform="translate(14,{(PAD_T + H - PAD_B) / 2}) rotate(-90)" '
           f'text-anchor="middle">{escape(y_label)}</text>']
    for t in _ticks(ax.x0, ax.x1, ax.log_x):
        x = ax.px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{H - PAD_B}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for t in _ticks(ax.y0, ax.y1, False):
        y = ax.py(t)
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{PAD_L - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    return out


def _marker(kind: str, x: float, y: float, r: float, color: str, label: str) -> str:
    tip = f"<title>{escape(label)}</title>"
    if kind == "square":
        return (f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" '
                f'fill="{color}" stroke="#000">{tip}</rect>')
    if kind == "star":
        pts = " ".join(f"{x + (r * 1.8 if i % 2 == 0 else r * 0.8) * math.sin(i * math.pi / 5):.1f},"
                       f"{y - (r * 1.8 if i % 2 == 0 else r * 0.8) * math.cos(i * math.pi / 5):.1f}"
                       for i in range(10))
        return f'<polygon points="{pts}" fill="{color}" stroke="#000">{tip}</polygon>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}" fill-opacity="0.75">{tip}</circle>'


def scatter(series: Sequence[Series], *, title: str, x_label: str, y_label: str, log_x: bool = False,
            chart_id: str = "") -> str:
    """A scatter plot with optional connecting lines and a legend; hover shows point labels."""
    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points]
    if not xs:
        return f'<p class="empty">{escape(title)}: no points</p>'
    ax = _Axes(xs, ys, log_x)
    out = _frame(ax, title, x_label + (" (log)" if ax.log_x else ""), y_label)
    for s in series:
        if s.line and len(s.points) > 1:
            pts = " ".join(f"{ax.px(x):.1f},{ax.py(y):.1f}" for x, y, _ in sorted(s.points))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{s.color}" stroke-width="2"/>')
        out.extend(_marker(s.marker, ax.px(x), ax.py(y), s.size, s.color, f"{s.name}: {lab}")
                   for x, y, lab in s.points)
    for i, s in enumerate(series):
        y = PAD_T + 12 + 14 * i
        out.append(_marker(s.marker, W - PAD_R - 110, y - 4, 4, s.color, s.name) +
                   f'<text x="{W - PAD_R - 100}" y="{y}">{escape(s.name)}</text>')
    return _svg(out, chart_id, "scatter")


def bars(labels: Sequence[str], values: Sequence[float], *, title: str, y_label: str,
         chart_id: str = "", y_max: float | None = None, color: str = PALETTE[0]) -> str:
    """Vertical bars, one per label (layer names), value printed on top."""
    if not values:
        return f'<p class="empty">{escape(title)}: no data</p>'
    top = y_max if y_max is not None else (max(values) or 1.0)
    out = [f'<text x="{W / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>',
           f'<text transform="translate(14,{(PAD_T + H - PAD_B) / 2}) rotate(-90)" '
           f'text-anchor="middle">{escape(y_label)}</text>',
           f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{H - PAD_B}" y2="{H - PAD_B}" stroke="#999"/>']
    slot = (W - PAD_L - PAD_R) / len(values)
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        h = max(0.0, min(1.0, v / top)) * (H - PAD_T - PAD_B)
        x = PAD_L + i * slot + slot * 0.15
        out.append(f'<rect x="{x:.1f}" y="{H - PAD_B - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                   f'fill="{color}"><title>{escape(lab)}: {_fmt(v)}</title></rect>'
                   f'<text x="{x + slot * 0.35:.1f}" y="{H - PAD_B - h - 3:.1f}" '
                   f'text-anchor="middle">{_fmt(v)}</text>'
                   f'<text x="{x + slot * 0.35:.1f}" y="{H - PAD_B + 14}" '
                   f'text-anchor="middle">{escape(lab[-10:])}</text>')
    return _svg(out, chart_id, "bars")


def strips(samples: dict[str, Sequence[float]], *, title: str, x_label: str, chart_id: str = "") -> str:
    """Latency distribution: one row per model, every sample a dot, the median a bar."""
    if not samples:
        return f'<p class="empty">{escape(title)}: no samples</p>'
    allv = [v for s in samples.values() for v in s]
    ax = _Axes(allv, [0.0, 1.0], log_x=max(allv) / max(min(allv), 1e-9) > 20)
    rows = len(samples)
    height = PAD_T + PAD_B + 26 * rows
    out = [f'<text x="{W / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>',
           f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{height - 8}" text-anchor="middle">'
           f'{escape(x_label)}</text>']
    for t in _ticks(ax.x0, ax.x1, ax.log_x):
        x = ax.px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{height - PAD_B}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{height - PAD_B + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for i, (name, s) in enumerate(samples.items()):
        y = PAD_T + 13 + 26 * i
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<text x="{PAD_L - 4}" y="{y + 4}" text-anchor="end">{escape(name[:12])}</text>')
        out.extend(f'<circle cx="{ax.px(v):.1f}" cy="{y + ((j % 5) - 2) * 1.5:.1f}" r="2" fill="{color}" '
                   f'fill-opacity="0.5"/>' for j, v in enumerate(s))
        med = sorted(s)[len(s) // 2]
        out.append(f'<line x1="{ax.px(med):.1f}" x2="{ax.px(med):.1f}" y1="{y - 9}" y2="{y + 9}" '
                   f'stroke="#000" stroke-width="2"><title>{escape(name)} median {med:.4f} ms</title></line>')
    return _svg(out, chart_id, "strips", height)


def _svg(parts: list[str], chart_id: str, kind: str, height: int = H) -> str:
    ident = f' id="{escape(chart_id)}"' if chart_id else ""
    return (f'<svg{ident} class="chart {kind}" xmlns="http://www.w3.org/2000/svg" width="{W}" '
            f'height="{height}" viewBox="0 0 {W} {height}" role="img">' + "".join(parts) + "</svg>")
