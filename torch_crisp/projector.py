"""`CrispProjector`: collect capability curvature of target layers and project their updates.

The projector is a thin orchestrator: :mod:`~torch_crisp.layers` decides which modules are
projected and how their parameters map to ``[W | b]``, :mod:`~torch_crisp.capture` feeds
activations and output gradients into per-layer :class:`~torch_crisp.state.LayerState` objects,
and :mod:`~torch_crisp.functional` does the mathematics.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed as crisp_dist
from .capture import CaptureSession, FactorCapture
from .config import CrispConfig
from .correction import CorrectionCapture
from .curvature import mc_cross_entropy
from .layers import find_target_modules, iter_geometries
from .lora import LoraLayer, check_peft_model, find_lora_layers, reproject_after_basis_change
from .state import Basis, LayerState

__all__ = ["CrispProjector", "LogitsFn", "LossFn"]

# loss_fn(model, batch) returns the sum-reduced loss, or (mean-reduced loss, number of terms).
LossFn = Callable[[nn.Module, Any], Union[Tensor, tuple[Tensor, Union[int, Tensor]]]]
# logits_fn(model, batch) returns (..., C) logits, one cross-entropy term per leading position
# (fisher="mc" samples the labels from them).
LogitsFn = Callable[[nn.Module, Any], Tensor]

IGNORE_INDEX = -100  # Hugging Face / PyTorch cross-entropy convention


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested dict / list / tuple) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _unwrap_data_parallel(model: nn.Module) -> nn.Module:
    # DDP / DataParallel keep the real model in ``.module``. The projector works on that one, so
    # layer names are the same with and without the wrapper (saved projectors stay portable), and
    # collect() runs the model without DDP's gradient reducer (parameters are frozen meanwhile,
    # which a DDP forward would treat as unused parameters).
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _num_loss_terms(model: nn.Module, labels: Tensor) -> int:
    """Number of terms a Hugging Face model averages its loss over.

    Token-level labels of a decoder-only model are shifted by one inside the model, so the first
    label never counts; encoder-decoder models and sequence-level labels are not shifted.
    """
    config = getattr(model, "config", None)
    if labels.dim() >= 2 and not getattr(config, "is_encoder_decoder", False):
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum().item())


def _mc_dict_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor | None:
    """Sum-reduced cross-entropy of a Hugging Face-style batch against labels sampled from the model.

    The loss terms are those the model's own loss would count: token-level labels of a decoder-only
    model are shifted (position ``t`` predicts token ``t+1``, counted where ``labels[t+1] != -100``);
    sequence-level labels and encoder-decoder models are not shifted. Without labels, every
    non-padding next-token prediction of a ``(batch, seq, vocab)`` output counts.
    """
    labels = batch.get("labels")
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    # The data's labels play no part in the loss; drop them so the model skips its own loss, except
    # for encoder-decoder models, which build their decoder inputs from them.
    inputs = batch if encoder_decoder else {k: v for k, v in batch.items() if k != "labels"}
    output = model(**inputs)
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(
            f"fisher='mc' samples labels from the model's predictive distribution, but "
            f"{type(model).__name__}(**batch) returned no logits; pass logits_fn=lambda model, batch: ..."
        )
    if labels is not None and labels.is_floating_point():
        raise ValueError("fisher='mc' supports softmax cross-entropy heads only; these labels are floats (regression)")
    token_level = logits.dim() >= 3 if labels is None else labels.dim() >= 2
    shift = token_level and not encoder_decoder
    if labels is not None:
        valid = labels != IGNORE_INDEX
    elif batch.get("attention_mask") is not None and token_level:
        valid = batch["attention_mask"].bool()
    else:
        valid = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if shift:
        logits, valid = logits[..., :-1, :], valid[..., 1:]
    if not valid.any():
        warnings.warn("skipping a batch with no loss terms (all labels -100)", stacklevel=4)
        return None
    return mc_cross_entropy(logits, valid)


def _check_pass_arguments(max_batches: int | None, weight: float) -> None:
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer, got {max_batches}")
    if weight <= 0:
        raise ValueError(f"weight must be positive, got {weight}")


class CrispProjector:
    """K-FAC curvature of a capability data set and the low-curvature projection it defines.

    For each target layer (logical weight ``W`` of shape ``(d_out, d_in)``, bias appended as a
    last column), the projector accumulates ``A = (1/N) Σ_t a_t a_tᵀ`` over bias-augmented inputs
    and ``S = (1/N) Σ_t g_t g_tᵀ`` over gradients of the sum-reduced loss w.r.t. the layer output,
    where ``t`` runs over the ``N`` non-padding positions. After :meth:`update_basis`, a gradient
    ``Q`` is projected as ``U_out ((U_outᵀ Q U_in) ⊙ M) U_inᵀ`` with ``M`` the kept
    (low-curvature) mask of the energy threshold ``gamma``.

    Example:
        >>> projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"]))
        >>> projector.collect(capability_batches)          # doctest: +SKIP
        >>> optimizer = CrispOptimizer(torch.optim.AdamW(model.parameters()), projector)
    """

    def __init__(self, model: nn.Module, config: CrispConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"CrispProjector needs a torch.nn.Module, got {type(model).__name__}")
        model = _unwrap_data_parallel(model)
        self.model = model
        self.config = config if config is not None else CrispConfig()
        self.config.validate()
        check_peft_model(model)
        modules = find_target_modules(model, self.config.target_modules)
        dtype = self.config.torch_factor_dtype
        self.layers: dict[str, LayerState] = {
            name: LayerState(name, geometry, dtype) for name, geometry in iter_geometries(modules)
        }
        # LoRA-wrapped targets: factors come from the base layer (self.layers); the adapters'
        # A and B are kept in a kept rectangle of that layer (see torch_crisp.lora).
        self.lora_layers: dict[str, LoraLayer] = find_lora_layers(
            model, {name: state.geometry.d_in for name, state in self.layers.items()}
        )
        self._capture = FactorCapture(self.layers)
        self._correction = CorrectionCapture(self.layers)
        self._correction_follows = False  # collect() runs EK-FAC's second pass right after update_basis
        # Multi-process (torch_crisp.distributed): with torch.distributed initialised and more than
        # one rank in ``process_group`` (None = the default group), update_basis() sums the factors
        # over ranks and splits the eigendecompositions; set ``sync_across_ranks = False`` to keep
        # a rank's projector purely local. ``eigendecomposition_owners`` records which rank
        # computed each layer's basis at the last distributed update_basis().
        self.process_group: Any = None
        self.sync_across_ranks: bool = True
        self.eigendecomposition_owners: dict[str, int] = {}
        self._holds_unreduced_data = False
        self._holds_unreduced_correction = False
        self._removed_sq = None
        self._total_sq = None
        self.last_projected_layers = 0  # layers (and LoRA layers) that had a gradient at the last project_()

    # ----------------------------------------------------------------- introspection
    @property
    def target_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the projected layers."""
        return list(self.layers)

    @property
    def has_basis(self) -> bool:
        return all(state.basis is not None for state in self.layers.values())

    def _layer(self, name: str) -> LayerState:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a projected layer; projected layers: {self.target_names}") from None

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Normalised ``(A, S)`` of one layer; ``A`` includes the bias row/column if any."""
        return self._layer(name).factors()

    def num_tokens(self, name: str) -> float:
        """Token count ``N`` behind one layer's factors (weighted if ``weight`` was used)."""
        return self._layer(name).num_tokens

    def kept_fraction(self) -> dict[str, float]:
        """Fraction of eigen-directions kept (``M`` true) per layer."""
        return {name: self.require_basis(state).kept_fraction for name, state in self.layers.items()}

    def require_basis(self, state: LayerState) -> Basis:
        """``state.basis``, or a ``RuntimeError`` that says how to compute it."""
        if state.basis is None:
            raise RuntimeError(
                f"no eigenbasis for layer {state.name!r}: call projector.collect(batches) first, or "
                "projector.update_basis() after feeding data through projector.capture()"
            )
        return state.basis

    # ----------------------------------------------------------------- collection
    @contextmanager
    def capture(self) -> Iterator[CaptureSession]:
        """Context manager: backward passes inside it add to the factors.

        The caller is responsible for the normalisation: backpropagate the **sum-reduced** loss
        (or set ``session.grad_scale`` to the number of terms of a mean-reduced loss) and set
        ``session.position_mask`` to the batch's ``attention_mask`` (``None`` = every position).
        Call :meth:`update_basis` afterwards.

        Example:
            >>> with projector.capture() as session:           # doctest: +SKIP
            ...     for batch in batches:
            ...         session.position_mask = batch["attention_mask"]
            ...         loss_fn(model, batch).backward()
            >>> projector.update_basis()                       # doctest: +SKIP
        """
        self._begin_local_accumulation()
        with self._capture.capturing() as session:
            yield session

    def collect(
        self,
        batches: Iterable[Any],
        *,
        loss_fn: LossFn | None = None,
        max_batches: int | None = None,
        progress: bool = True,
        weight: float = 1.0,
        logits_fn: LogitsFn | None = None,
    ) -> CrispProjector:
        """Accumulate the factors over ``batches`` and recompute eigenbases and masks.

        Args:
            batches: Hugging Face-style dict batches (``input_ids``, ``attention_mask``,
                ``labels``), run as ``model(**batch).loss``; or any batches with ``loss_fn``.
            loss_fn: ``loss_fn(model, batch)`` returning the sum-reduced loss, or a tuple
                ``(mean_loss, num_terms)``. For dict batches, ``attention_mask`` still selects
                the positions.
            max_batches: stop after this many batches.
            progress: show a tqdm progress bar.
            weight: multiplies this data's contribution (e.g. to up-weight edits in sequential
                editing); factors stay normalised by the weighted token count.
            logits_fn: for ``fisher="mc"`` with batches that are not Hugging Face dicts:
                ``logits_fn(model, batch)`` returns ``(..., C)`` logits, one cross-entropy term per
                leading position, and labels are drawn from their softmax (``torch.manual_seed``
                makes the draws reproducible). Dict batches use ``model(**batch).logits``.

        With ``curvature="ekfac"`` a second pass over the same ``batches`` (which must then be
        re-iterable: a list or DataLoader, not a generator) computes the corrected curvature in the
        new eigenbasis (:meth:`correct_curvature`); that correction covers this call's batches only.

        Runs the model in eval mode without touching parameter ``.grad`` s (parameters are
        frozen for the duration, so no weight gradients are computed); both are restored. Sums add
        to what was collected before; :meth:`reset` clears them.
        """
        _check_pass_arguments(max_batches, weight)
        self._check_variant_inputs(batches, loss_fn, logits_fn, two_passes=self.config.curvature == "ekfac")
        self._begin_local_accumulation()
        with self._frozen_eval(), self._capture.capturing(CaptureSession(weight=weight)) as session:
            seen = self._backward_passes(batches, session, loss_fn, logits_fn, max_batches, progress, "collect")
        # In a process group a rank may hold no batches of an uneven shard; it must still join the
        # reductions in update_basis(), which checks the global token counts on every rank.
        if seen == 0 and not self.is_distributed:
            raise ValueError("collect() received no batches; pass a non-empty iterable of capability batches")
        if self.config.curvature == "ekfac":
            self._correction_follows = True
            try:
                self.update_basis()
            finally:
                self._correction_follows = False
            self.correct_curvature(
                batches, loss_fn=loss_fn, logits_fn=logits_fn, max_batches=max_batches, progress=progress, weight=weight
            )
        else:
            self.update_basis()
        return self

    def _check_variant_inputs(
        self, batches: Iterable[Any], loss_fn: LossFn | None, logits_fn: LogitsFn | None, two_passes: bool
    ) -> None:
        if self.config.fisher == "mc" and loss_fn is not None and logits_fn is None:
            raise ValueError(
                "fisher='mc' draws labels from the model's predictive distribution, so it needs logits, "
                "not a loss: pass logits_fn=lambda model, batch: <(..., C) logits> instead of loss_fn "
                "(or use fisher='empirical')"
            )
        if two_passes and isinstance(batches, Iterator):  # a DataLoader is re-iterable, a generator is not
            raise ValueError(
                "curvature='ekfac' makes two passes over the batches (factors, then per-example "
                "corrections), but a one-shot iterator was given; pass a list or a DataLoader"
            )

    def correct_curvature(
        self,
        batches: Iterable[Any],
        *,
        loss_fn: LossFn | None = None,
        logits_fn: LogitsFn | None = None,
        max_batches: int | None = None,
        progress: bool = True,
        weight: float = 1.0,
    ) -> CrispProjector:
        """EK-FAC's second pass: corrected curvature in the current eigenbases, then new masks.

        For each example ``n`` (one row of a batch) the weight gradient ``G_n`` of its sum-reduced
        loss (bias-augmented, padding positions excluded) is rotated into the K-FAC eigenbasis and
        ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]`` replaces ``λ_out_i λ_in_j`` in the energy rule. Layers
        are handled one at a time inside the backward pass, so per-example gradients of all layers
        never coexist. :meth:`collect` calls this for ``curvature="ekfac"``; call it yourself after
        :meth:`capture` + :meth:`update_basis`. Arguments as in :meth:`collect`. Corrections are
        discarded whenever :meth:`update_basis` changes the bases. In a process group the
        correction sums and example counts are all-reduced like the factors (a collective).
        """
        if self.config.curvature != "ekfac":
            raise RuntimeError(
                f"correct_curvature() is EK-FAC's second pass, but config.curvature is "
                f"{self.config.curvature!r}; set CrispConfig(curvature='ekfac')"
            )
        _check_pass_arguments(max_batches, weight)
        self._check_variant_inputs(batches, loss_fn, logits_fn, two_passes=False)
        for state in self.layers.values():
            self.require_basis(state)
        self._begin_local_correction()
        with self._frozen_eval(), self._correction.capturing(CaptureSession(weight=weight)) as session:
            self._backward_passes(batches, session, loss_fn, logits_fn, max_batches, progress, "EK-FAC pass")
        if self.is_distributed:  # a collective: ranks without examples contribute zeros
            crisp_dist.all_reduce_corrections(self.layers, self.process_group)
            self._holds_unreduced_correction = False
        missing = [name for name, state in self.layers.items() if state.num_examples == 0]
        if missing:
            raise RuntimeError(f"the EK-FAC pass reached no example of layers {missing}; check the batches")
        for state in self.layers.values():
            state.apply_correction(self.config.gamma)
        self._reproject_lora()
        return self

    def _reproject_lora(self) -> None:
        # New masks: move the LoRA adapters (A starts random) into the new kept rectangles.
        reproject_after_basis_change(self.lora_layers, {name: s.basis for name, s in self.layers.items()})

    @contextmanager
    def _frozen_eval(self) -> Iterator[None]:
        """Eval mode with every parameter frozen, restored afterwards.

        Frozen parameters mean the backward passes compute no weight gradients (cheaper) and leave
        every ``.grad`` as the user had it; the capture hooks make the target outputs require grad.
        """
        model = self.model
        was_training = model.training
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)

    def _backward_passes(
        self,
        batches: Iterable[Any],
        session: CaptureSession,
        loss_fn: LossFn | None,
        logits_fn: LogitsFn | None,
        max_batches: int | None,
        progress: bool,
        what: str,
    ) -> int:
        """Forward and backward over ``batches`` while a capture is active; returns the batch count."""
        device = next(iter(self.model.parameters())).device
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        if max_batches is not None:
            total = max_batches if total is None else min(total, max_batches)
        seen = 0
        for batch in tqdm(batches, total=total, disable=not progress, desc=f"torch_crisp {what}"):
            if max_batches is not None and seen >= max_batches:
                break
            seen += 1
            batch = move_to_device(batch, device)
            # the hooks read the mask during the forward pass, so set it first; as bool once per
            # batch rather than once per hooked layer
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            session.position_mask = mask.bool() if isinstance(mask, Tensor) else None
            loss = self._sum_reduced_loss(batch, loss_fn, logits_fn)
            if loss is None:
                continue
            if not loss.requires_grad:
                raise RuntimeError(
                    "the loss does not depend on any target module; check target_modules and that "
                    "loss_fn runs the model"
                )
            loss.backward()
        return seen

    def _sum_reduced_loss(
        self, batch: Any, loss_fn: LossFn | None, logits_fn: LogitsFn | None = None
    ) -> Tensor | None:
        if self.config.fisher == "mc":
            if logits_fn is not None:
                return mc_cross_entropy(logits_fn(self.model, batch))
            if not isinstance(batch, Mapping):
                raise ValueError(
                    f"fisher='mc' with batches of type {type(batch).__name__} needs "
                    "logits_fn=lambda model, batch: <(..., C) logits>"
                )
            return _mc_dict_loss(self.model, batch)
        if loss_fn is not None:
            result = loss_fn(self.model, batch)
            if isinstance(result, tuple):
                mean_loss, num_terms = result
                return mean_loss * num_terms
            return result
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"batches of type {type(batch).__name__} need loss_fn=lambda model, batch: <sum-reduced "
                "loss>; without it, batches must be dicts of model inputs with 'labels'"
            )
        if "labels" not in batch:
            raise ValueError(
                "dict batches need 'labels' so model(**batch).loss exists (for causal LMs, "
                "labels = input_ids with padding set to -100), or pass loss_fn"
            )
        output = self.model(**batch)
        loss = output["loss"] if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError(f"{type(self.model).__name__}(**batch) returned no loss; pass loss_fn")
        num_terms = _num_loss_terms(self.model, batch["labels"])
        if num_terms == 0:
            warnings.warn("skipping a batch whose labels are all -100 (no loss terms)", stacklevel=3)
            return None
        # Hugging Face returns the mean over num_terms; the factors need the sum-reduced loss.
        return loss * num_terms

    @property
    def is_distributed(self) -> bool:
        """True when :meth:`update_basis` reduces over ranks (``torch.distributed`` initialised,
        more than one rank in :attr:`process_group`, and :attr:`sync_across_ranks`)."""
        return self.sync_across_ranks and crisp_dist.is_active(self.process_group)

    def _begin_local_accumulation(self) -> None:
        # After a reduction every rank holds the same global sums G. New local data L_r is added
        # on top, and the next all-reduce must yield G + Σ_r L_r, not world_size·G + Σ_r L_r: so
        # G stays on rank 0 only and the other ranks start again from zero (their bases are
        # kept; the sums come back with the next update_basis). Loaded sums count as global too.
        if not self.is_distributed or self._holds_unreduced_data:
            return
        self._holds_unreduced_data = True
        if torch.distributed.get_rank(self.process_group) != 0:
            for state in self.layers.values():
                state.A_sum = state.S_sum = None
                state.num_tokens = 0

    def _begin_local_correction(self) -> None:
        # Same bookkeeping as for the factors: reduced EK-FAC sums stay on rank 0 only, so a
        # second correct_curvature() on the same basis adds each rank's new examples exactly once.
        if not self.is_distributed or self._holds_unreduced_correction:
            return
        self._holds_unreduced_correction = True
        if torch.distributed.get_rank(self.process_group) != 0:
            for state in self.layers.values():
                state.clear_correction()

    def update_basis(self) -> CrispProjector:
        """Eigendecompose every layer's factors and recompute masks for ``config.gamma``.

        In a process group (see :attr:`is_distributed`) this is a collective that every rank must
        call: the factor sums and token counts are all-reduced (ranks without data contribute
        zeros), each layer's eigendecomposition runs on one rank (greedy by ``d_in³ + d_out³``)
        and is broadcast, so all ranks hold bit-identical bases and masks
        (:mod:`torch_crisp.distributed`). Between the start of a capture and this call, ranks
        other than 0 hold only their own new data.
        """
        # Reduce only when some rank captured data since the last reduction: the sums are global
        # otherwise (e.g. update_basis() again after changing gamma), and summing them again
        # would multiply them by the world size. A rank without new data contributes zeros
        # (rank 0 contributes the global sums it keeps).
        if self.is_distributed and crisp_dist.any_rank(self._holds_unreduced_data, self.process_group):
            self._begin_local_accumulation()
            crisp_dist.all_reduce_factors(self.layers, self.process_group)
            self._holds_unreduced_data = False
        empty = [name for name, state in self.layers.items() if state.num_tokens == 0]
        if empty:
            raise RuntimeError(
                f"no curvature data reached layers {empty}: they may not be on the loss path, or no "
                "batch was collected; check target_modules and your batches"
            )
        if self.is_distributed:
            self.eigendecomposition_owners = crisp_dist.update_bases(
                self.layers, self.config.gamma, self.process_group, curvature=self.config.curvature
            )
        else:
            for state in self.layers.values():
                state.update_basis(
                    self.config.gamma, device=state.geometry.weight.device, curvature=self.config.curvature
                )
        if self.config.curvature == "ekfac" and not self._correction_follows:
            warnings.warn(
                "curvature='ekfac': the eigenbases changed, so the masks are K-FAC's until "
                "projector.correct_curvature(batches) runs the second pass (collect() does both)",
                stacklevel=2,
            )
        self._reproject_lora()
        return self

    def reset(self) -> CrispProjector:
        """Forget all collected factors and bases."""
        for state in self.layers.values():
            state.reset()
        return self

    # ----------------------------------------------------------------- projection
    def project(self, name: str, Q: Tensor) -> Tensor:
        """Project a ``(d_out, d_in[+1])`` matrix of layer ``name`` onto its kept subspace."""
        state = self._layer(name)
        self.require_basis(state)
        expected = (state.geometry.d_out, state.geometry.d_in_augmented)
        if tuple(Q.shape[-2:]) != expected:
            bias_note = " (the last column is the bias)" if state.geometry.has_bias else ""
            raise ValueError(f"layer {name!r} projects matrices of shape {expected}{bias_note}, got {tuple(Q.shape)}")
        return state.project(Q)

    @torch.no_grad()
    def project_(self) -> CrispProjector:
        """Project every target layer's ``.grad`` in place (weight and bias together).

        Layers whose weight and bias both have no gradient are skipped. A missing gradient of one
        of the two is treated as zero (its part of the projection is dropped, with a warning,
        since the remaining update is then only approximately in the kept subspace).

        FSDP2 (``fully_shard``) gradients are ``DTensor`` shards: each is all-gathered, the full
        matrix is projected (identically on every rank, the bases being bit-identical) and each
        rank keeps its own shard. DeepSpeed ZeRO and FSDP1 flat parameters raise ``RuntimeError``.
        """
        removed_sq = total_sq = None
        projected = 0
        for state in self.layers.values():
            self.require_basis(state)
            geometry = state.geometry
            params = geometry.parameters()
            for param in params:
                crisp_dist.check_supported_parameter(param, state.name)
            grads = [p.grad for p in params]
            if all(g is None for g in grads):
                continue
            projected += 1
            if any(g is None for g in grads):
                warnings.warn(
                    f"layer {state.name!r} has a gradient for only one of weight/bias; the missing one "
                    "is taken as zero and the update of that layer is only approximately projected",
                    stacklevel=2,
                )
            # full_tensor gathers FSDP2 shards (a collective) and returns plain tensors as they are
            filled = [
                crisp_dist.full_tensor(g) if g is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                for p, g in zip(params, grads)
            ]
            Q = geometry.as_matrix(filled[0], filled[1] if geometry.has_bias else None)
            P = state.project(Q)
            q_sq, p_sq = Q.float().square().sum(), P.float().square().sum()
            total_sq = q_sq if total_sq is None else total_sq + q_sq
            removed_sq = q_sq - p_sq if removed_sq is None else removed_sq + (q_sq - p_sq)
            for grad, new in zip(grads, geometry.split_matrix(P)):
                if grad is not None and new is not None:
                    crisp_dist.copy_from_full_(grad, new)
        for name, lora_layer in self.lora_layers.items():
            lora_total, lora_removed = lora_layer.project_grads_(self.require_basis(self.layers[name]))
            if lora_total > 0.0:
                projected += 1
                total_sq = torch.tensor(lora_total) if total_sq is None else total_sq.cpu() + lora_total
                removed_sq = torch.tensor(lora_removed) if removed_sq is None else removed_sq.cpu() + lora_removed
        self._removed_sq, self._total_sq = removed_sq, total_sq
        self.last_projected_layers = projected
        return self

    # ----------------------------------------------------------------- LoRA (torch_crisp.lora)
    @torch.no_grad()
    def project_lora_parameters_(self) -> CrispProjector:
        """Keep every LoRA layer's ``ΔW = scaling · B A`` in its kept rectangle (no-op without LoRA).

        Projects ``B``'s columns onto ``span U_out[:, R]`` and ``A``'s rows onto the allowed span of
        ``U_in[:, C]``, in place. :class:`~torch_crisp.CrispOptimizer` calls it after every step, so
        the guarantee holds for any inner optimizer. Layers without a basis yet are skipped.
        """
        for name, lora_layer in self.lora_layers.items():
            basis = self.layers[name].basis
            if basis is not None:
                lora_layer.project_parameters_(basis)
        return self

    def lora_kept_fraction(self) -> dict[str, float]:
        """Per LoRA layer, ``|R|·|C| / |M|``: the share of the full-weight kept subspace LoRA can use."""
        return {
            name: lora_layer.rectangle(self.require_basis(self.layers[name])).kept_fraction
            for name, lora_layer in self.lora_layers.items()
        }

    def projected_parameters(self) -> list[Tensor]:
        """Every parameter whose updates this projector constrains (layer weights/biases, LoRA A/B)."""
        params = [p for state in self.layers.values() for p in state.geometry.parameters()]
        return params + [p for lora_layer in self.lora_layers.values() for p in lora_layer.parameters()]

    @property
    def last_removed_fraction(self) -> float | None:
        """``‖Q − P(Q)‖² / ‖Q‖²`` over all layers at the last :meth:`project_` (None before)."""
        if self._total_sq is None or self._removed_sq is None:
            return None
        total = float(self._total_sq.item())
        return float(self._removed_sq.item()) / total if total > 0 else 0.0

    def __repr__(self) -> str:
        status = "basis ready" if self.has_basis else "no basis yet"
        return (
            f"CrispProjector({len(self.layers)} layers, gamma={self.config.gamma}, "
            f"fisher={self.config.fisher!r}, {status})"
        )

    # ----------------------------------------------------------------- persistence (issue 5)
    # Thin delegations to torch_crisp.persistence, which documents the formats.
    def state_dict(self, include_basis: bool = False) -> dict[str, Any]:
        """``weights_only``-safe state: config, per-layer factor sums, token counts, fingerprints
        and (with ``include_basis``) eigenbases. Tensors are shared, as in ``nn.Module.state_dict``."""
        from . import persistence

        return persistence.state_dict(self, include_basis=include_basis)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> CrispProjector:
        """Restore :meth:`state_dict` output (layers must match: ``ValueError`` lists mismatches);
        bases that were not saved are recomputed from the sums with the saved ``gamma``."""
        from . import persistence

        persistence.load_state_dict(self, state_dict)
        return self

    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        *,
        include_basis: bool = False,
        hash_weights: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Atomically write a folder (``crisp_config.json`` + ``.safetensors``); see
        :func:`torch_crisp.persistence.save_pretrained`."""
        from . import persistence

        return persistence.save_pretrained(
            self, path, include_basis=include_basis, hash_weights=hash_weights, metadata=metadata
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], model: nn.Module, *, gamma: float | None = None
    ) -> CrispProjector:
        """Load a folder written by :meth:`save_pretrained` onto ``model`` (``ValueError`` listing
        mismatched layers; warning if the weights differ); ``gamma`` overrides the saved one."""
        from . import persistence

        return persistence.from_pretrained(cls, path, model, gamma=gamma)
