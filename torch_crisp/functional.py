"""Pure tensor functions of CrispEdit's low-curvature projection.

No modules, hooks or state live here: every function takes tensors and returns tensors (or a
float), so the property tests can hit the mathematics directly.

Conventions (``docs/concepts.md``): a projected layer has a logical weight ``W`` of shape
``(d_out, d_in)``; its K-FAC factors are ``A = (1/N) Σ_t a_t a_tᵀ`` (input side) and
``S = (1/N) Σ_t g_t g_tᵀ`` (output side) with eigendecompositions ``A = U_in diag(λ_in) U_inᵀ``
and ``S = U_out diag(λ_out) U_outᵀ``. The curvature of the eigen-direction ``(i, j)`` — the
rank-one matrix ``u_out_i u_in_jᵀ`` — is ``c_ij = λ_out_i · λ_in_j``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "curvature_grid",
    "kept_below",
    "energy_threshold",
    "threshold_from_curvature",
    "low_curvature_mask",
    "project",
    "project_complement",
    "project_fixed_column",
    "remove_column_component",
    "rotate",
    "symmetric_eigh",
    "unrotate",
]


def _check_gamma(gamma: float) -> None:
    if not (isinstance(gamma, (int, float)) and 0.0 < float(gamma) < 1.0):
        raise ValueError(
            f"gamma must lie strictly between 0 and 1 (got {gamma!r}); "
            "it is the fraction of curvature energy to block, e.g. 0.9 or 0.99."
        )


def _check_spectrum(name: str, eig: Tensor) -> None:
    if eig.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of eigenvalues, got shape {tuple(eig.shape)}")
    if eig.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(eig).all():
        raise ValueError(f"{name} contains NaN or infinite values; the factors are corrupt")
    if (eig < 0).any():
        raise ValueError(
            f"{name} has negative entries; curvature eigenvalues must be >= 0 "
            "(clamp the output of an eigendecomposition, e.g. with symmetric_eigh)"
        )


def curvature_grid(eig_out: Tensor, eig_in: Tensor) -> Tensor:
    """Return ``c = λ_out λ_inᵀ`` (shape ``(d_out, d_in)``) in float64.

    float64 so that the mask and the threshold are computed from identical products.
    """
    return torch.outer(eig_out.to(torch.float64), eig_in.to(torch.float64))


def threshold_from_curvature(curvature: Tensor, gamma: float) -> float:
    """Energy threshold ``τ`` of an arbitrary non-negative curvature tensor.

    Sort the entries in descending order and take the shortest prefix whose sum reaches
    ``γ · Σ c``; ``τ`` is the smallest value in that prefix. Everything strictly below ``τ`` is
    kept. When all curvature is zero the empty prefix already reaches the target, so ``τ = +inf``
    and every direction is kept (the capability loss is flat in all of them).
    """
    _check_gamma(gamma)
    c = curvature.reshape(-1).to(torch.float64)
    _check_spectrum("curvature", c)
    total = c.sum()
    if total.item() == 0.0:
        return math.inf
    ordered = torch.sort(c, descending=True).values
    prefix = torch.cumsum(ordered, dim=0)
    target = float(gamma) * total
    # first index whose running sum reaches the target; rounding can leave the last partial
    # sum a hair below gamma * total only when gamma is ~1, so clamp to the last entry.
    k = int(torch.searchsorted(prefix, target.unsqueeze(0)).item())
    k = min(k, ordered.numel() - 1)
    return float(ordered[k].item())


def energy_threshold(eig_out: Tensor, eig_in: Tensor, gamma: float) -> float:
    """The threshold ``τ`` of the energy rule for K-FAC curvature ``c_ij = λ_out_i · λ_in_j``.

    Args:
        eig_out: eigenvalues of the output factor ``S`` (``d_out``, non-negative).
        eig_in: eigenvalues of the input factor ``A`` (``d_in``, non-negative).
        gamma: fraction of the total curvature energy ``Σ c_ij`` to block, in ``(0, 1)``.

    Returns:
        ``τ``: the directions with ``c_ij < τ`` are kept (see :func:`low_curvature_mask`).
    """
    _check_gamma(gamma)
    _check_spectrum("eig_out", eig_out)
    _check_spectrum("eig_in", eig_in)
    if eig_out.numel() * eig_in.numel() > _SEARCH_MIN_GRID:
        # An LLM layer's grid (4096 × 14336 = 59M float64) costs seconds and ~2 GB to sort; the
        # search below needs neither. Small grids keep the literal definition.
        return _kfac_threshold_by_search(eig_out, eig_in, gamma)
    return threshold_from_curvature(curvature_grid(eig_out, eig_in), gamma)


# Grids with more entries than this use the sort-free search (the two cost the same at about
# 2^17 entries on one CPU core; measured by benchmarks/threshold.py).
_SEARCH_MIN_GRID = 1 << 17
_SEARCH_CANDIDATES = 64  # thresholds tried per round: 6 bits of the 63-bit range per round


def _kfac_threshold_by_search(eig_out: Tensor, eig_in: Tensor, gamma: float) -> float:
    """The energy threshold of ``c_ij = λ_out_i · λ_in_j`` without materialising or sorting ``c``.

    Let ``E(t) = Σ_{c_ij ≥ t} c_ij`` (non-increasing in ``t``, constant between consecutive
    values of ``c``). The shortest descending prefix reaching ``γ·Σc`` ends at the value ``τ``
    with ``E(τ) ≥ γ·Σc > E(t)`` for every ``t > τ``; so ``τ`` is the largest float64 ``t`` with
    ``E(t) ≥ γ·Σc``, and it is one of the ``c_ij``. Non-negative float64 numbers are ordered like
    their bit patterns, so a search over the bits finds it in at most 63 halvings; each round
    here tries 64 thresholds at once.

    ``E(t)`` needs no grid: with the longer spectrum sorted ascending (``s``) and its suffix sums,
    the entries ``≥ t`` of row ``i`` (the shorter spectrum's value ``r_i``) are a suffix of ``s``
    (``r_i · s_k`` is monotone in ``s_k``, also after float64 rounding), found by a vectorised
    binary search on the exact products ``r_i · s_k``, so membership is decided on the same
    float64 values as :func:`curvature_grid`'s. Only the order of the float64 additions differs
    from the sorted cumulative sum, which can move ``τ`` only when ``γ·Σc`` lies within rounding of
    a prefix sum.
    """
    rows_in, searched_in = (eig_out, eig_in) if eig_out.numel() <= eig_in.numel() else (eig_in, eig_out)
    rows = rows_in.to(torch.float64).reshape(-1, 1)  # (r, 1)
    s = torch.sort(searched_in.to(torch.float64)).values  # (n,) ascending
    n = s.numel()
    # suffix[k] = Σ_{j ≥ k} s_j, with suffix[n] = 0 for rows where nothing reaches t
    suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(s, (0,)), 0), (0,)), s.new_zeros(1)])
    steps = max(1, math.ceil(math.log2(n + 1)))

    def energy_at_or_above(t: Tensor) -> Tensor:
        """``E(t)`` for a vector of thresholds ``t`` (shape ``(K,)``)."""
        lo = torch.zeros(rows.shape[0], t.numel(), dtype=torch.long, device=s.device)
        hi = torch.full_like(lo, n)
        for _ in range(steps):  # first k with rows·s_k >= t; lo == hi stays put
            mid = (lo + hi) // 2
            reaches = rows * s[mid.clamp_max(n - 1)] >= t
            active = lo < hi
            hi = torch.where(active & reaches, mid, hi)
            lo = torch.where(active & ~reaches, mid + 1, lo)
        return (rows * suffix[lo]).sum(dim=0)

    zero = torch.zeros(1, dtype=torch.float64, device=s.device)
    total = energy_at_or_above(zero)
    if total.item() == 0.0:
        return math.inf
    target = float(gamma) * total
    top = (rows.max() * s[-1]).reshape(1)  # the largest c_ij (the product is monotone)
    if bool(energy_at_or_above(top) >= target):
        return float(top.item())
    # invariant: E(bits lo) >= target > E(bits hi)
    lo_bits, hi_bits = 0, int(top.view(torch.int64).item())
    while hi_bits - lo_bits > 1:
        span = hi_bits - lo_bits
        # evenly spaced strictly inside (lo, hi), in exact integer arithmetic (bit patterns reach
        # 2^63, beyond float64's integer precision)
        offsets = sorted({span * k // (_SEARCH_CANDIDATES + 1) for k in range(1, _SEARCH_CANDIDATES + 1)} - {0})
        candidates = torch.tensor([lo_bits + o for o in offsets], dtype=torch.int64, device=s.device)
        reached = energy_at_or_above(candidates.view(torch.float64)) >= target
        passing = candidates[reached]
        failing = candidates[~reached]
        if passing.numel():
            lo_bits = int(passing.max().item())
        if failing.numel():
            hi_bits = int(failing.min().item())
    return float(torch.tensor(lo_bits, dtype=torch.int64).view(torch.float64).item())


def low_curvature_mask(eig_out: Tensor, eig_in: Tensor, gamma: float) -> Tensor:
    """Boolean mask ``M`` of shape ``(d_out, d_in)``: ``M_ij = [λ_out_i · λ_in_j < τ]``, True = kept.

    Larger ``gamma`` blocks more energy and therefore keeps fewer directions; the kept set grows
    monotonically as ``gamma`` shrinks.
    """
    tau = energy_threshold(eig_out, eig_in, gamma)
    return kept_below(eig_out, eig_in, tau)


def kept_below(eig_out: Tensor, eig_in: Tensor, tau: float, rows_per_chunk: int = 256) -> Tensor:
    """``[λ_out_i · λ_in_j < τ]`` as a bool ``(d_out, d_in)`` mask, built a block of rows at a time.

    The products are the float64 values of :func:`curvature_grid` (so the mask agrees exactly with
    the threshold), but only ``rows_per_chunk`` rows of them exist at once: at LLM sizes the full
    float64 grid would be 8× the size of the mask.
    """
    eig_out64, eig_in64 = eig_out.to(torch.float64), eig_in.to(torch.float64)
    mask = torch.empty(eig_out.numel(), eig_in.numel(), dtype=torch.bool, device=eig_out.device)
    for start in range(0, eig_out.numel(), rows_per_chunk):
        rows = eig_out64[start : start + rows_per_chunk]
        torch.lt(torch.outer(rows, eig_in64), tau, out=mask[start : start + rows_per_chunk])
    return mask


def project(Q: Tensor, U_out: Tensor, U_in: Tensor, mask: Tensor) -> Tensor:
    """Project ``Q`` onto the kept subspace: ``P(Q) = U_out ((U_outᵀ Q U_in) ⊙ M) U_inᵀ``.

    ``P`` is the orthogonal projection (Frobenius inner product) onto the span of the rank-one
    matrices ``u_out_i u_in_jᵀ`` with ``M_ij`` true; the ``(d_in·d_out)²`` projector is never
    formed. ``Q`` may carry leading batch dimensions. The products run in the dtype of the bases
    (float32 bases keep bf16 gradients accurate); the result has ``Q``'s dtype.

    Args:
        Q: ``(..., d_out, d_in)`` matrix (gradient or update) to project.
        U_out: ``(d_out, d_out)`` orthonormal eigenvectors of ``S`` (columns).
        U_in: ``(d_in, d_in)`` orthonormal eigenvectors of ``A`` (columns).
        mask: ``(d_out, d_in)`` boolean (or 0/1) kept set.
    """
    if Q.shape[-2:] != (U_out.shape[0], U_in.shape[0]):
        raise ValueError(
            f"cannot project a matrix of shape {tuple(Q.shape)} with bases of sizes "
            f"d_out={U_out.shape[0]}, d_in={U_in.shape[0]}: expected (..., {U_out.shape[0]}, "
            f"{U_in.shape[0]}) (for a layer with a bias, append the bias gradient as a last column)"
        )
    if mask.shape != (U_out.shape[0], U_in.shape[0]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the bases")
    compute_dtype = U_out.dtype
    rotated = U_out.mT @ Q.to(compute_dtype) @ U_in
    # In place by the boolean mask itself: no ``~mask`` or float copy per step, and measured
    # (benchmarks/micro.py) 1.2× faster than masked_fill_ on K-FAC's staircase masks and 7–10× on
    # irregular (EK-FAC-like) ones. Rotating a finite Q gives finite entries, so × 0 is exactly 0.
    rotated = rotated * mask.to(compute_dtype) if mask.dtype != torch.bool else rotated.mul_(mask)
    return (U_out @ rotated @ U_in.mT).to(Q.dtype)


Band = tuple[slice, slice | Tensor | None, Tensor | None]
"""One band of :func:`project_complement`: ``(side, other, blocked)``."""


def project_complement(
    Q: Tensor, U_side: Tensor, U_other: Tensor | None, bands: Sequence[Band], by_columns: bool = False
) -> Tensor:
    """``P(Q) = Q − Σ_b U_out[:, R_b] ((U_out[:, R_b]ᵀ Q U_in[:, C_b]) ⊙ B_b) U_in[:, C_b]ᵀ``.

    The same projection as :func:`project`, computed from the **blocked** directions only: since
    ``U_out`` and ``U_in`` are complete orthonormal bases, ``Q = U_out (U_outᵀ Q U_in) U_inᵀ``, so
    removing the blocked coefficients ``B = ¬M`` is subtracting ``U_out ((U_outᵀ Q U_in) ⊙ B) U_inᵀ``,
    and only the rows ``R_b`` and columns ``C_b`` where ``B`` has entries take part. Each band ``b``
    is a set of blocked directions on one side (output directions ``R_b``; input directions when
    ``by_columns``) with the union ``C_b`` of their blocked directions on the other side, and
    ``B_b = B[R_b, C_b]``. Cost (``by_columns=False``): ``4·r·d_out·d_in + 4·d_in·Σ_b |R_b|·|C_b|``
    FLOPs for ``r = Σ_b |R_b|``, against ``4·d_out·d_in·(d_out + d_in)`` for :func:`project`; with
    ``by_columns`` swap ``d_out`` and ``d_in``.

    Args:
        Q: ``(..., d_out, d_in)`` matrix to project; the products run in ``U_side``'s dtype and the
            result has ``Q``'s dtype.
        U_side: ``(d_side, r)`` the banded side's eigenvectors of the blocked directions, bands
            consecutive (``U_out[:, R]``, or ``U_in[:, C]`` when ``by_columns``).
        U_other: ``(d_other, c)`` the other side's eigenvectors used by the bands (``None`` when every
            band spans the whole other side).
        bands: ``(side, other, blocked)`` per band: ``side`` a slice of ``U_side``'s columns;
            ``other`` the positions of ``C_b`` among ``U_other``'s columns, or ``None`` when the band
            blocks **every** direction of the other side (then ``U_other U_otherᵀ = I`` cancels and
            the band costs no inner products); ``blocked`` the ``(|side|, |other|)`` bool mask
            ``B_b``, or ``None`` when all of it is blocked.
        by_columns: the bands run over input directions (``U_side`` holds ``U_in`` columns).
    """
    if not bands:
        return Q.clone()  # nothing is blocked: P is the identity
    compute_dtype = U_side.dtype
    Qc = Q.to(compute_dtype)
    if by_columns:
        T = Qc @ U_side  # (..., d_out, c): the blocked input directions' coefficients, all output rows
        for side, other, blocked in bands:
            if other is None:
                continue
            V = U_other[:, other]  # type: ignore[index]
            X = V.mT @ T[..., :, side]
            if blocked is not None:
                X.mul_(blocked.mT)  # a finite rotation times 0 is exactly 0 (as in project)
            T[..., :, side] = V @ X
            del V, X  # before the result is allocated: the peak stays at T plus one of them
        left, right = T, U_side.mT
    else:
        T = U_side.mT @ Qc  # (..., r, d_in)
        for side, other, blocked in bands:
            if other is None:
                continue
            V = U_other[:, other]  # type: ignore[index]
            X = T[..., side, :] @ V
            if blocked is not None:
                X.mul_(blocked)
            T[..., side, :] = X @ V.mT
            del V, X
        left, right = U_side, T
    # one fused product-and-subtract for a plain matrix: no d_out × d_in temporary besides the result
    result = torch.addmm(Qc, left, right, alpha=-1) if Qc.dim() == 2 else Qc - left @ right
    return result.to(Q.dtype)


def rotate(Q: Tensor, U_out: Tensor, U_in: Tensor) -> Tensor:
    """Coefficients of ``Q`` in the Kronecker eigenbasis, ``Ũ = U_outᵀ Q U_in``, in the bases' dtype."""
    return U_out.mT @ Q.to(U_out.dtype) @ U_in


