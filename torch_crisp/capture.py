"""Module hooks that feed per-position activations and output gradients to the layer states.

A forward hook on each target module remembers the module's input and registers a gradient hook
on its output; when the backward pass reaches that output, the input rows and output-gradient rows
of the selected positions are added to the layer's factor sums. Accumulating both sides at
gradient time means each forward that takes part in a backward pass counts exactly once — also
under activation checkpointing, whose recomputed forwards never receive gradients of their own
(non-reentrant) or run with gradients disabled the first time (reentrant).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .state import LayerState

__all__ = ["CaptureSession", "FactorCapture", "OutputGradientHooks"]


@dataclass
class CaptureSession:
    """What the hooks need to know about the batch in flight.

    Attributes:
        position_mask: boolean ``(batch, seq)`` mask of the positions that count (the batch's
            ``attention_mask``), or ``None`` for every position.
        decoder_position_mask, decoder_layers: for encoder-decoder models, the mask of the decoder's
            positions and the names of the layers it applies to (the others use ``position_mask``).
        grad_scale: multiplies each output gradient so it becomes the gradient of the
            **sum-reduced** loss (e.g. the number of loss terms when the loss was a mean).
        weight: multiplies this data's contribution to the sums and token counts.
    """

    position_mask: Tensor | None = None
    grad_scale: float = 1.0
    weight: float = 1.0
    decoder_position_mask: Tensor | None = None
    decoder_layers: frozenset[str] = frozenset()

    def mask_for(self, layer: str) -> Tensor | None:
        return self.decoder_position_mask if layer in self.decoder_layers else self.position_mask


def _select_rows(t: Tensor, mask: Tensor | None, layer: str, what: str) -> Tensor:
    if mask is None:
        return t.reshape(-1, t.shape[-1])
    if tuple(mask.shape) != tuple(t.shape[:-1]):
        raise ValueError(
            f"the position mask has shape {tuple(mask.shape)} but the {what} of layer {layer!r} has "
            f"leading shape {tuple(t.shape[:-1])}; pass batches whose attention_mask matches the "
            "token layout, or collect with a loss_fn and no attention_mask to count every position"
        )
    return t[mask.to(device=t.device, dtype=torch.bool)]


class OutputGradientHooks:
    """Forward hooks on the target modules that call :meth:`on_output_grad` during backward.

    Active only inside :meth:`capturing`. For each forward pass with gradients enabled, the hook
    keeps the module's input and registers a hook on its output; when the output's gradient
    arrives, :meth:`on_output_grad` receives both with the session settings of that forward pass.
    Subclasses decide what to accumulate.
    """

    purpose = "its curvature cannot be captured"  # completes the error for an input modified in place
    # Collection freezes the weights, so an output may need no gradient: it is made a leaf that does.
    # Training-time hooks (torch_crisp.token_capture) must not change the graph and leave it alone.
    force_output_gradient = True

    def __init__(self, layers: dict[str, LayerState]) -> None:
        self.layers = layers
        self.session: CaptureSession | None = None
        self._handles: list[RemovableHandle] = []
        self._warned_late = False

    @contextmanager
    def capturing(self, session: CaptureSession | None = None) -> Iterator[CaptureSession]:
        """Install the hooks for the duration of the block (re-entrant calls are refused)."""
        self.install(session)
        try:
            yield self.session  # type: ignore[misc]
        finally:
            self.remove()

    def install(self, session: CaptureSession | None = None) -> None:
        """Install the hooks until :meth:`remove` (what :meth:`capturing` does around a block)."""
        if self.session is not None:
            raise RuntimeError("this projector is already capturing; nested capture() is not supported")
        self.session = session if session is not None else CaptureSession()
        for name, state in self.layers.items():
            handle = state.geometry.module.register_forward_hook(
                self._make_forward_hook(name, state), with_kwargs=True
            )
            self._handles.append(handle)

    def remove(self) -> None:
        """Remove the hooks; a backward pass still in flight is then ignored (with a warning)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.session = None

    def wants(self, name: str, layer_input: Tensor, session: CaptureSession) -> bool:
        """Whether this forward pass of layer ``name`` should be followed into its backward pass."""
        return True

    def on_input_modified(self, name: str) -> None:
        """The input of ``name`` changed in place between its forward and backward pass: it is not the input
        the gradient belongs to."""
        raise RuntimeError(
            f"the input of layer {name!r} was modified in place after its forward pass; "
            f"{self.purpose} (avoid in-place ops on that activation)"
        )

    def on_output_grad(
        self, name: str, state: LayerState, layer_input: Tensor, grad: Tensor, session: CaptureSession
    ) -> None:
        raise NotImplementedError

    def _make_forward_hook(self, name: str, state: LayerState):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any):
            session = self.session
            if session is None or not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return None
            layer_input = args[0] if args else kwargs.get("input")
            if not isinstance(layer_input, Tensor) or not self.wants(name, layer_input, session):
                return None
            replaced = None
            if not output.requires_grad:
                if not self.force_output_gradient:
                    return None
                # Nothing upstream needs a gradient (frozen weights, no grad on the input): make the
                # output a leaf so the loss still reaches it; its value is unchanged.
                replaced = output = output.detach().requires_grad_()
            saved_input = layer_input.detach()
            version = layer_input._version
            # the settings of this forward pass: the session may move on to the next batch
            snapshot = CaptureSession(session.mask_for(name), session.grad_scale, session.weight)

            def on_output_grad(grad: Tensor) -> None:
                if self.session is not session:  # the capture ended before this backward pass
                    if not self._warned_late:
                        self._warned_late = True
                        warnings.warn(
                            f"a backward pass reached layer {name!r} after its capture() block ended; it was "
                            "not added to the factors (run forward and backward inside the block)",
                            stacklevel=2,
                        )
                    return
                if layer_input._version != version:
                    self.on_input_modified(name)
                    return
                self.on_output_grad(name, state, saved_input, grad, snapshot)

            output.register_hook(on_output_grad)
            return replaced

        return hook


class FactorCapture(OutputGradientHooks):
    """Adds each backward pass's selected positions to the layers' K-FAC factor sums."""

    def on_output_grad(
        self, name: str, state: LayerState, layer_input: Tensor, grad: Tensor, session: CaptureSession
    ) -> None:
        a = _select_rows(layer_input, session.position_mask, name, "input")
        g = _select_rows(grad, session.position_mask, name, "output gradient")
        if session.grad_scale != 1.0:
            g = g.to(state.factor_dtype) * session.grad_scale
        state.accumulate(a, g, weight=session.weight)
