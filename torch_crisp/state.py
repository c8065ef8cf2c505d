"""Per-layer state: factor sums, token count, the eigenbasis and EK-FAC's correction sums.

One :class:`LayerState` per projected module. It receives per-position activations and output
gradients (already selected and scaled by :mod:`torch_crisp.capture`) and keeps their **sums**
with a token count, so data from several calls, ranks or editing rounds merges exactly; the
normalised factors become a :class:`~torch_crisp.basis.Basis` through
:func:`~torch_crisp.basis.compute_basis`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import curvature as curvature_models
from . import functional
from .basis import Basis, compute_basis
from .config import Curvature
from .layers import LinearGeometry

__all__ = ["Basis", "LayerState"]


class LayerState:
    """Factor sums ``Σ_t a_t a_tᵀ``, ``Σ_t g_t g_tᵀ``, token count ``N`` and basis of one layer.

    Attributes:
        A_sum, S_sum: the factor sums (``None`` before any data), in ``factor_dtype``.
        token_count: ``N``, the (possibly weighted) number of positions behind the sums.
        basis: the current :class:`~torch_crisp.basis.Basis` (``None`` before the first one).
        correction_sum, example_count: EK-FAC's second pass, ``Σ_n (U_outᵀ G_n U_in)²`` over
            ``example_count`` examples, expressed in the current basis.
    """

    def __init__(self, name: str, geometry: LinearGeometry, factor_dtype: torch.dtype) -> None:
        self.name = name
        self.geometry = geometry
        self.factor_dtype = factor_dtype
        self.A_sum: Tensor | None = None
        self.S_sum: Tensor | None = None
        self.token_count: float = 0
        self.basis: Basis | None = None
        self.correction_sum: Tensor | None = None
        self.example_count: float = 0

    # ----------------------------------------------------------------- accumulation
    def ensure_sums(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """The factor sums, allocated as zeros (on ``device``, default the weight's) if missing."""
        if self.A_sum is None or self.S_sum is None:
            device = device if device is not None else self.geometry.weight.device
            d_in, d_out = self.geometry.d_in_augmented, self.geometry.d_out
            self.A_sum = torch.zeros(d_in, d_in, dtype=self.factor_dtype, device=device)
            self.S_sum = torch.zeros(d_out, d_out, dtype=self.factor_dtype, device=device)
        return self.A_sum, self.S_sum

    @torch.no_grad()
    def accumulate(self, inputs: Tensor, output_grads: Tensor, weight: float = 1.0) -> None:
        """Add ``weight · Σ_t a_t a_tᵀ`` and ``weight · Σ_t g_t g_tᵀ`` over the rows given.

        Args:
            inputs: ``(n, d_in)`` layer inputs at the selected positions (no bias column).
            output_grads: ``(n, d_out)`` gradients of the sum-reduced loss w.r.t. the layer output.
            weight: multiplies both sums and the token count (for up-weighting a data set).
        """
        n = inputs.shape[0]
        if output_grads.shape[0] != n:
            raise RuntimeError(f"{self.name}: {n} input rows but {output_grads.shape[0]} gradient rows")
        A_sum, S_sum = self.ensure_sums(inputs.device)
        a = inputs.to(self.factor_dtype)
        g = output_grads.to(self.factor_dtype)
        d_in = self.geometry.d_in
        # A's weight block in place; the bias row/column of the augmented input [a, 1] is the
        # running sum of a and the count, which avoids concatenating a column of ones.
        A_sum[:d_in, :d_in].addmm_(a.mT, a, alpha=weight)
        if self.geometry.has_bias:
            column = a.sum(dim=0) * weight
            A_sum[:d_in, d_in] += column
            A_sum[d_in, :d_in] += column
            A_sum[d_in, d_in] += n * weight
        S_sum.addmm_(g.mT, g, alpha=weight)
        self.token_count += n * weight

    def reset(self) -> None:
        self.A_sum = self.S_sum = None
        self.token_count = 0
        self.basis = None
        self.clear_correction()

    # ----------------------------------------------------------------- factors and basis
    def factors(self) -> tuple[Tensor, Tensor]:
        """Normalised factors ``(A, S) = (Σ a aᵀ / N, Σ g gᵀ / N)``."""
        if self.A_sum is None or self.S_sum is None or self.token_count == 0:
            raise RuntimeError(
                f"layer {self.name!r} has no curvature data yet: call projector.collect(...) or run "
                "forward/backward passes inside projector.capture()"
            )
        return self.A_sum / self.token_count, self.S_sum / self.token_count

    def compute_basis(self, gamma: float, curvature: Curvature = "kfac", device: torch.device | None = None) -> Basis:
        """Eigendecompose this layer's factors into a new basis (:func:`~torch_crisp.basis.compute_basis`).

        The basis lives on ``device`` (default: the weight's). An EK-FAC correction belonged to the
        old basis and is discarded: run the second pass, then :meth:`apply_correction`.
        """
        A, S = self.factors()
        device = device if device is not None else self.geometry.weight.device
        self.basis = compute_basis(A, S, gamma, curvature, device=device)
        if curvature == "ekfac":
            self.clear_correction()
        return self.basis

    def require_basis(self) -> Basis:
        """The basis, or a ``RuntimeError`` that says how to compute it."""
        if self.basis is None:
            raise RuntimeError(
                f"no eigenbasis for layer {self.name!r}: call projector.collect(batches) first, or "
                "projector.update_basis() after feeding data through projector.capture()"
            )
        return self.basis

    # ----------------------------------------------------------------- EK-FAC correction
    def clear_correction(self) -> None:
        """Forget the EK-FAC second-pass sums (they are tied to the basis they were rotated into)."""
        self.correction_sum = None
        self.example_count = 0

    def ensure_correction_sum(self) -> Tensor:
        """The correction sum, allocated as zeros if missing (a rank without examples adds zeros)."""
        if self.correction_sum is None:
            shape = (self.geometry.d_out, self.geometry.d_in_augmented)
            self.correction_sum = torch.zeros(shape, dtype=self.factor_dtype, device=self.geometry.weight.device)
        return self.correction_sum

    @torch.no_grad()
    def accumulate_correction(self, inputs: Tensor, output_grads: Tensor, weight: float = 1.0) -> None:
        """Add ``weight · Σ_n (U_outᵀ G_n U_in)²`` for a batch of examples in the current basis.

        Args:
            inputs: ``(n, T, d_in[+1])`` inputs of each example's positions, bias-augmented, with
                non-counting positions zeroed.
            output_grads: ``(n, T, d_out)`` gradients of the sum-reduced loss w.r.t. the outputs.
            weight: multiplies the sum and the example count.
        """
        if self.basis is None:
            raise RuntimeError(f"layer {self.name!r}: the EK-FAC correction needs an eigenbasis first")
        U_in = self.basis.U_in.to(inputs.device, self.factor_dtype)
        U_out = self.basis.U_out.to(inputs.device, self.factor_dtype)
        added = curvature_models.ekfac_curvature_sum(inputs, output_grads, U_in, U_out)
        if self.correction_sum is None:
            self.correction_sum = torch.zeros_like(added)
        self.correction_sum.add_(added, alpha=weight)
        self.example_count += inputs.shape[0] * weight

    def corrected_curvature(self) -> Tensor:
        """EK-FAC's ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]`` in the current basis, ``(d_out, d_in[+1])``."""
        if self.correction_sum is None or self.example_count == 0:
            raise RuntimeError(
                f"layer {self.name!r} has no EK-FAC correction for its current basis: run the second "
                "pass (projector.correct_curvature(batches); projector.collect does it for curvature='ekfac')"
            )
        return self.correction_sum / self.example_count

    def apply_correction(self, gamma: float) -> Basis:
        """Replace the basis' mask and threshold by the energy rule on the corrected curvature."""
        self.basis = self.require_basis().with_corrected_curvature(self.corrected_curvature(), gamma)
        return self.basis

    # ----------------------------------------------------------------- projection
    def project(self, matrix: Tensor) -> Tensor:
        """``P(Q)`` for a plain ``(..., d_out, d_in[+1])`` matrix (see :func:`functional.project`).

        The basis moves to the matrix's device once (and stays there).
        """
        basis = self.require_basis()
        if basis.device != matrix.device:
            basis = self.basis = basis.to(matrix.device)
        return functional.project(matrix, basis.U_out, basis.U_in, basis.mask)
