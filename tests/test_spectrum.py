"""gamma_sweep agrees exactly with the energy rule of torch_crisp.functional."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_crisp import functional
from torch_crisp.spectrum import factor_summary, gamma_sweep, spectra_from_sums, sweep_curvature

GAMMAS = [0.3, 0.5, 0.9, 0.95, 0.99, 0.999]


def _eigs(draw, size):
    # include exact zeros and repeated values: ties are where rules disagree if they differ
    element = st.sampled_from([0.0, 0.5, 1.0, 2.0, 1e-3, 7.25]) | st.floats(0, 10)
    values = draw(st.lists(element, min_size=size, max_size=size))
    return torch.tensor(values, dtype=torch.float64)


@st.composite
def spectra(draw):
    d_out, d_in = draw(st.integers(1, 7)), draw(st.integers(1, 9))
    return _eigs(draw, d_out), _eigs(draw, d_in)


@settings(max_examples=60, deadline=None)
@given(spectra())
def test_sweep_matches_the_mask_of_the_energy_rule(pair):
    eig_out, eig_in = pair
    c = functional.curvature_grid(eig_out, eig_in)
    for point in gamma_sweep(eig_out, eig_in, GAMMAS):
        tau = functional.energy_threshold(eig_out, eig_in, point.gamma)
        mask = functional.low_curvature_mask(eig_out, eig_in, point.gamma)
        assert point.tau == tau
        assert round(point.kept_fraction * mask.numel()) == int(mask.sum())
        assert point.kept_fraction == int(mask.sum()) / mask.numel()
        total = c.sum().item()
        expected_energy = c[mask].sum().item() / total if total > 0 else 1.0
        assert math.isclose(point.kept_energy, expected_energy, rel_tol=1e-9, abs_tol=1e-12)


def test_kept_fraction_shrinks_as_gamma_grows():
    g = torch.Generator().manual_seed(0)
    eig_out, eig_in = torch.rand(20, generator=g) ** 4, torch.rand(30, generator=g) ** 4
    points = gamma_sweep(eig_out, eig_in, GAMMAS)
    kept = [p.kept_fraction for p in points]
    energy = [p.kept_energy for p in points]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    assert energy == sorted(energy, reverse=True)
    assert all(p.kept_energy <= 1 - p.gamma + 1e-12 for p in points)  # kept energy stays below 1 − γ


def test_factor_summary_and_spectra_from_sums():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 6, generator=g)
    a[:, 5] = 0.0  # a dead input feature: rank 5
    gr = torch.randn(50, 4, generator=g)
    eig_in, eig_out = spectra_from_sums(a.T @ a, gr.T @ gr, 50)
    torch.testing.assert_close(eig_in.sum(), (a.T @ a / 50).trace())
    summary = factor_summary(eig_in)
    assert summary.size == 6 and summary.numerical_rank == 5
    assert 1 <= summary.rank_90 <= 5
    assert summary.max == eig_in.max().item() and summary.min == 0.0
    assert factor_summary(torch.zeros(3)).rank_90 == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1e-3, 0.5, 1.0, 3.0]) | st.floats(0, 5), min_size=1, max_size=30))
def test_sweep_of_arbitrary_curvature_matches_threshold_from_curvature(values):
    c = torch.tensor(values, dtype=torch.float32)  # e.g. λ_in (activations) or EK-FAC's corrected c
    for point in sweep_curvature(c, GAMMAS):
        tau = functional.threshold_from_curvature(c, point.gamma)
        assert point.tau == tau
        assert point.kept_fraction == int((c.double() < tau).sum()) / c.numel()
