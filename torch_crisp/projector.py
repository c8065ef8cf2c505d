"""`CrispProjector`: collect capability curvature of target layers and project their updates.

A thin orchestrator over small parts: :mod:`~torch_crisp.layers` decides which modules are
projected and how their parameters map to ``[W | b]``; :mod:`~torch_crisp.collection` runs the data
passes while the hooks of :mod:`~torch_crisp.capture` (and :mod:`~torch_crisp.correction` for
EK-FAC) feed per-layer :class:`~torch_crisp.state.LayerState` sums; :mod:`~torch_crisp.sync` merges
them across ranks; :mod:`~torch_crisp.basis` turns them into eigenbases and masks;
:mod:`~torch_crisp.projection` applies them; :mod:`~torch_crisp.serialization` and
:mod:`~torch_crisp.persistence` save and load them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from . import memory
from .capture import CaptureSession, FactorCapture, OutputGradientHooks
from .collection import (
    PassReport,
    as_batches,
    check_batches,
    check_pass_arguments,
    restored_on_error,
    run_pass,
    unwrap_data_parallel,
)
from .config import CrispConfig
from .correction import CorrectionCapture
from .distributed import Group
from .layers import LinearGeometry, find_target_modules
from .lora import LoraLayer, check_peft_model, find_lora_layers, reproject_after_basis_change
from .losses import LogitsFn, LossFn
from .persistence_facade import ProjectorPersistence
from .projection import ProjectionStats, project_gradients_
from .state import LayerState
from .sync import RankSync

__all__ = ["CrispProjector"]


class CrispProjector(ProjectorPersistence):
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
        self.model = unwrap_data_parallel(model)
        self.config = config if config is not None else CrispConfig()
        self.config.validate()
        check_peft_model(self.model)
        dtype = self.config.torch_factor_dtype
        self.layers: dict[str, LayerState] = {
            name: LayerState(name, LinearGeometry.of(module, name), dtype, self.config.projection_options)
            for name, module in find_target_modules(self.model, self.config.target_modules).items()
        }
        # LoRA-wrapped targets: factors come from the base layer (self.layers); the adapters'
        # A and B are kept in a kept rectangle of that layer (see torch_crisp.lora).
        self.lora_layers: dict[str, LoraLayer] = find_lora_layers(
            self.model, {name: state.geometry.d_in for name, state in self.layers.items()}
        )
        if self.lora_layers:  # their kept rectangles are read from the full bases and mask, on every rank
            self.config.projection_options.require_full_bases("LoRA adapters")
            if self.config.basis_placement == "sharded":
                raise ValueError(
                    "LoRA adapters are re-projected into their kept rectangles on every rank after every step, which "
                    "needs every basis on every rank; use basis_placement='replicated' (or 'auto') with LoRA"
                )
        self._factor_capture = FactorCapture(self.layers)
        self._correction_capture = CorrectionCapture(self.layers)
        self.sync = RankSync()
        self.last_projection: ProjectionStats | None = None
        self.last_collection: PassReport | None = None  # what the last collect() read, skipped, padded

    # ----------------------------------------------------------------- introspection
    @property
    def target_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the projected layers."""
        return list(self.layers)

    @property
    def has_basis(self) -> bool:
        return all(state.basis is not None for state in self.layers.values())

    def _layer(self, name: str) -> LayerState:
        if name not in self.layers:
            raise KeyError(f"{name!r} is not a projected layer; projected layers: {self.target_names}")
        return self.layers[name]

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Normalised ``(A, S)`` of one layer; ``A`` includes the bias row/column if any."""
        return self._layer(name).factors()

    def num_tokens(self, name: str) -> float:
        """Token count ``N`` behind one layer's factors (weighted if ``weight`` was used)."""
        return self._layer(name).token_count

    def kept_fraction(self) -> dict[str, float]:
        """Fraction of eigen-directions kept (``M`` true) per layer."""
        return {name: state.require_basis().kept_fraction for name, state in self.layers.items()}

    def lora_kept_fraction(self) -> dict[str, float]:
        """Per LoRA layer, ``|R|·|C| / |M|``: the share of the full-weight kept subspace LoRA can use."""
        return {name: lora.rectangle(self.layers[name].require_basis()).kept_fraction
                for name, lora in self.lora_layers.items()}

    def projected_parameters(self) -> list[Tensor]:
        """Every parameter whose updates this projector constrains (layer weights/biases, LoRA A/B)."""
        params = [p for state in self.layers.values() for p in state.geometry.parameters()]
        return params + [p for lora_layer in self.lora_layers.values() for p in lora_layer.parameters()]

    @property
    def last_removed_fraction(self) -> float | None:
        """``‖Q − P(Q)‖² / ‖Q‖²`` over all layers at the last projection (None before)."""
        return None if self.last_projection is None else self.last_projection.removed_fraction

    @property
    def predicted_capability_increase(self) -> float | None:
        """``L̂ = ½ Σ c Ũ²`` of the cumulative change at the last step (update mode or with a budget).

        ``None`` when a layer took the complement path, which skips the rotation ``L̂`` needs; then
        ``CrispOptimizer.constraint.current_predicted_increase()`` computes it on request.
        """
        return None if self.last_projection is None else self.last_projection.predicted_increase

    @property
    def budget_mu(self) -> float | None:
        """The capability budget's multiplier ``μ`` at the last step (0: the budget did not bind)."""
        return None if self.last_projection is None else self.last_projection.budget_mu

    @property
    def last_projected_layers(self) -> int:
        """Layers (and LoRA layers) that took part in the last projection."""
        return 0 if self.last_projection is None else self.last_projection.layers

    def record_projection(self, stats: ProjectionStats) -> None:
        """Remember what a projection removed (read by :attr:`last_removed_fraction`)."""
        self.last_projection = stats

    # ----------------------------------------------------------------- distribution
    @property
    def process_group(self) -> Group:
        """Group the sums are reduced over (``None``: the default group); see :mod:`torch_crisp.sync`."""
        return self.sync.process_group

    @process_group.setter
    def process_group(self, group: Group) -> None:
        self.sync.process_group = group

    @property
    def sync_across_ranks(self) -> bool:
        """Set ``False`` to keep this projector purely local to its rank."""
        return self.sync.enabled

    @sync_across_ranks.setter
    def sync_across_ranks(self, value: bool) -> None:
        self.sync.enabled = bool(value)

    @property
    def is_distributed(self) -> bool:
        """True when :meth:`update_basis` reduces over ranks (``torch.distributed`` initialised,
        more than one rank in :attr:`process_group`, and :attr:`sync_across_ranks`)."""
        return self.sync.active

    @property
    def basis_placement(self) -> str:
        """The placement :meth:`update_basis` uses: the config's, except that ``"auto"`` stays replicated where
        every rank needs every basis (LoRA adapters, a capability budget, EK-FAC)."""
        config = self.config
        needs_all = bool(self.lora_layers) or config.capability_budget is not None or config.curvature == "ekfac"
        return "replicated" if config.basis_placement == "auto" and needs_all else config.basis_placement

    @property
    def bases_sharded(self) -> bool:
        """True when each rank holds only the bases it computed (see ``CrispConfig.basis_placement``)."""
        return self.sync.sharded and self.sync.active

    @property
    def eigendecomposition_owners(self) -> dict[str, int]:
        """Which rank computed each layer's basis at the last distributed :meth:`update_basis`."""
        return self.sync.owners

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
        self.sync.begin_local_factors(self.layers)
        with self._factor_capture.capturing() as session:
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
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_size: int | None = None,
        correction_batches: Iterable[Any] | None = None,
    ) -> CrispProjector:
        """Accumulate the factors over ``batches`` and recompute eigenbases and masks.

        Args:
            batches: Hugging Face-style dict batches (``input_ids``, ``attention_mask``, ``labels``),
                run as ``model(**batch).loss``; any batches with ``loss_fn``; or a data set of single
                tokenised examples (``datasets.Dataset``, torch ``Dataset``, list of dicts), batched
                with ``collate_fn`` (default: right padding, labels = input ids) and ``batch_size`` (8).
            loss_fn: ``loss_fn(model, batch)`` returning the sum-reduced loss, or ``(mean_loss, num_terms)``.
            max_batches: stop after this many batches. ``progress``: show a progress bar.
            weight: multiplies this data's contribution (e.g. edits in sequential editing).
            logits_fn: for ``fisher="mc"`` with non-dict batches: ``(..., C)`` logits to draw labels from.

        ``curvature="ekfac"`` makes a second pass for the corrected curvature in the new eigenbasis
        (:meth:`correct_curvature`) over ``correction_batches``: by default ``batches`` (which must
        then be re-iterable). The correction cannot be carried from an old basis to a new one, so a
        later ``collect`` (sequential editing) must pass every data set collected so far as
        ``correction_batches``. The model runs in eval mode with its parameters frozen (no weight
        gradients, ``.grad`` untouched); both are restored. Sums add to what was collected before;
        :meth:`reset` clears them.

        A batch with a NaN/inf loss is skipped, and a layer's NaN/inf contribution is left out of
        its sums (both counted in :attr:`last_collection` and warned about), so a bad batch never
        poisons the curvature. If the call fails part-way (an error, out of memory, Ctrl-C), the
        projector is left exactly as it was.
        """
        check_pass_arguments(max_batches, weight)
        batches = as_batches(batches, collate_fn, batch_size)
        ekfac = self.config.curvature == "ekfac"
        if ekfac and correction_batches is None and any(s.token_count for s in self.layers.values()):
            raise ValueError(
                "curvature='ekfac' keeps per-example corrections in the current eigenbasis, and they cannot be "
                "moved to the basis this collect computes: pass correction_batches=<every data set collected so "
                "far, these batches included> so the second pass covers all of them"
            )
        check_batches(batches, self.config.fisher, loss_fn, logits_fn, two_passes=ekfac and correction_batches is None)
        with restored_on_error(self.layers, self.sync):
            self.sync.begin_local_factors(self.layers)
            report = self._passes(self._factor_capture, batches, weight, loss_fn, logits_fn, max_batches, progress)
            # In a process group a rank may hold no batches of an uneven shard; it must still join the
            # reductions in update_basis(), which checks the global token counts on every rank.
            if report.batches == 0 and not self.is_distributed:
                raise ValueError("collect() received no batches; pass a non-empty iterable of capability batches")
            self._update_bases(correction_follows=ekfac)
            if ekfac:
                self.correct_curvature(
                    batches if correction_batches is None else correction_batches, loss_fn=loss_fn,
                    logits_fn=logits_fn, max_batches=max_batches, progress=progress, weight=weight,
                )
        self.last_collection = report
        return self

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
        """EK-FAC's second pass: ``c_ij = E_n[(U_outᵀ G_n U_in)_ij²]`` in the current bases, then new masks.

        ``G_n`` is example ``n``'s (one batch row's) weight gradient, rotated layer by layer inside the
        backward pass (see :mod:`torch_crisp.correction`). :meth:`collect` calls this for
        ``curvature="ekfac"``; call it yourself after :meth:`capture` + :meth:`update_basis`.
        Arguments as in :meth:`collect`; a collective in a process group.
        """
        if self.config.curvature != "ekfac":
            raise RuntimeError(
                f"correct_curvature() is EK-FAC's second pass, but config.curvature is "
                f"{self.config.curvature!r}; set CrispConfig(curvature='ekfac')"
            )
        check_pass_arguments(max_batches, weight)
        check_batches(batches, self.config.fisher, loss_fn, logits_fn, two_passes=False)
        for state in self.layers.values():
            state.require_basis()
        with restored_on_error(self.layers, self.sync):
            self.sync.begin_local_corrections(self.layers)
            self._passes(self._correction_capture, batches, weight, loss_fn, logits_fn, max_batches, progress)
            self.sync.reduce_corrections(self.layers)  # a collective: ranks without examples contribute zeros
            missing = [name for name, state in self.layers.items() if state.example_count == 0]
            if missing:
                raise RuntimeError(f"the EK-FAC pass reached no example of layers {missing}; check the batches")
            for state in self.layers.values():
                state.apply_correction(self.config.gamma)
        self._after_basis_change()
        return self

    def _passes(
        self, capture: OutputGradientHooks, batches: Iterable[Any], weight: float, loss_fn: LossFn | None,
        logits_fn: LogitsFn | None, max_batches: int | None, progress: bool,
    ) -> PassReport:
        return run_pass(
            self.model, self.layers, capture, batches, sync=self.sync, weight=weight, fisher=self.config.fisher,
            temperature=self.config.temperature, loss_fn=loss_fn, logits_fn=logits_fn, max_batches=max_batches,
            progress=progress, what="collect" if capture is self._factor_capture else "EK-FAC pass",
        )

    def update_basis(self) -> CrispProjector:
        """Eigendecompose every layer's factors and recompute masks for ``config.gamma``.

        In a process group (:attr:`is_distributed`) a collective every rank must call: the sums are
        all-reduced and each basis is computed on one rank and broadcast, so all ranks hold
        bit-identical bases and masks (:mod:`torch_crisp.sync`).
        """
        return self._update_bases(correction_follows=False)

    def _update_bases(self, correction_follows: bool) -> CrispProjector:
        self.sync.reduce_factors(self.layers)
        empty = [name for name, state in self.layers.items() if state.token_count == 0]
        if empty:
            raise RuntimeError(
                f"no curvature data reached layers {empty}: they may not be on the loss path, or no "
                "batch was collected; check target_modules and your batches"
            )
        self.sync.compute_bases(self.layers, self.config.gamma, self.config.curvature, self.basis_placement,
                                self.config.projection)
        if self.config.curvature == "ekfac" and not correction_follows:
            warnings.warn(
                "curvature='ekfac': the eigenbases changed, so the masks are K-FAC's until "
                "projector.correct_curvature(batches) runs the second pass (collect() does both)",
                stacklevel=3,
            )
        self._after_basis_change()
        return self

    def _after_basis_change(self) -> None:
        # New masks: move the LoRA adapters (A starts random) into the new kept rectangles.
        reproject_after_basis_change(self.lora_layers, {name: s.basis for name, s in self.layers.items()})

    def reset(self) -> CrispProjector:
        """Forget all collected factors and bases."""
        for state in self.layers.values():
            state.reset()
        return self

    # ----------------------------------------------------------------- projection
    def project(self, name: str, Q: Tensor) -> Tensor:
        """Project a ``(d_out, d_in[+1])`` matrix of layer ``name`` onto its kept subspace."""
        state = self._layer(name)
        state.require_basis()
        expected = (state.geometry.d_out, state.geometry.d_in_augmented)
        if tuple(Q.shape[-2:]) != expected:
            bias_note = " (the last column is the bias)" if state.geometry.has_bias else ""
            raise ValueError(f"layer {name!r} projects matrices of shape {expected}{bias_note}, got {tuple(Q.shape)}")
        return state.project(Q)

    def project_(
        self, skip: Collection[str] = (), factors: Mapping[str, Callable[[Tensor], Tensor]] | None = None
    ) -> CrispProjector:
        """Project every target layer's ``.grad`` in place (weight and bias together), LoRA included.

        See :func:`~torch_crisp.projection.project_gradients_`; layers named in ``skip`` are left
        alone, those in ``factors`` are projected from their tokens' factors (the low-rank step).
        FSDP2 (``fully_shard``) gradients are gathered, projected identically on every rank and
        written back shard by shard; DeepSpeed ZeRO and FSDP1 flat parameters raise ``RuntimeError``.
        With sharded bases (a collective then) each layer's owner projects it and broadcasts the result.
        """
        owners = self.sync.owner_broadcasts()
        self.record_projection(project_gradients_(self.layers, self.lora_layers, skip, factors, owners))
        return self

    @torch.no_grad()
    def project_lora_parameters_(self) -> CrispProjector:
        """Keep every LoRA layer's ``ΔW = scaling · B A`` in its kept rectangle, in place (:mod:`torch_crisp.lora`).

        Called after every optimizer step, so the guarantee holds for any optimizer. Layers without a
        basis yet are skipped.
        """
        for name, lora_layer in self.lora_layers.items():
            basis = self.layers[name].basis
            if basis is not None:
                lora_layer.project_parameters_(basis)
        return self

    def memory_report(self, **options: Any) -> memory.MemoryReport:
        """What collection and training hold, per layer and in total (:func:`torch_crisp.memory.memory_report`)."""
        return memory.memory_report(self.layers, self.config, **options)

    def __repr__(self) -> str:
        status = "basis ready" if self.has_basis else "no basis yet"
        config = self.config
        return f"CrispProjector({len(self.layers)} layers, gamma={config.gamma}, fisher={config.fisher!r}, {status})"
