"""The low-rank edit step of ``mode="grad"``: project gradients from their per-token factors where exact.

At an optimizer step, a layer whose gradient came from ``T`` positions has ``.grad = α·Gᵀ X`` with
the factors :class:`~torch_crisp.token_capture.TokenCapture` kept during the backward passes;
:mod:`torch_crisp.low_rank` projects from them at a fraction of the dense cost. Per layer and
step, :class:`LowRankStep`

1. takes the factors of every backward pass since the last step (micro-batches concatenate);
2. in a process group (DDP: ``.grad`` is the average of the ranks' gradients, each rank holds its
   own tokens' factors) all-gathers the token counts, then the factors of the layers below their
   token budget, in rank order, so every rank holds the same ``G``, ``X``;
3. checks that they reproduce ``.grad`` up to a scale ``α`` and rounding
   (:func:`torch_crisp.low_rank.reproduction_scale`) — the scale absorbs clipping, loss scaling and
   DDP's averaging; a user's own backward outside the hooks, another loss term, a tied weight's other
   use, or anything else fails the check — and, with replicated bases, agrees on the verdict over the
   ranks (one all-reduce), so every rank takes the same path;
4. hands :func:`torch_crisp.projection.project_gradients_` the projection from the factors on the
   cheaper low-rank path (:func:`torch_crisp.low_rank.choose_path`); every other layer takes the
   dense path. The result is never a different projection: only a cheaper computation of the same one.

Not used (dense path): FSDP2 (``DTensor``) gradients, a frozen bias column, layers above their
token budget, and update mode (the cumulative change ``W − W₀`` is not low-rank; see
``docs/concepts.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed, low_rank
from .basis import AnyBasis, Basis, BlockedBasis, RemoteBasis
from .config import LOW_RANKS, LowRank, Projection, check_choice
from .dtensor import is_dtensor
from .projection import has_frozen_bias, layer_matrix
from .state import LayerState
from .token_capture import TokenCapture, TokenRecords

__all__ = ["LowRankStep", "project_from_factors"]

_UNUSABLE = -1  # a rank's token count for a layer whose factors cannot be used at this step


class LowRankStep:
    """Keeps the factors during training and prepares the low-rank projections of a step (module docstring).

    Args:
        projector: the :class:`~torch_crisp.CrispProjector` whose layers are projected.
        policy: ``"auto"`` (the cost model decides), ``"always"`` (wherever exact) or ``"off"``.
    """

    def __init__(self, projector, policy: LowRank = "auto") -> None:
        self.projector = projector
        self.policy: LowRank = check_choice("low_rank", policy, LOW_RANKS)  # type: ignore[assignment]
        self.capture = TokenCapture(projector.layers, projector.model, self.budget)
        self._budgets: dict[str, tuple[AnyBasis, int]] = {}

    # ----------------------------------------------------------------- lifetime
    def start(self) -> None:
        if self.policy != "off":
            self.capture.start()

    def stop(self) -> None:
        self.capture.stop()

    def clear(self) -> None:
        """Drop the factors kept since the last step (their gradients were zeroed)."""
        self.capture.clear()

    # ----------------------------------------------------------------- per-layer budget
    def budget(self, name: str) -> int:
        """The most tokens of one step for which layer ``name`` projects from factors (0: never), cached
        per basis. The same on every rank: from identical bases, or broadcast by a sharded basis' owner."""
        state = self.projector.layers[name]
        basis = state.basis
        if basis is None or self.policy == "off":
            return 0
        cached = self._budgets.get(name)
        if cached is not None and cached[0] is basis:
            return cached[1]
        if is_dtensor(state.geometry.weight) or has_frozen_bias(state):
            tokens = 0
        elif isinstance(basis, RemoteBasis):
            tokens = low_rank.token_cap(basis.shape) if self.policy == "always" else basis.low_rank_tokens
        else:
            device = state.geometry.weight.device
            tokens = low_rank.token_budget(basis, state.options.projection, device, self.policy)
        self._budgets[name] = (basis, tokens)
        return tokens

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def prepare(self, skip: Collection[str] = ()) -> dict[str, Callable[[Tensor], Tensor]]:
        """``{layer: (.grad as [W|b]) -> P(.grad)}`` for the layers that project from their factors at this step.

        A collective in a process group (every rank calls it at the same step). Clears the factors.
        """
        records, refused = self.capture.take()
        states = list(self.projector.layers.values())
        if self.policy == "off" or all(self.budget(s.name) == 0 for s in states):
            return {}  # the budgets are the same on every rank: no rank joins a collective
        local = [self._local_count(s, records, refused, skip) for s in states]
        sync = self.projector.sync
        counts = distributed.all_gather_ints([v for pair in local for v in pair], sync.process_group) \
            if sync.active else [[v for pair in local for v in pair]]
        candidates = []
        for i, state in enumerate(states):
            per_rank = [(c[2 * i], c[2 * i + 1]) for c in counts]
            tokens = sum(t for t, _ in per_rank)
            if all(t != _UNUSABLE for t, _ in per_rank) and 0 < tokens <= self.budget(state.name):
                candidates.append((state, per_rank))
        if not candidates:
            return {}
        factors = self._gathered(candidates, records) if sync.active else {
            s.name: (*_concatenated(records[s.name]), None) for s, _ in candidates
        }
        verified: list[tuple[LayerState, float | None]] = []
        for state, per_rank in candidates:
            if isinstance(state.basis, RemoteBasis):
                continue  # the owner projects this layer and broadcasts the result
            G, X, rounding = factors[state.name]
            grads = [p.grad for p in state.geometry.parameters()]
            passes = sum(n for _, n in per_rank)
            alpha = low_rank.reproduction_scale(layer_matrix(state, grads), G, _augmented(state, X), passes,
                                                rounding) if all(g is not None for g in grads) else None
            verified.append((state, alpha))
        if sync.active and not sync.sharded:  # the group's flag: a rank may own every layer while others own none
            verified = _agreed(verified, sync.process_group)  # replicated: every rank takes the same path
        projections = {}
        for state, alpha in verified:
            if alpha is not None:
                G, X, _ = factors[state.name]
                projections[state.name] = partial(self._project, state, G, _augmented(state, X), alpha)
        return projections

    def _local_count(self, state: LayerState, records: TokenRecords, refused: set[str],
                     skip: Collection[str]) -> tuple[int, int]:
        """``(tokens, backward passes)`` this rank kept for the layer, or ``(-1, 0)`` if its factors are unusable."""
        grads = [p.grad for p in state.geometry.parameters()]
        if state.name in refused or state.name in skip or any(g is not None and is_dtensor(g) for g in grads):
            return _UNUSABLE, 0
        passes = records.get(state.name, [])
        return sum(G.shape[0] for G, _ in passes), len(passes)

    def _gathered(self, candidates: Sequence[tuple[LayerState, list[tuple[int, int]]]],
                  records: TokenRecords) -> dict[str, tuple[Tensor, Tensor, torch.dtype]]:
        """Every rank's factors of the candidate layers, concatenated in rank order (one all-gather), with the
        coarsest dtype this rank's factors had (they travel in float32, exactly, and the check must still
        allow for the rounding of bf16 products: autocast under a float32 ``.grad``)."""
        group = self.projector.sync.process_group
        pieces = [_concatenated(records.get(s.name, []), s) for s, _ in candidates]
        rounding = [max((t.dtype for t in pair), key=lambda d: torch.finfo(d).eps) for pair in pieces]
        # the same on every rank (a rank may hold no factors): float64 only for float64 weights
        dtype = torch.float64 if any(s.geometry.weight.dtype == torch.float64 for s, _ in candidates) else torch.float32
        flat = torch.cat([t.to(dtype).reshape(-1) for pair in pieces for t in pair])
        flat = flat.to(distributed.comm_device(flat, group))
        widths = [s.geometry.d_out + s.geometry.d_in for s, _ in candidates]
        lengths = [sum(per_rank[r][0] * w for (_, per_rank), w in zip(candidates, widths))
                   for r in range(dist.get_world_size(group))]
        gathered = distributed.all_gather_varying(flat, lengths, group)
        out = {}
        for i, (state, per_rank) in enumerate(candidates):
            Gs, Xs = [], []
            for r, rank_flat in enumerate(gathered):
                start = sum(per_rank_of[r][0] * w for (_, per_rank_of), w in zip(candidates[:i], widths[:i]))
                tokens, m, n = per_rank[r][0], state.geometry.d_out, state.geometry.d_in
                Gs.append(rank_flat[start : start + tokens * m].reshape(tokens, m))
                Xs.append(rank_flat[start + tokens * m : start + tokens * (m + n)].reshape(tokens, n))
            device = state.geometry.weight.device
            out[state.name] = (torch.cat(Gs).to(device), torch.cat(Xs).to(device), rounding[i])
        return out

    def _project(self, state: LayerState, G: Tensor, X: Tensor, alpha: float, grad: Tensor) -> Tensor:
        """``P(.grad)``, ``.grad ≈ α·Gᵀ X`` (:func:`project_from_factors`); the basis moves to the factors' device."""
        basis = state.require_basis()
        if basis.device != G.device:
            basis = state.basis = basis.to(G.device)
        return project_from_factors(basis, state.options.projection, G, X, alpha, grad)  # type: ignore[arg-type]


