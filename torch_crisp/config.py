"""User-facing configuration of a :class:`~torch_crisp.CrispProjector`, and the named choices.

The modes, Fisher types and curvature models are ``typing.Literal`` types with one checker each,
so every entry point (config, optimizer, Trainer callback, command line) accepts the same values
and refuses others with the same message.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union, get_args

import torch

__all__ = [
    "BASIS_PLACEMENTS",
    "CURVATURES",
    "FISHER_TYPES",
    "LOW_RANKS",
    "MODES",
    "DEFAULT_MODE",
    "CrispConfig",
    "BasisPlacement",
    "Curvature",
    "FisherType",
    "LowRank",
    "Mode",
    "TargetModules",
    "check_choice",
]

TargetModules = Union[list[str], str]

Mode = Literal["grad", "update"]
"""``"grad"``: project each gradient before the inner step (the paper); ``"update"``: project the
parameter change after it (exact for any optimizer)."""
FisherType = Literal["empirical", "mc"]
Curvature = Literal["kfac", "ekfac", "activations"]
Projection = Literal["auto", "full", "complement"]
"""How ``P(Q)`` is computed (the result is the same up to float rounding): ``"full"`` rotates into the
whole eigenbasis, ``"complement"`` subtracts the blocked part rotating only the blocked directions,
``"auto"`` takes whichever costs fewer FLOPs for each layer (see ``torch_crisp.plan``)."""
BasisStorage = Literal["full", "blocked"]
"""``"full"``: every eigenvector and the kept mask stay resident; ``"blocked"``: only the eigenvectors
the layer's complement path multiplies with (all of them where the full path is cheaper)."""

BasisPlacement = Literal["auto", "replicated", "sharded"]
"""Where each layer's basis lives in a process group: ``"replicated"`` on every rank (no communication per
step), ``"sharded"`` on the rank that computed it, which projects that layer and broadcasts the result
(kfac-pytorch's MEM-OPT), ``"auto"``: replicated unless the bases would not fit (``torch_crisp.sync``)."""
LowRank = Literal["auto", "always", "off"]
"""The low-rank edit step of ``mode="grad"`` (``torch_crisp.low_rank_step``): project from the per-token
factors of the step's gradient where that is exact and the cost model says it is cheaper (``"auto"``),
wherever it is exact (``"always"``), or never (``"off"``)."""

MODES: tuple[str, ...] = get_args(Mode)
DEFAULT_MODE: Mode = "update"
"""The default of every entry point: its guarantee holds with any optimizer (measured against ``"grad"`` in
``benchmarks/mode_default.py`` and the demo; see ``docs/concepts.md``)."""
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)
CURVATURES: tuple[str, ...] = get_args(Curvature)
PROJECTIONS: tuple[str, ...] = get_args(Projection)
BASIS_STORAGES: tuple[str, ...] = get_args(BasisStorage)
BASIS_PLACEMENTS: tuple[str, ...] = get_args(BasisPlacement)
LOW_RANKS: tuple[str, ...] = get_args(LowRank)
_FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_positive_number(name: str, value: Any, *, optional: bool, hint: str) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number ({hint}), got {value!r}")


@dataclass(frozen=True)
class ProjectionOptions:
    """The options of :class:`CrispConfig` that each layer's state needs to project and store its basis."""

    projection: Projection = "auto"
    basis_storage: BasisStorage = "full"
    offload_factors: bool = False

    def require_full_bases(self, what: str) -> None:
        """``ValueError`` when bases are stored blocked-only but ``what`` needs the full ones."""
        if self.basis_storage == "blocked":
            raise ValueError(
                f"{what} need the full eigenbases and kept mask, which CrispConfig(basis_storage='blocked') does "
                "not keep (only the blocked directions' eigenvectors); use basis_storage='full'"
            )


