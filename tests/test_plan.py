"""The projection plan (torch_crisp.plan): every path equals functional.project, the reference.

Checked on K-FAC staircases, activation-only masks and irregular (EK-FAC-like) masks, with random
and power-law ("trained") spectra, with and without a bias column, in float64 (the algebra: equal
to 1e-10) and in float32 against a float64 reference (rounding: ≤ 1e-5 relative). Also: the
staircase is read in the bases' ascending order, ``auto`` never costs more than the full path,
blocked-only storage keeps what it should and refuses what it cannot do.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_crisp import CrispConfig, CrispProjector, functional
from torch_crisp import curvature as curvature_models
from torch_crisp.basis import Basis, BlockedBasis
from torch_crisp.config import ProjectionOptions
from torch_crisp.layers import LinearGeometry
from torch_crisp.plan import full_flops, plan_projection
from torch_crisp.plan_report import format_plan_report, plan_report, spectrum_plan_rows
from torch_crisp.state import LayerState

PATHS = ("auto", "full", "complement")


def orthogonal(d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def power_law(d: int, exponent: float) -> torch.Tensor:
    """Eigenvalues ``k^-exponent``, ascending as eigh returns them."""
    return torch.arange(1, d + 1, dtype=torch.float64).pow(-exponent).flip(0)


def irregular_mask(eig_out: torch.Tensor, eig_in: torch.Tensor, gamma: float, seed: int) -> torch.Tensor:
    """EK-FAC-like: the energy rule on K-FAC's grid times random per-entry factors (not a staircase)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(eig_out.numel(), eig_in.numel(), generator=g, dtype=torch.float64) * 4
    return curvature_models.corrected_mask(torch.outer(eig_out, eig_in) * noise, gamma)[0]


def mask_of(kind: str, eig_out: torch.Tensor, eig_in: torch.Tensor, gamma: float, seed: int) -> torch.Tensor:
    if kind == "kfac":
        return functional.low_curvature_mask(eig_out, eig_in, gamma)
    if kind == "activations":
        return curvature_models.activation_mask(eig_in, eig_out.numel(), gamma)[0]
    return irregular_mask(eig_out, eig_in, gamma, seed)


@st.composite
def spectrum(draw, d: int) -> torch.Tensor:
    if draw(st.booleans()):  # "trained": a power law, possibly with a null space
        values = power_law(d, draw(st.floats(0.5, 3.0)))
        values[: draw(st.integers(0, d - 1))] = 0.0
        return values
    raw = draw(st.lists(st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-6, 1e3)), min_size=d, max_size=d))
    return torch.sort(torch.tensor(raw, dtype=torch.float64)).values


@st.composite
def problem(draw):
    d_out, d_in = draw(st.integers(1, 24)), draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["kfac", "activations", "irregular"]))
    seed = draw(st.integers(0, 2**16))
    gamma = draw(st.floats(0.05, 0.999))
    mask = mask_of(kind, draw(spectrum(d_out)), draw(spectrum(d_in)), gamma, seed)
    Q = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return orthogonal(d_out, seed), orthogonal(d_in, seed + 1), mask, Q


def relative_error(result: torch.Tensor, reference: torch.Tensor, Q: torch.Tensor) -> float:
    # relative to the result, but not below 10 % of ‖Q‖: float32 rounding of a rotation is of order
    # ε‖Q‖, so when nearly everything is blocked (a tiny or zero result) the complement path's
    # Q − (blocked part) keeps ~1e-7‖Q‖ (the full path multiplies it by exact zeros)
    return float((result.double() - reference).norm() / max(reference.norm(), 0.1 * Q.norm()))


@settings(max_examples=120, deadline=None, derandomize=True)
@given(problem())
def test_every_path_equals_the_reference_projection(p):
    U_out, U_in, mask, Q = p
    reference = functional.project(Q, U_out, U_in, mask)
    for path in PATHS:
        plan = plan_projection(mask, path)
        assert plan.path == ("full" if path == "full" else plan.path)
        tolerance = 1e-10 * (1 + Q.norm().item())
        assert torch.allclose(plan.apply(Q, U_out, U_in, mask), reference, atol=tolerance)
        if plan.path == "complement":
            assert torch.allclose(plan.apply_reduced(Q, *plan.vectors(U_out, U_in)), reference, atol=tolerance)
        assert plan.relative_time <= 1.0 or path == "complement"
    U_out32, U_in32, Q32 = U_out.float(), U_in.float(), Q.float()
    for path in ("auto", "complement"):
        assert relative_error(plan_projection(mask, path).apply(Q32, U_out32, U_in32, mask), reference, Q) <= 1e-5


