"""`CrispProjector`: collect capability curvature of target layers and project their updates.

The projector is a thin orchestrator: :mod:`~torch_crisp.layers` decides which modules are
projected and how their parameters map to ``[W | b]``, :mod:`~torch_crisp.capture` feeds
activations and output gradients into per-layer :class:`~torch_crisp.state.LayerState` objects,
and :mod:`~torch_crisp.functional` does the mathematics.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .capture import CaptureSession, FactorCapture
from .config import CrispConfig
from .layers import find_target_modules, iter_geometries
from .state import LayerState

__all__ = ["CrispProjector", "LossFn"]

# loss_fn(model, batch) returns the sum-reduced loss, or (mean-reduced loss, number of terms).
LossFn = Callable[[nn.Module, Any], Tensor | tuple[Tensor, int | Tensor]]

IGNORE_INDEX = -100  # Hugging Face / PyTorch cross-entropy convention


def _move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move_to(v, device) for v in batch)
    return batch


def _num_loss_terms(model: nn.Module, labels: Tensor) -> int:
    """Number of terms a Hugging Face model averages its loss over.

    Token-level labels of a decoder-only model are shifted by one inside the model, so the first
    label never counts; encoder-decoder models and sequence-level labels are not shifted.
    """
    config = getattr(model, "config", None)
    if labels.dim() >= 2 and not getattr(config, "is_encoder_decoder", False):
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum().item())


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
        self.model = model
        self.config = config if config is not None else CrispConfig()
        self.config.validate()
        modules = find_target_modules(model, self.config.target_modules)
        dtype = self.config.torch_factor_dtype
        self.layers: dict[str, LayerState] = {
            name: LayerState(name, geometry, dtype) for name, geometry in iter_geometries(modules)
        }
        self._capture = FactorCapture(self.layers)
        self._removed_sq = None
        self._total_sq = None

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
        return {name: self._require_basis(state).kept_fraction for name, state in self.layers.items()}

    def _require_basis(self, state: LayerState):
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

        Runs the model in eval mode without touching parameter ``.grad`` s (parameters are
        frozen for the duration, so no weight gradients are computed); both are restored. Sums add
        to what was collected before; :meth:`reset` clears them.
        """
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be a positive integer, got {max_batches}")
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        model = self.model
        device = next(iter(model.parameters())).device
        was_training = model.training
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        total = max_batches
        if hasattr(batches, "__len__"):
            total = len(batches) if max_batches is None else min(len(batches), max_batches)  # type: ignore[arg-type]
        seen = 0
        try:
            model.eval()
            for p, _ in requires_grad:
                p.requires_grad_(False)
            with self._capture.capturing(CaptureSession(weight=weight)) as session:
                for batch in tqdm(batches, total=total, disable=not progress, desc="torch_crisp collect"):
                    if max_batches is not None and seen >= max_batches:
                        break
                    seen += 1
                    batch = _move_to(batch, device)
                    # the hooks read the mask during the forward pass, so set it first
                    session.position_mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                    loss = self._sum_reduced_loss(batch, loss_fn)
                    if loss is None:
                        continue
                    if not loss.requires_grad:
                        raise RuntimeError(
                            "the loss does not depend on any target module; check target_modules "
                            "and that loss_fn runs the model"
                        )
                    loss.backward()
        finally:
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            model.train(was_training)
        if seen == 0:
            raise ValueError("collect() received no batches; pass a non-empty iterable of capability batches")
        self.update_basis()
        return self

    def _sum_reduced_loss(self, batch: Any, loss_fn: LossFn | None) -> Tensor | None:
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

    def update_basis(self) -> CrispProjector:
        """Eigendecompose every layer's factors and recompute masks for ``config.gamma``."""
        empty = [name for name, state in self.layers.items() if state.num_tokens == 0]
        if empty:
            raise RuntimeError(
                f"no curvature data reached layers {empty}: they may not be on the loss path, or no "
                "batch was collected; check target_modules and your batches"
            )
        for state in self.layers.values():
            state.update_basis(self.config.gamma, device=state.geometry.weight.device)
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
        self._require_basis(state)
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
        """
        removed_sq = total_sq = None
        for state in self.layers.values():
            self._require_basis(state)
            geometry = state.geometry
            params = geometry.parameters()
            grads = [p.grad for p in params]
            if all(g is None for g in grads):
                continue
            if any(g is None for g in grads):
                warnings.warn(
                    f"layer {state.name!r} has a gradient for only one of weight/bias; the missing one "
                    "is taken as zero and the update of that layer is only approximately projected",
                    stacklevel=2,
                )
            filled = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
            Q = geometry.as_matrix(filled[0], filled[1] if geometry.has_bias else None)
            P = state.project(Q)
            q_sq, p_sq = Q.float().square().sum(), P.float().square().sum()
            total_sq = q_sq if total_sq is None else total_sq + q_sq
            removed_sq = q_sq - p_sq if removed_sq is None else removed_sq + (q_sq - p_sq)
            for grad, new in zip(grads, geometry.split_matrix(P)):
                if grad is not None and new is not None:
                    grad.copy_(new)
        self._removed_sq, self._total_sq = removed_sq, total_sq
        return self

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
