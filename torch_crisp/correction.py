"""Hooks of EK-FAC's second pass: per-example gradients rotated into each layer's eigenbasis.

The first pass (:mod:`torch_crisp.capture`) flattens positions into factor sums and forgets which
example they came from. EK-FAC needs the weight gradient ``G_n`` of each example (one row of the
batch, dim 0), so here the forward hook keeps the input with its batch layout and the output
gradient hook hands ``(n, T, d)`` blocks to :meth:`LayerState.accumulate_correction`, which
rotates and squares them one layer at a time (per-example gradients of all layers never coexist).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .capture import CaptureSession
from .state import LayerState

__all__ = ["CorrectionCapture"]


def _per_example(t: Tensor, mask: Tensor | None, layer: str, what: str) -> Tensor:
    """``(n, T, d)`` view of a layer tensor with the positions outside ``mask`` zeroed."""
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if mask is not None:
        if tuple(mask.shape) != tuple(t.shape[:-1]):
            raise ValueError(
                f"the position mask has shape {tuple(mask.shape)} but the {what} of layer {layer!r} has "
                f"leading shape {tuple(t.shape[:-1])}; EK-FAC needs batches whose attention_mask matches "
                "the token layout"
            )
        t = t * mask.to(device=t.device, dtype=t.dtype).unsqueeze(-1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


class CorrectionCapture:
    """Installs the second-pass hooks on the target modules inside :meth:`capturing`."""

    def __init__(self, layers: dict[str, LayerState]) -> None:
        self.layers = layers
        self.session: CaptureSession | None = None
        self._handles: list[RemovableHandle] = []

    @contextmanager
    def capturing(self, session: CaptureSession) -> Iterator[CaptureSession]:
        if self.session is not None:
            raise RuntimeError("EK-FAC correction pass already running; nested passes are not supported")
        self.session = session
        for name, state in self.layers.items():
            self._handles.append(
                state.geometry.module.register_forward_hook(self._make_forward_hook(name, state), with_kwargs=True)
            )
        try:
            yield session
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.session = None

    def _make_forward_hook(self, name: str, state: LayerState):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any):
            session = self.session
            if session is None or not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return None
            layer_input = args[0] if args else kwargs.get("input")
            if not isinstance(layer_input, Tensor):
                return None
            replaced = None
            if not output.requires_grad:
                replaced = output = output.detach().requires_grad_()
            saved_input = layer_input.detach()
            version = layer_input._version
            mask, scale, weight = session.position_mask, session.grad_scale, session.weight

            def on_output_grad(grad: Tensor) -> None:
                if layer_input._version != version:
                    raise RuntimeError(
                        f"the input of layer {name!r} was modified in place after its forward pass; "
                        "its EK-FAC correction cannot be computed (avoid in-place ops on that activation)"
                    )
                a = _per_example(saved_input, mask, name, "input")
                g = _per_example(grad, mask, name, "output gradient")
                if scale != 1.0:
                    g = g * scale
                if state.geometry.has_bias:
                    # the bias column of [a, 1]; zero where the position does not count
                    ones = torch.ones_like(saved_input[..., :1])
                    a = torch.cat([a, _per_example(ones, mask, name, "input")], dim=-1)
                state.accumulate_correction(a, g, weight=weight)

            output.register_hook(on_output_grad)
            return replaced

        return hook
