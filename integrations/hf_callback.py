"""The Trainer callback: the constraint of :mod:`torch_crisp.constraint` around every optimizer step.

Order within one optimizer step of the Trainer: micro-batch backward passes (gradient
accumulation sums them) → gradient clipping (on the unprojected gradients; under fp16 this also
unscales them) → ``on_pre_optimizer_step``: checks and the gradient projection (``mode="grad"``) →
``optimizer.step()`` → ``on_optimizer_step``: the cumulative-change projection (``mode="update"``),
the capability budget, LoRA's re-projection → ``zero_grad``. Micro-batches are never projected
separately. :mod:`torch_crisp.integrations.hf_trainer` is the public entry point.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from torch_crisp import CrispOptimizer, CrispProjector
from torch_crisp.collection import as_batches, is_example_data
from torch_crisp.config import DEFAULT_MODE, MODES, LowRank, Mode, check_choice
from torch_crisp.constraint import TrainingConstraint, load_constraint, save_constraint
from torch_crisp.layers import innermost_base_layer
from torch_crisp.monitor import CapabilityMonitor
from torch_crisp.optimizer import warn_if_grad_mode_leaks, warn_unprojected_parameters
from torch_crisp.persistence import read_folder
from torch_crisp.user_warnings import warn_user

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.utils import logging as hf_logging
except ImportError as err:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "torch_crisp.integrations.hf_trainer needs transformers; install it with `pip install torch-crisp[hf]`"
    ) from err

__all__ = ["CONSTRAINT_FILE", "PROJECTOR_DIR", "CrispCallback", "check_projector_matches", "freeze_unprojected"]

logger = hf_logging.get_logger("torch_crisp")

PROJECTOR_DIR = "crisp_projector"  # sub-folder of every Trainer checkpoint holding the projector
CONSTRAINT_FILE = "crisp_constraint.safetensors"  # the run's anchors W₀, next to it
_REMOVED, _PREDICTED, _MU = "crisp/removed_fraction", "crisp/predicted_capability_increase", "crisp/budget_mu"


# ----------------------------------------------------------------------------- checks
def _unwrap_optimizer(optimizer: Any) -> Any:
    """Follow ``.optimizer`` links (accelerate's ``AcceleratedOptimizer``) to the innermost optimizer."""
    seen = 0
    while getattr(optimizer, "optimizer", None) is not None and not isinstance(optimizer, CrispOptimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


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


def _check_not_deepspeed(args: TrainingArguments) -> None:
    """DeepSpeed steps its engine inside ``backward``: neither mode could see a step to constrain."""
    uses_deepspeed = bool(getattr(args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "") in (
        "1", "true", "True",
    )
    if uses_deepspeed:
        raise RuntimeError(
            "torch_crisp does not support DeepSpeed: DeepSpeed keeps the gradients in its own (partitioned) buffers "
            "and steps its optimizer inside backward, so the projection would be skipped silently. Train with DDP "
            "(accelerate launch --multi_gpu / torchrun) or FSDP2 (fsdp_version: 2) instead"
        )


def freeze_unprojected(model: nn.Module, projector: CrispProjector) -> list[str]:
    """Freeze every parameter outside the projected layers (and their LoRA adapters); return their names.

    Full fine-tuning with a few projected layers otherwise trains every other tensor without a
    constraint, which causes most of the damage.
    """
    projected = {id(p) for p in projector.projected_parameters()}
    frozen = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in projected:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


# ----------------------------------------------------------------------------- callback
class CrispCallback(TrainerCallback):
    """Constrain every target layer's updates inside a Hugging Face ``Trainer``.

    Args:
        projector: a :class:`~torch_crisp.CrispProjector` built on the model given to the Trainer
            (for peft, on the ``PeftModel``). It needs an eigenbasis by the time training starts:
            collected beforehand, restored from the checkpoint being resumed, or collected by the
            callback from ``capability_data``.
        capability_data: used only when the projector has no basis at train begin: a data set of
            examples (batched with ``collate_fn`` — default the Trainer's collator — and
            ``capability_batch_size``), a ``DataLoader``, or any iterable of dict batches
            (``input_ids``, ``attention_mask``, ``labels``).
        mode: ``"grad"`` projects each target gradient ``Q ↦ P(Q)`` before the optimizer step (the
            paper); ``"update"`` projects the cumulative change since training started after every
            step, so it stays in the kept subspace for any optimizer (Adam, weight decay, bf16).
        collate_fn, capability_batch_size, max_capability_batches: how ``capability_data`` is batched
            and how much of it is used.
        save_projector: write the projector (``<checkpoint>/crisp_projector``, with eigenbases) and the
            run's anchors (``<checkpoint>/crisp_constraint.safetensors``) into every checkpoint and
            restore them on ``trainer.train(resume_from_checkpoint=...)``.
        freeze_unprojected: freeze every parameter outside the projected layers at train begin.
        low_rank: the low-rank edit step of grad mode (``"auto"``, ``"always"`` or ``"off"``, see
            :class:`~torch_crisp.CrispOptimizer`); its hooks live from train begin to train end.
        capability_eval_data, capability_eval_steps: held-out capability batches whose real mean
            per-token loss is logged every ``capability_eval_steps`` optimizer steps as
            ``crisp/capability_loss`` and ``crisp/capability_loss_increase`` (since train begin),
            next to the prediction ``crisp/predicted_capability_increase``.

    Logged (Trainer logs, mean or last value since the previous log): ``crisp/removed_fraction``
    (``‖Q − P(Q)‖² / ‖Q‖²`` of the gradients, or of each step's change in update mode),
    ``crisp/predicted_capability_increase`` (``L̂ = ½ Σ c Ũ²`` of the change since train begin; update
    mode or with a capability budget) and ``crisp/budget_mu`` (the budget's multiplier).
    """

    def __init__(
        self,
        projector: CrispProjector,
        capability_data: Iterable[Any] | None = None,
        mode: Mode = DEFAULT_MODE,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        capability_batch_size: int | None = None,
        max_capability_batches: int | None = None,
        save_projector: bool = True,
        freeze_unprojected: bool = False,
        capability_eval_data: Iterable[Any] | None = None,
        capability_eval_steps: int | None = None,
        low_rank: LowRank = "auto",
    ) -> None:
        if not isinstance(projector, CrispProjector):
            raise TypeError(f"CrispCallback needs a CrispProjector, got {type(projector).__name__}")
        check_choice("mode", mode, MODES)
        if capability_batch_size is not None and capability_batch_size < 1:
            raise ValueError(f"capability_batch_size must be positive, got {capability_batch_size}")
        if (capability_eval_data is None) != (capability_eval_steps is None):
            raise ValueError("capability_eval_data and capability_eval_steps go together: pass both or neither")
        self.projector = projector
        self.capability_data = capability_data
        self.mode = mode
        self.collate_fn = collate_fn
        self.capability_batch_size = capability_batch_size
        self.max_capability_batches = max_capability_batches
        self.save_projector = save_projector
        self.freeze_unprojected = freeze_unprojected
        self.capability_eval_data = capability_eval_data
        self.capability_eval_steps = capability_eval_steps
        self.constraint = TrainingConstraint(projector, mode, low_rank)
        self.monitor: CapabilityMonitor | None = None
        #: ``(global step after the update, removed fraction)`` of every projected step.
        self.removed_fractions: list[tuple[int, float]] = []
        self._pending: list[float] = []
        self._latest: dict[str, float] = {}
        self._delegate: CrispOptimizer | None = None
        self._checked_grads = False
        self._warned_no_grad: set[str] = set()

    # ------------------------------------------------------------------ train begin
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is None:
            raise ValueError("CrispCallback received no model from the Trainer")
        _check_not_deepspeed(args)
        check_projector_matches(self.projector, model)
        self._checked_grads = False
        inner = _unwrap_optimizer(kwargs.get("optimizer"))
        self._delegate = inner if isinstance(inner, CrispOptimizer) else None
        if self._delegate is not None:
            if self._delegate.projector is not self.projector:
                raise ValueError(
                    "the Trainer's CrispOptimizer uses a different projector than this CrispCallback; pass the "
                    "same projector to both (or drop one of them)"
                )
            if self._delegate.mode != self.mode:
                warn_user(
                    f"the Trainer's optimizer is a CrispOptimizer in mode={self._delegate.mode!r}; it does the "
                    f"projection, so CrispCallback(mode={self.mode!r}) only logs and checkpoints"
                )
        elif inner is not None:
            warn_if_grad_mode_leaks(inner, self.mode, self.projector)

        restored = state.global_step > 0 and self._restore(args, state)
        if not self.projector.has_basis:
            if self.capability_data is None:
                raise ValueError(
                    "the projector has no eigenbasis: call projector.collect(capability_batches) before "
                    "trainer.train(), or pass CrispCallback(projector, capability_data=...)"
                )
            if state.global_step > 0 and not restored:
                warn_user(
                    "resuming without a saved projector in the checkpoint: re-collecting the capability "
                    "curvature (the projection matches the original run only if collection is deterministic)"
                )
            self._collect(args, kwargs.get("train_dataloader"))
        if self.freeze_unprojected:
            frozen = freeze_unprojected(model, self.projector)
            if frozen and state.is_world_process_zero:
                logger.warning(f"torch_crisp: froze {len(frozen)} parameter tensors outside the projected layers")
        self._check_trainable(model)
        # LoRA: start (or resume) with scaling·B·A inside the kept rectangle, whatever A's init.
        self.projector.project_lora_parameters_()
        if self.capability_eval_data is not None and self.capability_eval_steps is not None:
            self.monitor = CapabilityMonitor(model, self.capability_eval_data, self.capability_eval_steps)
        if state.is_world_process_zero:
            logger.warning(self._summary())
        if self._delegate is None:  # a CrispOptimizer keeps its own factors
            self.constraint.start()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.constraint.stop()

    def _summary(self) -> str:
        kept = self.projector.kept_fraction()
        config = self.projector.config
        summary = (
            f"torch_crisp: constraining {len(kept)} layers in mode={self.mode!r} (gamma={config.gamma}, "
            f"mean kept fraction {sum(kept.values()) / len(kept):.3f}"
        )
        if config.capability_budget is not None:
            summary += f", capability budget {config.capability_budget:g} nats"
        if self.projector.lora_layers:
            lora = self.projector.lora_kept_fraction()
            summary += f"; LoRA rectangles keep {sum(lora.values()) / len(lora):.3f} of that on average"
        return summary + ")"

    def _collect(self, args: TrainingArguments, train_dataloader: Any) -> None:
        data = self.capability_data
        collate = self.collate_fn
        if is_example_data(data) and collate is None:
            collate = getattr(train_dataloader, "collate_fn", None)
        batch_size = self.capability_batch_size or args.per_device_train_batch_size
        if is_example_data(data):
            data = as_batches(data, collate, batch_size)  # type: ignore[arg-type]
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
            warn_user(
                f"target modules {frozen} are frozen: they need no protection, but check that this is "
                "intended (their capability curvature was collected for nothing)"
            )
        if self._delegate is None:  # a CrispOptimizer warned about its own parameters already
            warn_unprojected_parameters(self.projector, model.named_parameters(), where="the Trainer")

    # ------------------------------------------------------------------ stepping
    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._delegate is not None:
            return
        self._check_gradients(state)
        self.constraint.before_step()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        stats = self.projector.last_projection if self._delegate is not None else self.constraint.after_step()
        step = state.global_step + 1
        if stats is not None:
            if self.mode == "grad" or float(stats.total_sq) > 0:
                self._record(step, stats.removed_fraction)
            for key, value in ((_PREDICTED, stats.predicted_increase), (_MU, stats.budget_mu)):
                if value is not None:
                    self._latest[key] = value
        if self.monitor is not None:
            report = self.monitor(step)
            if report is not None:
                self._latest.update(report)

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
            warn_user(
                f"target modules {new} received no gradient at step {state.global_step + 1}; they are skipped "
                "at this step (not on the loss path?)"
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
        if logs is None or "loss" not in logs:
            return  # only training logs carry the statistics (not eval or the final summary)
        added = dict(self._latest)
        if _PREDICTED not in added and self._delegate is None and self.constraint.anchored:
            # the complement path's steps do not compute L̂; once per log it is cheap
            predicted = self.constraint.current_predicted_increase()
            if predicted is not None:
                added[_PREDICTED] = predicted
        if self._pending:
            added[_REMOVED] = sum(self._pending) / len(self._pending)
            self._pending.clear()
        logs.update(added)
        # Trainer.log appended a copy of logs to the history before calling the callbacks.
        if added and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.save_projector:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):
            if state.is_world_process_zero:
                warn_user(
                    f"CrispCallback: checkpoint folder {checkpoint} not found; the projector was not saved with it "
                    "(custom checkpoint naming? save it yourself with projector.save_pretrained)"
                )
            return
        if state.is_world_process_zero:
            # Eigenbases are saved too, so a resumed run projects with bit-identical bases (not when they are
            # sharded over the ranks: the resumed run recomputes them); the weights changed since collection,
            # so hashing them would only produce a false warning.
            self.projector.save_pretrained(
                os.path.join(checkpoint, PROJECTOR_DIR), include_basis=not self.projector.bases_sharded,
                hash_weights=False,
            )
            if self._delegate is None and self.constraint.anchored:
                save_constraint(self.constraint, os.path.join(checkpoint, CONSTRAINT_FILE))

    def _restore(self, args: TrainingArguments, state: TrainerState) -> bool:
        """Load the projector saved in the checkpoint being resumed; False if there is none."""
        if not self.save_projector:
            return False
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for checkpoint in candidates:
            if os.path.isdir(os.path.join(checkpoint, PROJECTOR_DIR)):
                self.load_checkpoint(checkpoint)
                return True
        if self.projector.has_basis:
            warn_user(
                f"resuming at step {state.global_step}, but no {PROJECTOR_DIR} folder was found in "
                f"{candidates}; continuing with the projector's current basis"
            )
        return False

    def load_checkpoint(self, checkpoint: str | os.PathLike[str]) -> None:
        """Restore the projector (and the run's anchors) in place from a Trainer checkpoint folder.

        Called automatically on resume when the checkpoint lies in ``output_dir`` (or is
        ``TrainingArguments.resume_from_checkpoint``); call it yourself for checkpoints elsewhere.
        """
        state_dict, _ = read_folder(os.path.join(checkpoint, PROJECTOR_DIR))
        self.projector.load_state_dict(state_dict)
        constraint_file = os.path.join(checkpoint, CONSTRAINT_FILE)
        if os.path.isfile(constraint_file):
            load_constraint(self.constraint, constraint_file)
        logger.warning(f"torch_crisp: restored the projector from {checkpoint}")


def _layer_parameters(projector: CrispProjector, name: str) -> list[Tensor]:
    params = list(projector.layers[name].geometry.parameters())
    lora_layer = projector.lora_layers.get(name)
    return params + (lora_layer.parameters() if lora_layer is not None else [])
