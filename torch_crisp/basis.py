"""The eigenbasis and kept mask of one layer: what a projection needs, computed from the factors.

:func:`compute_basis` turns the normalised factors ``A`` and ``S`` into ``U_in, λ_in, U_out,
λ_out``, the energy threshold ``τ`` and the kept mask ``M`` of a curvature model;
:meth:`Basis.with_corrected_curvature` replaces mask and threshold by EK-FAC's. A :class:`Basis`
is immutable: a new threshold or correction makes a new one, so anything derived from a basis
(a LoRA layer's kept rectangle, its projection plan) can be cached on its identity.

:class:`BlockedBasis` is the same basis stored for ``CrispConfig(basis_storage="blocked")``: only
the eigenvectors its complement path multiplies with (:mod:`torch_crisp.plan`), ``r·d_out + J·d_in``
floats instead of ``d_out² + d_in²``. It projects exactly like the full basis, and every use of
the full eigenvectors or the mask raises a ``ValueError`` that says so. :class:`RemoteBasis` is what a
rank keeps of a basis another rank holds (``CrispConfig(basis_placement="sharded")``): eigenvalues and
numbers, no eigenvectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Union

import torch
from torch import Tensor

from . import curvature as curvature_models
from . import functional
from .config import CURVATURES, BasisStorage, Curvature, Projection, check_choice
from .plan import ProjectionPlan, plan_projection

__all__ = ["AnyBasis", "Basis", "BlockedBasis", "RemoteBasis", "compute_basis", "same_basis"]


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
    # projection plans of this mask by choice of path, made on first use (the basis is immutable)
    _plans: dict[str, ProjectionPlan] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def kept_fraction(self) -> float:
        return float(self.mask.float().mean().item())

    @property
    def device(self) -> torch.device:
        return self.U_out.device

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in[+1])`` of the matrices this basis projects."""
        return self.U_out.shape[0], self.U_in.shape[0]

    def plan(self, projection: Projection = "auto") -> ProjectionPlan:
        """The projection plan of this mask (:func:`torch_crisp.plan.plan_projection`), cached."""
        if projection not in self._plans:
            self._plans[projection] = plan_projection(self.mask, projection)
        return self._plans[projection]

    def project(self, Q: Tensor, projection: Projection = "auto") -> Tensor:
        """``P(Q)`` on the path of :meth:`plan` (equal to :func:`functional.project` up to float rounding)."""
        return self.plan(projection).apply(Q, self.U_out, self.U_in, self.mask)

    def stored(self, storage: BasisStorage, projection: Projection = "auto") -> AnyBasis:
        """This basis as ``storage`` keeps it: itself, or a :class:`BlockedBasis` when the plan takes
        the complement path and its vectors and band masks take fewer bytes than the full bases and mask."""
        if storage == "full":
            return self
        plan = self.plan(projection)
        if plan.path == "full":
            return self
        d_out, d_in = self.shape
        full_bytes = 4 * (d_out * d_out + d_in * d_in) + d_out * d_in
        blocked_bytes = 4 * plan.reduced_floats() + sum(t.numel() * t.element_size() for t in plan.tensors().values())
        return BlockedBasis.of(self, plan) if blocked_bytes < full_bytes else self

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor this basis holds (cached plans included), for memory accounting."""
        held = {"eig_in": self.eig_in, "U_in": self.U_in, "eig_out": self.eig_out, "U_out": self.U_out,
                "mask": self.mask}
        for choice, plan in self._plans.items():
            held.update({f"{choice}.{key}": t for key, t in plan.tensors().items()})
        return held

    def to(self, device: torch.device | str) -> Basis:
        """This basis on ``device`` (``self`` when it is there already)."""
        device = torch.device(device)
        if self.U_out.device == device:
            return self
        moved = replace(
            self,
            eig_in=self.eig_in.to(device),
            U_in=self.U_in.to(device),
            eig_out=self.eig_out.to(device),
            U_out=self.U_out.to(device),
            mask=self.mask.to(device),
        )
        moved._plans.update({choice: plan.to(device) for choice, plan in self._plans.items()})
        return moved

    def with_corrected_curvature(self, corrected: Tensor, gamma: float | None) -> Basis:
        """The same eigenvectors with EK-FAC's mask and threshold from the corrected curvature."""
        if gamma is None:
            return replace(self, mask=torch.ones_like(self.mask), tau=math.inf, curvature="ekfac")
        mask, tau = curvature_models.corrected_mask(corrected, gamma)
        return replace(self, mask=mask.to(self.mask.device), tau=tau, curvature="ekfac")


