"""LoRA layers: keep the trained change ``ΔW = scaling · B A`` inside the kept subspace.

A LoRA-wrapped layer (peft's ``lora.Linear``, detected by duck typing: a projectable
``base_layer`` plus ``lora_A`` / ``lora_B`` module dicts and a ``scaling`` dict; peft is never
imported) computes ``z = W a + b + Σ_adapters scaling · B (A a)`` with ``A`` of shape
``(rank, d_in)`` and ``B`` of shape ``(d_out, rank)``. Curvature is captured on the base layer (its
input is the wrapper's input and, since the LoRA branch is added, the gradient at its output is
the gradient at the wrapper's output), so the eigenbases and mask ``M`` are those of the frozen
``W``.

Why the gradients of ``A`` and ``B`` cannot simply be projected with ``P``: ``P`` acts on
``(d_out, d_in)`` matrices, and ``B A`` is a product. The kept set ``M`` is in general not a product
``R × C`` of an output set and an input set, so no pair of constraints "``B``'s columns in one
subspace, ``A``'s rows in another" reproduces ``P`` exactly. What *is* exact is a kept
**rectangle** ``R × C ⊆ M``: if ``B``'s columns lie in ``span U_out[:, R]`` and ``A``'s rows in
``span U_in[:, C]`` then ``U_outᵀ (B A) U_in`` is zero outside ``R × C`` and therefore outside the
blocked set, whatever ``B`` and ``A`` are. Because the constraints are linear subspaces of the
parameters, projecting the parameters themselves after every optimizer step (and their
gradients before it) keeps them there for any optimizer — Adam's rescaling, momentum and weight
decay included — and the projection of ``A``'s random initialisation happens once, when the
basis is computed.

Choosing the rectangle: sort the output directions by how many input directions they keep; the
best rectangle with ``r`` rows uses the ``r`` most permissive rows and the input directions kept
by all of them. For K-FAC (``c_ij = λ_out_i λ_in_j``) the kept sets of the rows are nested, the
mask is a staircase and this scan finds the largest rectangle exactly; for other masks it gives a
valid (always ``⊆ M``) rectangle. The price compared with full-weight projection is
``|R|·|C| / |M|`` — :attr:`LoraRectangle.kept_fraction` reports it.

With a base-layer bias, ``U_in`` lives in the bias-augmented input space ``[a, 1]`` while LoRA
cannot change the bias: the usable input subspace is ``span U_in[:, C] ∩ {bias coordinate = 0}``,
one dimension smaller in general.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .basis import Basis
from .layers import is_lora_layer, is_tuner_layer

__all__ = [
    "LoraLayer",
    "LoraRectangle",
    "check_peft_model",
    "find_lora_layers",
    "kept_rectangle",
    "rectangle_bases",
    "reproject_after_basis_change",
]


# ----------------------------------------------------------------------------- configuration
def _peft_type_name(config: object) -> str:
    peft_type = getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type))


def check_peft_model(model: nn.Module) -> None:
    """Raise ``ValueError`` for peft configurations whose training the projection cannot constrain.

    Only plain LoRA is supported: DoRA rescales the whole weight, LoRA biases and ``bias="all"`` /
    ``"lora_only"`` train biases outside ``B A``, and other peft methods (IA³, LoHa, prompt
    tuning, ...) change the model in ways that are not a low-rank ``ΔW`` of the target layers.
    Models without a ``peft_config`` attribute pass unchecked.
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        return
    for adapter, config in configs.items():
        kind = _peft_type_name(config)
        if kind.upper() != "LORA":
            raise ValueError(
                f"peft adapter {adapter!r} uses {kind}; torch_crisp constrains only LoRA adapters (and full "
                "fine-tuning). Use peft.LoraConfig, or train the target layers directly with CrispOptimizer"
            )
        if getattr(config, "use_dora", False):
            raise ValueError(
                f"peft adapter {adapter!r} uses DoRA (use_dora=True), whose magnitude vector rescales the whole "
                "weight outside the low-curvature subspace; use plain LoRA (use_dora=False)"
            )
        if getattr(config, "lora_bias", False):
            raise ValueError(
                f"peft adapter {adapter!r} has lora_bias=True; a LoRA bias changes the layer outside B·A and is "
                "not constrained; use lora_bias=False"
            )
        bias = getattr(config, "bias", "none")
        if bias not in (None, "none"):
            raise ValueError(
                f"peft adapter {adapter!r} has bias={bias!r}, which trains the base layers' biases without any "
                "capability constraint; use bias='none' (or add those layers to target_modules and fine-tune "
                "them fully with CrispOptimizer)"
            )


