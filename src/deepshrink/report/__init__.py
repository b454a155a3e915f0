"""Self-contained HTML reports (inline SVG + CSS) of recipe runs and searches, and the Pareto PNG."""

from deepshrink.report.html import render_report, write_report
from deepshrink.report.png import pareto_png

__all__ = ["pareto_png", "render_report", "write_report"]