def project_from_factors(
    basis: Basis | BlockedBasis, projection: Projection, G: Tensor, X: Tensor, alpha: float, grad: Tensor
) -> Tensor:
    """``P(grad)`` for ``grad ≈ α·Gᵀ X`` (checked by the caller) on the cheaper low-rank path, in the bases' dtype.

    The full path projects ``α·Gᵀ X`` itself; the complement path subtracts the blocked part of ``α·Gᵀ X``
    from ``grad`` (:func:`torch_crisp.low_rank.project_complement`). Either way the result differs from the
    dense ``P(grad)`` by at most ``‖grad − α·Gᵀ X‖``.
    """
    path = low_rank.choose_path(basis, projection, G.shape[0], G.device, "always")
    if isinstance(basis, Basis):
        G, X = G.to(basis.U_out.dtype) * alpha, X.to(basis.U_out.dtype)
        if path == "full":
            return low_rank.project_full(G, X, basis.U_out, basis.U_in, basis.mask)
        plan = low_rank.complement_plan(basis, projection)
        assert plan is not None and plan.banding is not None
        U_side, U_other = plan.vectors(basis.U_out, basis.U_in)
    else:  # blocked storage: the stored complement plan and its vectors
        plan, U_side, U_other = basis.projection_plan, basis.U_side, basis.U_other
        G, X = G.to(U_side.dtype) * alpha, X.to(U_side.dtype)
    banding = plan.banding
    assert banding is not None
    return low_rank.project_complement(grad, G, X, U_side, U_other, banding.kernel_bands, banding.by_columns)


