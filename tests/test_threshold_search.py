"""The sort-free energy threshold returns exactly the τ of the literal definition (sort + cumsum).

``functional.energy_threshold`` switches to ``_kfac_threshold_by_search`` for grids larger than
``_SEARCH_MIN_GRID``; these tests call the search directly on small spectra of every awkward kind
(ties, zeros, all-zero rows, integer values whose prefix sums hit ``γ·Σc`` exactly, float32 input,
heavy decay) and compare with ``threshold_from_curvature(curvature_grid(...))``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_crisp import functional
from torch_crisp.functional import _kfac_threshold_by_search


def reference(eig_out: torch.Tensor, eig_in: torch.Tensor, gamma: float) -> float:
    return functional.threshold_from_curvature(functional.curvature_grid(eig_out, eig_in), gamma)


def same(a: float, b: float) -> bool:
    return a == b or (math.isinf(a) and math.isinf(b))


values = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False, width=64),
    st.integers(0, 3).map(float),  # exact sums: prefixes can equal γ·Σc exactly
    st.sampled_from([0.0, 0.1, 0.5, 1e-12, 1e-300, 2.0]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(values, min_size=1, max_size=12),
    st.lists(values, min_size=1, max_size=15),
    st.one_of(st.floats(0.01, 0.99), st.sampled_from([0.5, 0.25, 0.75, 0.9, 0.99])),
)
def test_search_matches_the_sorted_definition(out_values, in_values, gamma):
    eig_out = torch.tensor(out_values, dtype=torch.float64)
    eig_in = torch.tensor(in_values, dtype=torch.float64)
    assert same(_kfac_threshold_by_search(eig_out, eig_in, gamma), reference(eig_out, eig_in, gamma))


@pytest.mark.parametrize("seed", range(40))
def test_search_matches_on_random_spectra_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))
    kind = seed % 4
    if kind == 0:  # repeated values (rounded), zeros included
        eig_out = torch.rand(d_out, generator=g, dtype=torch.float64).round(decimals=1)
        eig_in = torch.rand(d_in, generator=g, dtype=torch.float64).round(decimals=1)
    elif kind == 1:  # heavy decay, like real factor spectra
        eig_out = torch.rand(d_out, generator=g, dtype=torch.float64) ** 8
        eig_in = torch.rand(d_in, generator=g, dtype=torch.float64) ** 8
    elif kind == 2:  # float32 eigenvalues, as update_basis produces them
        eig_out, eig_in = torch.rand(d_out, generator=g), torch.rand(d_in, generator=g)
    else:  # unsorted, with many exact ties
        eig_out = torch.randint(0, 4, (d_out,), generator=g).double()
        eig_in = torch.randint(0, 4, (d_in,), generator=g).double()
    for gamma in (0.1, 0.5, 0.9, 0.99, float(torch.rand(1, generator=g).clamp(0.01, 0.99))):
        assert same(_kfac_threshold_by_search(eig_out, eig_in, gamma), reference(eig_out, eig_in, gamma))


def test_energy_threshold_uses_the_search_above_the_switch_and_agrees():
    g = torch.Generator().manual_seed(7)
    d_out, d_in = 300, 600  # 180 000 entries > _SEARCH_MIN_GRID
    assert d_out * d_in > functional._SEARCH_MIN_GRID
    eig_out = torch.rand(d_out, generator=g) ** 6
    eig_in = torch.rand(d_in, generator=g) ** 6
    for gamma in (0.5, 0.9, 0.999):
        tau = functional.energy_threshold(eig_out, eig_in, gamma)
        assert tau == reference(eig_out, eig_in, gamma)
        mask = functional.low_curvature_mask(eig_out, eig_in, gamma)
        assert torch.equal(mask, functional.curvature_grid(eig_out, eig_in) < tau)


def test_all_zero_curvature_keeps_everything():
    assert math.isinf(_kfac_threshold_by_search(torch.zeros(3), torch.rand(4), 0.9))
