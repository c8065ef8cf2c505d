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

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import persistence, serialization
from .capture import CaptureSession, FactorCapture
from .collection import check_batches, check_pass_arguments, frozen_eval, run_backward_passes, unwrap_data_parallel
from .config import CrispConfig
from .correction import CorrectionCapture
from .distributed import Group
from .layers import LinearGeometry, find_target_modules
from .lora import LoraLayer, check_peft_model, find_lora_layers, reproject_after_basis_change
from .losses import LogitsFn, LossFn
from .projection import ProjectionStats, project_gradients_
from .state import LayerState
from .sync import RankSync

__all__ = ["CrispProjector"]


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
        self.model = unwrap_data_parallel(model)
        self.config = config if config is not None else CrispConfig()
        self.config.validate()
        check_peft_model(self.model)
        dtype = self.config.torch_factor_dtype
        self.layers: dict[str, LayerState] = {
            name: LayerState(name, LinearGeometry.of(module), dtype)
            for name, module in find_target_modules(self.model, self.config.target_modules).items()
        }
        # LoRA-wrapped targets: factors come from the base layer (self.layers); the adapters'
        # A and B are kept in a kept rectangle of that layer (see torch_crisp.lora).
        self.lora_layers: dict[str, LoraLayer] = find_lora_layers(
            self.model, {name: state.geometry.d_in for name, state in self.layers.items()}
        )
        self._factor_capture = FactorCapture(self.layers)
        self._correction_capture = CorrectionCapture(self.layers)
        self.sync = RankSync()
        self.last_projection: ProjectionStats | None = None

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
    ) -> CrispProjector:
        """Accumulate the factors over ``batches`` and recompute eigenbases and masks.

        Args:
            batches: Hugging Face-style dict batches (``input_ids``, ``attention_mask``, ``labels``),
                run as ``model(**batch).loss``; or any batches with ``loss_fn``.
            loss_fn: ``loss_fn(model, batch)`` returning the sum-reduced loss, or a tuple
                ``(mean_loss, num_terms)``. For dict batches, ``attention_mask`` still selects positions.
            max_batches: stop after this many batches.
            progress: show a tqdm progress bar.
            weight: multiplies this data's contribution (e.g. to up-weight edits in sequential
                editing); factors stay normalised by the weighted token count.
            logits_fn: for ``fisher="mc"`` with batches that are not Hugging Face dicts: returns
                ``(..., C)`` logits whose softmax the labels are drawn from (``torch.manual_seed``
                makes the draws reproducible).

        ``curvature="ekfac"`` makes a second pass over the same (re-iterable) ``batches`` for the
        corrected curvature in the new eigenbasis (:meth:`correct_curvature`). The model runs in
        eval mode with its parameters frozen (no weight gradients, ``.grad`` untouched); both are
        restored. Sums add to what was collected before; :meth:`reset` clears them.
        """
        check_pass_arguments(max_batches, weight)
        check_batches(batches, self.config.fisher, loss_fn, logits_fn, two_passes=self.config.curvature == "ekfac")
        self.sync.begin_local_factors(self.layers)
        with frozen_eval(self.model), self._factor_capture.capturing(CaptureSession(weight=weight)) as session:
            seen = self._passes(batches, session, loss_fn, logits_fn, max_batches, progress, "collect")
        # In a process group a rank may hold no batches of an uneven shard; it must still join the
        # reductions in update_basis(), which checks the global token counts on every rank.
        if seen == 0 and not self.is_distributed:
            raise ValueError("collect() received no batches; pass a non-empty iterable of capability batches")
        self._update_bases(correction_follows=self.config.curvature == "ekfac")
        if self.config.curvature == "ekfac":
            self.correct_curvature(
                batches, loss_fn=loss_fn, logits_fn=logits_fn, max_batches=max_batches, progress=progress, weight=weight
            )
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
        check_pass_arguments(max_batches, weight)
        check_batches(batches, self.config.fisher, loss_fn, logits_fn, two_passes=False)
        for state in self.layers.values():
            state.require_basis()
        self.sync.begin_local_corrections(self.layers)
        with frozen_eval(self.model), self._correction_capture.capturing(CaptureSession(weight=weight)) as session:
            self._passes(batches, session, loss_fn, logits_fn, max_batches, progress, "EK-FAC pass")
        self.sync.reduce_corrections(self.layers)  # a collective: ranks without examples contribute zeros
        missing = [name for name, state in self.layers.items() if state.example_count == 0]
        if missing:
            raise RuntimeError(f"the EK-FAC pass reached no example of layers {missing}; check the batches")
        for state in self.layers.values():
            state.apply_correction(self.config.gamma)
        self._after_basis_change()
        return self

    def _passes(self, batches, session, loss_fn, logits_fn, max_batches, progress, what) -> int:  # noqa: ANN001
        return run_backward_passes(
            self.model, batches, session, fisher=self.config.fisher, loss_fn=loss_fn, logits_fn=logits_fn,
            max_batches=max_batches, progress=progress, what=what,
        )

    def update_basis(self) -> CrispProjector:
        """Eigendecompose every layer's factors and recompute masks for ``config.gamma``.

        In a process group (see :attr:`is_distributed`) this is a collective that every rank must
        call: the factor sums and token counts are all-reduced (ranks without data contribute
        zeros), each layer's eigendecomposition runs on one rank (greedy by ``d_in³ + d_out³``)
        and is broadcast, so all ranks hold bit-identical bases and masks
        (:mod:`torch_crisp.sync`). Between the start of a capture and this call, ranks other than 0
        hold only their own new data.
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
        self.sync.compute_bases(self.layers, self.config.gamma, self.config.curvature)
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

    def project_(self) -> CrispProjector:
        """Project every target layer's ``.grad`` in place (weight and bias together), LoRA included.

        See :func:`~torch_crisp.projection.project_gradients_`. FSDP2 (``fully_shard``) gradients are
        gathered, projected identically on every rank and written back shard by shard; DeepSpeed
        ZeRO and FSDP1 flat parameters raise ``RuntimeError``.
        """
        self.record_projection(project_gradients_(self.layers, self.lora_layers))
        return self

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

    def __repr__(self) -> str:
        status = "basis ready" if self.has_basis else "no basis yet"
        return (
            f"CrispProjector({len(self.layers)} layers, gamma={self.config.gamma}, "
            f"fisher={self.config.fisher!r}, {status})"
        )

    # ----------------------------------------------------------------- persistence
    def state_dict(self, include_basis: bool = False) -> dict[str, Any]:
        """``weights_only``-safe state (:func:`torch_crisp.serialization.state_dict`): config, per-layer
        factor sums, token counts, fingerprints and (with ``include_basis``) eigenbases."""
        return serialization.state_dict(self.layers, self.config, include_basis=include_basis)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> CrispProjector:
        """Restore :meth:`state_dict` output (layers must match: ``ValueError`` lists mismatches);
        bases that were not saved are recomputed from the sums with the saved ``gamma``."""
        return self._load(state_dict, source="the state dict", compare_weights=False)

    def _load(self, state_dict: Mapping[str, Any], *, source: str, compare_weights: bool) -> CrispProjector:
        config = serialization.load_state_dict(self.layers, state_dict, source=source, compare_weights=compare_weights)
        for key in ("gamma", "fisher", "curvature", "factor_dtype"):
            setattr(self.config, key, getattr(config, key))
        self.sync.mark_global()  # loaded sums are global: a later capture must not reduce them twice
        self._after_basis_change()
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
        state = serialization.state_dict(
            self.layers, self.config, include_basis=include_basis, hash_weights=hash_weights
        )
        return persistence.save_pretrained(state, path, metadata=metadata)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], model: nn.Module, *, gamma: float | None = None
    ) -> CrispProjector:
        """Load a folder written by :meth:`save_pretrained` onto ``model`` (``ValueError`` listing
        mismatched layers; warning if the weights differ); ``gamma`` overrides the saved one (the
        masks are then recomputed from the saved factors)."""
        state_dict, _ = persistence.read_folder(path)
        source = f"projector folder {Path(path)}"
        config = serialization.parse_config(state_dict, source)
        try:
            projector = cls(model, config)
        except ValueError as err:
            raise ValueError(f"{source} does not fit this model: {err}") from None
        projector._load(state_dict, source=source, compare_weights=True)
        if gamma is not None and gamma != projector.config.gamma:
            projector.set_gamma(gamma)
        return projector

    def set_gamma(self, gamma: float) -> CrispProjector:
        """New masks for ``gamma`` from the current factors, on this rank only (no collective).

        EK-FAC layers with a correction keep their basis (the correction lives in it) and
        re-threshold the corrected curvature; the others recompute their basis from the sums.
        """
        self.config.gamma = gamma
        self.config.validate()
        for state in self.layers.values():
            if state.basis is not None and state.correction_sum is not None and state.basis.curvature == "ekfac":
                state.apply_correction(gamma)
            elif state.token_count:
                state.compute_basis(gamma, self.config.curvature)
        self._after_basis_change()
        return self