@dataclass
class CrispConfig:
    """What to project and how strongly.

    Attributes:
        target_modules: which linear layers to project, peft-style: a list of module-name
            suffixes (``["mlp.down_proj"]`` matches ``model.layers.3.mlp.down_proj``), a regular
            expression matched against the full module name (``r".*\\.(q|v)_proj"``), or
            ``"all-linear"`` (every ``nn.Linear`` / Hugging Face ``Conv1D`` except the output
            embedding).
        gamma: energy threshold in ``(0, 1)``: the fraction of the capability curvature energy
            whose directions are blocked. Larger blocks more. ``None`` blocks nothing by a mask:
            only with ``capability_budget``, which then is the whole constraint.
        fisher: how output gradients are obtained: ``"empirical"`` uses the data's labels;
            ``"mc"`` samples labels from the model's own softmax (Gauss-Newton / true Fisher for
            cross-entropy; needs logits, see ``CrispProjector.collect``). ``A`` is the same for both.
        curvature: curvature model of each direction; ``"kfac"`` uses ``λ_out_i · λ_in_j``;
            ``"ekfac"`` keeps the K-FAC eigenbases but uses ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]`` over
            per-example gradients (a second pass over the data); ``"activations"`` (AlphaEdit /
            Adam-NSCL baseline) applies the energy rule to ``λ_in`` alone. See ``docs/curvature.md``.
        factor_dtype: ``"float32"`` or ``"float64"``; factors are accumulated in this dtype
            whatever the model's dtype.
        capability_budget: ``ε`` in nats, or ``None``. The predicted increase of the mean
            per-token capability loss, ``L̂ = ½ Σ_layers Σ_ij c_ij Ũ_ij²`` with ``Ũ = U_outᵀ (W − W₀) U_in``
            the rotated change since training started, is kept ``≤ ε`` after every optimizer step
            by replacing ``Ũ`` with the nearest change inside the budget, ``Ũ_ij / (1 + μ c_ij)``
            (one ``μ ≥ 0`` for all layers). See ``docs/budget.md``.
        temperature: softmax temperature of the curvature collection (``1``: the plain empirical
            or Monte-Carlo Fisher). Above 1 the output gradients come from ``softmax(z / T)``, so
            tokens the model predicts with near certainty (whose plain gradients vanish) still
            count. Needs Hugging Face dict batches (or ``logits_fn``); the prediction ``L̂`` then
            refers to the tempered loss.
        projection: ``"auto"`` (default), ``"full"`` or ``"complement"``: how each projection is
            computed. ``"full"`` is ``U_out ((U_outᵀ Q U_in) ⊙ M) U_inᵀ``; ``"complement"`` is
            ``Q − (the blocked part of Q)``, rotating only the blocked directions (exact too, and far
            cheaper when few directions are blocked); ``"auto"`` picks the cheaper by FLOP count per
            layer, from its actual mask. See ``docs/performance.md``.
        basis_storage: ``"full"`` (default) keeps every eigenvector and the mask; ``"blocked"``
            keeps only the eigenvectors the chosen path multiplies with (``r·d_out + J·d_in`` floats
            instead of ``d_out² + d_in²``), for large models. Refused (``ValueError``) with
            ``projection="full"`` and with ``capability_budget``; update mode, LoRA adapters, a frozen
            bias column, EK-FAC's second pass, ``include_basis`` saving and changing EK-FAC's ``gamma``
            need the full bases and raise ``ValueError`` (see ``torch_crisp.basis.BlockedBasis``).
        offload_factors: keep the factor sums (and EK-FAC's correction sums) in CPU memory: each
            batch's products are computed on the layer's device and added on the CPU, and the
            eigendecomposition copies the factors to the device. Sums are only needed to add data
            or change ``gamma``; offloading frees ``d_in² + d_out²`` device floats per layer.
        basis_placement: in a process group, ``"replicated"`` keeps every basis on every rank (no
            communication per step); ``"sharded"`` keeps each layer's basis on the rank that computed
            it, which projects that layer's gradient (or change) and broadcasts the result (each rank
            holds ~1/world_size of the bases; one broadcast of each projected matrix per step);
            ``"auto"`` (default) is replicated unless the replicated bases would take more than half
            of the free device memory. ``"sharded"`` is refused with ``capability_budget``,
            ``curvature="ekfac"`` and LoRA adapters, which need every basis on every rank (``"auto"``
            stays replicated there). See ``docs/integrations/accelerate.md``.
    """

    target_modules: TargetModules = field(default_factory=lambda: ["mlp.down_proj"])
    gamma: float | None = 0.9
    fisher: FisherType = "empirical"
    curvature: Curvature = "kfac"
    factor_dtype: str = "float32"
    capability_budget: float | None = None
    temperature: float = 1.0
    projection: Projection = "auto"
    basis_storage: BasisStorage = "full"
    offload_factors: bool = False
    basis_placement: BasisPlacement = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a corrective message for any invalid field."""
        if self.gamma is None:
            if self.capability_budget is None:
                raise ValueError(
                    "gamma=None removes the energy-threshold mask, so it needs a capability_budget "
                    "(e.g. CrispConfig(gamma=None, capability_budget=0.05)); otherwise nothing is constrained"
                )
        elif isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)):
            raise ValueError(f"gamma must be a float in (0, 1) or None, got {self.gamma!r}")
        elif not 0.0 < float(self.gamma) < 1.0:
            raise ValueError(
                f"gamma must lie strictly between 0 and 1, got {self.gamma}; typical values are "
                "0.9 to 0.999 (larger blocks more curvature)"
            )
        _check_positive_number("capability_budget", self.capability_budget, optional=True, hint="in nats, e.g. 0.05")
        _check_positive_number("temperature", self.temperature, optional=False, hint="1 is the plain Fisher")
        check_choice("fisher", self.fisher, FISHER_TYPES)
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("factor_dtype", self.factor_dtype, tuple(_FACTOR_DTYPES))
        self._check_storage()
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("target_modules is an empty string; pass e.g. ['mlp.down_proj'] or 'all-linear'")
            if targets != "all-linear":
                try:
                    re.compile(targets)
                except re.error as err:
                    raise ValueError(
                        f"target_modules {targets!r} is neither 'all-linear' nor a valid regular "
                        f"expression ({err}); pass a list of name suffixes instead"
                    ) from None
        elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
            self.target_modules = list(targets)
        else:
            raise ValueError(
                "target_modules must be a non-empty list of module-name suffixes "
                f"(e.g. ['mlp.down_proj']), a regex string, or 'all-linear'; got {targets!r}"
            )

    def _check_storage(self) -> None:
        check_choice("projection", self.projection, PROJECTIONS)
        check_choice("basis_storage", self.basis_storage, BASIS_STORAGES)
        if not isinstance(self.offload_factors, bool):
            raise ValueError(f"offload_factors must be True or False, got {self.offload_factors!r}")
        check_choice("basis_placement", self.basis_placement, BASIS_PLACEMENTS)
        if self.basis_placement == "sharded" and self.capability_budget is not None:
            raise ValueError(
                "capability_budget solves one multiplier over every layer's rotated change on every rank, so it "
                "needs every basis on every rank; use basis_placement='replicated' (or 'auto') with a budget"
            )
        if self.basis_placement == "sharded" and self.curvature == "ekfac":
            raise ValueError(
                "curvature='ekfac' rotates every rank's examples into every basis (its second pass) and saves each "
                "correction with its basis, so it needs every basis on every rank; use basis_placement='replicated' "
                "(or 'auto') with EK-FAC"
            )
        if self.basis_storage != "blocked":
            return
        if self.projection == "full":
            raise ValueError(
                "basis_storage='blocked' keeps only the eigenvectors of the complement path, but "
                "projection='full' multiplies with all of them; use projection='auto' or 'complement'"
            )
        if self.capability_budget is not None:
            raise ValueError(
                "capability_budget rotates every change into the full eigenbasis and weighs it by the whole "
                "curvature grid, which basis_storage='blocked' does not keep; use basis_storage='full'"
            )

    @property
    def projection_options(self) -> ProjectionOptions:
        """What each layer's state needs of this config (:class:`ProjectionOptions`)."""
        return ProjectionOptions(self.projection, self.basis_storage, self.offload_factors)

    @property
    def torch_factor_dtype(self) -> torch.dtype:
        return _FACTOR_DTYPES[self.factor_dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (inverse of ``CrispConfig(**d)``)."""
        return asdict(self)
