"""The demo's picture: what each method kept, locality (x) against capability retained (y).

Every method is driven to the same edit reliability, so what separates them is the damage done
elsewhere: the neighbour facts they changed (locality) and the held-out skills they lost
(capability retained = skill accuracy / the base model's). One marker per method, named in the
legend with its reliability (annotations beside points overlapped when several methods share a
point); over several seeds, the marker is the mean and the bars span the lowest to the highest
seed. When one method lies far off, a second panel zooms on those close to the base model.
:func:`reliability_figure` draws the other trade-off, edits learnt (x) against capability retained
(y): a method with a setting (``ewc:100``, ``crisp-budget:0.03``) is one point of a line through its
settings, so a peer's grid is a curve to hold CrispEdit's points against at equal reliability.
Drawn with matplotlib (the ``plot`` extra); without it there is no picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Point",
    "points_from_results",
    "points_from_summary",
    "reliability_figure",
    "save_png",
    "tradeoff_figure",
    "write_reliability_png",
    "write_tradeoff_png",
]

_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h", "p", "d")
_ZOOM = 0.8  # the zoom panel shows methods at or above this locality and capability retained


@dataclass(frozen=True)
class Point:
    """One method's place in the picture; ranges are (lowest, highest) over seeds, or ``None``."""

    name: str
    locality: float
    capability_retained: float
    reliability: float
    locality_range: tuple[float, float] | None = None
    capability_range: tuple[float, float] | None = None
    reliability_range: tuple[float, float] | None = None


def points_from_results(results: dict[str, Any]) -> list[Point]:
    """Points of a one-seed ``results.json`` (methods lacking a measurement are left out)."""
    base = results["base"].get("capability") or 1.0
    return [
        Point(name, m["locality"], m["capability"] / base, m["reliability"])
        for name, m in results["methods"].items()
        if all(m.get(key) is not None for key in ("locality", "capability", "reliability"))
    ]


def points_from_summary(summary: dict[str, Any]) -> list[Point]:
    """Points of a multi-seed summary (``{method: {metric: {mean, min, max}}}``): means and ranges."""
    points = []
    for name, metrics in summary["methods"].items():
        cells = [metrics.get(key) for key in ("locality", "capability_retained", "reliability")]
        if any(cell is None for cell in cells):
            continue
        loc, cap, rel = cells
        points.append(
            Point(
                name, loc["mean"], cap["mean"], rel["mean"],
                (loc["min"], loc["max"]), (cap["min"], cap["max"]), (rel["min"], rel["max"]),
            )
        )
    return points


def _label(point: Point) -> str:
    text = f"{point.name}: reliability {point.reliability:.2f}"
    if point.reliability_range is not None and point.reliability_range[0] != point.reliability_range[1]:
        text += f" ({point.reliability_range[0]:.2f}–{point.reliability_range[1]:.2f})"
    return text


def _error(mean: float, span: tuple[float, float] | None) -> list[list[float]] | None:
    return None if span is None else [[max(mean - span[0], 0.0)], [max(span[1] - mean, 0.0)]]


def _limits(values: list[float]) -> tuple[float, float]:
    # Start a little below the worst value (never below 0) and end just past "unchanged" (1.0),
    # so the differences between methods, not the empty unit square, fill the axes.
    low = min([1.0, *values])
    high = max([1.0, *values])
    margin = max(0.03, 0.08 * (high - low))
    return max(low - margin, 0.0) if low > 0 else -margin, high + margin


def _draw(axes: Any, points: list[Point]) -> tuple[list[float], list[float]]:
    """Draw the base model and every point on ``axes``; returns the x and y values drawn."""
    axes.axvline(1.0, color="0.8", lw=1, ls="--", zorder=0)
    axes.axhline(1.0, color="0.8", lw=1, ls="--", zorder=0)
    axes.plot([1.0], [1.0], marker="*", ms=14, color="black", ls="none", label="base model (before editing)")
    xs, ys = [1.0], [1.0]
    for index, point in enumerate(points):
        colour, marker = f"C{index % 10}", _MARKERS[index % len(_MARKERS)]
        # Hollow markers of different shapes stay distinguishable where methods coincide.
        axes.errorbar(
            [point.locality], [point.capability_retained],
            xerr=_error(point.locality, point.locality_range),
            yerr=_error(point.capability_retained, point.capability_range),
            fmt=marker, ms=10, mew=2, mfc="none", mec=colour, ecolor=colour, elinewidth=1.2, capsize=3,
            label=_label(point),
        )
        xs += _extent(point.locality, point.locality_range)
        ys += _extent(point.capability_retained, point.capability_range)
    axes.set_xlabel("locality: neighbour facts whose answer did not change")
    axes.set_ylabel("capability retained: held-out skill accuracy / base model's")
    axes.grid(True, color="0.93")
    return xs, ys


