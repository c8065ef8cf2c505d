"""Spectra of saved factors and how much each energy threshold ``γ`` keeps (model-free).

Answers "which γ?" before any training: for the K-FAC curvature ``c_ij = λ_out_i · λ_in_j`` of a
layer, :func:`gamma_sweep` gives, for each ``γ``, the threshold ``τ`` of
the energy rule (``docs/concepts.md``), the fraction of eigen-directions kept (``c_ij < τ``) and
the fraction of the curvature energy ``Σ c_ij`` those kept directions carry. The rule, the tie
handling and, on large layers, the sort-free threshold search are exactly the projector's
(:func:`torch_crisp.functional.energy_threshold`, :func:`torch_crisp.curvature.curvature_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import functional
from .curvature import curvature_threshold

__all__ = ["FactorSummary", "GammaPoint", "factor_summary", "gamma_sweep", "spectra_from_sums", "sweep_curvature"]


@dataclass(frozen=True)
class GammaPoint:
    """What the energy rule keeps at one ``γ``.

    Attributes:
        gamma: fraction of the curvature energy to block.
        tau: threshold; direction ``(i, j)`` is kept iff ``c_ij < tau``.
        kept_fraction: kept directions / all ``d_out · d_in`` directions.
        kept_energy: ``Σ_kept c_ij / Σ c_ij`` (1 when all curvature is zero); at most ``1 − γ``
            up to the one direction that crosses the threshold.
    """

    gamma: float
    tau: float
    kept_fraction: float
    kept_energy: float


@dataclass(frozen=True)
class FactorSummary:
    """Summary of one factor's eigenvalues ``λ`` (ascending as returned by ``eigh``)."""

    size: int
    max: float
    min: float
    trace: float
    rank_90: int  # fewest eigenvalues that hold 90 % of the trace
    numerical_rank: int  # eigenvalues above size · eps(float32) · max


