"""User-facing configuration of a :class:`~torch_crisp.CrispProjector`, and the named choices.

The modes, Fisher types and curvature models are ``typing.Literal`` types with one checker each,
so every entry point (config, optimizer, Trainer callback, command line) accepts the same values
and refuses others with the same message.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union, get_args

import torch

__all__ = [
    "CURVATURES",
    "FISHER_TYPES",
    "MODES",
    "CrispConfig",
    "Curvature",
    "FisherType",
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

MODES: tuple[str, ...] = get_args(Mode)
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)
CURVATURES: tuple[str, ...] = get_args(Curvature)
_FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


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
            whose directions are blocked. Larger blocks more.
        fisher: how output gradients are obtained: ``"empirical"`` uses the data's labels;
            ``"mc"`` samples labels from the model's own softmax (Gauss-Newton / true Fisher for
            cross-entropy; needs logits, see ``CrispProjector.collect``). ``A`` is the same for both.
        curvature: curvature model of each direction; ``"kfac"`` uses ``λ_out_i · λ_in_j``;
            ``"ekfac"`` keeps the K-FAC eigenbases but uses ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]`` over
            per-example gradients (a second pass over the data); ``"activations"`` (AlphaEdit /
            Adam-NSCL baseline) applies the energy rule to ``λ_in`` alone. See ``docs/curvature.md``.
        factor_dtype: ``"float32"`` or ``"float64"``; factors are accumulated in this dtype
            whatever the model's dtype.
    """

    target_modules: TargetModules = field(default_factory=lambda: ["mlp.down_proj"])
    gamma: float = 0.9
    fisher: FisherType = "empirical"
    curvature: Curvature = "kfac"
    factor_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a corrective message for any invalid field."""
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)):
            raise ValueError(f"gamma must be a float in (0, 1), got {self.gamma!r}")
        if not 0.0 < float(self.gamma) < 1.0:
            raise ValueError(
                f"gamma must lie strictly between 0 and 1, got {self.gamma}; typical values are "
                "0.9 to 0.999 (larger blocks more curvature)"
            )
        check_choice("fisher", self.fisher, FISHER_TYPES)
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("factor_dtype", self.factor_dtype, tuple(_FACTOR_DTYPES))
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

    @property
    def torch_factor_dtype(self) -> torch.dtype:
        return _FACTOR_DTYPES[self.factor_dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (inverse of ``CrispConfig(**d)``)."""
        return asdict(self)
