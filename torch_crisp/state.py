"""Per-layer state: factor sums, token count, eigenbases and the kept mask.

One :class:`LayerState` per projected module. It receives per-position activations and output
gradients (already selected and scaled by :mod:`torch_crisp.capture`), keeps their sums so that
data from several calls, ranks or editing rounds merges exactly, and turns the normalised factors
into the eigenbases and mask that :func:`torch_crisp.functional.project` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import curvature as C
from . import functional as F
from .layers import LinearGeometry

__all__ = ["Basis", "LayerState"]


@dataclass(frozen=True, eq=False)
class Basis:
    """Eigenbases of ``A`` and ``S`` with the kept mask, ready to project.

    Immutable: a new threshold or correction makes a new ``Basis``, so anything derived from one
    (e.g. a LoRA layer's kept rectangle) can be cached on its identity.
    """

    eig_in: Tensor  # (d_in[+1],) ascending, >= 0
    U_in: Tensor  # (d_in[+1], d_in[+1]) columns are eigenvectors of A
    eig_out: Tensor  # (d_out,)
    U_out: Tensor  # (d_out, d_out) columns are eigenvectors of S
    mask: Tensor  # (d_out, d_in[+1]) bool, True = kept (low curvature)
    tau: float  # energy threshold: kept iff c_ij < tau
    # curvature model behind mask/tau: "kfac" (c = λ_out λ_inᵀ), "ekfac" (corrected c, see
    # curvature.py) or "activations" (tau is τ_in of λ_in; the mask is constant along rows)
    curvature: str = "kfac"

    @property
    def kept_fraction(self) -> float:
        return float(self.mask.float().mean().item())


class LayerState:
    """Factor sums ``Σ_t a_t a_tᵀ``, ``Σ_t g_t g_tᵀ`` and token count ``N`` of one layer."""

    def __init__(self, name: str, geometry: LinearGeometry, factor_dtype: torch.dtype) -> None:
        self.name = name
        self.geometry = geometry
        self.factor_dtype = factor_dtype
        self.A_sum: Tensor | None = None
        self.S_sum: Tensor | None = None
        self.num_tokens: int = 0
        self.basis: Basis | None = None
        # EK-FAC's second pass: Σ_n (U_outᵀ G_n U_in)² in the current basis and the example count
        self.correction_sum: Tensor | None = None
        self.num_examples: float = 0

    # ----------------------------------------------------------------- accumulation
    def _allocate(self, device: torch.device) -> None:
        d_in, d_out = self.geometry.d_in_augmented, self.geometry.d_out
        self.A_sum = torch.zeros(d_in, d_in, dtype=self.factor_dtype, device=device)
        self.S_sum = torch.zeros(d_out, d_out, dtype=self.factor_dtype, device=device)

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
        if self.A_sum is None:
            self._allocate(inputs.device)
        assert self.A_sum is not None and self.S_sum is not None
        a = inputs.to(self.factor_dtype)
        g = output_grads.to(self.factor_dtype)
        d_in = self.geometry.d_in
        # A's weight block in place; the bias row/column of the augmented input [a, 1] is the
        # running sum of a and the count, which avoids concatenating a column of ones.
        self.A_sum[:d_in, :d_in].addmm_(a.mT, a, alpha=weight)
        if self.geometry.has_bias:
            column = a.sum(dim=0) * weight
            self.A_sum[:d_in, d_in] += column
            self.A_sum[d_in, :d_in] += column
            self.A_sum[d_in, d_in] += n * weight
        self.S_sum.addmm_(g.mT, g, alpha=weight)
        self.num_tokens += n * weight

    def reset(self) -> None:
        self.A_sum = self.S_sum = None
        self.num_tokens = 0
        self.basis = None
        self.clear_correction()

    # ----------------------------------------------------------------- factors and basis
    def factors(self) -> tuple[Tensor, Tensor]:
        """Normalised factors ``(A, S) = (Σ a aᵀ / N, Σ g gᵀ / N)``."""
        if self.A_sum is None or self.S_sum is None or self.num_tokens == 0:
            raise RuntimeError(
                f"layer {self.name!r} has no curvature data yet: call projector.collect(...) or run "
                "forward/backward passes inside projector.capture()"
            )
        return self.A_sum / self.num_tokens, self.S_sum / self.num_tokens

    def update_basis(self, gamma: float, device: torch.device | None = None, curvature: str = "kfac") -> Basis:
        """Eigendecompose the factors and compute the kept mask for ``gamma``.

        Bases are stored in float32 on ``device`` (default: where the factors live).
        ``curvature="activations"`` keeps input directions with ``λ_in < τ_in`` for every output
        row (:func:`curvature.activation_mask`). ``curvature="ekfac"`` starts from the K-FAC mask and
        discards any previous correction, which belonged to the old basis: run the second pass
        (:meth:`accumulate_correction`) and then :meth:`apply_correction`.
        """
        if curvature not in ("kfac", "ekfac", "activations"):
            raise ValueError(f"unknown curvature {curvature!r}; use 'kfac', 'ekfac' or 'activations'")
        A, S = self.factors()
        eig_in, U_in = F.symmetric_eigh(A)
        eig_out, U_out = F.symmetric_eigh(S)
        if curvature == "activations":
            mask, tau = C.activation_mask(eig_in, self.geometry.d_out, gamma)
        else:  # EK-FAC starts from the K-FAC mask until its second pass corrects it
            tau = F.energy_threshold(eig_out, eig_in, gamma)
            mask = F.kept_below(eig_out, eig_in, tau)
            if curvature == "ekfac":
                self.clear_correction()
        target = device if device is not None else U_in.device
        self.basis = Basis(
            eig_in=eig_in.to(target, torch.float32),
            U_in=U_in.to(target, torch.float32).contiguous(),
            eig_out=eig_out.to(target, torch.float32),
            U_out=U_out.to(target, torch.float32).contiguous(),
            mask=mask.to(target),
            tau=tau,
            curvature="activations" if curvature == "activations" else "kfac",
        )
        return self.basis

    # ----------------------------------------------------------------- EK-FAC correction
    def clear_correction(self) -> None:
        """Forget the EK-FAC second-pass sums (they are tied to the basis they were rotated into)."""
        self.correction_sum = None
        self.num_examples = 0

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
        b = self.basis
        U_in = b.U_in.to(inputs.device, self.factor_dtype)
        U_out = b.U_out.to(inputs.device, self.factor_dtype)
        added = C.ekfac_curvature_sum(inputs, output_grads, U_in, U_out)
        if self.correction_sum is None:
            self.correction_sum = torch.zeros_like(added)
        self.correction_sum.add_(added, alpha=weight)
        self.num_examples += inputs.shape[0] * weight

    def corrected_curvature(self) -> Tensor:
        """EK-FAC's ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]`` in the current basis, ``(d_out, d_in[+1])``."""
        if self.correction_sum is None or self.num_examples == 0:
            raise RuntimeError(
                f"layer {self.name!r} has no EK-FAC correction for its current basis: run the second "
                "pass (projector.correct_curvature(batches); projector.collect does it for curvature='ekfac')"
            )
        return self.correction_sum / self.num_examples

    def apply_correction(self, gamma: float) -> Basis:
        """Replace the basis' mask and threshold by the energy rule on the corrected curvature."""
        if self.basis is None:
            raise RuntimeError(f"layer {self.name!r} has no eigenbasis yet")
        mask, tau = C.corrected_mask(self.corrected_curvature(), gamma)
        self.basis = replace(self.basis, mask=mask.to(self.basis.mask.device), tau=tau, curvature="ekfac")
        return self.basis

    def project(self, matrix: Tensor) -> Tensor:
        """``P(Q)`` for a ``(..., d_out, d_in[+1])`` matrix (see :func:`functional.project`)."""
        if self.basis is None:
            raise RuntimeError(
                f"layer {self.name!r} has no eigenbasis yet: call projector.collect(...) or "
                "projector.update_basis() after capturing data"
            )
        from .distributed import is_dtensor, project_dtensor  # lazy: distributed imports this module

        if is_dtensor(matrix):  # FSDP2 shard: project the gathered matrix, return it sharded alike
            return project_dtensor(matrix, self.project)
        b = self.basis
        if b.U_out.device != matrix.device:
            b = self.basis = Basis(
                b.eig_in.to(matrix.device), b.U_in.to(matrix.device), b.eig_out.to(matrix.device),
                b.U_out.to(matrix.device), b.mask.to(matrix.device), b.tau, b.curvature,
            )
        return F.project(matrix, b.U_out, b.U_in, b.mask)