def spectra_from_sums(A_sum: Tensor, S_sum: Tensor, num_tokens: float) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``(λ_in, λ_out)`` of ``A = A_sum / N`` and ``S = S_sum / N`` (ascending, ≥ 0)."""
    if num_tokens <= 0:
        raise ValueError("the factors hold no tokens; nothing was collected for this layer")
    eig_in, _ = functional.symmetric_eigh(A_sum / num_tokens)
    eig_out, _ = functional.symmetric_eigh(S_sum / num_tokens)
    return eig_in, eig_out


def factor_summary(eigenvalues: Tensor) -> FactorSummary:
    """Largest and smallest eigenvalue, trace, 90 %-of-trace rank and numerical rank."""
    lam = eigenvalues.to(torch.float64).flatten()
    descending = torch.sort(lam, descending=True).values
    trace = float(descending.sum().item())
    largest = float(descending[0].item())
    if trace > 0:
        cumulative = torch.cumsum(descending, 0)
        rank_90 = int(torch.searchsorted(cumulative, torch.tensor([0.9 * trace], dtype=torch.float64)).item()) + 1
        rank_90 = min(rank_90, lam.numel())
    else:
        rank_90 = 0
    tolerance = lam.numel() * torch.finfo(torch.float32).eps * largest
    return FactorSummary(
        size=lam.numel(),
        max=largest,
        min=float(descending[-1].item()),
        trace=trace,
        rank_90=rank_90,
        numerical_rank=int((lam > tolerance).sum().item()),
    )


def gamma_sweep(eig_out: Tensor, eig_in: Tensor, gammas: Sequence[float]) -> list[GammaPoint]:
    """:class:`GammaPoint` for every ``γ`` of K-FAC curvature ``c_ij = λ_out_i · λ_in_j``.

    Each ``τ`` is the projector's own (:func:`functional.energy_threshold`, which needs no grid on
    large layers), and the kept counts and energies come from one pass over the grid a block of
    rows at a time: nothing of ``d_out × d_in`` size is kept. Many ``γ`` on a large layer (a plot's
    sweep) sort the float64 grid once instead, which is faster but transiently needs a few
    float64 copies of it.
    """
    _check_gammas(gammas)
    if not _search_pays(eig_out.numel() * eig_in.numel(), gammas):
        return sweep_curvature(functional.curvature_grid(eig_out, eig_in), gammas)
    taus = [functional.energy_threshold(eig_out, eig_in, float(gamma)) for gamma in gammas]
    eig_in64 = eig_in.to(torch.float64)
    rows = max(1, _BLOCK // max(1, eig_in.numel()))
    blocks = (torch.outer(block, eig_in64) for block in eig_out.to(torch.float64).split(rows))
    return _points(gammas, taus, blocks)


def sweep_curvature(curvature: Tensor, gammas: Sequence[float]) -> list[GammaPoint]:
    """:class:`GammaPoint` for every ``γ`` of any non-negative curvature.

    The rule is :func:`functional.threshold_from_curvature`'s, which the activation-only model
    (``c = λ_in``) and EK-FAC (``c`` = corrected curvature) also use. Small tensors, and many ``γ``,
    are served by one sort; a few ``γ`` on a large tensor use the projector's sort-free
    :func:`~torch_crisp.curvature.curvature_threshold` and one chunked pass for the statistics.
    """
    _check_gammas(gammas)
    if _search_pays(curvature.numel(), gammas):
        taus = [curvature_threshold(curvature, float(gamma)) for gamma in gammas]
        flat = curvature.reshape(-1)
        return _points(gammas, taus, (flat[start : start + _BLOCK].to(torch.float64)
                                      for start in range(0, flat.numel(), _BLOCK)))
    c = curvature.reshape(-1).to(torch.float64)
    total_tensor = c.sum()  # the same reduction the threshold rule uses, so tau matches exactly
    total = float(total_tensor.item())
    count = c.numel()
    if total == 0.0:
        return [GammaPoint(float(g), math.inf, 1.0, 1.0) for g in gammas]
    descending = torch.sort(c, descending=True).values
    prefix = torch.cumsum(descending, 0)
    ascending = descending.flip(0)
    points = []
    for gamma in gammas:
        target = float(gamma) * total_tensor
        k = min(int(torch.searchsorted(prefix, target.unsqueeze(0)).item()), count - 1)
        tau = float(descending[k].item())
        kept = int(torch.searchsorted(ascending, torch.tensor([tau], dtype=ascending.dtype)).item())  # c < tau
        blocked = count - kept
        kept_energy = total - float(prefix[blocked - 1].item()) if blocked > 0 else total
        points.append(GammaPoint(float(gamma), tau, kept / count, max(kept_energy, 0.0) / total))
    return points


# Above this many entries the projector thresholds without sorting (functional, curvature), and so
# do sweeps of at most _FEW_GAMMAS values; blocks of _BLOCK entries exist at a time.
_SEARCH_MIN_ENTRIES = 1 << 17
_FEW_GAMMAS = 8
_BLOCK = 1 << 20


def _search_pays(entries: int, gammas: Sequence[float]) -> bool:
    return entries > _SEARCH_MIN_ENTRIES and len(gammas) <= _FEW_GAMMAS


def _check_gammas(gammas: Sequence[float]) -> None:
    for gamma in gammas:
        if not 0.0 < float(gamma) < 1.0:
            raise ValueError(f"every gamma must lie strictly between 0 and 1, got {gamma}")


def _points(gammas: Sequence[float], taus: Sequence[float], blocks: Iterable[Tensor]) -> list[GammaPoint]:
    """Kept fractions and energies of the thresholds ``taus`` from one pass over float64 ``blocks``."""
    total, count = 0.0, 0
    kept = [0] * len(taus)
    energy = [0.0] * len(taus)
    for block in blocks:
        total += float(block.sum())
        count += block.numel()
        for index, tau in enumerate(taus):
            below = block < tau
            kept[index] += int(below.sum())
            energy[index] += float(block[below].sum())
    if total == 0.0:
        return [GammaPoint(float(g), math.inf, 1.0, 1.0) for g in gammas]
    rows = zip(gammas, taus, kept, energy)
    return [GammaPoint(float(gamma), tau, k / count, max(e, 0.0) / total) for gamma, tau, k, e in rows]
