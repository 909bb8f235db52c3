"""Charts for the dashboard as server-rendered SVG: no script, nothing to load. Each bar
carries its month and value (``data-month``, ``data-value``, minor units) and a ``<title>``
tooltip, so a test (or a screen reader) reads the numbers the chart draws."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: int


def bar_chart(
    bars: Sequence[Bar],
    *,
    title: str,
    fmt: Callable[[int], str],
    width: int = 640,
    height: int = 220,
    chart_id: str = "chart",
) -> str:
    """An SVG bar chart of ``bars`` (non-negative values), the largest bar full height."""
    left, bottom, top = 70, 28, 16
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max((b.value for b in bars), default=0) or 1
    slot = plot_w / max(len(bars), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(chart_id)}" class="chart" '
        f'role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" '
        'stroke="#8894a3"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" class="axis">'
        f"{escape(fmt(peak if peak != 1 or any(b.value for b in bars) else 0))}</text>",
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" class="axis">'
        f"{escape(fmt(0))}</text>",
    ]
    for i, bar in enumerate(bars):
        h = plot_h * bar.value / peak
        x = left + i * slot + slot * 0.15
        y = top + plot_h - h
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{h:.1f}" fill="#2f5d8a" data-month="{escape(bar.label)}" '
            f'data-value="{bar.value}"><title>{escape(bar.label)}: {escape(fmt(bar.value))}'
            "</title></rect>"
        )
        parts.append(
            f'<text x="{x + slot * 0.35:.1f}" y="{height - 10}" text-anchor="middle" '
            f'class="axis">{escape(bar.label[2:])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
