"""Each method of the demo as a (model, optimizer) pair on the shared base weights.

Every method starts from the same base weights and trains the same layers. CrispEdit's rows
collect their curvature with the library's own options (``CrispConfig(temperature=...)``, and
``capability_budget=`` for ``crisp-budget``), exactly as a user would. The peers are in
:mod:`.peers`. :meth:`MethodBuilder.predictions` gives, for any edited model, K-FAC's prediction
``L̂ = ½ Σ_layers ⟨Δ, S Δ A⟩`` of the loss increase of its change ``Δ`` (``= ½ Σ c Ũ²``): with
the factors the methods use (capability corpus, the collection's temperature: what the budget
constrains), and with factors of the held-out text at temperature 1, the very loss whose increase
is measured there, so every row sets each prediction beside its measurement.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..batching import collate_texts
from ..loop import train_only
from .grid import parse_method
from .peers import QuadraticPenalty, add_quadratic_penalty, corda_model, corda_preprocessed, diagonal_fisher, lora_model
from .settings import ALL_METHODS, DemoSettings

__all__ = ["Method", "MethodBuilder", "text_batches"]

_UPDATE_MODE = ("crisp-update", "crisp-ekfac", "crisp-budget")
_CURVATURE = {"activations": "activations", "crisp-ekfac": "ekfac"}


@dataclass
class Method:
    """One method ready to edit: the model to train, its optimizer, what to record before and after."""

    model: Any
    optimizer: torch.optim.Optimizer
    info: dict[str, Any] = field(default_factory=dict)
    # Called after the edit loop: numbers only known then (the budget's last multiplier, a penalty).
    after: Callable[[], dict[str, Any]] = field(default=dict)


class MethodBuilder:
    """Builds each method on the shared base weights; curvature and Fisher are collected once each."""

    def __init__(
        self, model: Any, tokenizer: Any, targets: list[str], texts: list[str], settings: DemoSettings,
        heldout: list[str] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.targets = targets
        self.texts = texts  # the capability corpus
        self.batches = text_batches(tokenizer, texts)
        self.heldout_batches = text_batches(tokenizer, heldout or [])
        self.settings = settings
        self.base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._projectors: dict[tuple, tuple[Any, float]] = {}
        self._fisher: tuple[dict[str, torch.Tensor], float] | None = None
        self._corda: tuple[Any, float] | None = None
        self._heldout: Any = None  # K-FAC of the held-out text, plain softmax (the measured loss)

    # ----------------------------------------------------------------- shared, collected once
    def projector(
        self, curvature: str = "kfac", gamma: float | None = None, budget: float | None = None, model: Any = None
    ) -> tuple[Any, float]:
        """The projector of these settings on ``model`` (default: the base model) and its collection seconds.

        Collected once per setting, always at the base weights (which are loaded first).
        """
        from torch_crisp import CrispConfig

        gamma = self.settings.gamma if gamma is None and budget is None else gamma
        key = (curvature, gamma, budget, model is not None)
        if key not in self._projectors:
            config = CrispConfig(
                target_modules=self.targets, gamma=gamma, curvature=curvature, capability_budget=budget,
                temperature=self.settings.capability_temperature,
            )
            self._projectors[key] = self._collect(config, self.batches, model)
        return self._projectors[key]

    def _collect(self, config: Any, batches: list[dict[str, torch.Tensor]], model: Any = None) -> tuple[Any, float]:
        from torch_crisp import CrispProjector

        if model is None:
            self.model.load_state_dict(self.base_state)
        start = time.perf_counter()
        projector = CrispProjector(model if model is not None else self.model, config)
        projector.collect(batches, progress=False)
        return projector, time.perf_counter() - start

    def prepare_predictions(self) -> None:
        """Collect, at the base weights, the two curvatures :meth:`predictions` uses (call before editing)."""
        from torch_crisp import CrispConfig

        self.projector()
        if self.heldout_batches and self._heldout is None:
            config = CrispConfig(target_modules=self.targets, gamma=self.settings.gamma, temperature=1.0)
            self._heldout = self._collect(config, self.heldout_batches)[0]

    def fisher(self) -> tuple[dict[str, torch.Tensor], float]:
        """EWC's diagonal Fisher of the base weights (same corpus and temperature as the curvature)."""
        if self._fisher is None:
            start = time.perf_counter()
            fisher = diagonal_fisher(self.model, self.targets, self.batches, self.settings.capability_temperature)
            self._fisher = fisher, time.perf_counter() - start
        return self._fisher

    def corda_base(self) -> tuple[Any, float]:
        """The base model with CorDA's decomposition on the capability corpus (seconds it took)."""
        if self._corda is None:
            start = time.perf_counter()
            documents = [collate_texts(self.tokenizer, [text])["input_ids"] for text in self.texts]
            preprocessed = corda_preprocessed(self.model, self.targets, self.settings.lora_rank, documents)
            self._corda = preprocessed, time.perf_counter() - start
        return self._corda

    # ----------------------------------------------------------------- the methods
    def build(self, method: str) -> Method:
        """The model and optimizer of ``method`` (a name of ``ALL_METHODS``, optionally ``NAME:VALUE``)."""
        base, value = parse_method(method, ALL_METHODS)
        # Every method starts from the base weights (the previous method edited them in place).
        self.model.load_state_dict(self.base_state)
        if base in ("lora", "lora-crisp", "corda"):
            return self._adapter(base, value)
        params = train_only(self.model, self.targets)
        inner = torch.optim.Adam(params, lr=self.settings.lr)
        if base == "ft":
            return Method(self.model, inner)
        if base in ("ewc", "l2sp"):
            return self._penalised(base, value, params, inner)
        return self._crisp(base, value, inner)

    def _crisp(self, base: str, value: float | None, inner: torch.optim.Optimizer) -> Method:
        from torch_crisp import CrispOptimizer

        mode = "update" if base in _UPDATE_MODE else "grad"
        if base == "crisp-budget":
            budget = value if value is not None else self.settings.budget
            projector, seconds = self.projector(gamma=None, budget=budget)
            info: dict[str, Any] = {"collect_seconds": seconds, "budget": budget}

            def after() -> dict[str, Any]:  # the library's own report of the last step
                return {
                    "budget_mu": projector.budget_mu,
                    "budget_predicted_increase": projector.predicted_capability_increase,
                }

            return Method(self.model, CrispOptimizer(inner, projector, mode=mode), info, after)
        gamma = value if value is not None else self.settings.gamma
        projector, seconds = self.projector(_CURVATURE.get(base, "kfac"), gamma)
        info = {"collect_seconds": seconds, "gamma": gamma, "kept_fraction": projector.kept_fraction()}
        return Method(self.model, CrispOptimizer(inner, projector, mode=mode), info)

    def _penalised(
        self, base: str, value: float | None, params: list[torch.nn.Parameter], inner: torch.optim.Optimizer
    ) -> Method:
        if base == "ewc":
            strength = value if value is not None else self.settings.ewc_lambda
            fisher, seconds = self.fisher()
            weights: list[torch.Tensor | float] = [strength * fisher[name] for name in self.targets]
            info: dict[str, Any] = {"ewc_lambda": strength, "fisher_seconds": seconds}
        else:
            strength = value if value is not None else self.settings.l2sp_alpha
            weights = [strength] * len(self.targets)
            info = {"l2sp_alpha": strength}
        # train_only returns each target's weight in target order (the demo's layers have no bias)
        penalty = QuadraticPenalty(params, weights)
        add_quadratic_penalty(inner, penalty)
        return Method(self.model, inner, info, lambda: {"penalty": penalty.value()})

    def _adapter(self, base: str, value: float | None) -> Method:
        from torch_crisp import CrispOptimizer

        s = self.settings
        if base == "corda":
            preprocessed, seconds = self.corda_base()
            model = corda_model(preprocessed, self.targets, s.lora_rank)
            lr = value if value is not None else s.corda_lr
            info: dict[str, Any] = {"corda_seconds": seconds, "lr": lr}
        else:
            model, lr, info = lora_model(self.model, self.targets, s.lora_rank), s.lora_lr, {}
        inner = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        if base != "lora-crisp":
            return Method(model, inner, info)
        projector, seconds = self.projector(model=model)
        info = {"collect_seconds": seconds, "lora_kept_fraction": projector.lora_kept_fraction()}
        return Method(model, CrispOptimizer(inner, projector, mode="grad"), info)

    # ----------------------------------------------------------------- the prediction
    @torch.no_grad()
    def predictions(self, edited: Any) -> dict[str, float]:
        """K-FAC's ``L̂ = ½ Σ ⟨Δ, S Δ A⟩`` of ``edited``'s change from the base weights (adapters merged).

        ``predicted_increase``: the factors of the capability corpus with the collection's
        temperature (the tempered loss there; what the budget constrains). ``predicted_heldout_increase``
        (with held-out texts): the factors of the held-out text at temperature 1, predicting the
        increase of its plain loss (the log of the perplexity). Needs :meth:`prepare_predictions` first.
        """
        key = ("kfac", self.settings.gamma, None, False)
        if key not in self._projectors:  # collecting now would load the base weights over the edit
            raise RuntimeError("collect the predictions' curvature first: call prepare_predictions() before editing")
        if hasattr(edited, "merge_and_unload"):  # a peft model: the effective weights W + s·BA
            edited = copy.deepcopy(edited).merge_and_unload()
        modules = dict(edited.named_modules())
        changes = {
            name: modules[name].weight.detach().float() - self.base_state[f"{name}.weight"].float()
            for name in self.targets
        }
        result = {"predicted_increase": _quadratic(self._projectors[key][0], changes)}
        if self._heldout is not None:
            result["predicted_heldout_increase"] = _quadratic(self._heldout, changes)
        return result


def text_batches(tokenizer: Any, texts: list[str], size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches of ``size`` texts each (right-padded, padding labelled -100)."""
    return [collate_texts(tokenizer, texts[i : i + size]) for i in range(0, len(texts), size)]


def _quadratic(projector: Any, changes: dict[str, torch.Tensor]) -> float:
    """``½ Σ_layers ⟨Δ, S Δ A⟩`` with the projector's normalised factors (``= ½ Σ c Ũ²``)."""
    total = 0.0
    for name, change in changes.items():
        A, S = projector.factors(name)
        total += 0.5 * float((change * (S @ change @ A)).sum(dtype=torch.float64))
    return total
