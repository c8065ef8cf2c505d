"""`CrispOptimizer`: wrap any torch optimizer so projected layers move only in kept directions."""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .config import DEFAULT_MODE, LOW_RANKS, MODES, LowRank, Mode, check_choice
from .constraint import TrainingConstraint
from .projector import CrispProjector
from .user_warnings import warn_user

__all__ = ["CrispOptimizer", "warn_if_grad_mode_leaks", "warn_unprojected_parameters"]


def warn_if_grad_mode_leaks(optimizer: Optimizer, mode: str, projector: CrispProjector) -> bool:
    """Warn when ``mode="grad"`` meets an optimizer whose steps leave the kept subspace.

    Only plain SGD without weight decay turns projected gradients into steps inside the kept
    subspace. Adaptive optimizers (Adam, AdamW, Adafactor, RMSprop, …) rescale each coordinate,
    and weight decay moves every weight towards zero, in blocked directions too. LoRA adapters are
    exempt: their parameters are re-projected after every step in both modes. Returns whether it
    warned.
    """
    full_weight = any(p.requires_grad for s in projector.layers.values() for p in s.geometry.parameters())
    if mode != "grad" or not full_weight:
        return False
    decays = any(float(group.get("weight_decay", 0.0) or 0.0) > 0 for group in optimizer.param_groups)
    if type(optimizer) is torch.optim.SGD and not decays:
        return False
    reason = "weight decay" if type(optimizer) is torch.optim.SGD else type(optimizer).__name__
    warn_user(
        f"mode='grad' with {reason}: the optimizer turns projected gradients into steps that leave the kept "
        "subspace (it rescales coordinates or decays weights), so the total change is only approximately "
        "constrained; mode='update' keeps it exactly in the kept subspace with any optimizer"
    )
    return True



def warn_unprojected_parameters(
    projector: CrispProjector, named_parameters: Iterable[tuple[str, Tensor]], *, where: str
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
        warn_user(
            f"{len(outside)} trainable parameter tensors ({count} values: {shown}) are outside every projected "
            f"layer; {where} updates them without any capability constraint (freeze them or add their layers to "
            "target_modules if that is not intended)"
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

    ``low_rank`` (grad mode only): while this optimizer lives, hooks keep each backward pass's
    per-token inputs and output gradients of the projected layers, and at the step a layer whose
    ``.grad`` they reproduce (up to a scale and rounding; else the dense path) is projected from them
    (:mod:`torch_crisp.low_rank_step`): ``"auto"`` where the cost model says it is cheaper,
    ``"always"`` wherever it is exact, ``"off"`` never. The result is the same projection. Update
    mode ignores it: the cumulative change ``W − W₀`` it projects is not low-rank.
    """

    def __init__(
        self, optimizer: Optimizer, projector: CrispProjector, mode: Mode = DEFAULT_MODE, low_rank: LowRank = "auto"
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"CrispOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, CrispOptimizer):
            raise TypeError("the optimizer is already a CrispOptimizer; wrap the inner optimizer only once")
        if not isinstance(projector, CrispProjector):
            raise TypeError(f"projector must be a CrispProjector, got {type(projector).__name__}")
        check_choice("mode", mode, MODES)
        check_choice("low_rank", low_rank, LOW_RANKS)
        self.optimizer = optimizer
        self.projector = projector
        self.mode = mode
        self.low_rank = low_rank
        self.constraint = TrainingConstraint(projector, mode, low_rank)
        self.constraint.start()
        weakref.finalize(self, self.constraint.stop)  # the hooks go with this optimizer
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
        warn_unprojected_parameters(projector, [(names.get(id(p), "?"), p) for p in params], where="CrispOptimizer")
        warn_if_grad_mode_leaks(optimizer, mode, projector)

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
        self.constraint.before_step()
        self._warn_if_nothing_projected()
        self.optimizer.step()
        self.constraint.after_step()
        return loss

    def _warn_if_nothing_projected(self) -> None:
        # No target layer had a gradient: frozen targets, layers off the loss path, or a framework
        # that keeps gradients elsewhere (DeepSpeed ZeRO). Then nothing is constrained: say so once.
        if self._warned_nothing_projected or any(p.grad is not None for p in self.projector.projected_parameters()):
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
        self.constraint.gradients_zeroed()

    def close(self) -> None:
        """Remove the low-rank step's hooks now (they are removed anyway when this optimizer is collected)."""
        self.constraint.stop()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus ``{"crisp": {"mode", "constraint"}}`` (``weights_only``-safe).

        ``constraint`` holds the anchors ``W₀`` of update mode / the capability budget, so a resumed
        run keeps constraining the change since the original start.
        """
        state = self.optimizer.state_dict()
        state["crisp"] = {"mode": self.mode, "constraint": self.constraint.state_dict()}
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
        if meta is not None and meta.get("constraint") is not None:
            self.constraint.load_state_dict(meta["constraint"])

    def __repr__(self) -> str:
        return (f"CrispOptimizer(mode={self.mode!r}, low_rank={self.low_rank!r}, {self.projector!r},\n"
                f"{self.optimizer!r})")

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
