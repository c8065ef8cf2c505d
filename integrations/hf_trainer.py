"""Hugging Face ``Trainer`` integration: capability-preserving fine-tuning in an unchanged script.

Two doors, same guarantee:

* :class:`CrispCallback` — add ``callbacks=[CrispCallback(projector)]`` to a ``Trainer``. Whatever
  optimizer the Trainer builds (``optim=`` AdamW fused or not, SGD, Adafactor, ...), the callback
  projects the gradients of every target layer after the Trainer's gradient clipping and before
  each optimizer step (``mode="grad"``), or projects each optimizer step's parameter change
  (``mode="update"``: the total change then stays in the kept subspace for any optimizer).
* ``Trainer(optimizers=(CrispOptimizer(inner, projector), None))`` or
  ``Trainer(optimizer_cls_and_kwargs=crisp_optimizer_cls_and_kwargs(projector, torch.optim.AdamW,
  lr=...))`` — the projection lives in the optimizer; a :class:`CrispCallback` added as well then
  only logs (and checkpoints the projector) instead of projecting twice.

Order within one optimizer step of the Trainer: micro-batch backward passes (gradient
accumulation sums them) → gradient clipping (on the unprojected gradients; under fp16 this also
unscales them) → ``on_pre_optimizer_step``: projection → ``optimizer.step()`` →
``on_optimizer_step``: update-mode projection of the change, LoRA parameter projection →
``zero_grad``. Micro-batches are never projected separately.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_crisp import CrispOptimizer, CrispProjector
from torch_crisp.config import MODES, Mode, check_choice
from torch_crisp.layers import innermost_base_layer
from torch_crisp.optimizer import warn_unprojected_parameters
from torch_crisp.persistence import read_folder
from torch_crisp.projection import ParameterChange

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as err:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "torch_crisp.integrations.hf_trainer needs transformers; install it with `pip install torch-crisp[hf]`"
    ) from err

__all__ = ["PROJECTOR_DIR", "CrispCallback", "crisp_optimizer_cls_and_kwargs"]

logger = logging.getLogger(__name__)

PROJECTOR_DIR = "crisp_projector"  # sub-folder of every Trainer checkpoint holding the projector
_LOG_KEY = "crisp/removed_fraction"


# ----------------------------------------------------------------------------- helpers
def _unwrap_optimizer(optimizer: Any) -> Any:
    """Follow ``.optimizer`` links (accelerate's ``AcceleratedOptimizer``) to a ``CrispOptimizer``."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, CrispOptimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, CrispOptimizer) else None


def check_projector_matches(projector: CrispProjector, model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``projector`` was built on this very ``model``.

    The projection writes into the ``.grad`` (or weights) of the modules the projector holds, so
    a projector built on another model — or on another instance of the same architecture, or on
    the base model before ``get_peft_model`` wrapped it — would silently protect nothing.
    """
    missing, mismatched, foreign = [], [], []
    for name, state in projector.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        base = innermost_base_layer(module)
        if base is state.geometry.module:
            continue
        weight = getattr(base, "weight", None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != tuple(state.geometry.weight.shape):
            mismatched.append(name)
        else:
            foreign.append(name)
    hint = (
        "build the projector on the model you pass to the Trainer (for peft, on the model returned by "
        "get_peft_model), or load a saved one with CrispProjector.from_pretrained(path, model)"
    )
    if missing:
        shown = ", ".join(missing[:4]) + (", …" if len(missing) > 4 else "")
        raise ValueError(
            f"the projector was built for another model: the Trainer's model has no module {shown}; {hint}"
        )
    if mismatched:
        raise ValueError(f"the projector was built for another model: layer shapes differ at {mismatched[:4]}; {hint}")
    if foreign:
        raise ValueError(
            f"the projector holds other module objects than the Trainer's model at {foreign[:4]} (a copy of the "
            f"model?); {hint}"
        )


def _layer_parameters(projector: CrispProjector, name: str) -> list[Tensor]:
    params = list(projector.layers[name].geometry.parameters())
    lora_layer = projector.lora_layers.get(name)
    return params + (lora_layer.parameters() if lora_layer is not None else [])


def _is_example_dataset(data: Any) -> bool:
    """True for data sets of single examples (to be batched by a collator), False for batches."""
    if isinstance(data, torch.utils.data.DataLoader):
        return False
    if isinstance(data, torch.utils.data.Dataset) or hasattr(data, "column_names"):
        return True  # torch Dataset or Hugging Face datasets.Dataset
    if isinstance(data, Sequence) and len(data) > 0 and isinstance(data[0], Mapping):
        ids = data[0].get("input_ids")
        # an example holds a list of token ids or a 1-D tensor; a batch holds a 2-D tensor
        return ids is not None and not (isinstance(ids, Tensor) and ids.dim() >= 2)
    return False


# ----------------------------------------------------------------------------- callback
class CrispCallback(TrainerCallback):
    """Project every target layer's updates inside a Hugging Face ``Trainer``.

    Args:
        projector: a :class:`~torch_crisp.CrispProjector` built on the model given to the Trainer
            (for peft, on the ``PeftModel``). It needs an eigenbasis by the time training starts:
            collected beforehand, restored from the checkpoint being resumed, or collected by the
            callback from ``capability_data``.
        capability_data: used only when the projector has no basis at train begin: a data set of
            examples (batched with ``collate_fn`` or the Trainer's data collator), a
            ``DataLoader``, or any iterable of dict batches (``input_ids``, ``attention_mask``,
            ``labels``) passed to :meth:`CrispProjector.collect`.
        mode: ``"grad"`` projects each target gradient ``Q ↦ P(Q)`` before the optimizer step
            (the paper); ``"update"`` projects each step's parameter change ``Δ ↦ P(Δ)`` after it,
            so the accumulated change of every projected layer stays in its kept subspace for any
            optimizer (Adam, weight decay, momentum).
        collate_fn: collator for ``capability_data`` examples (default: the Trainer's).
        capability_batch_size: batch size for ``capability_data`` examples (default: the
            Trainer's ``per_device_train_batch_size``).
        max_capability_batches: stop collecting after this many batches.
        save_projector: write the projector into every checkpoint (``<checkpoint>/crisp_projector``,
            a :meth:`CrispProjector.save_pretrained` folder with eigenbases) and restore it from
            the checkpoint on ``trainer.train(resume_from_checkpoint=...)``.

    Logging: each projected step records the fraction of squared gradient norm removed,
    ``‖Q − P(Q)‖² / ‖Q‖²`` summed over target layers (in ``"update"`` mode: of the parameter
    change); the mean since the last log is added to the Trainer's logs as
    ``"crisp/removed_fraction"`` and kept, per step, in :attr:`removed_fractions`.

    Raises:
        ValueError: at train begin, when the projector belongs to another model, when no target
            layer is trainable, or when no basis can be obtained.
        RuntimeError: at the first optimizer step, when no target layer received a gradient.
    """

    def __init__(
        self,
        projector: CrispProjector,
        capability_data: Iterable[Any] | None = None,
        mode: Mode = "grad",
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        capability_batch_size: int | None = None,
        max_capability_batches: int | None = None,
        save_projector: bool = True,
    ) -> None:
        if not isinstance(projector, CrispProjector):
            raise TypeError(f"CrispCallback needs a CrispProjector, got {type(projector).__name__}")
        check_choice("mode", mode, MODES)
        if capability_batch_size is not None and capability_batch_size < 1:
            raise ValueError(f"capability_batch_size must be positive, got {capability_batch_size}")
        self.projector = projector
        self.capability_data = capability_data
        self.mode = mode
        self.collate_fn = collate_fn
        self.capability_batch_size = capability_batch_size
        self.max_capability_batches = max_capability_batches
        self.save_projector = save_projector
        #: ``(global step after the update, removed fraction)`` of every projected step.
        self.removed_fractions: list[tuple[int, float]] = []
        self._pending: list[float] = []
        self._delegate: CrispOptimizer | None = None
        self._snapshot: ParameterChange | None = None  # update mode: parameters before the step
        self._checked_grads = False
        self._warned_no_grad: set[str] = set()

    # ------------------------------------------------------------------ train begin
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is None:
            raise ValueError("CrispCallback received no model from the Trainer")
        check_projector_matches(self.projector, model)
        self._checked_grads = False
        self._snapshot = None

        self._delegate = _unwrap_optimizer(kwargs.get("optimizer"))
        if self._delegate is not None:
            if self._delegate.projector is not self.projector:
                raise ValueError(
                    "the Trainer's CrispOptimizer uses a different projector than this CrispCallback; pass the "
                    "same projector to both (or drop one of them)"
                )
            if self._delegate.mode != self.mode:
                warnings.warn(
                    f"the Trainer's optimizer is a CrispOptimizer in mode={self._delegate.mode!r}; it does the "
                    f"projection, so CrispCallback(mode={self.mode!r}) only logs and checkpoints",
                    stacklevel=2,
                )
            logger.info("torch_crisp: the optimizer is a CrispOptimizer; CrispCallback only logs and checkpoints")

        restored = state.global_step > 0 and self._restore(args, state)
        if not self.projector.has_basis:
            if self.capability_data is None:
                raise ValueError(
                    "the projector has no eigenbasis: call projector.collect(capability_batches) before "
                    "trainer.train(), or pass CrispCallback(projector, capability_data=...)"
                )
            if state.global_step > 0 and not restored:
                warnings.warn(
                    "resuming without a saved projector in the checkpoint: re-collecting the capability "
                    "curvature (the projection matches the original run only if collection is deterministic)",
                    stacklevel=2,
                )
            self._collect(args, kwargs.get("train_dataloader"))
        self._check_trainable(model)
        # LoRA: start (or resume) with scaling·B·A inside the kept rectangle, whatever A's init.
        self.projector.project_lora_parameters_()
        if state.is_world_process_zero:
            kept = self.projector.kept_fraction()
            mean_kept = sum(kept.values()) / len(kept)
            summary = f"torch_crisp: projecting {len(kept)} layers (mean kept fraction {mean_kept:.3f})"
            if self.projector.lora_layers:
                lora = self.projector.lora_kept_fraction()
                summary += f"; LoRA rectangles keep {sum(lora.values()) / len(lora):.3f} of that on average"
            logger.info(summary)

    def _collect(self, args: TrainingArguments, train_dataloader: Any) -> None:
        data = self.capability_data
        if _is_example_dataset(data):
            collate = self.collate_fn
            if collate is None:
                collate = getattr(train_dataloader, "collate_fn", None)
            if collate is None:
                raise ValueError(
                    "capability_data is a data set of examples but no collator is available; pass "
                    "CrispCallback(..., collate_fn=...) or a DataLoader of batches"
                )
            batch_size = self.capability_batch_size or args.per_device_train_batch_size
            data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
        self.projector.collect(data, max_batches=self.max_capability_batches, progress=not args.disable_tqdm)

    def _check_trainable(self, model: nn.Module) -> None:
        trainable, frozen = [], []
        for name in self.projector.layers:
            params = _layer_parameters(self.projector, name)
            (trainable if any(p.requires_grad for p in params) else frozen).append(name)
        if not trainable:
            raise ValueError(
                "none of the projector's target modules has a trainable parameter, so the callback would "
                f"protect nothing while the Trainer trains other parameters; target modules: {frozen[:4]}. "
                "Unfreeze them, put LoRA adapters on them, or choose other target_modules"
            )
        if frozen:
            warnings.warn(
                f"target modules {frozen} are frozen: they need no protection, but check that this is "
                "intended (their capability curvature was collected for nothing)",
                stacklevel=3,
            )
        if self._delegate is None:  # a CrispOptimizer warned about its own parameters already
            warn_unprojected_parameters(self.projector, model.named_parameters(), where="the Trainer", stacklevel=4)

    # ------------------------------------------------------------------ stepping
    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._delegate is not None:
            return
        self._check_gradients(state)
        if self.mode == "grad":
            self.projector.project_()
            fraction = self.projector.last_removed_fraction
            if fraction is not None:
                self._record(state.global_step + 1, fraction)
        else:
            self._snapshot = ParameterChange(self.projector.layers, self.projector.lora_layers)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._delegate is not None:
            fraction = self.projector.last_removed_fraction
            if fraction is not None:
                self._record(state.global_step + 1, fraction)
            return
        if self.mode == "update" and self._snapshot is not None:
            stats = self._snapshot.project_()
            self._snapshot = None
            self.projector.record_projection(stats)
            if float(stats.total_sq) > 0:  # logged every step anyway
                self._record(state.global_step + 1, stats.removed_fraction)
        else:
            # LoRA's constraint is on the parameters themselves: re-project after every step.
            self.projector.project_lora_parameters_()

    def _check_gradients(self, state: TrainerState) -> None:
        """Fail loudly when no target layer gets a gradient; warn once per silent layer."""
        silent = []
        any_grad = False
        for name in self.projector.layers:
            params = [p for p in _layer_parameters(self.projector, name) if p.requires_grad]
            if not params:
                continue
            if any(p.grad is not None for p in params):
                any_grad = True
            else:
                silent.append(name)
        if not any_grad and not self._checked_grads:
            raise RuntimeError(
                f"at optimizer step {state.global_step + 1} no target module of the projector has a gradient: "
                "they are not on the loss path of this model (check target_modules and that the Trainer "
                "trains the model the projector was built on)"
            )
        self._checked_grads = True
        new = [name for name in silent if name not in self._warned_no_grad]
        if new:
            self._warned_no_grad.update(new)
            warnings.warn(
                f"target modules {new} received no gradient at step {state.global_step + 1}; they are skipped "
                "at this step (not on the loss path?)",
                stacklevel=3,
            )

    def _record(self, step: int, fraction: float) -> None:
        self.removed_fractions.append((step, fraction))
        self._pending.append(fraction)

    # ------------------------------------------------------------------ logging
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or not self._pending or "loss" not in logs:
            return  # only training logs carry the statistic (not eval or the final summary)
        value = sum(self._pending) / len(self._pending)
        self._pending.clear()
        logs[_LOG_KEY] = value
        # Trainer.log appended a copy of logs to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][_LOG_KEY] = value

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.save_projector or not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):
            warnings.warn(
                f"CrispCallback: checkpoint folder {checkpoint} not found; the projector was not saved with it "
                "(custom checkpoint naming? save it yourself with projector.save_pretrained)",
                stacklevel=2,
            )
            return
        # Eigenbases are saved too, so a resumed run projects with bit-identical bases; the
        # weights changed since collection, so hashing them would only produce a false warning.
        self.projector.save_pretrained(os.path.join(checkpoint, PROJECTOR_DIR), include_basis=True, hash_weights=False)

    def _restore(self, args: TrainingArguments, state: TrainerState) -> bool:
        """Load the projector saved in the checkpoint being resumed; False if there is none."""
        if not self.save_projector:
            return False
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for checkpoint in candidates:
            folder = os.path.join(checkpoint, PROJECTOR_DIR)
            if os.path.isdir(folder):
                self.load_checkpoint(checkpoint)
                return True
        if self.projector.has_basis:
            warnings.warn(
                f"resuming at step {state.global_step}, but no {PROJECTOR_DIR} folder was found in "
                f"{candidates}; continuing with the projector's current basis",
                stacklevel=3,
            )
        return False

    def load_checkpoint(self, checkpoint: str | os.PathLike[str]) -> None:
        """Restore the projector in place from ``<checkpoint>/crisp_projector``.

        Called automatically on resume when the checkpoint lies in ``output_dir`` (or is
        ``TrainingArguments.resume_from_checkpoint``); call it yourself for checkpoints elsewhere.
        """
        state_dict, _ = read_folder(os.path.join(checkpoint, PROJECTOR_DIR))
        self.projector.load_state_dict(state_dict)
        logger.info("torch_crisp: restored the projector from %s", checkpoint)


# ----------------------------------------------------------------------------- optimizer factory
def crisp_optimizer_cls_and_kwargs(
    projector: CrispProjector,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    mode: Mode = "grad",
    **optimizer_kwargs: Any,
) -> tuple[Callable[[], Callable[..., CrispOptimizer]], dict[str, Any]]:
    """A value for ``Trainer(optimizer_cls_and_kwargs=...)`` that builds a ``CrispOptimizer``.

    The Trainer calls a non-``Optimizer`` first element as a factory: ``factory()(model, **kwargs)``.
    The factory checks that ``model`` is the projector's model, builds
    ``optimizer_cls(params, **kwargs)`` over the trainable parameters — with ``weight_decay``
    (if given) applied to matrices only, not to biases and norm scales (tensors of dimension < 2),
    the Trainer's usual convention — and wraps it in ``CrispOptimizer(..., projector, mode)``.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds,                       # doctest: +SKIP
        ...     optimizer_cls_and_kwargs=crisp_optimizer_cls_and_kwargs(projector, torch.optim.SGD, lr=0.1))
    """
    check_choice("mode", mode, MODES)

    def build(model: nn.Module, **kwargs: Any) -> CrispOptimizer:
        check_projector_matches(projector, model)
        kwargs = dict(kwargs)
        decay = kwargs.pop("weight_decay", None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if decay is None:
            groups: list[dict[str, Any]] = [{"params": trainable}]
        else:
            groups = [
                {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": decay},
                {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
        return CrispOptimizer(optimizer_cls(groups, **kwargs), projector, mode=mode)

    def factory() -> Callable[..., CrispOptimizer]:
        return build

    return factory, dict(optimizer_kwargs)
