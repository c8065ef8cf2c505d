"""Pure functions of the curvature variants: activation-only masks, EK-FAC, MC labels, exact GN.

Like :mod:`torch_crisp.functional`, nothing here holds modules, hooks or state; every function maps
tensors to tensors. Conventions (``docs/curvature.md``): a projected layer has a logical weight
``[W | b]`` of shape ``(d_out, d_in)`` (``d_in`` counts the bias column), K-FAC eigenbases
``A = U_in diag(λ_in) U_inᵀ`` and ``S = U_out diag(λ_out) U_outᵀ``, and the kept set of the energy
rule with threshold ``τ`` is ``{(i, j): c_ij < τ}`` (:func:`functional.threshold_from_curvature`).

* ``"activations"`` (AlphaEdit / Adam-NSCL): ``c`` depends on the input side only, the energy rule
  runs on ``λ_in`` and the kept mask is constant along rows, so ``P(Q) = Q U_in diag(λ_in < τ) U_inᵀ``
  whatever ``U_out`` is (:func:`activation_mask`).
* ``"ekfac"``: ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]`` over per-example weight gradients ``G_n``
  (:func:`rotated_example_gradients`, :func:`ekfac_curvature_sum`).
* ``fisher="mc"``: cross-entropy against labels drawn from the model's own softmax
  (:func:`mc_cross_entropy`); in expectation its output-gradient outer products are the Gauss-Newton
  factor ``Jᵀ (diag p − p pᵀ) J``.
* Exact layer-wise Gauss-Newton ``G = (1/N) Σ_n J_nᵀ H_n J_n`` with ``torch.func``
  (:func:`layer_gauss_newton`), its energy-rule projector (:func:`gauss_newton_projector`) and the
  curvature of a direction (:func:`gauss_newton_curvature`): the gold standard for small layers.

Vectorisation of a ``(d_out, d_in)`` matrix is row-major (``Q.reshape(-1)``), so the K-FAC
approximation of ``G`` reads ``torch.kron(S, A)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import functional

__all__ = [
    "activation_mask",
    "corrected_mask",
    "cross_entropy_output_hessians",
    "curvature_threshold",
    "ekfac_curvature_sum",
    "gauss_newton_curvature",
    "gauss_newton_projector",
    "layer_gauss_newton",
    "mc_cross_entropy",
    "rotated_example_gradients",
    "squared_error_output_hessians",
]


# --------------------------------------------------------------------------- activation-only
def activation_mask(eig_in: Tensor, d_out: int, gamma: float) -> tuple[Tensor, float]:
    """Kept mask of the activation-only curvature model and its threshold ``τ_in``.

    The energy rule runs on the input-factor spectrum ``λ_in`` alone: ``τ_in`` is the smallest
    value of the shortest descending prefix of ``λ_in`` holding ``γ · Σ λ_in``, and input direction
    ``j`` is kept iff ``λ_in_j < τ_in``. The returned ``(d_out, d_in)`` mask repeats that row for
    every output index, so ``functional.project`` with any orthonormal ``U_out`` gives
    ``Q U_in diag(λ_in < τ_in) U_inᵀ`` (``U_out (U_outᵀ Q U_in D) U_inᵀ = Q U_in D U_inᵀ``).

    Directions with ``λ_in_j = 0`` (the null space of ``A``) are always kept: the capability inputs
    never excite them, and by Proposition 1 of the paper their Gauss-Newton curvature is zero.
    """
    if d_out < 1:
        raise ValueError(f"d_out must be positive, got {d_out}")
    tau = functional.threshold_from_curvature(eig_in, gamma)
    row = eig_in.to(torch.float64) < tau
    return row.unsqueeze(0).expand(d_out, -1).clone(), tau


# --------------------------------------------------------------------------- EK-FAC
def rotated_example_gradients(inputs: Tensor, output_grads: Tensor, U_in: Tensor, U_out: Tensor) -> Tensor:
    """Per-example weight gradients rotated into the Kronecker eigenbasis, ``U_outᵀ G_n U_in``.

    ``G_n = Σ_t g_{n,t} a_{n,t}ᵀ`` is the gradient of example ``n``'s sum-reduced loss with respect
    to ``[W | b]``; it is never formed: ``U_outᵀ G_n U_in = (g_n U_out)ᵀ (a_n U_in)`` with the
    positions of example ``n`` stacked as rows of ``a_n`` and ``g_n``.

    Args:
        inputs: ``(n, T, d_in)`` layer inputs (bias-augmented with a trailing 1 where the layer has
            a bias; rows of positions that do not count set to zero).
        output_grads: ``(n, T, d_out)`` gradients of the sum-reduced loss w.r.t. the layer output.
        U_in: ``(d_in, d_in)`` eigenvectors of ``A`` (columns).
        U_out: ``(d_out, d_out)`` eigenvectors of ``S`` (columns).

    Returns:
        ``(n, d_out, d_in)`` rotated gradients, in the dtype of the bases.
    """
    if inputs.dim() != 3 or output_grads.dim() != 3 or inputs.shape[:2] != output_grads.shape[:2]:
        raise ValueError(
            "expected inputs (n, T, d_in) and output_grads (n, T, d_out) with the same (n, T), got "
            f"{tuple(inputs.shape)} and {tuple(output_grads.shape)}"
        )
    if inputs.shape[-1] != U_in.shape[0] or output_grads.shape[-1] != U_out.shape[0]:
        raise ValueError(
            f"inputs/output_grads of widths {inputs.shape[-1]}/{output_grads.shape[-1]} do not match bases "
            f"of sizes {U_in.shape[0]}/{U_out.shape[0]} (is the bias column appended to the inputs?)"
        )
    dtype = U_in.dtype
    a_rot = inputs.to(dtype) @ U_in  # (n, T, d_in)
    g_rot = output_grads.to(dtype) @ U_out  # (n, T, d_out)
    return g_rot.mT @ a_rot


def ekfac_curvature_sum(
    inputs: Tensor, output_grads: Tensor, U_in: Tensor, U_out: Tensor, *, max_elements: int = 1 << 24
) -> Tensor:
    """``Σ_n (U_outᵀ G_n U_in)²`` (elementwise square) over the examples of one batch.

    Dividing the sum over all examples by their count gives EK-FAC's corrected curvature
    ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]``, the diagonal of the exact empirical Fisher of the layer
    in the Kronecker eigenbasis. At most about ``max_elements`` rotated entries exist at once:
    examples are processed in chunks, and when one example's ``d_out × d_in`` rotated gradient is
    itself larger, it is built and squared a block of output rows at a time.

    Returns a ``(d_out, d_in)`` tensor in the dtype of the bases.
    """
    n = inputs.shape[0]
    d_out, d_in = U_out.shape[0], U_in.shape[0]
    total = torch.zeros(d_out, d_in, dtype=U_in.dtype, device=U_in.device)
    if d_out * d_in > max_elements:
        return _ekfac_sum_by_row_blocks(inputs, output_grads, U_in, U_out, total, max(1, max_elements // d_in))
    chunk = max(1, max_elements // (d_out * d_in))
    for start in range(0, n, chunk):
        rotated = rotated_example_gradients(
            inputs[start : start + chunk], output_grads[start : start + chunk], U_in, U_out
        )
        total += rotated.square().sum(dim=0)
    return total


def _ekfac_sum_by_row_blocks(
    inputs: Tensor, output_grads: Tensor, U_in: Tensor, U_out: Tensor, total: Tensor, rows: int
) -> Tensor:
    """:func:`ekfac_curvature_sum` one example and ``rows`` output rows at a time, into ``total``.

    Row block ``R`` of ``U_outᵀ G_n U_in`` is ``(g_n U_out[:, R])ᵀ (a_n U_in)``: the rotated inputs
    and gradients are per-position (the size of the layer's activations), and only a
    ``rows × d_in`` block of the rotated gradient exists at a time.
    """
    rotated_example_gradients(inputs[:0], output_grads[:0], U_in, U_out)  # the shape checks
    dtype = U_in.dtype
    for a_n, g_n in zip(inputs, output_grads):
        a_rot = a_n.to(dtype) @ U_in  # (T, d_in)
        g_rot = g_n.to(dtype) @ U_out  # (T, d_out)
        for start in range(0, U_out.shape[0], rows):
            block = g_rot[:, start : start + rows].mT @ a_rot
            total[start : start + rows].addcmul_(block, block)
    return total


def corrected_mask(curvature: Tensor, gamma: float) -> tuple[Tensor, float]:
    """Kept mask ``c < τ`` and threshold ``τ`` of the energy rule on arbitrary curvature ``c``.

    ``τ`` is :func:`curvature_threshold` (no sort of the grid on large layers); the mask is compared
    in float64 a chunk at a time, so no float64 copy of the grid is made either.
    """
    tau = curvature_threshold(curvature, gamma)
    flat = curvature.reshape(-1)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=curvature.device)
    for start in range(0, flat.numel(), _CHUNK):
        torch.lt(flat[start : start + _CHUNK].to(torch.float64), tau, out=mask[start : start + _CHUNK])
    return mask.reshape(curvature.shape), tau


# --------------------------------------------------------------------------- sort-free energy threshold
# Tensors with more entries than this are thresholded by the radix search below (its cost and
# functional's sort cross near the size functional uses for its own K-FAC search).
_SEARCH_MIN_ENTRIES = 1 << 17
_CHUNK = 1 << 20  # entries converted to float64 at a time
# A non-negative float64 has its sign bit clear, so its bit pattern has 63 significant bits,
# consumed most significant first: 15, then 16, 16 and 16.
_RADIX_ROUNDS = ((48, 15), (32, 16), (16, 16), (0, 16))


def curvature_threshold(curvature: Tensor, gamma: float) -> float:
    """Energy threshold ``τ`` of any non-negative curvature tensor, without sorting large ones.

    The definition is :func:`functional.threshold_from_curvature`'s (the smallest value of the
    shortest descending prefix whose sum reaches ``γ · Σ c``; ``+inf`` when ``Σ c = 0``), which
    small tensors use directly. For larger ones ``τ`` is the value ``v`` with
    ``Σ_{c > v} c < γ · Σ c ≤ Σ_{c ≥ v} c``, found by a radix search on the float64 bit patterns
    (ordered like the values, since they are non-negative): four passes over the tensor in chunks,
    each summing the entries per 16-bit digit with ``bincount``, narrow the candidates to one
    value. Memory is one chunk and a 65 536-entry histogram instead of a sorted float64 copy, its
    indices and prefix sums (about 2 GB at 4096 × 14336). Only the order of the float64 additions
    differs from the sorted cumulative sum, which matters only when ``γ · Σ c`` lies within
    rounding of a prefix sum.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) < 1.0:
        raise ValueError(f"gamma must lie strictly between 0 and 1, got {gamma!r}")
    if curvature.numel() <= _SEARCH_MIN_ENTRIES:
        return functional.threshold_from_curvature(curvature, gamma)
    return _threshold_by_radix_search(curvature.reshape(-1), float(gamma))