def unrotate(coefficients: Tensor, U_out: Tensor, U_in: Tensor) -> Tensor:
    """Inverse of :func:`rotate`: ``U_out Ũ U_inᵀ``."""
    return U_out @ coefficients @ U_in.mT


def remove_column_component(coefficients: Tensor, mask: Tensor, column_row: Tensor) -> Tensor:
    """Per row, remove from the kept coefficients their component along the kept part of ``column_row``.

    With ``v = column_row`` (the row of ``U_in`` at one input coordinate ``b``), a rotated matrix
    ``Ũ`` whose unrotated form has column ``b`` equal to zero is one with ``Σ_j Ũ_ij v_j = 0`` for
    every row ``i``. For row ``i`` with kept set ``M_i`` this subtracts
    ``(Σ_{j∈M_i} Ũ_ij v_j / Σ_{j∈M_i} v_j²) · v_j`` on ``M_i``: the orthogonal projection of the row
    onto ``span{e_j : j ∈ M_i} ∩ v^⊥``. Returns the corrected (masked) coefficients.
    """
    kept = coefficients * mask.to(coefficients.dtype)
    weights = mask.to(coefficients.dtype) * column_row.to(coefficients.dtype)  # (d_out, d_in): M_ij v_j
    along = kept @ column_row.to(coefficients.dtype)  # Σ_j M_ij Ũ_ij v_j
    norms = weights @ column_row.to(coefficients.dtype)  # Σ_j M_ij v_j²
    scale = torch.where(norms > 0, along / torch.where(norms > 0, norms, 1.0), 0.0)
    return kept - scale.unsqueeze(-1) * weights


