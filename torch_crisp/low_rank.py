"""Pure tensor functions of the low-rank edit step: ``P(Q)`` from the per-token factors of ``Q``.

When one optimizer step's gradient of a layer comes from ``T`` token positions,

    Q = Σ_t g_t x_tᵀ = Gᵀ X,   G: (T, d_out) output gradients,  X: (T, d_in[+1]) inputs (bias-augmented),

so ``rank Q ≤ T`` and the rotations of :func:`torch_crisp.functional.project` can act on the factors:
``U_outᵀ Q U_in = (G U_out)ᵀ (X U_in)``. On the **full** path this replaces the first two dense
products (``2·d_out·d_in·(d_out + d_in)`` FLOPs) by ``2T(d_out² + d_in² + d_out·d_in)``; the
back-rotation stays, so the step costs at best half the dense one. On the **complement** path
(:func:`torch_crisp.functional.project_complement`, ``P(Q) = Q − Σ_b U_b ((U_bᵀ Q V_b) ⊙ B_b) V_bᵀ``)
every term is low-rank: a band's rectangle is ``(G U_b)ᵀ (X V_b)`` and its contribution
``U_b (X_b ⊙ B_b) V_bᵀ`` has rank ``k_b = min(|R_b|, |C_b|)``, and a band that blocks the whole
other side contributes ``U_b U_bᵀ Q = (G U_b U_bᵀ)ᵀ X`` (rank ``T``). So the whole step is
``P(Q) = Q − L R`` with one product of inner dimension ``T + Σ_b k_b``, far below ``d_out``.

The factors must reproduce the gradient the optimizer will see: :func:`reproduction_scale` checks
``.grad ≈ α·Gᵀ X`` (``α`` absorbs gradient clipping, loss scaling and DDP's averaging) to the
rounding the two computations can differ by, and the caller falls back to the dense path otherwise.
The costs here are estimates in FLOPs at the peak matmul rate, in the units of
:mod:`torch_crisp.plan` (each product weighted by :func:`~torch_crisp.plan.product_cost`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, Union

import torch
from torch import Tensor

from . import functional
from .basis import Basis, BlockedBasis
from .config import LowRank, Projection
from .plan import ProjectionPlan, call_overhead_flops, product_cost

__all__ = [
    "Path",
    "choose_path",
    "complement_cost",
    "complement_plan",
    "full_cost",
    "path_costs",
    "project_complement",
    "project_full",
    "reproduction_residual",
    "reproduction_scale",
    "reproduction_tolerance",
    "token_budget",
    "token_cap",
]

Path = Literal["dense", "full", "complement"]
"""How one layer's gradient is projected at a step: dense (:mod:`torch_crisp.plan`'s path on ``.grad``),
or from the factors on the full or the complement path."""
LocalBasis = Union[Basis, BlockedBasis]

# Entry-wise passes over a d_out × d_in matrix that the check adds (the norm of .grad, writing and reading
# its residual), in FLOPs per entry and pass at the matmul rate. Measured on one CPU core by
# benchmarks/low_rank.py (512×2048, 1024×4096): a norm takes 12-13 FLOP-equivalents per entry, a copy
# 13-28 (in or out of cache); 16 is charged.
_PASS_FLOPS_PER_ENTRY = 16.0
_CHECK_PASSES = 3
# "auto" takes a low-rank path only when its estimate is below this share of the dense one: the estimates
# err by ~×1.35 per product shape (plan.py), and on the demo's 768×64 layers at T = 16 low-rank estimates
# of 0.97–0.98 of the dense path ran slower (benchmarks/low_rank.py); near-ties keep the reference path.
_AUTO_MARGIN = 0.8


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def reproduction_tolerance(dtypes: Iterable[torch.dtype], tokens: int, terms: int) -> float:
    """``ρ``: how far (relative to ``‖.grad‖_F``) a correct ``.grad`` may lie from ``α·Gᵀ X``.

    ``ρ = 2·u·√(terms + 1) + 8·u₃₂·√T``: ``u`` is the unit roundoff of the coarsest dtype the two
    computations went through (``.grad``, ``G``, ``X``: a bf16 gradient, or autocast's bf16 products
    under a float32 ``.grad``), rounded once per stored term (each micro-batch's and each rank's
    addition into ``.grad``, plus one); ``u₃₂`` that of the accumulation (float32, or float64) of the
    ``T`` products per entry, whose order differs between autograd and this check (a random walk:
    ``√T``). A wrong answer needs an unexplained difference above this; the fallback for anything
    above it is the dense path, so a tight ``ρ`` only ever costs speed.
    """
    dtypes = list(dtypes)
    coarse = max(_unit_roundoff(d) for d in dtypes)
    accumulate = torch.float64 if all(d == torch.float64 for d in dtypes) else torch.float32
    return 2.0 * coarse * math.sqrt(terms + 1) + 8.0 * _unit_roundoff(accumulate) * math.sqrt(max(1, tokens))


@torch.no_grad()
def reproduction_residual(grad: Tensor, G: Tensor, X: Tensor) -> tuple[float, float] | None:
    """``(α, ‖grad − α·Gᵀ X‖_F / ‖grad‖_F)`` with ``α = ⟨grad, Q⟩ / ‖Q‖²``, ``Q = Gᵀ X``; ``None`` when ``Q`` is 0.

    ``Q`` is never formed: ``⟨grad, Q⟩ = Σ (G·grad) ⊙ X`` and ``‖Q‖² = Σ (G Gᵀ) ⊙ (X Xᵀ)`` are products
    with ``T`` rows, and the residual is one ``addmm`` onto ``grad`` and its norm.
    """
    compute = torch.float64 if torch.float64 in (grad.dtype, G.dtype, X.dtype) else torch.float32
    g, Gc, Xc = grad.to(compute), G.to(compute), X.to(compute)
    q_sq = ((Gc @ Gc.mT) * (Xc @ Xc.mT)).sum()
    if not bool(q_sq > 0):
        return None
    alpha = float(((Gc @ g) * Xc).sum() / q_sq)
    if not math.isfinite(alpha):
        return None
    residual = torch.linalg.vector_norm(torch.addmm(g, Gc.mT, Xc, alpha=-alpha))
    return alpha, float(residual / torch.linalg.vector_norm(g).clamp_min(torch.finfo(compute).tiny))


def reproduction_scale(
    grad: Tensor, G: Tensor, X: Tensor, terms: int = 1, rounding: torch.dtype | None = None
) -> float | None:
    """``α`` with ``‖grad − α·Gᵀ X‖_F ≤ ρ·‖grad‖_F`` (:func:`reproduction_tolerance`), or ``None``.

    ``α`` (:func:`reproduction_residual`) is the least-squares scale of ``Q = Gᵀ X``: 1 for a plain
    backward, the clipping coefficient after ``clip_grad_norm_``, ``1/S`` after a ``GradScaler``
    unscaled a loss scaled by ``S``, ``1/world_size`` after DDP's averaging. ``None`` when ``Q`` is zero
    or the residual is above rounding: another loss term, a tied weight's other use, a ``.grad``
    written outside the hooks. ``rounding``: a dtype the factors went through before reaching this
    function in a wider one (bf16 factors gathered over ranks in float32).
    """
    found = reproduction_residual(grad, G, X)
    if found is None:
        return None
    alpha, residual = found
    dtypes = (grad.dtype, G.dtype, X.dtype) + ((rounding,) if rounding is not None else ())
    return alpha if residual <= reproduction_tolerance(dtypes, G.shape[0], terms) else None


def project_full(G: Tensor, X: Tensor, U_out: Tensor, U_in: Tensor, mask: Tensor) -> Tensor:
    """``P(Gᵀ X) = U_out (((G U_out)ᵀ (X U_in)) ⊙ M) U_inᵀ`` in the bases' dtype (:func:`functional.project`)."""
    rotated = (G @ U_out).mT @ (X @ U_in)
    rotated = rotated.mul_(mask) if mask.dtype == torch.bool else rotated * mask.to(rotated.dtype)
    return U_out @ rotated @ U_in.mT