def _threshold_by_radix_search(flat: Tensor, gamma: float) -> float:
    """:func:`curvature_threshold` of a flat tensor of any size, by the radix search."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].to(torch.float64)
        if not bool(torch.isfinite(chunk).all()) or bool((chunk < 0).any()):
            raise ValueError("curvature must be finite and non-negative; the factors are corrupt")
        total += chunk.sum()
    if total.item() == 0.0:
        return math.inf
    target = gamma * total
    prefix, above = 0, torch.zeros((), dtype=torch.float64, device=flat.device)  # above: Σ c beyond the prefix
    for shift, width in _RADIX_ROUNDS:
        sums = _digit_sums(flat, prefix, shift, width)
        reached = above + torch.cumsum(sums.flip(0), 0)  # Σ c over this digit and all larger ones
        hits = torch.nonzero(reached >= target).flatten()
        if not hits.numel():
            # rounding left γ·Σc above every partial sum (γ ≈ 1): the smallest entry, like the
            # literal definition's clamp to the last sorted entry
            return _smallest_with_prefix(flat, prefix, shift + width)
        index = int(hits[0])
        if index > 0:
            above = reached[index - 1]
        prefix = (prefix << width) | ((1 << width) - 1 - index)
    return _from_bits(prefix)


def _float64_chunks(flat: Tensor) -> Iterator[Tensor]:
    """Chunks of ``flat`` in float64, with -0.0 (whose sign bit is set) turned into 0.0."""
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK].to(torch.float64).abs()


def _bits_with_prefix(flat: Tensor, prefix: int, prefix_shift: int) -> Iterator[Tensor]:
    """Per chunk, the bit patterns of the entries whose bits above ``prefix_shift`` equal ``prefix``."""
    for chunk in _float64_chunks(flat):
        bits = chunk.view(torch.int64)
        yield bits if prefix_shift >= 63 else bits[(bits >> prefix_shift) == prefix]


def _digit_sums(flat: Tensor, prefix: int, shift: int, width: int) -> Tensor:
    """``Σ c`` per value of the ``width``-bit digit at ``shift``, over the entries with ``prefix``."""
    sums = torch.zeros(1 << width, dtype=torch.float64, device=flat.device)
    for bits in _bits_with_prefix(flat, prefix, shift + width):
        digits = (bits >> shift) & ((1 << width) - 1)
        sums += torch.bincount(digits, weights=bits.view(torch.float64), minlength=1 << width)
    return sums


def _smallest_with_prefix(flat: Tensor, prefix: int, prefix_shift: int) -> float:
    smallest = min(int(bits.min()) for bits in _bits_with_prefix(flat, prefix, prefix_shift) if bits.numel())
    return _from_bits(smallest)


def _from_bits(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int64).view(torch.float64).item())


# --------------------------------------------------------------------------- Monte-Carlo labels
def mc_cross_entropy(logits: Tensor, valid: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Sum-reduced cross-entropy against labels sampled from ``softmax(logits)``.

    Each position ``t`` draws ``ŷ_t ~ Categorical(softmax(z_t))`` (``torch.multinomial``, so a
    ``torch.manual_seed`` or an explicit ``generator`` makes it reproducible); the loss is
    ``Σ_t valid_t · (−log softmax(z_t)[ŷ_t])``. Its gradient w.r.t. ``z_t`` is ``p_t − e_{ŷ_t}``,
    whose outer product has expectation ``diag(p_t) − p_t p_tᵀ``, the Hessian of the cross-entropy:
    K-FAC's output factor built from it estimates the Gauss-Newton (true Fisher) factor.

    Args:
        logits: ``(..., C)`` unnormalised class scores.
        valid: boolean ``(...)`` mask of the positions that are loss terms (default: all).
        generator: optional random generator for the draws.
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a trailing class dimension, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    flat = logits.reshape(-1, logits.shape[-1])
    log_probs = torch.log_softmax(flat.float(), dim=-1)
    with torch.no_grad():
        sampled = torch.multinomial(log_probs.exp(), 1, generator=generator)
    nll = -log_probs.gather(1, sampled).squeeze(1)
    if valid is not None:
        if tuple(valid.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"valid has shape {tuple(valid.shape)}, expected the logits' leading shape {tuple(logits.shape[:-1])}"
            )
        nll = nll * valid.reshape(-1).to(device=nll.device, dtype=nll.dtype)
    return nll.sum()


# --------------------------------------------------------------------------- exact Gauss-Newton
def cross_entropy_output_hessians(logits: Tensor) -> Tensor:
    """``H_n = diag(p_n) − p_n p_nᵀ`` for ``(n, C)`` logits: the Hessian of ``−log softmax(z)[y]``."""
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def squared_error_output_hessians(outputs: Tensor) -> Tensor:
    """``H_n = I`` for ``(n, C)`` outputs: the Hessian of ``½ ‖f_n − y_n‖²``."""
    n, c = outputs.shape
    return torch.eye(c, dtype=torch.float64, device=outputs.device).expand(n, c, c)


def layer_gauss_newton(
    output_fn: Callable[[Tensor], Tensor],
    weight: Tensor,
    output_hessians: Tensor,
    num_positions: int | None = None,
) -> Tensor:
    """Exact Gauss-Newton block of one layer, ``G = (1/N) Σ_n J_nᵀ H_n J_n``, with ``torch.func``.

    Args:
        output_fn: maps the layer's logical weight ``[W | b]`` (``(d_out, d_in)``) to the model's
            outputs ``(n, C)`` on the capability data, everything else held fixed.
        weight: the point ``[W | b]`` at which to linearise.
        output_hessians: ``(n, C, C)`` Hessians of each sum-reduced loss term w.r.t. its output
            (:func:`cross_entropy_output_hessians`, :func:`squared_error_output_hessians`).
        num_positions: ``N``, the normaliser (default ``n``), matching the ``1/N`` of ``A`` and ``S``.

    Returns:
        ``(d_out·d_in, d_out·d_in)`` float64 matrix in row-major ``vec``; K-FAC approximates it by
        ``torch.kron(S, A)``. Memory ``O(n·C·d_out·d_in + (d_out·d_in)²)``: small layers only.
    """
    point = weight.detach().to(torch.float64)
    jac = torch.func.jacrev(lambda w: output_fn(w).to(torch.float64))(point)
    n, c = output_hessians.shape[:2]
    if jac.shape[:2] != (n, c):
        raise ValueError(
            f"output_fn returned outputs of shape {tuple(jac.shape[:2])} but output_hessians is for ({n}, {c})"
        )
    J = jac.reshape(n, c, -1)
    HJ = output_hessians.to(J) @ J
    gn = J.reshape(n * c, -1).mT @ HJ.reshape(n * c, -1)
    gn = 0.5 * (gn + gn.mT)
    return gn / float(num_positions if num_positions is not None else n)


def gauss_newton_projector(gn: Tensor, gamma: float) -> tuple[Tensor, float]:
    """Orthogonal projector onto the low-curvature eigenspace of an explicit curvature matrix.

    With ``G = V diag(μ) Vᵀ`` the energy rule on ``μ`` gives ``τ``; the projector is
    ``Π = V_kept V_keptᵀ`` over the eigenvectors with ``μ < τ`` (``P(Q) = unvec(Π vec(Q))``).
    Returns ``(Π, τ)``.
    """
    eig, vecs = functional.symmetric_eigh(gn.to(torch.float64))
    tau = functional.threshold_from_curvature(eig, gamma)
    kept = vecs[:, eig < tau]
    return kept @ kept.mT, tau


def gauss_newton_curvature(gn: Tensor, Q: Tensor) -> Tensor:
    """``vec(Q)ᵀ G vec(Q)`` (row-major ``vec``): the curvature that ``G`` assigns to direction ``Q``."""
    q = Q.reshape(-1).to(gn.dtype)
    return q @ gn @ q