_DROPPED = (
    "layer basis stored with CrispConfig(basis_storage='blocked') keeps only the eigenvectors of its blocked "
    "directions, not {what}. Update mode, capability_budget, LoRA adapters, a frozen bias column, EK-FAC's second "
    "pass, saving with include_basis=True and changing an EK-FAC projector's gamma need the full eigenbases and "
    "mask: build the projector with basis_storage='full' for those"
)


@dataclass(frozen=True, eq=False)
class BlockedBasis:
    """A :class:`Basis` stored with only the eigenvectors its complement path needs.

    ``U_side`` holds the banded side's eigenvectors of blocked directions (``U_out[:, R]``, or
    ``U_in[:, C]`` when the plan bands over input directions) and ``U_other`` the other side's that
    the bands use (``None`` when none do), in the plan's order. Eigenvalues, ``τ`` and the curvature
    model are kept (reports, the curvature grid); ``U_in``, ``U_out`` and ``mask`` raise ``ValueError``.
    """

    eig_in: Tensor
    eig_out: Tensor
    tau: float
    curvature: Curvature
    projection_plan: ProjectionPlan
    U_side: Tensor
    U_other: Tensor | None

    @classmethod
    def of(cls, basis: Basis, plan: ProjectionPlan) -> BlockedBasis:
        """Keep what ``plan`` (a complement plan of ``basis``' mask) multiplies with; copies, so the rest is freed."""
        U_side, U_other = plan.vectors(basis.U_out, basis.U_in)
        return cls(
            eig_in=basis.eig_in, eig_out=basis.eig_out, tau=basis.tau, curvature=basis.curvature, projection_plan=plan,
            U_side=U_side.clone(memory_format=torch.contiguous_format),
            U_other=None if U_other is None else U_other.clone(memory_format=torch.contiguous_format),
        )

    @property
    def U_in(self) -> Tensor:
        raise ValueError("this " + _DROPPED.format(what="U_in"))

    @property
    def U_out(self) -> Tensor:
        raise ValueError("this " + _DROPPED.format(what="U_out"))

    @property
    def mask(self) -> Tensor:
        raise ValueError("this " + _DROPPED.format(what="the kept mask"))

    @property
    def kept_fraction(self) -> float:
        return 1.0 - self.projection_plan.blocked_fraction

    @property
    def device(self) -> torch.device:
        return self.U_side.device

    @property
    def shape(self) -> tuple[int, int]:
        return self.projection_plan.shape

    def plan(self, projection: Projection = "auto") -> ProjectionPlan:
        """The complement plan this basis was stored for (the stored vectors allow no other)."""
        return self.projection_plan

    def project(self, Q: Tensor, projection: Projection = "auto") -> Tensor:
        """``P(Q)`` on the complement path (equal to the full basis' projection up to float rounding)."""
        return self.projection_plan.apply_reduced(Q, self.U_side, self.U_other)

    def stored(self, storage: BasisStorage, projection: Projection = "auto") -> BlockedBasis:
        if storage == "full":
            raise ValueError("this " + _DROPPED.format(what="the full bases to return to basis_storage='full'"))
        return self

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor this basis holds, for memory accounting."""
        held = {"eig_in": self.eig_in, "eig_out": self.eig_out, "U_side": self.U_side}
        if self.U_other is not None:
            held["U_other"] = self.U_other
        held.update(self.projection_plan.tensors())
        return held

    def to(self, device: torch.device | str) -> BlockedBasis:
        device = torch.device(device)
        if self.U_side.device == device:
            return self
        return replace(
            self, eig_in=self.eig_in.to(device), eig_out=self.eig_out.to(device),
            projection_plan=self.projection_plan.to(device), U_side=self.U_side.to(device),
            U_other=None if self.U_other is None else self.U_other.to(device),
        )

    def with_corrected_curvature(self, corrected: Tensor, gamma: float | None) -> Basis:
        raise ValueError(
            "a new EK-FAC mask may block directions whose eigenvectors this "
            + _DROPPED.format(what="the eigenvectors of other directions")
        )


_REMOTE = (
    "layer {name}'s basis lives on rank {owner} only (basis_placement='sharded': each rank keeps the bases it "
    "computed, projects those layers and broadcasts the result), so {what} is not available on this rank. "
    "LoRA adapters, capability_budget, saving with include_basis=True and re-thresholding on one rank (set_gamma) "
    "need every basis on every rank: build the projector with basis_placement='replicated' for those"
)


@dataclass(frozen=True, eq=False)
class RemoteBasis:
    """What a rank keeps of a layer whose basis another rank holds (``basis_placement="sharded"``).

    The eigenvalues, ``τ``, the kept fraction and the owner's token budget of the low-rank step
    (:mod:`torch_crisp.low_rank`) are broadcast by the owner, so reports and the curvature grid work on
    every rank; the eigenvectors and the mask raise ``ValueError``: the owner projects this layer.
    """

    name: str
    eig_in: Tensor
    eig_out: Tensor
    tau: float
    curvature: Curvature
    owner: int
    kept: float
    low_rank_tokens: int

    def _refuse(self, what: str) -> ValueError:
        return ValueError(_REMOTE.format(name=repr(self.name), owner=self.owner, what=what))

    @property
    def U_in(self) -> Tensor:
        raise self._refuse("U_in")

    @property
    def U_out(self) -> Tensor:
        raise self._refuse("U_out")

    @property
    def mask(self) -> Tensor:
        raise self._refuse("the kept mask")

    @property
    def kept_fraction(self) -> float:
        return self.kept

    @property
    def device(self) -> torch.device:
        return self.eig_in.device

    @property
    def shape(self) -> tuple[int, int]:
        return self.eig_out.shape[0], self.eig_in.shape[0]

    def plan(self, projection: Projection = "auto") -> ProjectionPlan:
        raise self._refuse("its projection plan")

    def project(self, Q: Tensor, projection: Projection = "auto") -> Tensor:
        raise self._refuse("a projection")

    def stored(self, storage: BasisStorage, projection: Projection = "auto") -> RemoteBasis:
        return self

    def tensors(self) -> dict[str, Tensor]:
        return {"eig_in": self.eig_in, "eig_out": self.eig_out}

    def to(self, device: torch.device | str) -> RemoteBasis:
        device = torch.device(device)
        if self.eig_in.device == device:
            return self
        return replace(self, eig_in=self.eig_in.to(device), eig_out=self.eig_out.to(device))

    def with_corrected_curvature(self, corrected: Tensor, gamma: float | None) -> Basis:
        raise self._refuse("a new EK-FAC mask")


AnyBasis = Union[Basis, BlockedBasis, RemoteBasis]
"""A layer's basis as stored: full, with the blocked directions' eigenvectors only, or held by another rank."""


def same_basis(a: AnyBasis, b: AnyBasis) -> bool:
    """The same eigenvectors and mask (a basis moved to another device, or restored from a checkpoint)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, RemoteBasis):  # another rank's basis: its owner and numbers identify it
        return a.owner == b.owner and a.kept == b.kept and a.tau == b.tau and all(  # type: ignore[union-attr]
            torch.equal(x.cpu(), y.cpu()) for x, y in ((a.eig_in, b.eig_in), (a.eig_out, b.eig_out)))
    # a blocked-only basis has no mask; its blocked eigenvectors identify it
    kept = (a.mask, b.mask) if isinstance(a, Basis) else (a.U_side, b.U_side)  # type: ignore[union-attr]
    return a.tau == b.tau and a.curvature == b.curvature and all(
        torch.equal(x.cpu(), y.cpu()) for x, y in ((a.eig_in, b.eig_in), (a.eig_out, b.eig_out), kept)
    )