def _concatenated(passes: list[tuple[Tensor, Tensor]], state: LayerState | None = None) -> tuple[Tensor, Tensor]:
    """``(G, X)`` of all passes stacked (empty ``(0, d)`` factors for none, shaped like ``state``'s)."""
    if passes:
        return torch.cat([G for G, _ in passes]), torch.cat([X for _, X in passes])
    assert state is not None
    device, dtype = state.geometry.weight.device, state.geometry.weight.dtype
    return (torch.zeros(0, state.geometry.d_out, device=device, dtype=dtype),
            torch.zeros(0, state.geometry.d_in, device=device, dtype=dtype))


def _augmented(state: LayerState, X: Tensor) -> Tensor:
    """``[X | 1]`` for a layer with a bias (the bias gradient is ``Σ_t g_t``)."""
    if not state.geometry.has_bias:
        return X
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], dim=1)


def _agreed(verified: list[tuple[LayerState, float | None]], group: distributed.Group) -> list[tuple[LayerState,
                                                                                                   float | None]]:
    """Keep a layer's ``α`` only where every rank verified it (one all-reduce of the verdicts)."""
    if not verified:
        return verified
    flags = torch.tensor([int(alpha is not None) for _, alpha in verified], dtype=torch.int64)
    flags = flags.to(distributed.comm_device(flags, group))
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    return [(state, alpha if ok else None) for (state, alpha), ok in zip(verified, flags.tolist())]