@pytest.mark.parametrize("kind", ["kfac", "activations", "irregular"])
@pytest.mark.parametrize("shape", [(96, 384), (384, 96)])
def test_float32_paths_on_trained_spectra_match_to_rounding(kind, shape):
    d_out, d_in = shape
    eig_out, eig_in = power_law(d_out, 1.5), power_law(d_in, 1.5)
    U_out, U_in = orthogonal(d_out, 1), orthogonal(d_in, 2)
    g = torch.Generator().manual_seed(3)
    # a gradient mostly in the blocked (high-curvature) directions, as real edit gradients are
    scale = torch.outer(eig_out, eig_in).sqrt()
    Q = U_out @ (torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * scale) @ U_in.mT
    for gamma in (0.9, 0.99, 0.995):
        mask = mask_of(kind, eig_out, eig_in, gamma, seed=4)
        reference = functional.project(Q, U_out, U_in, mask)
        for path in PATHS:
            result = plan_projection(mask, path).apply(Q.float(), U_out.float(), U_in.float(), mask)
            assert relative_error(result, reference, Q) <= 1e-5


def test_the_staircase_is_read_in_the_ascending_order_of_eigh():
    eig_out, eig_in = power_law(512, 1.5), power_law(2048, 1.5)
    mask = functional.low_curvature_mask(eig_out, eig_in, 0.9)
    plan = plan_projection(mask)
    # the numbers of the issue: r ≈ 325, f ≈ 0.2 %, ≈ 0.13 of the floor
    assert (plan.blocked_rows, plan.max_blocked_per_row) == (325, 325)
    assert 0.0015 < plan.blocked_fraction < 0.0025 and 0.11 < plan.flop_ratio < 0.14
    blocked = ~mask
    J = blocked.sum(dim=1)
    assert torch.all(J[1:] >= J[:-1])  # ascending eigenvalues: J grows down the rows
    assert torch.equal(blocked[-1, -int(J[-1]):], torch.ones(int(J[-1]), dtype=torch.bool))  # the largest λ_in
    # contiguous ranges of the bases: views, no gathers
    assert plan.banding is not None and isinstance(plan.banding.side, slice) and isinstance(plan.banding.other, slice)
    assert plan.banding.side == slice(512 - 325, 512) or plan.banding.side == slice(2048 - 325, 2048)
    assert all(isinstance(b.other, (slice, type(None))) for b in plan.banding.bands)


def test_auto_takes_the_full_path_where_the_complement_saves_nothing():
    scattered = plan_projection(torch.rand(64, 96, generator=torch.Generator().manual_seed(0)) > 0.5)
    assert scattered.path == "full" and scattered.flop_ratio == 1.0 and scattered.complement_flops >= 4 * 64 * 96 * 160
    nearly_flat = torch.linspace(1.0, 1.1, 64, dtype=torch.float64), torch.linspace(1.0, 1.1, 96, dtype=torch.float64)
    assert plan_projection(functional.low_curvature_mask(*nearly_flat, 0.99)).flop_ratio > 0.9


def test_the_identity_when_nothing_is_blocked_and_zero_when_everything_is():
    U_out, U_in, Q = orthogonal(8, 0), orthogonal(12, 1), torch.randn(8, 12, dtype=torch.float64)
    everything_kept = plan_projection(torch.ones(8, 12, dtype=torch.bool))
    assert everything_kept.path == "complement" and everything_kept.flops == 0
    result = everything_kept.apply(Q, U_out, U_in, torch.ones(8, 12, dtype=torch.bool))
    assert torch.equal(result, Q) and result.data_ptr() != Q.data_ptr()
    nothing_kept = torch.zeros(8, 12, dtype=torch.bool)
    plan = plan_projection(nothing_kept, "complement")
    assert plan.banding is not None and plan.banding.other_count == 0  # one band spanning every column
    assert plan.apply(Q, U_out, U_in, nothing_kept).abs().max() < 1e-12


def test_activation_masks_need_no_output_basis():
    eig_in = power_law(400, 1.0)
    mask = curvature_models.activation_mask(eig_in, 96, 0.9)[0]
    plan = plan_projection(mask)
    assert plan.path == "complement" and plan.banding.by_columns and plan.banding.other_count == 0
    blocked_inputs = int((~mask[0]).sum())
    assert plan.reduced_floats() == blocked_inputs * 400  # U_in[:, C] only: P(Q) = Q − Q U_C U_Cᵀ
    assert plan.flops == 4.0 * blocked_inputs * 96 * 400


