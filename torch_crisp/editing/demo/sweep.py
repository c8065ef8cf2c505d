"""The two knobs of CrispEdit side by side: a sweep over the capability budget ε and one over γ.

``torch-crisp demo --sweep`` edits with ``crisp-budget:ε`` for every ε and ``crisp-update:γ`` for
every γ (both update mode, so only the knob differs). :func:`sweep_record` turns those rows into
``sweep.json``: per series, per setting, the predicted capability loss increase ``L̂``, the
measured increases (held-out text, plain and tempered; the capability corpus, tempered), skill
accuracy, reliability, generalisation and locality — each a mean with its lowest and highest
seed (equal for one seed). :func:`sweep_figure` draws them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .grid import parse_method
from .plot import save_png
from .settings import ALL_METHODS, DemoSettings

__all__ = ["SWEEP_METRICS", "sweep_figure", "sweep_record", "write_sweep_png"]

SWEEP_METRICS = (
    "predicted_increase",
    "predicted_heldout_increase",
    "heldout_loss_increase",
    "heldout_tempered_loss_increase",
    "corpus_tempered_loss_increase",
    "capability",
    "capability_retained",
    "reliability",
    "generalization",
    "locality",
    "epochs",
    "budget_mu",
)
_SERIES = {"crisp-budget": "budget", "crisp-update": "gamma"}


def _cell(value: Any) -> dict[str, float] | None:
    """``{mean, min, max}`` of a one-seed number or of a summary cell (``None`` if missing)."""
    if isinstance(value, Mapping):
        return {key: float(value[key]) for key in ("mean", "min", "max")}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"mean": float(value), "min": float(value), "max": float(value)}
    return None


def sweep_record(
    rows: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any], settings: DemoSettings
) -> dict[str, Any]:
    """``sweep.json``: the sweep's rows of one run (numbers) or of a summary over seeds (cells).

    ``{"temperature", "base": {metric: cell}, "budget": [point], "gamma": [point]}`` with each
    point ``{"method", "value", metric: {"mean", "min", "max"}, ...}`` in the order run.
    """
    record: dict[str, Any] = {
        "temperature": settings.capability_temperature,
        "note": "predicted_increase: K-FAC's L̂ of the tempered loss on the capability corpus (what the budget "
        "constrains); predicted_heldout_increase: L̂ with K-FAC of the held-out text at temperature 1, predicting "
        "heldout_loss_increase (the log-perplexity increase); increases are over the base model",
        "base": {k: c for k in ("capability", "heldout_loss", "heldout_tempered_loss", "corpus_tempered_loss")
                 if (c := _cell(base.get(k))) is not None},
        "budget": [],
        "gamma": [],
    }
    for name, metrics in rows.items():
        method, value = parse_method(name, ALL_METHODS)
        if method not in _SERIES or value is None:
            continue
        point: dict[str, Any] = {"method": name, "value": value}
        point.update({k: c for k in SWEEP_METRICS if (c := _cell(metrics.get(k))) is not None})
        record[_SERIES[method]].append(point)
    return record


# ----------------------------------------------------------------------------- the picture
def _series(points: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[list[float]]]:
    """x (the setting), y (means) and the error bars (mean − min, max − mean) of one metric."""
    have = [p for p in points if key in p]
    ys = [p[key]["mean"] for p in have]
    bars = [[y - p[key]["min"] for p, y in zip(have, ys)], [p[key]["max"] - y for p, y in zip(have, ys)]]
    return [p["value"] for p in have], ys, bars


def _losses_panel(axes: Any, points: list[dict[str, Any]]) -> None:
    lines = (
        ("predicted_increase", "predicted L̂ (corpus, tempered: what ε bounds)", "-"),
        ("corpus_tempered_loss_increase", "measured, corpus (tempered)", "--"),
        ("predicted_heldout_increase", "predicted L̂ (held-out text, plain)", "-"),
        ("heldout_loss_increase", "measured, held-out text (plain: log perplexity)", ":"),
    )
    for key, label, style in lines:
        xs, ys, bars = _series(points, key)
        axes.errorbar(xs, ys, yerr=bars, ls=style, marker="o", ms=4, capsize=2, label=label)
    xs = [p["value"] for p in points]
    axes.plot(xs, xs, color="0.6", lw=1, label="the budget ε")
    axes.set_xscale("log")
    axes.set_yscale("symlog", linthresh=1e-3)
    axes.set_xlabel("capability budget ε (nats)")
    axes.set_ylabel("capability loss increase (nats per token)")
    axes.set_title("prediction and measurement", fontsize="medium")
    axes.legend(fontsize="x-small")


def _outcomes_panel(axes: Any, points: list[dict[str, Any]]) -> None:
    for key, label in (("reliability", "reliability"), ("generalization", "generalisation"),
                       ("locality", "locality"), ("capability_retained", "capability retained (skills)")):
        xs, ys, bars = _series(points, key)
        axes.errorbar(xs, ys, yerr=bars, marker="o", ms=4, capsize=2, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("capability budget ε (nats)")
    axes.set_title("what the edits did", fontsize="medium")
    axes.legend(fontsize="x-small")


def _knobs_panel(axes: Any, record: dict[str, Any]) -> None:
    for series, label, fmt in (("budget", "ε", "o-"), ("gamma", "γ", "s--")):
        points = [p for p in record[series] if "reliability" in p and "capability_retained" in p]
        if not points:
            continue
        xs, ys = [p["reliability"]["mean"] for p in points], [p["capability_retained"]["mean"] for p in points]
        axes.plot(xs, ys, fmt, mfc="none", label=f"{label} sweep")
        # settings that land on one point (a budget that never binds) share one label
        labels: dict[tuple[float, float], list[str]] = {}
        for p, x, y in zip(points, xs, ys):
            labels.setdefault((x, y), []).append(f"{p['value']:g}")
        for (x, y), values in labels.items():
            axes.annotate(f"{label}={', '.join(values)}", (x, y), fontsize="x-small", xytext=(-4, 3),
                          textcoords="offset points", ha="right")
    axes.set_xlabel("reliability (edits learnt)")
    axes.set_ylabel("capability retained (skills)")
    axes.set_title("the two knobs at equal reliability", fontsize="medium")
    axes.legend(fontsize="x-small")


def _calibration_panel(axes: Any, record: dict[str, Any]) -> None:
    for series, label, marker in (("budget", "ε sweep", "o"), ("gamma", "γ sweep", "s")):
        for predicted, measured, kind in (
            ("predicted_increase", "corpus_tempered_loss_increase", "corpus, tempered"),
            ("predicted_heldout_increase", "heldout_loss_increase", "held-out, plain"),
        ):
            pairs = [(p[predicted]["mean"], p[measured]["mean"]) for p in record[series]
                     if predicted in p and measured in p]
            if pairs:
                axes.plot(*zip(*pairs), marker, mfc="none" if "plain" in kind else None, ls="none",
                          label=f"{label}: {kind}")
    limits = [p[k]["mean"] for s in ("budget", "gamma") for p in record[s]
              for k in ("predicted_increase", "predicted_heldout_increase") if k in p]
    if limits:
        low, high = max(min(limits), 1e-5), max(limits)
        axes.plot([low, high], [low, high], color="0.6", lw=1, label="measured = predicted")
    axes.set_xscale("log")
    axes.set_yscale("symlog", linthresh=1e-3)
    axes.set_xlabel("predicted L̂ (nats)")
    axes.set_ylabel("measured increase (nats)")
    axes.set_title("where the quadratic model holds", fontsize="medium")
    axes.legend(fontsize="x-small")


def sweep_figure(record: dict[str, Any], title: str) -> Any:
    """A 2×2 matplotlib ``Figure`` of a :func:`sweep_record` (raises ``ImportError`` without matplotlib)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 10), layout="constrained")
    panels = figure.subplots(2, 2)
    if record["budget"]:
        _losses_panel(panels[0][0], record["budget"])
        _outcomes_panel(panels[0][1], record["budget"])
    _knobs_panel(panels[1][0], record)
    _calibration_panel(panels[1][1], record)
    figure.suptitle(title, fontsize="medium")
    return figure


def write_sweep_png(record: dict[str, Any], path: str | Path, title: str) -> Path | None:
    """Save :func:`sweep_figure` as a PNG (``None`` without matplotlib)."""
    return save_png(lambda: sweep_figure(record, title), path, dpi=100)
