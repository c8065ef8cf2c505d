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

import torch
from torch import Tensor

__all__ = [
    "curvature_grid",
    "energy_threshold",
    "threshold_from_curvature",
    "low_curvature_mask",
    "project",
    "symmetric_eigh",
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
    return threshold_from_curvature(curvature_grid(eig_out, eig_in), gamma)


def low_curvature_mask(eig_out: Tensor, eig_in: Tensor, gamma: float) -> Tensor:
    """Boolean mask ``M`` of shape ``(d_out, d_in)``: ``M_ij = [λ_out_i · λ_in_j < τ]``, True = kept.

    Larger ``gamma`` blocks more energy and therefore keeps fewer directions; the kept set grows
    monotonically as ``gamma`` shrinks.
    """
    tau = energy_threshold(eig_out, eig_in, gamma)
    return curvature_grid(eig_out, eig_in) < tau


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
    rotated = rotated * mask.to(compute_dtype) if mask.dtype != torch.bool else rotated.masked_fill_(~mask, 0)
    return (U_out @ rotated @ U_in.mT).to(Q.dtype)


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
