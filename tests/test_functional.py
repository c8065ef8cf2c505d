"""Property tests of the pure projection mathematics (torch_crisp.functional).

Everything is checked against explicit constructions: the (d_in·d_out)² Kronecker projector,
the curvature quadratic form vec(X)ᵀ (A ⊗ S) vec(X), and a brute-force reading of the energy rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_crisp import functional

settings.register_profile("crisp", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("crisp")

dims = st.integers(min_value=1, max_value=7)
gammas = st.floats(min_value=0.01, max_value=0.995)


@st.composite
def spectrum(draw, d: int) -> torch.Tensor:
    # non-negative eigenvalues spanning several orders of magnitude, with exact zeros and ties
    values = draw(
        st.lists(
            st.one_of(st.just(0.0), st.just(1.0), st.floats(min_value=1e-6, max_value=1e3)),
            min_size=d, max_size=d,
        )
    )
    return torch.tensor(values, dtype=torch.float64)


def orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@st.composite
def problem(draw):
    d_out, d_in = draw(dims), draw(dims)
    eig_out, eig_in = draw(spectrum(d_out)), draw(spectrum(d_in))
    seed = draw(st.integers(0, 2**16))
    U_out, U_in = orthogonal(d_out, seed), orthogonal(d_in, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    Q = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return eig_out, eig_in, U_out, U_in, Q, draw(gammas)


@given(problem())
def test_projection_is_an_orthogonal_nonexpansive_idempotent_map(p):
    eig_out, eig_in, U_out, U_in, Q, gamma = p
    mask = functional.low_curvature_mask(eig_out, eig_in, gamma)
    PQ = functional.project(Q, U_out, U_in, mask)
    assert torch.allclose(functional.project(PQ, U_out, U_in, mask), PQ, atol=1e-10)
    assert abs(torch.sum((Q - PQ) * PQ).item()) <= 1e-10 * max(1.0, Q.norm().item() ** 2)
    assert PQ.norm() <= Q.norm() * (1 + 1e-12)


@given(problem())
def test_projection_equals_explicit_kronecker_projector(p):
    eig_out, eig_in, U_out, U_in, Q, gamma = p
    mask = functional.low_curvature_mask(eig_out, eig_in, gamma)
    # row-major vec: vec(U_out C U_inᵀ) = (U_out ⊗ U_in) vec(C)
    K = torch.kron(U_out, U_in)
    explicit = K @ torch.diag(mask.reshape(-1).to(torch.float64)) @ K.T
    expected = (explicit @ Q.reshape(-1)).reshape(Q.shape)
    assert torch.allclose(functional.project(Q, U_out, U_in, mask), expected, atol=1e-10)


@given(problem())
def test_projected_matrices_see_curvature_below_threshold(p):
    eig_out, eig_in, U_out, U_in, Q, gamma = p
    tau = functional.energy_threshold(eig_out, eig_in, gamma)
    mask = functional.low_curvature_mask(eig_out, eig_in, gamma)
    PQ = functional.project(Q, U_out, U_in, mask)
    if PQ.norm() < 1e-12:
        return
    S = U_out @ torch.diag(eig_out) @ U_out.T
    A = U_in @ torch.diag(eig_in) @ U_in.T
    quadratic = torch.sum(PQ * (S @ PQ @ A)).item()  # vec(PQ)ᵀ (A ⊗ S) vec(PQ)
    # kept directions all have c_ij < tau, so the Rayleigh quotient is at most their maximum
    max_kept = functional.curvature_grid(eig_out, eig_in)[mask].max().item()
    assert max_kept < tau
    assert quadratic <= max_kept * PQ.norm().item() ** 2 * (1 + 1e-9) + 1e-12


@given(problem())
def test_threshold_is_the_shortest_prefix_reaching_gamma_energy(p):
    eig_out, eig_in, _, _, _, gamma = p
    c = functional.curvature_grid(eig_out, eig_in).reshape(-1)
    tau = functional.energy_threshold(eig_out, eig_in, gamma)
    total = c.sum().item()
    if total == 0:
        assert math.isinf(tau)
        return
    assert tau in set(c.tolist())  # tau is one of the curvature values
    blocked = c[c >= tau].sum().item()
    assert blocked >= gamma * total * (1 - 1e-12)
    # dropping the threshold value itself (and its ties) falls short of the target
    assert c[c > tau].sum().item() < gamma * total


@given(problem(), gammas)
def test_kept_set_grows_as_gamma_shrinks(p, other):
    eig_out, eig_in, _, _, _, gamma = p
    low, high = sorted((gamma, other))
    kept_low = functional.low_curvature_mask(eig_out, eig_in, low)
    kept_high = functional.low_curvature_mask(eig_out, eig_in, high)
    assert torch.all(kept_high <= kept_low)  # kept at the larger gamma => kept at the smaller


@given(problem())
def test_gradient_in_blocked_directions_projects_to_zero(p):
    eig_out, eig_in, U_out, U_in, Q, gamma = p
    mask = functional.low_curvature_mask(eig_out, eig_in, gamma)
    blocked_only = U_out @ (Q * (~mask)) @ U_in.T
    assert functional.project(blocked_only, U_out, U_in, mask).norm() <= 1e-10 * max(1.0, Q.norm().item())


def test_zero_curvature_keeps_everything():
    mask = functional.low_curvature_mask(torch.zeros(3), torch.zeros(4), 0.9)
    assert mask.all()


def test_batched_and_low_precision_inputs_keep_their_dtype():
    U = orthogonal(4, 0).float()
    mask = torch.rand(4, 4) > 0.5
    Q = torch.randn(2, 4, 4, dtype=torch.bfloat16)
    out = functional.project(Q, U, U, mask)
    assert out.dtype == torch.bfloat16 and out.shape == Q.shape
    for k in range(2):
        assert torch.allclose(out[k].float(), functional.project(Q[k].float(), U, U, mask), atol=2e-2)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_gamma_outside_open_interval_is_rejected(gamma):
    with pytest.raises(ValueError, match="gamma"):
        functional.energy_threshold(torch.ones(2), torch.ones(2), gamma)


def test_negative_or_nonfinite_spectrum_is_rejected():
    with pytest.raises(ValueError, match="negative"):
        functional.low_curvature_mask(torch.tensor([1.0, -1.0]), torch.ones(2), 0.9)
    with pytest.raises(ValueError, match="NaN"):
        functional.low_curvature_mask(torch.tensor([1.0, float("nan")]), torch.ones(2), 0.9)


def test_project_rejects_mismatched_shapes():
    U = torch.eye(3)
    with pytest.raises(ValueError, match="bias"):
        functional.project(torch.zeros(3, 4), U, U, torch.ones(3, 3, dtype=torch.bool))


def test_symmetric_eigh_clamps_round_off_and_rejects_nan():
    x = torch.randn(5, 2, dtype=torch.float64)
    values, vectors = functional.symmetric_eigh(x @ x.T)
    assert (values >= 0).all()
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, x @ x.T, atol=1e-10)
    with pytest.raises(ValueError, match="NaN"):
        functional.symmetric_eigh(torch.full((2, 2), float("nan")))
