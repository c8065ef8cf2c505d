"""Method names with a setting, the peers' tuning grids, the CrispEdit sweeps and the grid rule.

A method may carry its one setting after a colon: ``ewc:100`` is EWC with ``λ = 100``,
``crisp-budget:0.03`` CrispEdit with the capability budget ``ε = 0.03``, ``crisp-update:0.999``
update-mode CrispEdit with ``γ = 0.999``. Such rows run side by side in one comparison, so a grid
or a sweep is a list of method names (:func:`grid_methods`, :func:`sweep_methods`).

:func:`choose_settings` applies the rule stated before any grid was run: for each peer, among
its settings that reach the reliability of the reference (``crisp``), the one that keeps the
most capability (held-out skill accuracy), ties broken by locality.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = [
    "GRID_RULE",
    "PARAMETERS",
    "PEER_GRIDS",
    "SWEEP_BUDGETS",
    "SWEEP_GAMMAS",
    "choose_settings",
    "grid_methods",
    "method_name",
    "parse_method",
    "sweep_methods",
]

# The setting a method name may carry, and its range ("unit" means strictly between 0 and 1).
PARAMETERS: dict[str, tuple[str, str]] = {
    "crisp": ("gamma", "unit"),
    "crisp-update": ("gamma", "unit"),
    "crisp-budget": ("budget", "positive"),
    "ewc": ("lambda", "positive"),
    "l2sp": ("alpha", "positive"),
    "corda": ("lr", "positive"),
}

# The grids the peers' papers suggest, fixed before any was run (docs/editing.md reports all of
# them). EWC's λ scales a Fisher normalised per token (λ = 1: the penalty is the diagonal quadratic
# prediction of the capability loss), so its grid spans the orders of magnitude EWC papers try;
# L2-SP's α spans the range of the L2-SP paper (0.001-1 around its 0.01-0.1). CorDA's rank is fixed
# by the comparison (LoRA's) and its documented mode is knowledge-preserving (KPM): its only free
# knob is the learning rate, LoRA's 3e-3 and one step either side.
PEER_GRIDS: dict[str, tuple[float, ...]] = {
    "ewc": (1.0, 10.0, 100.0, 1000.0, 10000.0),
    "l2sp": (0.001, 0.01, 0.1, 1.0),
    "corda": (0.001, 0.003, 0.01),
}
# Down to where the budget binds hard: on the seed-0 base model, unconstrained fine-tuning's whole
# change has L̂ = 0.027, so every ε above that is plain fine-tuning (measured: 0.03, 0.1, 0.3 gave its row).
SWEEP_BUDGETS: tuple[float, ...] = (0.0003, 0.001, 0.003, 0.01, 0.02, 0.03, 0.1)
SWEEP_GAMMAS: tuple[float, ...] = (0.9, 0.99, 0.995, 0.999, 0.9999)

GRID_RULE = (
    "for each peer, among its grid settings whose mean reliability is at least the reference's minus 0.005, "
    "the one with the highest mean capability retained (held-out skill accuracy / the base model's), ties "
    "(within 0.0005) broken by the higher mean locality; if no setting reaches the reference's reliability, "
    "the one with the highest reliability"
)


def method_name(base: str, value: float) -> str:
    """The canonical name of ``base`` with a setting: ``method_name("ewc", 1e2) == "ewc:100"``."""
    return f"{base}:{value:g}"


def parse_method(name: str, known: Sequence[str]) -> tuple[str, float | None]:
    """``(base, setting)`` of a method name (``setting`` is ``None`` without a colon).

    Raises ``ValueError`` saying what is wrong: an unknown base, a base that takes no setting,
    a setting that is not a number or is out of its range.
    """
    base, colon, text = name.partition(":")
    if base not in known:
        raise ValueError(f"must be among {list(known)} (optionally NAME:VALUE for {', '.join(PARAMETERS)})")
    if not colon:
        return base, None
    if base not in PARAMETERS:
        raise ValueError(f"take a setting (NAME:VALUE) only for {', '.join(PARAMETERS)}")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"need a number after the colon ({base}:VALUE)") from None
    what, rule = PARAMETERS[base]
    if not math.isfinite(value) or value <= 0 or (rule == "unit" and value >= 1):
        bounds = "in (0, 1)" if rule == "unit" else "a positive number"
        raise ValueError(f"need {what} {bounds} after {base}:")
    return base, value


def canonical(name: str, known: Sequence[str]) -> str:
    """``name`` with its setting written canonically (``ewc:1e2`` → ``ewc:100``); checks it."""
    base, value = parse_method(name, known)
    return base if value is None else method_name(base, value)


def grid_methods(methods: Sequence[str], grids: Mapping[str, Sequence[float]] = PEER_GRIDS) -> list[str]:
    """``methods`` with every peer named without a setting replaced by its whole grid, in place."""
    expanded: list[str] = []
    for name in methods:
        expanded += [method_name(name, v) for v in grids[name]] if name in grids else [name]
    return list(dict.fromkeys(expanded))


def sweep_methods(budgets: Sequence[float], gammas: Sequence[float]) -> list[str]:
    """The sweep's rows: ``crisp-budget:ε`` for every budget, then ``crisp-update:γ`` for every γ."""
    return [method_name("crisp-budget", e) for e in budgets] + [method_name("crisp-update", g) for g in gammas]


def _better(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether grid row ``a`` beats ``b`` on capability retained, then locality."""
    if abs(a["capability_retained"] - b["capability_retained"]) > 5e-4:
        return a["capability_retained"] > b["capability_retained"]
    return a["locality"] > b["locality"]


def choose_settings(rows: Mapping[str, Mapping[str, float]], reference: str = "crisp") -> dict[str, str]:
    """The grid row chosen for each peer in ``rows`` (mean metrics by method name), by :data:`GRID_RULE`.

    ``rows`` maps method names (``ewc:100``) to their (mean) ``reliability``, ``capability_retained``
    and ``locality``; peers with no grid row are left out; without the reference row the bar is
    reliability 1.
    """
    bar = rows[reference]["reliability"] - 0.005 if reference in rows else 1.0 - 0.005
    chosen: dict[str, str] = {}
    for peer in PEER_GRIDS:
        names = [n for n in rows if n.partition(":")[0] == peer and n.partition(":")[1]]
        if not names:
            continue
        eligible = [n for n in names if rows[n]["reliability"] >= bar]
        if not eligible:
            chosen[peer] = max(names, key=lambda n: rows[n]["reliability"])
            continue
        best = eligible[0]
        for name in eligible[1:]:
            if _better(rows[name], rows[best]):
                best = name
        chosen[peer] = best
    return chosen
