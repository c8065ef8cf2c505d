"""Saving and loading a :class:`~torch_crisp.CrispProjector`: the methods users call, in one place.

:class:`ProjectorPersistence` is a base class of the projector holding only its persistence
methods (``state_dict`` / ``load_state_dict``, ``save_pretrained`` / ``from_pretrained``, and
``set_gamma``, which re-thresholds from the loaded sums). What is saved is
:mod:`torch_crisp.serialization`'s business, how it goes to disk :mod:`torch_crisp.persistence`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from . import persistence, serialization
from .basis import RemoteBasis

__all__ = ["ProjectorPersistence"]


class ProjectorPersistence:
    """The persistence methods of :class:`~torch_crisp.CrispProjector` (which provides the attributes)."""

    layers: Any
    config: Any
    sync: Any

    def _after_basis_change(self) -> None:  # provided by the projector
        raise NotImplementedError

    def state_dict(self, include_basis: bool = False) -> dict[str, Any]:
        """``weights_only``-safe state (:func:`torch_crisp.serialization.state_dict`): config, per-layer
        factor sums, token counts, fingerprints and (with ``include_basis``) eigenbases."""
        self._check_bases_here(include_basis)
        return serialization.state_dict(self.layers, self.config, include_basis=include_basis)

    def _check_bases_here(self, include_basis: bool) -> None:
        remote = [name for name, s in self.layers.items() if isinstance(s.basis, RemoteBasis)]
        if include_basis and remote:
            raise ValueError(
                f"include_basis=True needs every layer's basis on this rank, but with basis_placement='sharded' "
                f"{len(remote)} of them live on other ranks ({remote[:3]}…): save without the bases (they are "
                "recomputed from the saved sums when loaded), or use basis_placement='replicated'"
            )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> Any:
        """Restore :meth:`state_dict` output (layers must match: ``ValueError`` lists mismatches);
        bases that were not saved are recomputed from the sums with the saved ``gamma``."""
        return self._load(state_dict, source="the state dict", compare_weights=False)

    def _load(self, state_dict: Mapping[str, Any], *, source: str, compare_weights: bool) -> Any:
        # sharded bases in a process group: no rank computes every basis (a collective below instead)
        sharded = self.config.basis_placement == "sharded" and self.sync.active
        config = serialization.load_state_dict(self.layers, state_dict, source=source, compare_weights=compare_weights,
                                               compute_missing=not sharded)
        for key in ("gamma", "fisher", "curvature", "factor_dtype", "capability_budget", "temperature"):
            setattr(self.config, key, getattr(config, key))
        self.sync.mark_global()  # loaded sums are global: a later capture must not reduce them twice
        if sharded and all(state.basis is not None for state in self.layers.values()):  # saved with the bases
            self.sync.place_loaded(self.layers, self.config.curvature, self.config.projection)
        elif sharded:  # every rank loads: each computes its own layers' bases, the owners share the numbers
            self.sync.compute_bases(self.layers, self.config.gamma, self.config.curvature, "sharded",
                                    self.config.projection)
        else:
            self.sync.sharded = False  # every basis was computed (or loaded) here
        for state in self.layers.values():  # blocked-only bases, offloaded sums
            state.apply_storage(self.config.curvature)
        self._after_basis_change()
        return self

    def save_pretrained(
        self, path: str | os.PathLike[str], *, include_basis: bool = False, hash_weights: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Atomically write a folder (``crisp_config.json`` + ``.safetensors``); see
        :func:`torch_crisp.persistence.save_pretrained`."""
        self._check_bases_here(include_basis)
        state = serialization.state_dict(self.layers, self.config,
            include_basis=include_basis, hash_weights=hash_weights)
        return persistence.save_pretrained(state, path, metadata=metadata)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], model: nn.Module, *, gamma: float | None = None) -> Any:
        """Load a folder written by :meth:`save_pretrained` onto ``model`` (``ValueError`` listing
        mismatched layers; warning if the weights differ); ``gamma`` overrides the saved one (the
        masks are then recomputed from the saved factors)."""
        state_dict, _ = persistence.read_folder(path)
        source = f"projector folder {Path(path)}"
        config = serialization.parse_config(state_dict, source)
        try:
            # the saved layer names, never a saved regular expression (untrusted: it could hang the match)
            projector = cls(model, serialization.loading_config(state_dict, source))
        except ValueError as err:
            raise ValueError(f"{source} does not fit this model: {err}") from None
        projector._load(state_dict, source=source, compare_weights=True)
        projector.config.target_modules = config.target_modules
        if gamma is not None and gamma != projector.config.gamma:
            projector.set_gamma(gamma)
        return projector

    def set_gamma(self, gamma: float) -> Any:
        """New masks for ``gamma`` from the current factors, on this rank only (no collective).

        EK-FAC layers with a correction keep their basis (the correction lives in it) and
        re-threshold the corrected curvature; the others recompute their basis from the sums.
        """
        if any(isinstance(s.basis, RemoteBasis) for s in self.layers.values()):
            raise ValueError(
                "set_gamma() recomputes every basis on this rank alone, but with basis_placement='sharded' each rank "
                "holds only its own: set projector.config.gamma and call projector.update_basis() on every rank"
            )
        self.config.gamma = gamma
        self.config.validate()
        for state in self.layers.values():
            if state.basis is not None and state.correction_sum is not None and state.basis.curvature == "ekfac":
                state.apply_correction(gamma)
            elif state.token_count:
                state.compute_basis(gamma, self.config.curvature)
        self._after_basis_change()
        return self