def test_batched_and_bf16_gradients():
    eig_out, eig_in = power_law(16, 1.5), power_law(48, 1.5)
    mask = functional.low_curvature_mask(eig_out, eig_in, 0.9)
    U_out, U_in = orthogonal(16, 0, torch.float32), orthogonal(48, 1, torch.float32)
    Q = torch.randn(3, 16, 48)
    plan = plan_projection(mask, "complement")
    assert torch.allclose(plan.apply(Q, U_out, U_in, mask), functional.project(Q, U_out, U_in, mask), atol=1e-5)
    out = plan.apply(Q[0].bfloat16(), U_out, U_in, mask)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), functional.project(Q[0].bfloat16(), U_out, U_in, mask).float(), atol=2e-2)


def _state(d_out: int, d_in: int, bias: bool, options: ProjectionOptions, seed: int = 0) -> LayerState:
    torch.manual_seed(seed)
    state = LayerState("layer", LinearGeometry.of(nn.Linear(d_in, d_out, bias=bias)), torch.float32, options)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(200, d_in, generator=g) * torch.logspace(0, -3, d_in)
    out = torch.randn(200, d_out, generator=g) * torch.logspace(0, -2, d_out)
    state.accumulate(a, out)
    return state


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("projection", ["auto", "complement"])
def test_blocked_storage_projects_like_the_full_basis(bias, projection):
    # large enough for the complement path to beat the full one's fixed cost (auto keeps tiny layers full)
    full = _state(96, 240, bias, ProjectionOptions(projection="full"))
    blocked = _state(96, 240, bias, ProjectionOptions(projection, basis_storage="blocked"))
    full.compute_basis(0.9)
    stored = blocked.compute_basis(0.9)
    assert isinstance(full.basis, Basis) and isinstance(stored, BlockedBasis)
    Q = torch.randn(2, 96, 240 + bias)
    assert torch.allclose(blocked.project(Q), full.project(Q), atol=1e-5)
    plan = stored.plan()
    assert stored.kept_fraction == pytest.approx(full.basis.kept_fraction)
    assert stored.shape == full.basis.shape == (96, 240 + bias)
    vectors = stored.U_side.numel() + (0 if stored.U_other is None else stored.U_other.numel())
    assert vectors == plan.reduced_floats() < 0.5 * (96 * 96 + (240 + bias) ** 2)
    for name in ("U_in", "U_out", "mask"):
        with pytest.raises(ValueError, match="basis_storage='full'"):
            getattr(stored, name)
    with pytest.raises(ValueError, match="EK-FAC"):
        stored.with_corrected_curvature(torch.ones(96, 240 + bias), 0.9)


def test_ekfac_keeps_the_full_basis_until_its_correction():
    state = _state(64, 240, False, ProjectionOptions(basis_storage="blocked"))
    state.compute_basis(0.9, curvature="ekfac")
    assert isinstance(state.basis, Basis)  # the second pass rotates into the full basis
    g = torch.Generator().manual_seed(5)
    # per-example gradients with K-FAC-like decaying scales, so the corrected mask is nearly a staircase
    inputs = torch.randn(5, 4, 240, generator=g) * torch.logspace(0, -3, 240)
    grads = torch.randn(5, 4, 64, generator=g) * torch.logspace(0, -2, 64)
    state.accumulate_correction(inputs, grads)
    state.apply_correction(0.9)
    assert isinstance(state.basis, BlockedBasis) and state.basis.curvature == "ekfac"
    with pytest.raises(ValueError, match="U_in"):
        state.accumulate_correction(inputs, grads)


def test_offloaded_accumulation_equals_the_in_place_one():
    a, g = torch.randn(50, 20), torch.randn(50, 8)
    a[3, 0] = math.nan  # rejected whole, as in accumulate
    states = [_state(8, 20, True, ProjectionOptions(offload_factors=offload)) for offload in (False, True)]
    states[0].accumulate(a, g, weight=2.0)
    states[1]._accumulate_elsewhere(a, g, 2.0)  # what accumulate does when the sums live on another device
    for state in states:
        state.settle_rejections()
    assert states[0].token_count == states[1].token_count == 200
    assert torch.allclose(states[0].A_sum, states[1].A_sum) and torch.allclose(states[0].S_sum, states[1].S_sum)
    assert states[1].A_sum.device.type == "cpu"


