"""Hooks of EK-FAC's second pass: per-example gradients rotated into each layer's eigenbasis.

The first pass (:mod:`torch_crisp.capture`) flattens positions into factor sums and forgets which
example they came from. EK-FAC needs the weight gradient ``G_n`` of each example (one row of the
batch, dim 0), so here the forward hook keeps the input with its batch layout and the output
gradient hook hands ``(n, T, d)`` blocks to :meth:`LayerState.accumulate_correction`, which
rotates and squares them one layer at a time (per-example gradients of all layers never coexist).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .capture import CaptureSession, OutputGradientHooks
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


class CorrectionCapture(OutputGradientHooks):
    """Adds each example's rotated, squared weight gradient to the layers' EK-FAC sums."""

    purpose = "its EK-FAC correction cannot be computed"

    def on_output_grad(
        self, name: str, state: LayerState, layer_input: Tensor, grad: Tensor, session: CaptureSession
    ) -> None:
        mask = session.position_mask
        a = _per_example(layer_input, mask, name, "input")
        g = _per_example(grad, mask, name, "output gradient")
        if session.grad_scale != 1.0:
            g = g * session.grad_scale
        if state.geometry.has_bias:
            # the bias column of [a, 1]; zero where the position does not count
            ones = torch.ones_like(layer_input[..., :1])
            a = torch.cat([a, _per_example(ones, mask, name, "input")], dim=-1)
        state.accumulate_correction(a, g, weight=session.weight)
