"""The capability budget: the predicted capability loss of a change, and the nearest change within it.

Pure tensor functions, like :mod:`torch_crisp.functional`. For a projected layer with eigenbases
``U_in``, ``U_out`` and a cumulative change ``D = [W | b] − [W₀ | b₀]``, the rotated change is
``Ũ = U_outᵀ D U_in`` and K-FAC predicts the increase of the mean per-token capability loss as

    L̂ = ½ Σ_layers Σ_ij c_ij Ũ_ij²          (c: K-FAC's λ_out_i λ_in_j, or EK-FAC's corrected values)

— the quadratic model ``½ vec(D)ᵀ (A ⊗ S) vec(D)`` written in the eigenbasis. Given a budget ``ε``,
the Frobenius-nearest change (all layers jointly) with ``L̂ ≤ ε`` is ``Ũ_ij / (1 + μ c_ij)`` with one
``μ ≥ 0``: the KKT conditions of ``min ‖Ũ' − Ũ‖² s.t. ½ Σ c Ũ'² ≤ ε`` (the rotation is orthogonal, so
the Frobenius norm is the same in both coordinates). ``μ = 0`` when the change is within budget;
otherwise ``μ`` is the root of ``L̂(μ) = ε``, a monotone one-dimensional equation.

A layer whose bias is frozen while its weight trains adds one linear constraint per row,
``Σ_j Ũ_ij v_j = 0`` with ``v`` the bias coordinate's row of ``U_in``; its nearest point is
``(Ũ_ij − ν_i v_j) / (1 + μ c_ij)`` with ``ν_i`` chosen to keep the constraint (:class:`BudgetTerm`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BudgetTerm", "nearest_within_budget", "predicted_increase", "solve_multiplier"]


@dataclass(frozen=True)
class BudgetTerm:
    """One layer's part of the budget.

    Attributes:
        rotated: ``Ũ``, the rotated change, ``(d_out, d_in)`` (blocked coefficients already zero).
        curvature: ``c``, the same shape, non-negative.
        kept: optional bool mask of the coefficients that may be non-zero (needed with ``column_row``).
        column_row: optional ``v`` (``(d_in,)``): the row of ``U_in`` at a coordinate that must stay
            unchanged (a frozen bias); ``rotated`` must already satisfy ``Ũ v = 0``.
    """

    rotated: Tensor
    curvature: Tensor
    kept: Tensor | None = None
    column_row: Tensor | None = None

    def shrunk(self, mu: float) -> Tensor:
        """The nearest point's coefficients for multiplier ``mu`` (``Ũ`` itself for ``mu = 0``)."""
        if mu == 0.0:
            return self.rotated
        factor = 1.0 + mu * self.curvature
        if self.column_row is None:
            return self.rotated / factor
        # (Ũ − ν v) / (1 + μ c) on the kept set, with ν_i making row i orthogonal to v again
        weights = self.column_row.to(self.rotated.dtype)
        if self.kept is not None:
            weights = weights * self.kept.to(self.rotated.dtype)
        else:
            weights = weights.expand_as(self.rotated)
        along = (self.rotated * weights / factor).sum(dim=-1)
        norms = (weights * weights / factor).sum(dim=-1)
        nu = torch.where(norms > 0, along / torch.where(norms > 0, norms, 1.0), 0.0)
        return (self.rotated - nu.unsqueeze(-1) * weights) / factor

    def predicted_increase(self, mu: float = 0.0) -> float:
        """``½ Σ_ij c_ij Ũ'_ij²`` of this layer's nearest point for ``mu`` (summed in float64)."""
        coefficients = self.shrunk(mu)
        return 0.5 * float((self.curvature * coefficients.square()).sum(dtype=torch.float64))


def predicted_increase(terms: Sequence[BudgetTerm], mu: float = 0.0) -> float:
    """``L̂ = ½ Σ_layers Σ_ij c_ij Ũ_ij²`` (of the nearest points for multiplier ``mu``)."""
    return sum(term.predicted_increase(mu) for term in terms)


def solve_multiplier(
    terms: Sequence[BudgetTerm], budget: float, *, rtol: float = 1e-6, max_evaluations: int = 200
) -> float:
    """The ``μ ≥ 0`` of the nearest change within ``budget``: ``0`` if ``L̂ ≤ budget`` already.

    Otherwise ``L̂(μ)`` is non-increasing in ``μ`` and the returned ``μ`` satisfies
    ``budget·(1 − 2·rtol) ≤ L̂(μ) ≤ budget·(1 − rtol)``: the small margin below the budget absorbs
    the rounding of writing the result back into float32 weights, so the stored change stays
    within ``budget·(1 + rtol)``. The search brackets the root geometrically (bounds from the
    largest and smallest positive curvature), then refines it by regula falsi on
    ``L̂(μ)^(-1/2)``, which is nearly linear in ``μ`` (exactly, for one distinct curvature value).
    """
    if not budget > 0 or not math.isfinite(budget):
        raise ValueError(f"the capability budget must be a positive finite number, got {budget}")
    start = predicted_increase(terms)
    if not math.isfinite(start):
        raise ValueError("the predicted capability increase is not finite; the change or curvature holds NaN/inf")
    if start <= budget:
        return 0.0
    target = budget * (1.0 - rtol)
    low_enough = budget * (1.0 - 2.0 * rtol)
    positive = [t.curvature[t.curvature > 0] for t in terms if bool((t.curvature > 0).any())]
    c_max = max(float(c.max()) for c in positive)
    c_min = min(float(c.min()) for c in positive)
    ratio = math.sqrt(start / target) - 1.0
    # every term shrinks at least like 1/(1 + μ c_max)² and at most like 1/(1 + μ c_min)²
    lo, hi = ratio / c_max, ratio / c_min
    f_lo, f_hi = predicted_increase(terms, lo), predicted_increase(terms, hi)
    evaluations = 2
    while f_hi > target and evaluations < max_evaluations:  # frozen-bias coupling can loosen the bound
        lo, f_lo, hi = hi, f_hi, hi * 4.0
        f_hi = predicted_increase(terms, hi)
        evaluations += 1
    if f_lo <= target:
        return lo
    # bracket: f(lo) > target >= f(hi); regula falsi (Illinois) on g(μ) = f(μ)^(-1/2) - target^(-1/2)
    def g(value: float) -> float:
        return 1.0 / math.sqrt(max(value, 1e-300)) - 1.0 / math.sqrt(target)

    g_lo, g_hi = g(f_lo), g(f_hi)
    side = 0
    while evaluations < max_evaluations:
        mid = hi - g_hi * (hi - lo) / (g_hi - g_lo) if g_hi != g_lo else 0.5 * (lo + hi)
        if not lo < mid < hi:
            mid = 0.5 * (lo + hi)
        f_mid = predicted_increase(terms, mid)
        evaluations += 1
        if low_enough <= f_mid <= target:
            return mid
        if f_mid > target:
            lo, g_lo = mid, g(f_mid)
            if side == -1:
                g_hi *= 0.5
            side = -1
        else:
            hi, g_hi, f_hi = mid, g(f_mid), f_mid
            if side == 1:
                g_lo *= 0.5
            side = 1
    return hi  # feasible: f(hi) <= target


def nearest_within_budget(terms: Sequence[BudgetTerm], budget: float) -> tuple[list[Tensor], float, float]:
    """``(coefficients per term, μ, L̂ after)`` of the Frobenius-nearest change with ``L̂ ≤ budget``."""
    mu = solve_multiplier(terms, budget)
    shrunk = [term.shrunk(mu) for term in terms]
    return shrunk, mu, predicted_increase(terms, mu)