# ----------------------------------------------------------------------------- pure math
def kept_rectangle(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices ``(R, C)`` of a large all-True rectangle ``R × C`` of ``mask``.

    Rows are taken in decreasing order of their kept count; after ``r`` rows the usable columns
    are those kept by all of them (a running AND), and the ``r`` maximising ``r · |C|`` wins. Exact
    (the largest rectangle) when the rows' kept sets are nested, as for K-FAC masks; always
    returns ``R × C ⊆ mask``. Both index tensors are sorted and empty when ``mask`` has no True.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    counts = mask.sum(dim=1)
    order = torch.argsort(counts, descending=True, stable=True)
    # running[k, j] = all(mask[order[:k + 1], j]); the cumulative minimum of 0/1 is a running AND.
    running = torch.cummin(mask[order].to(torch.uint8), dim=0).values
    areas = running.sum(dim=1, dtype=torch.int64) * torch.arange(1, mask.shape[0] + 1, device=mask.device)
    best = int(torch.argmax(areas).item())
    if int(areas[best].item()) == 0:
        empty = torch.empty(0, dtype=torch.long, device=mask.device)
        return empty, empty.clone()
    rows = torch.sort(order[: best + 1]).values
    cols = torch.nonzero(running[best].to(torch.bool)).flatten()
    return rows, cols


def rectangle_bases(U_out: Tensor, U_in: Tensor, rows: Tensor, cols: Tensor, d_in: int) -> tuple[Tensor, Tensor]:
    """Orthonormal bases of the column space allowed to ``B`` and the row space allowed to ``A``.

    Returns ``(out_basis, in_basis)`` with ``out_basis = U_out[:, R]`` of shape ``(d_out, |R|)`` and
    ``in_basis`` of shape ``(d_in, k)``. Without a bias (``U_in`` is ``d_in × d_in``) ``in_basis`` is
    ``U_in[:, C]``. With a bias (``U_in`` is ``(d_in + 1) × (d_in + 1)``, last coordinate = bias) it
    spans ``{v : [v, 0] ∈ span U_in[:, C]}``: vectors of ``span U_in[:, C]`` with a zero bias
    coordinate, since LoRA's ``A`` cannot act on the constant input.
    """
    out_basis = U_out[:, rows]
    selected = U_in[:, cols]
    if U_in.shape[0] == d_in:
        return out_basis, selected
    if U_in.shape[0] != d_in + 1:
        raise ValueError(f"U_in has {U_in.shape[0]} rows; expected d_in={d_in} or d_in + 1 with a bias")
    if selected.shape[1] == 0:
        return out_basis, selected[:d_in]
    # Combinations y of the selected eigenvectors with zero bias coordinate: y ⊥ w, where w is the
    # bias row of the selected block; if w vanishes nothing is lost.
    w = selected[d_in].to(torch.float64)
    if float(w.norm()) <= 1e-12:
        return out_basis, selected[:d_in]
    combined = _complement_combinations(selected.to(torch.float64), w)
    return out_basis, combined[:d_in].to(U_in.dtype)


def _complement_combinations(vectors: Tensor, w: Tensor) -> Tensor:
    """``vectors @ H[:, 1:]`` for the Householder reflection ``H`` that maps ``w / ‖w‖`` to ``±e_1``.

    ``H`` is symmetric and orthogonal, so its columns beyond the first (``H e_1 = ±w/‖w‖``) are an
    orthonormal basis of ``w``'s orthogonal complement; orthonormal columns of ``vectors`` stay
    orthonormal. With ``v = w/‖w‖`` and ``u = v + sign(v_1) e_1`` (no cancellation: ``‖u‖² ≥ 2``),
    ``H = I − 2 u uᵀ / ‖u‖²`` and ``vectors @ H[:, 1:] = vectors[:, 1:] − (vectors u)(2/‖u‖²) u[1:]ᵀ``:
    ``O(rows · n)`` instead of the ``O(n³)`` full SVD of the ``1 × n`` matrix ``w``.
    """
    u = w / w.norm()
    u[0] += 1.0 if u[0] >= 0 else -1.0
    scale = 2.0 / float(u @ u)
    return vectors[:, 1:] - (vectors @ u).unsqueeze(1) * (scale * u[1:]).unsqueeze(0)


# ----------------------------------------------------------------------------- state
@dataclass(frozen=True)
class LoraRectangle:
    """The kept rectangle of one layer and the subspaces it allows to ``B`` and ``A``."""

    rows: Tensor  # R: indices into U_out's columns
    cols: Tensor  # C: indices into U_in's columns
    out_basis: Tensor  # (d_out, |R|) orthonormal: B's columns stay in its span
    in_basis: Tensor  # (d_in, k) orthonormal: A's rows stay in its span
    kept_fraction: float  # |R|·k / |M|: share of the full-weight kept subspace LoRA can reach

    @property
    def is_empty(self) -> bool:
        return self.out_basis.shape[1] == 0 or self.in_basis.shape[1] == 0


class LoraLayer:
    """One LoRA wrapper whose adapters are constrained to the kept rectangle of its base layer.

    Args:
        name: the wrapper's module name (the projected layer's name in the projector).
        wrapper: the LoRA wrapper module (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``).
        d_in: the base layer's input width (without the bias coordinate).
    """

    def __init__(self, name: str, wrapper: nn.Module, d_in: int) -> None:
        if not is_lora_layer(wrapper):
            raise TypeError(f"{name!r} ({type(wrapper).__name__}) is not a LoRA layer")
        self.name = name
        self.wrapper = wrapper
        self.d_in = d_in
        self._basis_key: object | None = None  # the Basis the cached rectangle belongs to
        self._rectangle: LoraRectangle | None = None
        self._check_supported()

    def _check_supported(self) -> None:
        use_dora = getattr(self.wrapper, "use_dora", {})
        if isinstance(use_dora, Mapping) and any(use_dora.values()):
            raise ValueError(f"layer {self.name!r} uses DoRA; only plain LoRA can be constrained (use_dora=False)")
        for adapter, _, B in self.adapters():
            if getattr(B, "bias", None) is not None:
                raise ValueError(
                    f"layer {self.name!r}, adapter {adapter!r}: lora_B has a bias (lora_bias=True), which changes "
                    "the layer outside B·A; use lora_bias=False"
                )

    def adapters(self) -> list[tuple[str, nn.Module, nn.Module]]:
        """``(adapter name, lora_A[name], lora_B[name])`` for every adapter of the wrapper."""
        lora_A, lora_B = self.wrapper.lora_A, self.wrapper.lora_B  # type: ignore[union-attr]
        return [(key, lora_A[key], lora_B[key]) for key in lora_A.keys() if key in lora_B]

    def parameters(self) -> list[Tensor]:
        """The adapters' ``A`` and ``B`` weights (the parameters this layer constrains)."""
        return [p for _, A, B in self.adapters() for p in (A.weight, B.weight)]

    def delta_weight(self) -> Tensor:
        """``ΔW = Σ_adapters scaling · B A`` of shape ``(d_out, d_in)`` in float32."""
        scaling = self.wrapper.scaling  # type: ignore[union-attr]
        total: Tensor | None = None
        for key, A, B in self.adapters():
            term = float(scaling[key]) * (B.weight.detach().float() @ A.weight.detach().float())
            total = term if total is None else total + term
        if total is None:
            raise RuntimeError(f"layer {self.name!r} has no LoRA adapters")
        return total

    def rectangle(self, basis: Basis) -> LoraRectangle:
        """The kept rectangle of ``basis`` , cached per basis.

        Bases are immutable (a new mask means a new ``Basis``), so the basis' identity is the key.
        """
        if self._rectangle is None or self._basis_key is not basis:
            rows, cols = kept_rectangle(basis.mask)
            out_basis, in_basis = rectangle_bases(basis.U_out, basis.U_in, rows, cols, self.d_in)
            kept_total = int(basis.mask.sum().item())
            fraction = out_basis.shape[1] * in_basis.shape[1] / kept_total if kept_total else 0.0
            self._rectangle = LoraRectangle(rows, cols, out_basis.contiguous(), in_basis.contiguous(), fraction)
            self._basis_key = basis
            if self._rectangle.is_empty:
                warnings.warn(
                    f"layer {self.name!r}: the kept set contains no usable rectangle, so its LoRA adapters are held "
                    "at ΔW = 0 (they cannot change the layer); lower gamma to keep more directions",
                    stacklevel=3,
                )
        return self._rectangle

    def constrained_pairs(self) -> list[tuple[Tensor, bool]]:
        """``(parameter, column_side)`` of every adapter: ``B`` (columns constrained), ``A`` (rows)."""
        return [(param, column_side) for _, A, B in self.adapters() for param, column_side in
                ((B.weight, True), (A.weight, False))]

    def project_like_(self, basis: Basis, tensor: Tensor, column_side: bool) -> Tensor:
        """Project a tensor shaped like ``B`` (``column_side``) or ``A`` onto its subspace, in place.

        ``B``-shaped tensors have their columns projected onto ``span U_out[:, R]``, ``A``-shaped
        ones their rows onto the allowed span of ``U_in[:, C]``: the orthogonal projection onto the
        constraint subspace of the parameters. The same map serves parameters, gradients and
        first moments of the optimizer. Returns ``tensor``.
        """
        rect = self.rectangle(basis)
        U = (rect.out_basis if column_side else rect.in_basis).to(tensor.device)
        m = tensor.to(U.dtype)
        projected = U @ (U.mT @ m) if column_side else (m @ U) @ U.mT
        return tensor.copy_(projected.to(tensor.dtype))

    @torch.no_grad()
    def project_grads_(self, basis: Basis) -> tuple[float, float]:
        """Project the adapters' gradients onto the rectangle's subspaces, in place.

        ``∂B ← P_R ∂B`` (columns), ``∂A ← ∂A P_C`` (rows). Returns ``(‖g‖², ‖g − P g‖²)`` summed over
        the adapters, for the removed-fraction statistic.
        """
        total = removed = 0.0
        for param, column_side in self.constrained_pairs():
            grad = param.grad
            if grad is None:
                continue
            g_sq = float(grad.float().square().sum())
            p_sq = float(self.project_like_(basis, grad, column_side).float().square().sum())
            total += g_sq
            removed += max(g_sq - p_sq, 0.0)
        return total, removed

    @torch.no_grad()
    def project_parameters_(self, basis: Basis) -> None:
        """Project ``B``'s columns and ``A``'s rows onto the rectangle's subspaces, in place.

        Afterwards ``U_outᵀ (B A) U_in`` vanishes outside ``R × C`` (up to rounding of the
        parameters' dtype). Idempotent; cheap (``O((d_in + d_out) · rank · k)``).
        """
        for param, column_side in self.constrained_pairs():
            self.project_like_(basis, param, column_side)


def find_lora_layers(model: nn.Module, names_and_d_in: Mapping[str, int]) -> dict[str, LoraLayer]:
    """The LoRA wrappers among the projected layers, keyed by name.

    Raises ``ValueError`` when a projected layer is wrapped by a non-LoRA peft tuner.
    """
    found: dict[str, LoraLayer] = {}
    for name, d_in in names_and_d_in.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if is_lora_layer(module):
            found[name] = LoraLayer(name, module, d_in)
        elif is_tuner_layer(module):
            raise ValueError(
                f"layer {name!r} is wrapped by {type(module).__name__}, a peft method other than LoRA; "
                "torch_crisp can constrain only LoRA adapters (peft.LoraConfig) or fully trained layers"
            )
    return found


@torch.no_grad()
def reproject_after_basis_change(lora_layers: Mapping[str, LoraLayer], bases: Mapping[str, Basis | None]) -> None:
    """Project every LoRA layer into the kept rectangle of its (new) basis, warning on lost changes.

    At the first basis ``B = 0``, so projecting ``A``'s initialisation does not change the model.
    If adapters were already trained (e.g. a new editing round recomputed the basis), the part
    of their ``ΔW`` outside the new rectangle is removed; the warning says how to keep it.
    """
    changed = []
    for name, lora_layer in lora_layers.items():
        basis = bases.get(name)
        if basis is None:
            continue
        before = lora_layer.delta_weight()
        lora_layer.project_parameters_(basis)
        norm = float(before.norm())
        if norm > 0 and float((lora_layer.delta_weight() - before).norm()) > 1e-4 * norm:
            changed.append(name)
    if changed:
        warnings.warn(
            f"recomputing the basis moved the trained LoRA change of {changed} out of the new kept rectangle, "
            "and projecting the adapters removed that part of it. To keep earlier edits when the basis changes "
            "(sequential editing), merge the adapters first (peft: model.merge_and_unload(), then new adapters)",
            stacklevel=3,
        )
