"""`CrispOptimizer`: wrap any torch optimizer so projected layers move only in kept directions."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .config import MODES, Mode, check_choice
from .projection import ParameterChange
from .projector import CrispProjector

__all__ = ["CrispOptimizer", "warn_unprojected_parameters"]


def warn_unprojected_parameters(
    projector: CrispProjector, named_parameters: Iterable[tuple[str, Tensor]], *, where: str, stacklevel: int = 3
) -> list[str]:
    """Warn once when trainable parameters lie outside every projected layer; return their names.

    ``where`` completes "… are outside every projected layer: <where> updates them without any
    capability constraint".
    """
    projected = {id(p) for p in projector.projected_parameters()}
    outside = [(n, p) for n, p in named_parameters if p.requires_grad and id(p) not in projected]
    if outside:
        names = [n for n, _ in outside]
        shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
        count = sum(p.numel() for _, p in outside)
        warnings.warn(
            f"{len(outside)} trainable parameter tensors ({count} values: {shown}) are outside every projected "
            f"layer; {where} updates them without any capability constraint (freeze them or add their layers to "
            "target_modules if that is not intended)",
            stacklevel=stacklevel,
        )
    return [n for n, _ in outside]


class CrispOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` that projects target layers before (or after) the inner step.

    It shares the inner optimizer's ``param_groups``, ``state`` and ``defaults`` (so learning-rate
    schedulers, ``GradScaler``, the Hugging Face Trainer and ``accelerator.prepare`` see one
    optimizer) and only adds the projection:

    * ``mode="grad"`` (the paper): every target layer's gradient ``Q`` is replaced by ``P(Q)``,
      then the inner optimizer steps. Optimizers that rescale coordinates (Adam) can move the
      weights slightly outside the kept subspace.
    * ``mode="update"``: the inner optimizer steps on the raw gradients, then each target layer's
      parameter change ``Δ`` is replaced by ``P(Δ)``. The total change of every projected layer
      stays in the kept subspace for any inner optimizer, weight decay and momentum included.
      Costs one copy of the projected parameters during the step.

    Parameters outside every projected layer are updated by the inner optimizer as usual (a
    warning is issued once at construction if any of them is trainable).
    """

    def __init__(self, optimizer: Optimizer, projector: CrispProjector, mode: Mode = "grad") -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"CrispOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, CrispOptimizer):
            raise TypeError("the optimizer is already a CrispOptimizer; wrap the inner optimizer only once")
        if not isinstance(projector, CrispProjector):
            raise TypeError(f"projector must be a CrispProjector, got {type(projector).__name__}")
        check_choice("mode", mode, MODES)
        self.optimizer = optimizer
        self.projector = projector
        self.mode = mode
        # Optimizer.__init__ would build fresh param_groups; we share the inner ones instead and
        # only set up the hook registries that Optimizer's machinery (step hooks) expects.
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()
        self._warned_nothing_projected = False
        params = [p for group in self.param_groups for p in group["params"]]
        names = {id(p): n for n, p in projector.model.named_parameters()}
        warn_unprojected_parameters(
            projector, [(names.get(id(p), "?"), p) for p in params], where="CrispOptimizer", stacklevel=3
        )

    # ----------------------------------------------------------------- shared attributes
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # ----------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Project (``mode="grad"``) then step, or step then project the change (``"update"``).

        A closure is evaluated once, before the projection; the inner optimizer then steps
        without it (closure-reevaluating optimizers such as LBFGS would see unprojected
        gradients and are not supported).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.mode == "grad":
            self.projector.project_()
            self._warn_if_nothing_projected()
            self.optimizer.step()
            # LoRA adapters are constrained through their parameters (torch_crisp.lora): re-project
            # them after the inner step so any optimizer keeps scaling·B·A in the kept set.
            self.projector.project_lora_parameters_()
        else:
            change = ParameterChange(self.projector.layers, self.projector.lora_layers)
            self.optimizer.step()
            self.projector.record_projection(change.project_())
        return loss

    def _warn_if_nothing_projected(self) -> None:
        # No target layer had a gradient: frozen targets, layers off the loss path, or a framework
        # that keeps gradients elsewhere (DeepSpeed ZeRO). Then nothing is constrained: say so once.
        if self.projector.last_projected_layers or self._warned_nothing_projected:
            return
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            self._warned_nothing_projected = True
            warnings.warn(
                "CrispOptimizer.step(): no target layer of the projector has a gradient, but other parameters "
                "do, so this step is not constrained; check that the target layers are trainable and on the "
                "loss path (DeepSpeed ZeRO keeps gradients elsewhere and is not supported: use DDP or FSDP2)",
                stacklevel=3,
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus ``{"crisp": {"mode": ...}}`` (``weights_only``-safe)."""
        state = self.optimizer.state_dict()
        state["crisp"] = {"mode": self.mode}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict of this wrapper (or of a plain inner optimizer)."""
        state_dict = dict(state_dict)
        meta = state_dict.pop("crisp", None)
        if meta is not None and meta.get("mode") != self.mode:
            warnings.warn(
                f"loading an optimizer state saved in mode={meta.get('mode')!r} into mode={self.mode!r}",
                stacklevel=2,
            )
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"CrispOptimizer(mode={self.mode!r}, {self.projector!r},\n{self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