def project_complement(
    base: Tensor, G: Tensor, X: Tensor, U_side: Tensor, U_other: Tensor | None, bands: Sequence[functional.Band],
    by_columns: bool = False,
) -> Tensor:
    """``base − Σ_b (blocked part of Gᵀ X in band b)``: ``P(Gᵀ X)`` for ``base = Gᵀ X``, from the factors.

    The bands are those of :func:`functional.project_complement`. With the banded side's factor ``A``
    (``G`` by rows, ``X`` by columns) and the other's ``B``, each band subtracts
    ``U_b ((A U_b)ᵀ (B V_b) ⊙ B_b) V_bᵀ`` in the orientation of rank ``min(|R_b|, |C_b|)``, and a band
    spanning the other side subtracts ``(A U_b U_bᵀ)ᵀ B``: all of it as one product ``base − L R``. The
    step passes the gradient itself as ``base`` (``.grad ≈ Gᵀ X`` to rounding, checked): the result then
    differs from the dense ``P(.grad)`` only by the blocked part of that rounding. Products run in ``G``'s
    dtype (the bases'); a new ``(d_out, d_in)`` tensor is returned.
    """
    A, B = (X, G) if by_columns else (G, X)
    AU = A @ U_side  # (T, s): U_sideᵀ Q = (A U_side)ᵀ B without forming U_sideᵀ Q
    lefts: list[Tensor] = []
    rights: list[Tensor] = []
    for side, other, blocked in bands:
        U_b = U_side[:, side]
        if other is None:  # every direction of the other side: U_b U_bᵀ Q = (A U_b U_bᵀ)ᵀ B
            lefts.append(U_b @ AU[:, side].mT)
            rights.append(B)
            continue
        V = U_other[:, other]  # type: ignore[index]
        rectangle = AU[:, side].mT @ (B @ V)  # U_bᵀ Q V_b
        if blocked is not None:
            rectangle.mul_(blocked)  # a finite rotation times 0 is exactly 0 (as in functional.project)
        if rectangle.shape[0] <= rectangle.shape[1]:
            lefts.append(U_b)
            rights.append(rectangle @ V.mT)
        else:
            lefts.append(U_b @ rectangle)
            rights.append(V.mT)
    result = base.to(G.dtype, copy=True)
    if lefts:
        target = result.mT if by_columns else result  # the banded side's directions are the rows of `target`
        target.addmm_(torch.cat(lefts, dim=1), torch.cat(rights, dim=0), alpha=-1)
    return result