def compute_basis(
    A: Tensor, S: Tensor, gamma: float | None, curvature: Curvature = "kfac", device: torch.device | None = None
) -> Basis:
    """Eigendecompose the normalised factors and compute the kept mask of the energy rule.

    Bases are stored in float32 on ``device`` (default: where the factors live). ``gamma=None``
    keeps every direction (``τ = ∞``): the capability budget alone constrains the change.
    ``curvature="activations"`` keeps input directions with ``λ_in < τ_in`` for every output row
    (:func:`curvature.activation_mask`). ``"ekfac"`` starts from the K-FAC mask; its second pass
    supplies the corrected curvature (:meth:`Basis.with_corrected_curvature`).
    """
    check_choice("curvature", curvature, CURVATURES)
    eig_in, U_in = functional.symmetric_eigh(A)
    eig_out, U_out = functional.symmetric_eigh(S)
    if gamma is None:
        mask, tau = torch.ones(S.shape[0], A.shape[0], dtype=torch.bool, device=eig_in.device), math.inf
    elif curvature == "activations":
        mask, tau = curvature_models.activation_mask(eig_in, S.shape[0], gamma)
    else:
        tau = functional.energy_threshold(eig_out, eig_in, gamma)
        mask = functional.kept_below(eig_out, eig_in, tau)
    target = device if device is not None else U_in.device
    # eigh returns column-major eigenvectors: each is copied once into row-major storage, and the
    # original is dropped before the next copy, so the two bases are never held twice at once
    U_in = U_in.to(target, torch.float32).contiguous()
    U_out = U_out.to(target, torch.float32).contiguous()
    return Basis(
        eig_in=eig_in.to(target, torch.float32),
        U_in=U_in,
        eig_out=eig_out.to(target, torch.float32),
        U_out=U_out,
        mask=mask.to(target),
        tau=tau,
        # EK-FAC's mask is K-FAC's until the second pass corrects it
        curvature="activations" if curvature == "activations" else "kfac",
    )
