"""The eigenbasis and kept mask of one layer: what a projection needs, computed from the factors.

:func:`compute_basis` turns the normalised factors ``A`` and ``S`` into ``U_in, λ_in, U_out,
λ_out``, the energy threshold ``τ`` and the kept mask ``M`` of a curvature model;
:meth:`Basis.with_corrected_curvature` replaces mask and threshold by EK-FAC's. A :class:`Basis`
is immutable: a new threshold or correction makes a new one, so anything derived from a basis
(a LoRA layer's kept rectangle) can be cached on its identity.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import curvature as curvature_models
from . import functional
from .config import CURVATURES, Curvature, check_choice

__all__ = ["Basis", "compute_basis"]


@dataclass(frozen=True, eq=False)
class Basis:
    """Eigenbases of ``A`` and ``S`` with the kept mask, ready to project."""

    eig_in: Tensor  # (d_in[+1],) ascending, >= 0
    U_in: Tensor  # (d_in[+1], d_in[+1]) columns are eigenvectors of A
    eig_out: Tensor  # (d_out,)
    U_out: Tensor  # (d_out, d_out) columns are eigenvectors of S
    mask: Tensor  # (d_out, d_in[+1]) bool, True = kept (low curvature)
    tau: float  # energy threshold: kept iff c_ij < tau
    # curvature model behind mask/tau: "kfac" (c = λ_out λ_inᵀ), "ekfac" (corrected c, see
    # curvature.py) or "activations" (tau is τ_in of λ_in; the mask is constant along rows)
    curvature: Curvature = "kfac"

    @property
    def kept_fraction(self) -> float:
        return float(self.mask.float().mean().item())

    @property
    def device(self) -> torch.device:
        return self.U_out.device

    def to(self, device: torch.device | str) -> Basis:
        """This basis on ``device`` (``self`` when it is there already)."""
        device = torch.device(device)
        if self.U_out.device == device:
            return self
        return replace(
            self,
            eig_in=self.eig_in.to(device),
            U_in=self.U_in.to(device),
            eig_out=self.eig_out.to(device),
            U_out=self.U_out.to(device),
            mask=self.mask.to(device),
        )

    def with_corrected_curvature(self, corrected: Tensor, gamma: float) -> Basis:
        """The same eigenvectors with EK-FAC's mask and threshold from the corrected curvature."""
        mask, tau = curvature_models.corrected_mask(corrected, gamma)
        return replace(self, mask=mask.to(self.mask.device), tau=tau, curvature="ekfac")


def compute_basis(
    A: Tensor, S: Tensor, gamma: float, curvature: Curvature = "kfac", device: torch.device | None = None
) -> Basis:
    """Eigendecompose the normalised factors and compute the kept mask of the energy rule.

    Bases are stored in float32 on ``device`` (default: where the factors live).
    ``curvature="activations"`` keeps input directions with ``λ_in < τ_in`` for every output row
    (:func:`curvature.activation_mask`). ``"ekfac"`` starts from the K-FAC mask; its second pass
    supplies the corrected curvature (:meth:`Basis.with_corrected_curvature`).
    """
    check_choice("curvature", curvature, CURVATURES)
    eig_in, U_in = functional.symmetric_eigh(A)
    eig_out, U_out = functional.symmetric_eigh(S)
    if curvature == "activations":
        mask, tau = curvature_models.activation_mask(eig_in, S.shape[0], gamma)
    else:
        tau = functional.energy_threshold(eig_out, eig_in, gamma)
        mask = functional.kept_below(eig_out, eig_in, tau)
    target = device if device is not None else U_in.device
    return Basis(
        eig_in=eig_in.to(target, torch.float32),
        U_in=U_in.to(target, torch.float32).contiguous(),
        eig_out=eig_out.to(target, torch.float32),
        U_out=U_out.to(target, torch.float32).contiguous(),
        mask=mask.to(target),
        tau=tau,
        # EK-FAC's mask is K-FAC's until the second pass corrects it
        curvature="activations" if curvature == "activations" else "kfac",
    )
