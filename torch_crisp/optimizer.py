"""`CrispOptimizer`: wrap any torch optimizer so projected layers move only in kept directions."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .projector import CrispProjector

__all__ = ["CrispOptimizer", "ParameterChange"]

_MODES = ("grad", "update")


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

    def __init__(self, optimizer: Optimizer, projector: CrispProjector, mode: str = "grad") -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"CrispOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, CrispOptimizer):
            raise TypeError("the optimizer is already a CrispOptimizer; wrap the inner optimizer only once")
        if not isinstance(projector, CrispProjector):
            raise TypeError(f"projector must be a CrispProjector, got {type(projector).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
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
        self._warn_unprojected_parameters()

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

    def _warn_unprojected_parameters(self) -> None:
        projected = {id(p) for p in self.projector.projected_parameters()}
        outside = [
            p for group in self.param_groups for p in group["params"] if p.requires_grad and id(p) not in projected
        ]
        if outside:
            count = sum(p.numel() for p in outside)
            warnings.warn(
                f"{len(outside)} trainable parameter tensors ({count} values) are outside every projected "
                "layer; CrispOptimizer updates them without any capability constraint (freeze them or "
                "add their layers to target_modules if that is not intended)",
                stacklevel=3,
            )

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
            change = ParameterChange(self.projector)
            self.optimizer.step()
            change.project_()
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


class ParameterChange:
    """The projected parameters before an optimizer step; :meth:`project_` projects the change.

    Update-mode projection, shared by :class:`CrispOptimizer` and the Trainer callback: each
    target layer's change ``Δ = [W | b]_after − [W | b]_before`` is replaced by ``P(Δ)``, and LoRA
    adapters are re-projected into their kept rectangles. Costs one copy of the projected
    parameters while the step runs.
    """

    def __init__(self, projector: CrispProjector) -> None:
        self.projector = projector
        self._layers: list[tuple[Any, list[Tensor], Tensor]] = []
        for state in projector.layers.values():
            projector.require_basis(state)
            params = state.geometry.parameters()
            if any(p.requires_grad for p in params):
                self._layers.append((state, params, self._matrix(state, params).clone()))
        # LoRA parameters already lie in their subspaces (projected after every step)
        self._lora = [(p, p.detach().clone()) for layer in projector.lora_layers.values() for p in layer.parameters()]

    @staticmethod
    def _matrix(state: Any, params: list[Tensor]) -> Tensor:
        return state.geometry.as_matrix(params[0].detach(), params[1].detach() if state.geometry.has_bias else None)

    @torch.no_grad()
    def project_(self) -> tuple[Tensor, Tensor]:
        """Project this step's changes in place; return ``(‖Δ‖², ‖Δ − P(Δ)‖²)`` summed over layers.

        The sums stay 0-dim tensors (no device synchronisation on the step's path); the
        projector's :attr:`~CrispProjector.last_removed_fraction` reads them when asked. A skipped
        step (GradScaler overflow) has ``Δ = 0`` and ``P(0) = 0`` leaves the weights as they were.
        """
        total = removed = torch.zeros(())
        for state, params, before in self._layers:
            delta = self._matrix(state, params).to(before.dtype) - before
            projected = state.project(delta)
            d_sq, p_sq = delta.float().square().sum(), projected.float().square().sum()
            total, removed = total.to(d_sq.device) + d_sq, removed.to(d_sq.device) + (d_sq - p_sq).clamp_min(0)
            for param, value in zip(params, state.geometry.split_matrix(before + projected)):
                if value is not None and param.requires_grad:
                    param.copy_(value)
        if self._lora:
            stepped = [p.detach().clone() for p, _ in self._lora]
            self.projector.project_lora_parameters_()
            for (param, old), after_step in zip(self._lora, stepped):
                d_sq = (after_step - old).float().square().sum()
                r_sq = (param.detach() - after_step).float().square().sum()
                total, removed = total.to(d_sq.device) + d_sq, removed.to(d_sq.device) + r_sq
        self.projector._total_sq, self.projector._removed_sq = total, removed
        return total, removed
