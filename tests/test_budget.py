"""The capability budget: exact properties of the solver, and the guarantee in training.

Oracles: the KKT conditions of ``min ‖Ũ' − Ũ‖² s.t. ½ Σ c Ũ'² ≤ ε`` and SciPy's SLSQP on the same
problem (small sizes); in training, ``L̂`` recomputed from the stored weights after every step.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from tiny_models import lm_batch, tiny_llama

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector
from torch_crisp.budget import BudgetTerm, nearest_within_budget, predicted_increase, solve_multiplier

TARGETS = ["mlp.down_proj"]


# --------------------------------------------------------------------------- the solver
def random_terms(seed: int, shapes, spread: float, zero_fraction: float = 0.0) -> list[BudgetTerm]:
    g = torch.Generator().manual_seed(seed)
    terms = []
    for d_out, d_in in shapes:
        curvature = 10 ** (spread * (torch.rand(d_out, d_in, generator=g, dtype=torch.float64) - 0.5))
        curvature = curvature * (torch.rand(d_out, d_in, generator=g, dtype=torch.float64) >= zero_fraction)
        terms.append(BudgetTerm(torch.randn(d_out, d_in, generator=g, dtype=torch.float64), curvature))
    return terms


shapes_strategy = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 7)), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), shapes=shapes_strategy, spread=st.floats(0.0, 8.0),
       fraction=st.floats(1e-4, 2.0), zeros=st.sampled_from([0.0, 0.3]))
def test_the_result_is_within_budget_and_the_budget_binds_tightly(seed, shapes, spread, fraction, zeros):
    terms = random_terms(seed, shapes, spread, zeros)
    start = predicted_increase(terms)
    if start == 0.0:
        return
    budget = fraction * start
    mu = solve_multiplier(terms, budget)
    after = predicted_increase(terms, mu)
    assert after <= budget * (1 + 1e-6)
    if budget >= start:
        assert mu == 0.0 and after == start
    else:
        assert mu > 0 and after >= budget * (1 - 1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shapes=shapes_strategy, spread=st.floats(0.0, 4.0), fraction=st.floats(0.01, 0.9))
def test_the_result_is_the_frobenius_nearest_point_of_the_ellipsoid(seed, shapes, spread, fraction):
    terms = random_terms(seed, shapes, spread)
    budget = fraction * predicted_increase(terms)
    shrunk, mu, _ = nearest_within_budget(terms, budget)
    x0 = torch.cat([t.rotated.reshape(-1) for t in terms]).numpy()
    c = torch.cat([t.curvature.reshape(-1) for t in terms]).numpy()
    x = torch.cat([s.reshape(-1) for s in shrunk]).numpy()
    # KKT: x − x0 + μ c x = 0 with μ ≥ 0 (stationarity), and the constraint active
    assert np.allclose(x - x0 + mu * c * x, 0.0, atol=1e-9)
    assert 0.5 * np.sum(c * x * x) == pytest.approx(budget, rel=1e-5)
    # a generic solver on the same problem finds the same point
    brute = brute_force(x0, c, budget)
    # ours sits a hair (1e-6 of the budget) inside the boundary on purpose; the exact optimum is on it
    assert np.sum((x - x0) ** 2) <= np.sum((brute.x - x0) ** 2) + 1e-5 * np.sum(x0**2)
    assert np.allclose(x, brute.x, atol=1e-4 * max(1.0, np.abs(x0).max()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d_out=st.integers(1, 4), d_in=st.integers(2, 6), fraction=st.floats(0.05, 0.9))
def test_a_frozen_column_stays_frozen_and_the_point_is_still_the_nearest(seed, d_out, d_in, fraction):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    v = U[-1]  # the "bias" coordinate's row of U_in
    x0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x0 = x0 - (x0 @ v).unsqueeze(-1) * v / (v @ v)  # start inside {Ũ v = 0}
    curvature = torch.rand(d_out, d_in, generator=g, dtype=torch.float64) + 0.1
    term = BudgetTerm(x0, curvature, None, v)
    budget = fraction * term.predicted_increase()
    (shrunk,), mu, after = nearest_within_budget([term], budget)
    assert after <= budget * (1 + 1e-6)
    assert torch.allclose(shrunk @ v, torch.zeros(d_out, dtype=torch.float64), atol=1e-10)
    flat0, c, vv = x0.reshape(-1).numpy(), curvature.reshape(-1).numpy(), v.numpy()
    rows = np.stack([np.kron(np.eye(d_out)[i], vv) for i in range(d_out)])
    brute = brute_force(flat0, c, budget, equalities=rows)
    assert np.allclose(shrunk.reshape(-1).numpy(), brute.x, atol=1e-4 * max(1.0, np.abs(flat0).max()))


def brute_force(x0: np.ndarray, c: np.ndarray, budget: float, equalities: np.ndarray | None = None):
    """SciPy's SLSQP on ``min ‖y − x0‖² s.t. ½ Σ c y² ≤ budget (and equalities·y = 0)``.

    A general-purpose sequential quadratic programming solver, which knows nothing of the
    multiplier's closed form; started at the feasible origin.
    """
    # the constraint relative to the budget, so that SLSQP's absolute tolerance is a relative one
    constraints = [
        {"type": "ineq", "fun": lambda y: 1.0 - 0.5 * np.sum(c * y * y) / budget, "jac": lambda y: -c * y / budget}
    ]
    if equalities is not None:
        constraints.append({"type": "eq", "fun": lambda y: equalities @ y, "jac": lambda y: equalities})
    result = minimize(
        lambda y: np.sum((y - x0) ** 2), np.zeros_like(x0), jac=lambda y: 2 * (y - x0), method="SLSQP",
        constraints=constraints, options={"ftol": 1e-12, "maxiter": 1000},
    )
    # status 8 ("positive directional derivative") is SLSQP stalling at its tolerance floor; the
    # callers compare the point itself, so a solver that stalled early fails them
    assert result.status in (0, 8), result.message
    assert 0.5 * np.sum(c * result.x**2) <= budget * (1 + 1e-6)
    return result


def test_solver_rejects_a_non_positive_budget():
    with pytest.raises(ValueError, match="budget"):
        solve_multiplier(random_terms(0, [(2, 2)], 1.0), 0.0)


# --------------------------------------------------------------------------- in training
def predicted_from_weights(projector: CrispProjector, start: dict[str, torch.Tensor]) -> float:
    """``½ Σ c Ũ²`` of the stored weights' change, computed independently in float64."""
    total = 0.0
    for name, state in projector.layers.items():
        basis = state.basis
        delta = state.geometry.weight.detach().double() - start[name]
        rotated = basis.U_out.double().mT @ delta @ basis.U_in.double()
        curvature = torch.outer(basis.eig_out.double(), basis.eig_in.double())
        total += 0.5 * float((curvature * rotated.square()).sum())
    return total