# ----------------------------------------------------------------------------- costs
def _check_cost(d_out: int, d_in: int, tokens: int) -> float:
    """:func:`reproduction_scale`: ``G·grad``, the residual's ``addmm`` and three entry-wise passes."""
    products = product_cost(tokens, d_out, d_in) + product_cost(d_out, tokens, d_in)
    return products + _CHECK_PASSES * _PASS_FLOPS_PER_ENTRY * d_out * d_in


def full_cost(shape: tuple[int, int], tokens: int, device: torch.device) -> float:
    """Estimated time of :func:`project_full` with the check, in FLOPs at the peak rate."""
    m, n = shape
    rotate = product_cost(tokens, m, m) + product_cost(tokens, n, n) + product_cost(m, tokens, n)
    back = product_cost(m, m, n) + product_cost(m, n, n)
    return rotate + back + _check_cost(m, n, tokens) + call_overhead_flops(device)


def complement_cost(plan: ProjectionPlan, tokens: int, device: torch.device) -> float:
    """Estimated time of :func:`project_complement` on ``plan``'s bands with the check (``inf`` for a full plan)."""
    banding = plan.banding
    if banding is None:
        return math.inf
    m, n = plan.shape
    d_side, d_other = (n, m) if banding.by_columns else (m, n)
    overhead = call_overhead_flops(device)
    cost = product_cost(tokens, d_side, banding.side_count) + overhead
    inner = 0
    for band in banding.bands:
        r = band.side.stop - band.side.start
        if band.other is None:
            cost += product_cost(d_side, r, tokens)
            inner += tokens
            continue
        c = band.other.stop - band.other.start if isinstance(band.other, slice) else band.other.numel()
        cost += product_cost(tokens, d_other, c) + product_cost(r, tokens, c) + overhead
        cost += product_cost(r, c, d_other) if r <= c else product_cost(d_side, r, c)
        inner += min(r, c)
    # the result: a copy of the gradient (one pass) minus one product of inner dimension Σ k_b (+ T)
    return cost + product_cost(d_side, inner, d_other) + _PASS_FLOPS_PER_ENTRY * m * n + _check_cost(m, n, tokens)


