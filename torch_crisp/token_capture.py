"""Training-time hooks that keep each backward pass's per-token factors of the projected layers.

For the low-rank edit step (:mod:`torch_crisp.low_rank_step`): while a ``CrispOptimizer`` or the
Trainer callback trains in ``mode="grad"``, every backward pass through a projected layer adds the
rows ``G`` (output gradients) and ``X`` (inputs) of its positions, so that at the optimizer step
``.grad = Σ_passes Gᵀ X`` can be projected from the factors (micro-batches simply concatenate).
The positions are those of collection: where the forward call's ``attention_mask == 1``, read
from the keyword arguments of the model's own forward (every position without a mask, or when
the mask does not match the layer's token layout). Whether the factors really reproduce ``.grad``
is checked at the step; here nothing is decided but what to keep:

* only layers whose weight trains, on outputs that need a gradient anyway (the graph is never
  changed), and only up to the layer's token budget for one step (the cost model's break-even,
  :func:`torch_crisp.low_rank.token_budget`): beyond it the layer's factors are dropped for the
  step, so memory stays below one gradient's worth of numbers per layer;
* an input modified in place after its forward pass makes the layer's factors unusable for the
  step (they are dropped; the dense path applies) instead of raising, as collection does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .capture import CaptureSession, OutputGradientHooks
from .state import LayerState

__all__ = ["TokenCapture", "TokenRecords"]

TokenRecords = dict[str, list[tuple[Tensor, Tensor]]]
"""``{layer: [(G, X) of each backward pass]}``: output gradients ``(T_k, d_out)`` and inputs ``(T_k, d_in)``."""


class TokenCapture(OutputGradientHooks):
    """Per-token factors of every backward pass between two optimizer steps (see the module docstring).

    Args:
        layers: the projector's layer states.
        model: the model whose forward receives the batches (its ``attention_mask`` selects positions).
        budget: ``budget(name)``, the most tokens of one step worth keeping for a layer (0: none).
    """

    force_output_gradient = False

    def __init__(self, layers: dict[str, LayerState], model: nn.Module, budget: Callable[[str], int]) -> None:
        super().__init__(layers)
        self.model = model
        self.budget = budget
        self.records: TokenRecords = {}
        self.tokens: dict[str, int] = {}
        self.refused: set[str] = set()  # layers whose factors are unusable until the next step
        self._root_handles: list[RemovableHandle] = []
        self._positions: tuple[Tensor, Tensor] | None = None  # (mask, flat indices of its positions)

    @property
    def active(self) -> bool:
        return self.session is not None

    def start(self) -> None:
        """Install the hooks (no-op if installed)."""
        if self.active:
            return
        self.install(CaptureSession())
        self._root_handles = [
            self.model.register_forward_pre_hook(self._read_mask, with_kwargs=True),
            self.model.register_forward_hook(self._forget_mask),
        ]

    def stop(self) -> None:
        """Remove the hooks and drop what was kept."""
        for handle in self._root_handles:
            handle.remove()
        self._root_handles.clear()
        if self.active:
            self.remove()
        self.clear()

    def clear(self) -> None:
        """Forget every factor (the gradients they belonged to were stepped on or zeroed)."""
        self.records, self.tokens, self.refused = {}, {}, set()
        self._positions = None

    def take(self) -> tuple[TokenRecords, set[str]]:
        """``(records, refused layers)`` of the passes since the last step; clears them."""
        taken = (self.records, self.refused)
        self.clear()
        return taken

    # ----------------------------------------------------------------- hooks
    def _read_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.session is not None:
            mask = kwargs.get("attention_mask")
            self.session.position_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _forget_mask(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.session is not None:
            self.session.position_mask = None  # a later call of a sub-module alone must not use it

    def _selected(self, mask: Tensor | None, leading: torch.Size) -> Tensor | None:
        """Flat indices of the positions that count, or ``None`` for every position."""
        if mask is None or tuple(mask.shape) != tuple(leading):
            return None
        if self._positions is None or self._positions[0] is not mask:
            # one host synchronisation per forward pass for all layers (the mask is shared)
            self._positions = (mask, mask.reshape(-1).nonzero().squeeze(1))
        return self._positions[1]

    def wants(self, name: str, layer_input: Tensor, session: CaptureSession) -> bool:
        state = self.layers[name]
        if name in self.refused or not state.geometry.weight.requires_grad:
            return False
        budget = self.budget(name)
        if budget <= 0:
            return False
        index = self._selected(session.mask_for(name), layer_input.shape[:-1])
        count = layer_input.numel() // max(1, layer_input.shape[-1]) if index is None else index.numel()
        if self.tokens.get(name, 0) + count > budget:
            self._refuse(name)
            return False
        return True

    def on_input_modified(self, name: str) -> None:
        self._refuse(name)

    def on_output_grad(
        self, name: str, state: LayerState, layer_input: Tensor, grad: Tensor, session: CaptureSession
    ) -> None:
        if name in self.refused:
            return
        index = self._selected(session.position_mask, layer_input.shape[:-1])
        X = layer_input.reshape(-1, layer_input.shape[-1])
        G = grad.reshape(-1, grad.shape[-1])
        if index is not None:
            index = index.to(X.device)
            X, G = X.index_select(0, index), G.index_select(0, index)
        if session.grad_scale != 1.0:
            G = G * session.grad_scale
        self.records.setdefault(name, []).append((G, X))
        self.tokens[name] = self.tokens.get(name, 0) + G.shape[0]
        if self.tokens[name] > self.budget(name):
            self._refuse(name)

    def _refuse(self, name: str) -> None:
        self.records.pop(name, None)
        self.refused.add(name)
