"""The low-rank edit step (torch_crisp.low_rank, low_rank_step, token_capture): the same projection, cheaper.

The pure functions equal functional.project (float64, every mask kind, both complement
orientations); the check accepts exactly what reproduces ``.grad`` up to a scale and rounding; and a
CrispOptimizer in grad mode with ``low_rank="always"`` ends where ``low_rank="off"`` does (≤ 1e-5)
under padding, gradient accumulation, clipping and loss scaling, while another loss term, a tied
weight, a ``.grad`` written by hand or stale factors make the layer fall back to the dense path.
The 2-rank (DDP) cases run in tests/distributed_workers/core_worker.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_plan import mask_of, orthogonal, power_law
from tiny_models import lm_batch, tiny_gpt2, tiny_llama
from torch import nn

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector, functional, low_rank
from torch_crisp.basis import Basis
from torch_crisp.plan import plan_projection

GPT2_TARGETS = ["mlp.c_proj", "attn.c_attn"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on two busy cores OpenMP's barriers made each test 20× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- the pure functions
@settings(max_examples=40, deadline=None)
@given(st.integers(2, 24), st.integers(2, 24), st.integers(1, 10),
       st.sampled_from(["kfac", "activations", "irregular"]), st.sampled_from([0.5, 0.9, 0.99]), st.integers(0, 10**6))
def test_low_rank_paths_equal_the_reference(d_out, d_in, tokens, kind, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    U_out, U_in = orthogonal(d_out, seed), orthogonal(d_in, seed + 1)
    mask = mask_of(kind, power_law(d_out, 1.5), power_law(d_in, 1.5), gamma, seed)
    G = torch.randn(tokens, d_out, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, d_in, generator=g, dtype=torch.float64)
    reference = functional.project(G.mT @ X, U_out, U_in, mask)
    scale = max(float(reference.norm()), 1e-3 * float((G.mT @ X).norm()))
    assert float((low_rank.project_full(G, X, U_out, U_in, mask) - reference).norm()) < 1e-10 * scale
    for orientation in (mask, mask.mT):  # one plan bands rows, the transposed one bands columns
        plan = plan_projection(orientation, "complement")
        if orientation is mask:
            U_side, U_other = plan.vectors(U_out, U_in)
            Q, A, B, expected = G.mT @ X, G, X, reference
        else:  # the transposed problem: P(Qᵀ) with the bases swapped is P(Q)ᵀ
            U_side, U_other = plan.vectors(U_in, U_out)
            Q, A, B, expected = X.mT @ G, X, G, reference.mT
        result = low_rank.project_complement(Q, A, B, U_side, U_other, plan.banding.kernel_bands,
                                             plan.banding.by_columns)
        assert float((result - expected).norm()) < 1e-10 * scale


def test_reproduction_scale_accepts_scales_and_refuses_other_terms():
    g = torch.Generator().manual_seed(0)
    G, X = torch.randn(12, 30, generator=g), torch.randn(12, 50, generator=g)
    Q = G.mT @ X
    assert low_rank.reproduction_scale(Q, G, X) == pytest.approx(1.0, rel=1e-6)
    assert low_rank.reproduction_scale(0.37 * Q, G, X) == pytest.approx(0.37, rel=1e-6)  # clipping, 1/S, 1/W
    other = torch.randn(30, 50, generator=g)
    assert low_rank.reproduction_scale(Q + 1e-4 * other / other.norm() * Q.norm(), G, X) is None  # another term
    assert low_rank.reproduction_scale(Q, G, torch.zeros_like(X)) is None  # the factors carry nothing
    # a bf16 gradient (or bf16 factors) is judged by bf16 rounding: its own rounding passes, a 3 % term does not
    assert low_rank.reproduction_scale(Q.bfloat16(), G, X) == pytest.approx(1.0, rel=1e-2)
    assert low_rank.reproduction_scale((Q + 0.03 * other / other.norm() * Q.norm()).bfloat16(), G, X) is None


def test_cost_model_takes_the_complement_for_few_tokens_and_stops_at_the_break_even():
    d_out, d_in = 512, 2048  # the costs depend on the mask and shapes only: identity bases suffice
    eig_out, eig_in = power_law(d_out, 1.5).float(), power_law(d_in, 1.5).float()
    tau = functional.energy_threshold(eig_out, eig_in, 0.9)
    basis = Basis(eig_in=eig_in, U_in=torch.eye(d_in), eig_out=eig_out, U_out=torch.eye(d_out),
                  mask=functional.kept_below(eig_out, eig_in, tau), tau=tau)
    cpu = torch.device("cpu")
    assert low_rank.choose_path(basis, "auto", 16, cpu, "auto") == "complement"
    budget = low_rank.token_budget(basis, "auto", cpu, "auto")
    assert 16 < budget <= low_rank.token_cap(basis.shape)
    assert low_rank.choose_path(basis, "auto", budget, cpu, "auto") != "dense"
    if budget < low_rank.token_cap(basis.shape):
        assert low_rank.choose_path(basis, "auto", budget + 1, cpu, "auto") == "dense"
    assert low_rank.choose_path(basis, "full", 16, cpu, "auto") in ("full", "dense")  # a forced path is kept
    small = Basis(eig_in=eig_in[:64], U_in=torch.eye(64), eig_out=eig_out[:64], U_out=torch.eye(64),
                  mask=functional.low_curvature_mask(eig_out[:64], eig_in[:64], 0.9), tau=1.0)
    assert low_rank.token_budget(small, "auto", cpu, "auto") == 0  # µs of work: the calls cost more than they save
    assert low_rank.token_budget(basis, "auto", cpu, "off") == 0
    assert low_rank.token_budget(basis, "auto", cpu, "always") == low_rank.token_cap(basis.shape)


# ----------------------------------------------------------------------------- training
def _setup(low_rank_policy: str, make=tiny_gpt2, targets=GPT2_TARGETS, mode: str = "grad", lr: float = 0.1):
    model = make(seed=0).eval()
    projector = CrispProjector(model, CrispConfig(target_modules=list(targets), gamma=0.9))
    projector.collect([lm_batch(s, batch=2, seq=8) for s in range(3)], progress=False)
    params = projector.projected_parameters()
    ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    optimizer = CrispOptimizer(torch.optim.SGD(params, lr=lr), projector, mode=mode, low_rank=low_rank_policy)
    return model, projector, params, optimizer


def _train(policy: str, steps: int = 2, accumulate: int = 1, clip: float | None = None, extra=None,
           before_step=None, scaler_scale: float | None = None, make=tiny_gpt2, targets=GPT2_TARGETS):
    """Train with ``policy``; returns the final parameters and the low-rank layers of every step."""
    model, projector, params, optimizer = _setup(policy, make, targets)
    scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale) if scaler_scale else None
    used = []
    for step in range(steps):
        for k in range(accumulate):
            loss = model(**lm_batch(100 + 10 * step + k, batch=2, seq=6, pad_rows=1)).loss
            if extra is not None:
                loss = loss + extra(model, params)
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if before_step is not None:
            before_step(model, params)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        used.append(set(projector.last_projection.low_rank))
        optimizer.zero_grad()
    return [p.detach().clone() for p in params], used, projector


@pytest.mark.parametrize("case", ["plain", "accumulate", "clip", "scaler"])
def test_low_rank_training_equals_the_dense_path(case):
    kwargs = {"plain": {}, "accumulate": {"accumulate": 2}, "clip": {"clip": 1e-3},
              "scaler": {"scaler_scale": 1024.0}}[case]
    low, used, projector = _train("always", **kwargs)
    dense, dense_used, _ = _train("off", **kwargs)
    assert all(u == set(projector.layers) for u in used), used  # padding dropped, every layer verified
    assert all(u == set() for u in dense_used)
    for a, b in zip(low, dense):
        assert rel(a, b) < 1e-5


def _target_weight(model):
    return model.transformer.h[0].attn.c_attn.weight


@pytest.mark.parametrize("case", ["other_loss_term", "grad_written_by_hand", "model_zero_grad_between"])
def test_anything_the_factors_do_not_reproduce_takes_the_dense_path(case):
    extra = before = None
    if case == "other_loss_term":  # an L2 term on one target weight: its gradient is not Gᵀ X
        def extra(model, params):
            return 1e-3 * _target_weight(model).square().sum()
    elif case == "grad_written_by_hand":
        def before(model, params):
            _target_weight(model).grad.add_(1e-3)
    low, used, projector = _train("always", extra=extra, before_step=before)
    dense, _, _ = _train("off", extra=extra, before_step=before)
    for a, b in zip(low, dense):
        assert rel(a, b) < 1e-5
    if case != "model_zero_grad_between":
        name = "transformer.h.0.attn.c_attn"
        assert all(name not in u and u == set(projector.layers) - {name} for u in used), used


def test_stale_factors_after_model_zero_grad_fall_back():
    model, projector, params, optimizer = _setup("always")
    model(**lm_batch(1, batch=2, seq=6)).loss.backward()
    model.zero_grad()  # the factors of that pass no longer belong to .grad (the optimizer cannot see this)
    model(**lm_batch(2, batch=2, seq=6)).loss.backward()
    optimizer.step()
    assert projector.last_projection.low_rank == ()
    optimizer.zero_grad()  # the optimizer's zero_grad drops them: the next step is low-rank again
    model(**lm_batch(1, batch=2, seq=6)).loss.backward()
    optimizer.zero_grad()
    model(**lm_batch(2, batch=2, seq=6)).loss.backward()
    optimizer.step()
    assert set(projector.last_projection.low_rank) == set(projector.layers)


def test_tied_weight_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8))
    model[4].weight = model[0].weight  # tied: layer 0's gradient also comes from layer 4's use
    model[4].bias.requires_grad_(False)
    with pytest.warns(UserWarning, match="share their weight"):
        projector = CrispProjector(model, CrispConfig(target_modules=["0", "2"], gamma=0.9))
    projector.collect([torch.randn(4, 6) for _ in range(2)], loss_fn=lambda m, x: m(x).square().sum(), progress=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = CrispOptimizer(torch.optim.SGD(trainable, lr=0.1), projector, mode="grad", low_rank="always")
    model(torch.randn(3, 6)).square().sum().backward()
    optimizer.step()
    assert projector.last_projection.low_rank == ("2",)


def test_more_tokens_than_the_budget_keep_nothing():
    model, projector, params, optimizer = _setup("always")
    budget = min(optimizer.constraint.low_rank.budget(n) for n in projector.layers)
    model(**lm_batch(3, batch=budget, seq=8, pad_rows=0)).loss.backward()  # 8·budget tokens
    assert optimizer.constraint.low_rank.capture.records == {}  # dropped: memory stays below one gradient
    optimizer.step()
    assert projector.last_projection.low_rank == ()


def test_auto_and_update_mode_and_close():
    # tiny layers: the cost model keeps the dense path (a few µs of work against the extra calls)
    low, used, _ = _train("auto")
    assert all(u == set() for u in used)
    model, projector, params, optimizer = _setup("auto", mode="update")
    assert optimizer.constraint.low_rank is None  # update mode projects W − W₀: no hooks at all
    hooks = sum(len(s.geometry.module._forward_hooks) for s in projector.layers.values())
    assert hooks == 0
    model, projector, params, optimizer = _setup("always")
    assert sum(len(s.geometry.module._forward_hooks) for s in projector.layers.values()) == len(projector.layers)
    optimizer.close()
    assert sum(len(s.geometry.module._forward_hooks) for s in projector.layers.values()) == 0
    with pytest.raises(ValueError, match="low_rank"):
        CrispOptimizer(torch.optim.SGD(params, lr=0.1), projector, mode="grad", low_rank="sometimes")


def test_bf16_llama_steps_match_the_dense_path_to_bf16_rounding():
    low, used, projector = _train("always", make=lambda seed: tiny_llama(seed, torch.bfloat16),
                                  targets=["mlp.down_proj"])
    dense, _, _ = _train("off", make=lambda seed: tiny_llama(seed, torch.bfloat16), targets=["mlp.down_proj"])
    assert all(u == set(projector.layers) for u in used)
    for a, b in zip(low, dense):
        assert rel(a, b) < 1e-2  # parameters in bf16: both runs round each step
