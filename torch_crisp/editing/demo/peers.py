"""The peers CrispEdit is compared with, implemented plainly: LoRA, CorDA, EWC and L2-SP.

* **LoRA** and **CorDA** are peft's own: :func:`lora_model`, and :func:`corda_model` — peft's
  ``preprocess_corda`` on the capability corpus, then ``LoraConfig(init_lora_weights="corda",
  corda_config=CordaConfig(corda_method="kpm"))``: the adapter starts from the directions of the
  covariance-weighted weights that the capability data uses least (knowledge-preserved mode), and
  the rest of each weight is frozen.
* **EWC** and **L2-SP** add a quadratic penalty ``½ Σ_i w_i (θ_i − θ₀_i)²`` to the edit loss, with
  ``w = λ·F`` (EWC; ``F`` the diagonal Fisher of :func:`diagonal_fisher`) or ``w = α`` (L2-SP).
  :func:`add_quadratic_penalty` adds its gradient ``w ⊙ (θ − θ₀)`` to every gradient in a step
  pre-hook of the optimizer, so the edit loop (which steps on ``model(**batch).loss``) is unchanged
  and the inner optimizer sees exactly the gradient of loss + penalty.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...losses import tempered_dict_loss

__all__ = ["QuadraticPenalty", "add_quadratic_penalty", "corda_model", "diagonal_fisher", "lora_model"]


def lora_model(model: nn.Module, targets: list[str], rank: int) -> Any:
    """peft LoRA (rank ``rank``, alpha ``2·rank``, no dropout) on a copy of ``model``'s ``targets``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none", target_modules=targets)
    return get_peft_model(copy.deepcopy(model), config)


def _corda_config(targets: list[str], rank: int) -> Any:
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    return LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none", target_modules=targets,
        init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"),
    )


def corda_preprocessed(model: nn.Module, targets: list[str], rank: int, documents: Sequence[Tensor]) -> nn.Module:
    """A copy of ``model`` carrying CorDA's decomposition of ``targets`` on ``documents``.

    ``documents`` are ``(1, T)`` token-id tensors, run one at a time: peft's covariance hook takes
    one sequence per call (it drops a batch dimension of one). Feed the result to :func:`corda_model`
    (once per adapter: peft consumes the decomposition when it initialises the adapter).
    """
    from peft.tuners.lora.corda import preprocess_corda

    copied = copy.deepcopy(model)

    def run_model() -> None:
        for ids in documents:
            copied(input_ids=ids)

    preprocess_corda(copied, _corda_config(targets, rank), run_model=run_model)
    return copied


def corda_model(preprocessed: nn.Module, targets: list[str], rank: int) -> Any:
    """CorDA (KPM) adapters of rank ``rank`` on a copy of a :func:`corda_preprocessed` model."""
    from peft import get_peft_model

    return get_peft_model(copy.deepcopy(preprocessed), _corda_config(targets, rank))


def _accumulating_hooks(
    modules: dict[str, nn.Module], sums: dict[str, Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks that add each position's squared weight gradient ``(g_t²)(a_t²)ᵀ`` to ``sums``."""

    def hook_for(name: str) -> Callable[..., None]:
        def forward_hook(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            inputs = args[0].detach().float()

            def backward_hook(grad: Tensor) -> None:
                sums[name] += torch.einsum("...o,...i->oi", grad.float().square(), inputs.square())

            output.register_hook(backward_hook)

        return forward_hook

    return [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]


def diagonal_fisher(
    model: nn.Module, targets: Sequence[str], batches: Sequence[dict[str, Tensor]], temperature: float = 1.0
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of each target layer's weight, per token, on ``batches``.

    ``F = (1/N) Σ_t (g_t a_tᵀ)²`` over the ``N`` non-padding positions ``t``: the squared per-position
    weight gradient, with ``a_t`` the layer's input and ``g_t`` the gradient of the sum-reduced
    loss (cross-entropy of ``logits / temperature`` against the data's labels) at its output, as
    K-FAC takes them. It is the exact diagonal of the matrix K-FAC approximates by ``A ⊗ S``, so
    EWC and CrispEdit see the same curvature. The parameters' ``requires_grad`` flags and the
    model's mode are restored; the target weights' ``.grad`` is cleared.
    """
    modules = {name: model.get_submodule(name) for name in targets}
    sums = {name: torch.zeros_like(module.weight, dtype=torch.float32) for name, module in modules.items()}
    flags = {param: param.requires_grad for param in model.parameters()}
    was_training = model.training
    positions = 0
    handles = _accumulating_hooks(modules, sums)
    try:
        model.eval()
        for param in flags:
            param.requires_grad_(False)  # no gradient is stored anywhere ...
        for module in modules.values():
            module.weight.requires_grad_(True)  # ... but the target layers' outputs carry one
        for batch in batches:
            loss = tempered_dict_loss(model, batch, temperature)
            if loss is None:
                continue
            loss.backward()
            positions += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for module in modules.values():
            module.weight.grad = None
        model.train(was_training)
    return {name: total / max(positions, 1) for name, total in sums.items()}


class QuadraticPenalty:
    """``½ Σ_i w_i (θ_i − θ₀_i)²`` over ``params`` (``θ₀``: their values at construction).

    ``weights`` holds one tensor (EWC's ``λ·F``) or one float (L2-SP's ``α``) per parameter.
    """

    def __init__(self, params: Sequence[nn.Parameter], weights: Sequence[Tensor | float]) -> None:
        if len(params) != len(weights):
            raise ValueError(f"{len(params)} parameters but {len(weights)} weights")
        self.params = list(params)
        self.weights = list(weights)
        self.anchors = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def add_gradient(self) -> None:
        """Add ``w ⊙ (θ − θ₀)``, the penalty's gradient, to every parameter's ``.grad``."""
        for param, anchor, weight in zip(self.params, self.anchors, self.weights):
            if param.grad is not None:
                param.grad.add_(weight * (param - anchor))

    @torch.no_grad()
    def value(self) -> float:
        """The penalty at the current parameters."""
        return sum(
            0.5 * float((weight * (param - anchor).square()).sum())
            for param, anchor, weight in zip(self.params, self.anchors, self.weights)
        )


def add_quadratic_penalty(optimizer: torch.optim.Optimizer, penalty: QuadraticPenalty) -> Any:
    """Make every ``optimizer.step()`` see the gradient of loss + ``penalty`` (a step pre-hook).

    Returns the hook's handle (``.remove()`` restores the plain optimizer).
    """
    return optimizer.register_step_pre_hook(lambda _optimizer, _args, _kwargs: penalty.add_gradient())