def setup(budget: float | None, gamma: float | None = 0.9, seed: int = 0):
    model = tiny_llama(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in TARGETS))
    config = CrispConfig(target_modules=TARGETS, gamma=gamma, capability_budget=budget)
    projector = CrispProjector(model, config).collect([lm_batch(s) for s in range(3)], progress=False)
    return model, projector


def train(model, projector, mode: str, steps: int = 6, lr: float = 3e-2, after_step=None):
    params = projector.projected_parameters()
    optimizer = CrispOptimizer(torch.optim.AdamW(params, lr=lr), projector, mode=mode)
    for step in range(steps):
        model(**lm_batch(100 + step, pad_rows=0)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step(step)
    return optimizer


def start_weights(projector):
    return {name: s.geometry.weight.detach().double().clone() for name, s in projector.layers.items()}


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_the_budget_holds_after_every_step_and_binds(mode):
    budget = 2e-5
    model, projector = setup(budget)
    start = start_weights(projector)
    seen = []

    def check(step):
        assert predicted_from_weights(projector, start) <= budget * (1 + 1e-6)
        seen.append((projector.budget_mu, projector.predicted_capability_increase))

    train(model, projector, mode, after_step=check)
    assert any(mu > 0 for mu, _ in seen), "the budget never bound: the test would not test it"
    assert all(p <= budget * (1 + 1e-6) for _, p in seen)


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_a_budget_that_does_not_bind_leaves_the_run_bit_identical(mode):
    runs = []
    for budget in (None, 1e6):
        model, projector = setup(budget)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # grad mode with AdamW warns; not what this test is about
            train(model, projector, mode)
        runs.append([s.geometry.weight.detach().clone() for s in projector.layers.values()])
        if budget is not None:
            assert projector.budget_mu == 0.0
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gamma_none_lets_the_budget_alone_decide():
    budget = 2e-5
    model, projector = setup(budget, gamma=None)
    assert all(f == 1.0 for f in projector.kept_fraction().values())
    start = start_weights(projector)
    train(model, projector, "update")
    assert projector.budget_mu > 0
    assert predicted_from_weights(projector, start) <= budget * (1 + 1e-6)


def test_resuming_from_the_optimizer_state_keeps_the_anchor():
    budget = 2e-5
    model, projector = setup(budget)
    start = start_weights(projector)
    optimizer = train(model, projector, "update", steps=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin_model, twin_projector = setup(budget)
    twin_model.load_state_dict(saved["model"])
    twin = CrispOptimizer(torch.optim.AdamW(twin_projector.projected_parameters(), lr=3e-2), twin_projector,
                          mode="update")
    twin.load_state_dict(saved["optimizer"])
    for m, opt in ((model, optimizer), (twin_model, twin)):
        for step in range(2, 5):
            m(**lm_batch(100 + step, pad_rows=0)).loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(projector.layers.values(), twin_projector.layers.values()):
        assert torch.equal(a.geometry.weight, b.geometry.weight)
    # the budget still counts the change since the original start, not since the resume
    assert predicted_from_weights(twin_projector, start) <= budget * (1 + 1e-6)
    assert twin_projector.budget_mu > 0


def test_lora_with_a_budget_is_refused_clearly():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["down_proj"]))
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS, capability_budget=0.1))
    projector.collect([lm_batch(s) for s in range(2)], progress=False)
    optimizer = CrispOptimizer(torch.optim.AdamW(projector.projected_parameters(), lr=1e-3), projector, mode="update")
    model(**lm_batch(9)).loss.backward()
    with pytest.raises(ValueError, match="LoRA"):
        optimizer.step()


def test_config_contract_for_the_budget():
    assert CrispConfig(gamma=None, capability_budget=0.05).gamma is None
    with pytest.raises(ValueError, match="capability_budget"):
        CrispConfig(gamma=None)
    for bad in (0, -1.0, math.inf, math.nan, True, "0.1"):
        with pytest.raises(ValueError, match="capability_budget"):
            CrispConfig(capability_budget=bad)