def _extent(value: float, span: tuple[float, float] | None) -> list[float]:
    return [value, *(span or ())]


def _near_base(points: list[Point]) -> list[Point]:
    # Methods within 20 % of the base model on both axes: one far-off method (LoRA: locality 0.46,
    # capability 0.30 in the seed-0 demo) squeezed the others into a corner, where they differ by a
    # few points.
    return [p for p in points if p.locality >= _ZOOM and p.capability_retained >= _ZOOM]


def tradeoff_figure(points: list[Point], title: str) -> Any:
    """A matplotlib ``Figure`` of ``points`` (raises ``ImportError`` without matplotlib).

    A second panel zooms on the methods within 20 % of the base model on both axes when some
    other method lies far off. The legend (right) names each method with its reliability.
    """
    from matplotlib.figure import Figure

    near = _near_base(points)
    far = min(min(p.locality, p.capability_retained) for p in points) < _ZOOM - 0.1 if points else False
    zoom = far and len(near) >= 2
    figure = Figure(figsize=(15, 5.5) if zoom else (9.5, 5.5), layout="constrained")
    panels = list(figure.subplots(1, 2)) if zoom else [figure.subplots()]
    xs, ys = _draw(panels[0], points)
    panels[0].set_xlim(*_limits(xs))
    panels[0].set_ylim(*_limits(ys))
    panels[0].text(0.01, 0.01, "better: up and to the right", transform=panels[0].transAxes, fontsize="small",
                   color="0.4")
    if zoom:
        _draw(panels[1], points)
        near_x = [x for p in near for x in _extent(p.locality, p.locality_range)]
        near_y = [y for p in near for y in _extent(p.capability_retained, p.capability_range)]
        panels[1].set_xlim(*_limits(near_x))
        panels[1].set_ylim(*_limits(near_y))
        panels[1].set_title(f"zoom: the methods within {1 - _ZOOM:.0%} of the base model", fontsize="medium")
    figure.suptitle(title, fontsize="medium")
    panels[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return figure


def save_png(draw: Callable[[], Any], path: str | Path, dpi: int = 110) -> Path | None:
    """Save the figure ``draw()`` returns as a PNG; ``None`` (nothing written) without matplotlib."""
    try:
        figure = draw()
    except ImportError:
        return None
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    return path


def write_tradeoff_png(points: list[Point], path: str | Path, title: str) -> Path | None:
    """Save :func:`tradeoff_figure` of ``points`` as a PNG (see :func:`save_png`)."""
    return save_png(lambda: tradeoff_figure(points, title), path)


# ----------------------------------------------------------------------------- reliability
def _grouped(points: list[Point]) -> tuple[list[Point], dict[str, list[Point]]]:
    """Methods without a setting, and the points of each method with settings (in the order run)."""
    single = [p for p in points if ":" not in p.name]
    series: dict[str, list[Point]] = {}
    for point in points:
        if ":" in point.name:
            series.setdefault(point.name.partition(":")[0], []).append(point)
    return single, series


_FULL = 0.99  # "equal reliability": the right panel of reliability_figure shows methods at or above it


# matplotlib's ten default colours and four more: a grid adds lines to the eight methods
_COLOURS = tuple(f"C{i}" for i in range(10)) + ("black", "darkgoldenrod", "teal", "magenta")


def _draw_methods(
    axes: Any, single: list[Point], series: dict[str, list[Point]], x_key: str, order: dict[str, int], legend: bool
) -> None:
    """Markers for ``single``, a labelled line through each method's settings; x is ``x_key`` of a point.

    ``order`` gives each method's (or series') colour and marker index, so both panels agree.
    """
    def x_of(p: Point) -> float:
        return getattr(p, x_key)

    for point in single:
        index = order[point.name]
        colour, marker = _COLOURS[index % len(_COLOURS)], _MARKERS[index % len(_MARKERS)]
        axes.errorbar(
            [x_of(point)], [point.capability_retained], xerr=_error(x_of(point), getattr(point, f"{x_key}_range")),
            yerr=_error(point.capability_retained, point.capability_range), fmt=marker, ms=10, mew=2, mfc="none",
            mec=colour, ecolor=colour, elinewidth=1.2, capsize=3, label=point.name if legend else None,
        )
    for name, members in series.items():
        index = order[name]
        colour = _COLOURS[index % len(_COLOURS)]
        axes.plot([x_of(p) for p in members], [p.capability_retained for p in members], "-",
                  marker=_MARKERS[index % len(_MARKERS)], mfc="none", color=colour,
                  label=f"{name} (settings)" if legend else None)
        labels: dict[tuple[float, float], list[str]] = {}  # settings on one point share one label
        for p in members:
            labels.setdefault((x_of(p), p.capability_retained), []).append(p.name.partition(":")[2])
        for (x, y), values in labels.items():
            axes.annotate(", ".join(values), (x, y), fontsize="x-small", color=colour, xytext=(-4, 3),
                          textcoords="offset points", ha="right")
    axes.axhline(1.0, color="0.6", lw=1, ls="--", zorder=0, label="base model's capability" if legend else None)
    axes.set_ylabel("capability retained: held-out skill accuracy / base model's")
    axes.grid(True, color="0.93")


def reliability_figure(points: list[Point], title: str) -> Any:
    """A matplotlib ``Figure``: reliability (x) against capability retained (y), one marker per method.

    A method run with several settings is a line through them, each point labelled with its
    setting; over several seeds markers are means with the seeds' range as bars. When two or more
    methods reach reliability 0.99, a second panel sets them side by side at that (equal)
    reliability: locality (x) against capability retained (y).
    """
    from matplotlib.figure import Figure

    single, series = _grouped(points)
    order = {name: index for index, name in enumerate([p.name for p in single] + list(series))}
    full_single = [p for p in single if p.reliability >= _FULL]
    full_series = {n: [p for p in m if p.reliability >= _FULL] for n, m in series.items()}
    full = full_single + [p for m in full_series.values() for p in m]
    both = len(full) >= 2
    figure = Figure(figsize=(16, 6.5) if both else (10.5, 6), layout="constrained")
    panels = list(figure.subplots(1, 2)) if both else [figure.subplots()]
    # The base model (reliability 0) is left out: it would squeeze every method against x = 1.
    _draw_methods(panels[0], single, series, "reliability", order, legend=True)
    low, _ = _limits([p.reliability for p in points])
    panels[0].set_xlim(low, 1.0 + 0.25 * (1.0 - low))
    panels[0].set_xlabel("reliability: edits learnt (greedy exact match)")
    panels[0].text(0.01, 0.01, "better: up and to the right", transform=panels[0].transAxes, fontsize="small",
                   color="0.4")
    if both:
        _draw_methods(panels[1], full_single, full_series, "locality", order, legend=False)
        panels[1].set_xlabel("locality: neighbour facts whose answer did not change")
        # zoomed on the methods near the base model, as the trade-off picture's second panel
        near = _near_base(full) or full
        panels[1].set_xlim(*_limits([x for p in near for x in _extent(p.locality, p.locality_range)]))
        panels[1].set_ylim(*_limits([y for p in near for y in _extent(p.capability_retained, p.capability_range)]))
        panels[1].set_title(f"at equal reliability (≥ {_FULL}), zoomed: what else changed", fontsize="medium")
    panels[-1].legend(*panels[0].get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      fontsize="small", frameon=False)
    figure.suptitle(title, fontsize="medium")
    return figure


def write_reliability_png(points: list[Point], path: str | Path, title: str) -> Path | None:
    """Save :func:`reliability_figure` of ``points`` as a PNG (see :func:`save_png`)."""
    return save_png(lambda: reliability_figure(points, title), path)
