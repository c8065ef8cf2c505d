"""Per-layer state: factor sums, token count, the eigenbasis and EK-FAC's correction sums.

One :class:`LayerState` per projected module. It receives per-position activations and output
gradients (already selected and scaled by :mod:`torch_crisp.capture`) and keeps their **sums**
with a token count, so data from several calls, ranks or editing rounds merges exactly; the
normalised factors become a :class:`~torch_crisp.basis.Basis` through
:func:`~torch_crisp.basis.compute_basis`.

Its :class:`~torch_crisp.config.ProjectionOptions` decide how it projects (the plan's path, see
:mod:`torch_crisp.plan`) and what it keeps: with ``basis_storage="blocked"`` the basis becomes a
:class:`~torch_crisp.basis.BlockedBasis` once it is final (EK-FAC: after its correction), and with
``offload_factors`` the sums live in CPU memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import curvature as curvature_models
from .basis import AnyBasis, Basis, compute_basis
from .config import Curvature, ProjectionOptions
from .layers import LinearGeometry

__all__ = ["Basis", "LayerState"]

_HOST = torch.device("cpu")


class LayerState:
    """Factor sums ``Σ_t a_t a_tᵀ``, ``Σ_t g_t g_tᵀ``, token count ``N`` and basis of one layer.

    Attributes:
        A_sum, S_sum: the factor sums (``None`` before any data), in ``factor_dtype``.
        token_count: ``N``, the (possibly weighted) number of positions behind the sums.
        basis: the current :class:`~torch_crisp.basis.Basis`, or :class:`~torch_crisp.basis.BlockedBasis`
            with ``basis_storage="blocked"`` (``None`` before the first one).
        correction_sum, example_count: EK-FAC's second pass, ``Σ_n (U_outᵀ G_n U_in)²`` over
            ``example_count`` examples, expressed in the current basis.
        options: the path of projections, the basis storage and the offloading of the sums.
    """

    def __init__(
        self, name: str, geometry: LinearGeometry, factor_dtype: torch.dtype, options: ProjectionOptions | None = None
    ) -> None:
        self.name = name
        self.geometry = geometry
        self.factor_dtype = factor_dtype
        self.options = options if options is not None else ProjectionOptions()
        self.A_sum: Tensor | None = None
        self.S_sum: Tensor | None = None
        self.token_count: float = 0
        self.basis: AnyBasis | None = None
        self.correction_sum: Tensor | None = None
        self.example_count: float = 0
        # positions whose contribution held NaN/inf and was replaced by zeros (a 0-dim tensor, so the
        # check costs no device synchronisation; settled into token_count by settle_rejections)
        self._rejected: Tensor | None = None
        self._rejected_examples: Tensor | None = None

    # ----------------------------------------------------------------- accumulation
    def ensure_sums(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """The factor sums, allocated as zeros (on ``device``, default the weight's; offloaded: the CPU) if missing."""
        if self.A_sum is None or self.S_sum is None:
            device = device if device is not None else self.geometry.weight.device
            device = _HOST if self.options.offload_factors else device
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
        if A_sum.device != inputs.device or S_sum.device != inputs.device:
            self._accumulate_elsewhere(inputs, output_grads, weight)
            return
        a = inputs.to(self.factor_dtype)
        g = output_grads.to(self.factor_dtype)
        # One NaN/inf would poison the sums (and every later basis) for good: a contribution that
        # is not finite is replaced by zeros and its positions are taken off the count later.
        finite = torch.isfinite(a).all() & torch.isfinite(g).all()
        a = torch.where(finite, a, 0.0)
        g = torch.where(finite, g, 0.0)
        rejected = (~finite).to(torch.float64) * (n * weight)
        self._rejected = rejected if self._rejected is None else self._rejected + rejected
        d_in = self.geometry.d_in
        # A's weight block in place; the bias row/column of the augmented input [a, 1] is the
        # running sum of a and the count, which avoids concatenating a column of ones.
        A_sum[:d_in, :d_in].addmm_(a.mT, a, alpha=weight)
        if self.geometry.has_bias:
            column = a.sum(dim=0) * weight
            A_sum[:d_in, d_in] += column
            A_sum[d_in, :d_in] += column
            A_sum[d_in, d_in] += (n * weight) * finite.to(A_sum.dtype)
        S_sum.addmm_(g.mT, g, alpha=weight)
        self.token_count += n * weight

    def _accumulate_elsewhere(self, inputs: Tensor, output_grads: Tensor, weight: float) -> None:
        """:meth:`accumulate` into sums on another device (offloaded): the products are formed where the
        data is, one ``d × d`` temporary at a time, and added to the sums where they live."""
        A_sum, S_sum = self.ensure_sums()
        n, d_in = inputs.shape[0], self.geometry.d_in
        a = inputs.to(self.factor_dtype)
        g = output_grads.to(self.factor_dtype)
        finite = torch.isfinite(a).all() & torch.isfinite(g).all()
        a = torch.where(finite, a, 0.0)
        g = torch.where(finite, g, 0.0)
        rejected = (~finite).to(torch.float64) * (n * weight)
        self._rejected = rejected if self._rejected is None else self._rejected + rejected.to(self._rejected.device)
        A_sum[:d_in, :d_in].add_((a.mT @ a).to(A_sum.device), alpha=weight)
        if self.geometry.has_bias:
            column = (a.sum(dim=0) * weight).to(A_sum.device)
            A_sum[:d_in, d_in] += column
            A_sum[d_in, :d_in] += column
            A_sum[d_in, d_in] += (n * weight) * float(finite.item())
        S_sum.add_((g.mT @ g).to(S_sum.device), alpha=weight)
        self.token_count += n * weight

    def settle_rejections(self) -> float:
        """Take rejected (non-finite) positions and examples off the counts; return how many positions."""
        if self._rejected_examples is not None:
            self.example_count -= float(self._rejected_examples.item())
            self._rejected_examples = None
        if self._rejected is None:
            return 0.0
        rejected, self._rejected = float(self._rejected.item()), None
        if rejected:
            self.token_count -= rejected
        return rejected

    def checkpoint(self) -> tuple:
        """Everything :meth:`restore` needs to undo later changes (the in-place sums are copied)."""
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return (clone(self.A_sum), clone(self.S_sum), self.token_count, self.basis, clone(self.correction_sum),
                self.example_count, self.factor_dtype)

    def restore(self, saved: tuple) -> None:
        """Return to the state :meth:`checkpoint` recorded."""
        (self.A_sum, self.S_sum, self.token_count, self.basis, self.correction_sum, self.example_count,
         self.factor_dtype) = saved
        self._rejected = self._rejected_examples = None

    def reset(self) -> None:
        self.A_sum = self.S_sum = None
        self.token_count = 0
        self._rejected = None
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

    def compute_basis(
        self, gamma: float | None, curvature: Curvature = "kfac", device: torch.device | None = None,
        keep_full: bool = False,
    ) -> AnyBasis:
        """Eigendecompose this layer's factors into a new basis (:func:`~torch_crisp.basis.compute_basis`).

        The basis lives on ``device`` (default: the weight's), and so does the eigendecomposition
        (offloaded factors are copied there for it). An EK-FAC correction belonged to the old basis
        and is discarded: run the second pass, then :meth:`apply_correction`. The basis is then
        stored as the options say (:meth:`apply_storage`) unless ``keep_full`` (a rank that
        broadcasts it first, :mod:`torch_crisp.sync`).
        """
        device = device if device is not None else self.geometry.weight.device
        A, S = (t.to(device) for t in self.factors())
        self.basis = compute_basis(A, S, gamma, curvature, device=device)
        del A, S
        if curvature == "ekfac":
            self.clear_correction()
        if not keep_full:
            self.apply_storage(curvature)
        return self.basis

    def apply_storage(self, curvature: Curvature) -> None:
        """Store the basis and sums as :attr:`options` say, for the projector's curvature model.

        ``basis_storage="blocked"``: the basis becomes a :class:`~torch_crisp.basis.BlockedBasis`,
        except an EK-FAC basis that still awaits its correction (``curvature="ekfac"`` while the basis
        is K-FAC's): the second pass rotates into the full basis. ``offload_factors``: the sums (and
        EK-FAC's correction sums) move to CPU memory.
        """
        options = self.options
        awaiting_correction = curvature == "ekfac" and self.basis is not None and self.basis.curvature != "ekfac"
        if options.basis_storage == "blocked" and self.basis is not None and not awaiting_correction:
            self.basis = self.basis.stored("blocked", options.projection)
        if options.offload_factors:
            self.A_sum, self.S_sum, self.correction_sum = (
                None if t is None else t.to(_HOST) for t in (self.A_sum, self.S_sum, self.correction_sum)
            )

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor this layer holds (sums, basis, cached plans), by name, for memory accounting."""
        held = {key: t for key, t in (("A_sum", self.A_sum), ("S_sum", self.S_sum),
                                      ("correction_sum", self.correction_sum)) if t is not None}
        if self.basis is not None:
            held.update({f"basis.{key}": t for key, t in self.basis.tensors().items()})
        return held

    def require_basis(self) -> AnyBasis:
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
        self._rejected_examples = None

    def ensure_correction_sum(self) -> Tensor:
        """The correction sum, allocated as zeros if missing (a rank without examples adds zeros)."""
        if self.correction_sum is None:
            shape = (self.geometry.d_out, self.geometry.d_in_augmented)
            device = _HOST if self.options.offload_factors else self.geometry.weight.device
            self.correction_sum = torch.zeros(shape, dtype=self.factor_dtype, device=device)
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
        finite = torch.isfinite(added).all()
        added = torch.where(finite, added, 0.0)
        rejected = (~finite).to(torch.float64) * (inputs.shape[0] * weight)
        self._rejected_examples = rejected if self._rejected_examples is None else self._rejected_examples + rejected
        if self.correction_sum is None:
            self.correction_sum = torch.zeros_like(added, device=_HOST if self.options.offload_factors else None)
        self.correction_sum.add_(added.to(self.correction_sum.device), alpha=weight)
        self.example_count += inputs.shape[0] * weight

    def corrected_curvature(self) -> Tensor:
        """EK-FAC's ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]`` in the current basis, ``(d_out, d_in[+1])``."""
        if self.correction_sum is None or self.example_count == 0:
            raise RuntimeError(
                f"layer {self.name!r} has no EK-FAC correction for its current basis: run the second "
                "pass (projector.correct_curvature(batches); projector.collect does it for curvature='ekfac')"
            )
        return self.correction_sum / self.example_count

    def apply_correction(self, gamma: float | None) -> AnyBasis:
        """Replace the basis' mask and threshold by the energy rule on the corrected curvature."""
        self.basis = self.require_basis().with_corrected_curvature(self.corrected_curvature(), gamma)
        self.apply_storage("ekfac")
        return self.basis

    def curvature_grid(self, device: torch.device | None = None) -> Tensor:
        """The curvature ``c_ij`` of every eigen-direction, ``(d_out, d_in[+1])`` float32.

        EK-FAC's corrected values when the basis carries them, else K-FAC's ``λ_out_i · λ_in_j`` (also
        for the activation-only mask, whose prediction of the capability loss is still K-FAC's).
        """
        basis = self.require_basis()
        device = device if device is not None else basis.device
        if basis.curvature == "ekfac" and self.correction_sum is not None and self.example_count:
            return self.corrected_curvature().to(device, torch.float32)
        return torch.outer(basis.eig_out.to(device, torch.float32), basis.eig_in.to(device, torch.float32))

    # ----------------------------------------------------------------- projection
    def project(self, matrix: Tensor) -> Tensor:
        """``P(Q)`` for a plain ``(..., d_out, d_in[+1])`` matrix on the plan's path (:mod:`torch_crisp.plan`).

        Equal to :func:`functional.project` (the reference) up to float rounding; the path is the
        cheaper of full rotation and complement unless ``options.projection`` forces one. The basis
        moves to the matrix's device once (and stays there).
        """
        basis = self.require_basis()
        if basis.device != matrix.device:
            basis = self.basis = basis.to(matrix.device)
        return basis.project(matrix, self.options.projection)