def project_fixed_column(Q: Tensor, U_out: Tensor, U_in: Tensor, mask: Tensor, column: int) -> Tensor:
    """Project ``Q`` onto the kept subspace intersected with {matrices whose column ``column`` is zero}.

    For a layer whose bias is frozen while its weight trains (``column`` = the bias column of
    ``[W | b]``): ``P(Q)`` of :func:`project` would ask for a bias change that never happens, and the
    weight part alone would leave the kept subspace. This is the orthogonal projection onto the
    largest subspace of the kept one that leaves the bias alone: rotate, mask, remove each row's
    component along the bias coordinate (:func:`remove_column_component`), rotate back. The result's
    column ``column`` is zero up to rounding.
    """
    rotated = rotate(Q, U_out, U_in)
    corrected = remove_column_component(rotated, mask, U_in[column])
    result = unrotate(corrected, U_out, U_in).to(Q.dtype)
    result[..., column] = 0  # exactly: it is zero up to rounding, and it is never written back
    return result


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric positive semi-definite factor.

    Returns ``(eigenvalues, eigenvectors)`` with eigenvalues ascending and clamped at zero
    (round-off makes tiny negative values of a PSD matrix). The input is symmetrised first so a
    factor accumulated with rounding asymmetry still gives orthonormal vectors.
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(
            "factor contains NaN or infinite values (overflow in the model's forward or backward "
            "pass?); collect in float32 and check the loss is finite"
        )
    sym = 0.5 * (matrix + matrix.mT)
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    return eigenvalues.clamp_min_(0.0), eigenvectors