def test_config_refuses_what_blocked_storage_cannot_do():
    with pytest.raises(ValueError, match="projection='full'"):
        CrispConfig(basis_storage="blocked", projection="full")
    with pytest.raises(ValueError, match="capability_budget"):
        CrispConfig(basis_storage="blocked", capability_budget=0.1)
    with pytest.raises(ValueError, match="projection must be one of"):
        CrispConfig(projection="fast")
    with pytest.raises(ValueError, match="offload_factors"):
        CrispConfig(offload_factors="yes")
    options = CrispConfig(basis_storage="blocked", offload_factors=True).projection_options
    assert options == ProjectionOptions("auto", "blocked", True)
    with pytest.raises(ValueError, match="mode='update' need the full eigenbases"):
        options.require_full_bases("mode='update'")
    ProjectionOptions().require_full_bases("LoRA adapters")  # full storage: nothing to refuse


def test_projector_gradients_and_report_on_a_tiny_llama(llama, lm_batches):
    projectors = {}
    for storage in ("full", "blocked"):
        # a tiny model: "auto" would keep every layer on the full path, so the complement is forced
        config = CrispConfig(target_modules="all-linear", gamma=0.9, basis_storage=storage, projection="complement")
        projector = CrispProjector(llama, config)
        projector.collect(lm_batches, progress=False)
        projectors[storage] = projector
    for name, state in projectors["full"].layers.items():
        Q = torch.randn(state.geometry.d_out, state.geometry.d_in_augmented)
        reference = functional.project(Q, state.basis.U_out, state.basis.U_in, state.basis.mask)
        assert relative_error(projectors["blocked"].project(name, Q), reference.double(), Q) <= 1e-5
    assert any(isinstance(s.basis, BlockedBasis) for s in projectors["blocked"].layers.values())
    rows = plan_report(projectors["blocked"].layers, (None, 0.99), projection="complement")
    assert len(rows) == 2 * len(projectors["blocked"].layers)
    for row in rows:
        assert row.path == "complement" and row.flop_ratio == row.complement_ratio and row.bands >= 1
        bases = 4 * (row.d_out**2 + row.d_in**2)
        full_storage = bases + 4 * (row.d_out + row.d_in) + row.d_out * row.d_in  # never more than that
        assert 0.0 <= row.blocked_fraction <= 1.0 and row.resident_ratio <= full_storage / bases
        assert row.blocked_rows <= row.d_out and row.max_blocked_per_row <= row.d_in
    assert all(r.relative_time <= 1.0 for r in plan_report(projectors["blocked"].layers, (0.9,)))  # auto
    for name, state in list(projectors["full"].layers.items())[:3]:  # model-free, as inspect reads a folder
        basis = state.basis
        from_spectra = spectrum_plan_rows(name, basis.eig_out, basis.eig_in, [0.99], projection="complement")
        assert from_spectra == [r for r in rows if r.layer == name and r.gamma == 0.99]
    at_basis = [r for r in rows if r.gamma is None]
    kept = projectors["blocked"].kept_fraction()
    assert all(r.blocked_fraction == pytest.approx(1 - kept[r.layer]) for r in at_basis)
    assert "J(0)" in format_plan_report(rows)


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_training_with_blocked_storage_equals_full_storage(mode, lm_batches):
    from tiny_models import lm_batch, tiny_llama

    from torch_crisp import CrispOptimizer

    weights = {}
    for storage in ("full", "blocked"):
        model = tiny_llama()
        for name, p in model.named_parameters():
            p.requires_grad_("down_proj" in name)
        config = CrispConfig(target_modules=["down_proj"], gamma=0.9, basis_storage=storage, projection="complement",
                             offload_factors=storage == "blocked")
        projector = CrispProjector(model, config).collect(lm_batches, progress=False)
        optimizer = CrispOptimizer(torch.optim.AdamW(projector.projected_parameters(), lr=1e-2), projector, mode=mode)
        for step in range(3):
            model(**lm_batch(30 + step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[storage] = [s.geometry.weight.detach().clone() for s in projector.layers.values()]
        if storage == "blocked":
            assert all(isinstance(s.basis, BlockedBasis) for s in projector.layers.values())
            assert all(s.A_sum.device.type == "cpu" for s in projector.layers.values())
    for full, blocked in zip(weights["full"], weights["blocked"]):
        assert torch.allclose(full, blocked, atol=1e-5)


def test_full_flops_is_the_floor_of_four_products():
    assert full_flops(4096, 14336) == 4 * 4096 * 14336 * (4096 + 14336)
