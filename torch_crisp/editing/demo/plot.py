"""A dependency-free SVG scatter plot: edit success against capability retained, per method."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

__all__ = ["write_tradeoff_svg"]

_W, _H, _PAD = 520, 400, 60
_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def write_tradeoff_svg(results: dict[str, Any], path: str | Path) -> Path:
    """Plot ``reliability`` (x) against ``capability / base capability`` (y) for each method.

    Both axes span [0, 1] (capability retained is clipped at 1.05 so a method that improves the
    skill stays in view). Returns the written path.
    """
    base = results["base"]["capability"] or 1.0
    methods = {k: v for k, v in results["methods"].items() if "reliability" in v}

    def x(v: float) -> float:
        return _PAD + v * (_W - 2 * _PAD)

    def y(v: float) -> float:
        return _H - _PAD - min(v, 1.05) / 1.05 * (_H - 2 * _PAD)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_W}" height="{_H}" fill="white"/>',
        f'<text x="{_W / 2}" y="20" text-anchor="middle" font-size="14">Edit success vs capability retained</text>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(tick)}" y1="{y(0)}" x2="{x(tick)}" y2="{y(1.05)}" stroke="#eee"/>')
        parts.append(f'<line x1="{x(0)}" y1="{y(tick)}" x2="{x(1)}" y2="{y(tick)}" stroke="#eee"/>')
        parts.append(f'<text x="{x(tick)}" y="{y(0) + 16}" text-anchor="middle">{tick:g}</text>')
        parts.append(f'<text x="{x(0) - 8}" y="{y(tick) + 4}" text-anchor="end">{tick:g}</text>')
    parts.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(0)}" stroke="black"/>')
    parts.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(0)}" y2="{y(1.05)}" stroke="black"/>')
    parts.append(f'<text x="{_W / 2}" y="{_H - 20}" text-anchor="middle">edit reliability (greedy exact match)</text>')
    parts.append(
        f'<text x="16" y="{_H / 2}" text-anchor="middle" transform="rotate(-90 16 {_H / 2})">'
        "capability retained (skill accuracy / base)</text>"
    )
    for index, (name, metrics) in enumerate(methods.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        px, py = x(metrics["reliability"]), y(metrics["capability"] / base)
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="6" fill="{colour}"/>')
        parts.append(
            f'<text x="{px - 8:.1f}" y="{py - 9 - 12 * (index % 2):.1f}" text-anchor="end" '
            f'fill="{colour}">{escape(name)}</text>'
        )
    parts.append("</svg>")
    path = Path(path)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