# ----------------------------------------------------------------------------- choice per layer
def token_cap(shape: tuple[int, int]) -> int:
    """Most tokens worth keeping factors of: ``T·(d_out + d_in) ≤ d_out·d_in``, never more numbers than ``Q``."""
    m, n = shape
    return (m * n) // (m + n)


def complement_plan(basis: LocalBasis, projection: Projection) -> ProjectionPlan | None:
    """The complement plan the factors would use (``None`` when ``projection="full"`` forbids it)."""
    if projection == "full":
        return None
    plan = basis.plan(projection)
    return plan if plan.path == "complement" or not isinstance(basis, Basis) else basis.plan("complement")


def path_costs(basis: LocalBasis, projection: Projection, tokens: int, device: torch.device) -> dict[str, float]:
    """Estimated time of each path a layer may take for ``tokens`` positions, in FLOPs at the peak rate.

    ``"dense"`` is the plan's own path on ``.grad``; ``"full"`` needs the full bases (not with
    ``projection="complement"``); ``"complement"`` the complement bands (not with ``projection="full"``).
    """
    costs = {"dense": basis.plan(projection).estimated_cost(device)}
    if isinstance(basis, Basis) and projection != "complement":
        costs["full"] = full_cost(basis.shape, tokens, device)
    plan = complement_plan(basis, projection)
    if plan is not None:
        costs["complement"] = complement_cost(plan, tokens, device)
    return costs


def choose_path(basis: LocalBasis, projection: Projection, tokens: int, device: torch.device, policy: LowRank) -> Path:
    """The path of one layer at one step: the cheapest low-rank one when its estimate is below 0.8 of the
    dense one (``policy="auto"``; near-ties keep the dense reference path) or always (``"always"``);
    ``"dense"`` for ``"off"`` or when there are no tokens."""
    if policy == "off" or tokens <= 0:
        return "dense"
    costs = path_costs(basis, projection, tokens, device)
    low = [path for path in ("complement", "full") if path in costs]
    if not low:
        return "dense"
    best = min(low, key=costs.__getitem__)
    return best if policy == "always" or costs[best] < _AUTO_MARGIN * costs["dense"] else "dense"  # type: ignore


def token_budget(basis: LocalBasis, projection: Projection, device: torch.device, policy: LowRank) -> int:
    """The most tokens of one step for which the layer takes a low-rank path (0: never).

    Every low-rank cost grows with ``T`` and the dense one does not, so the largest ``T`` (up to
    :func:`token_cap`) with a low-rank path chosen is found by bisection; ``"always"`` takes the cap.
    """
    cap = token_cap(basis.shape)
    if policy == "off":
        return 0
    if policy == "always":
        return cap
    lo, hi = 0, cap  # invariant: T = lo takes a low-rank path (or lo = 0), T = hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if choose_path(basis, projection, mid, device, policy) != "dense":
            lo = mid
        else:
            hi = mid - 1
    return lo
