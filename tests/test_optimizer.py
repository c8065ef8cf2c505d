"""CrispOptimizer: exact SGD step, update mode's guarantee, schedulers and state dicts."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from tiny_models import lm_batch, tiny_gpt2, tiny_llama

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector

TARGETS = ["mlp.down_proj", "self_attn.o_proj"]


def projected_model(make=tiny_llama, targets=TARGETS, gamma=0.9):
    model = make()
    projector = CrispProjector(model, CrispConfig(target_modules=targets, gamma=gamma))
    projector.collect([lm_batch(s) for s in range(3)], progress=False)
    return model, projector


def target_params(projector):
    return [p for state in projector.layers.values() for p in state.geometry.parameters()]


def blocked_leak(projector, name, delta_matrix):
    """‖(U_outᵀ Δ U_in) ⊙ ¬M‖ / ‖Δ‖: the share of a change in blocked eigen-directions."""
    basis = projector.layers[name].basis
    rotated = basis.U_out.double().T @ delta_matrix.double() @ basis.U_in.double()
    return (rotated * (~basis.mask)).norm().item() / delta_matrix.double().norm().item()


def train_steps(model, optimizer, seeds):
    for seed in seeds:
        model(**lm_batch(seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def weight_matrices(projector):
    return {
        name: state.geometry.as_matrix(*[p.detach().clone() for p in state.geometry.parameters()])
        for name, state in projector.layers.items()
    }


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_one_sgd_step_is_minus_lr_times_projected_gradient(make):
    targets = TARGETS if make is tiny_llama else ["mlp.c_proj", "attn.c_attn"]
    model, projector = projected_model(make, targets)
    optimizer = CrispOptimizer(torch.optim.SGD(target_params(projector), lr=0.1), projector)
    batch = lm_batch(7)
    model(**batch).loss.backward()
    before = weight_matrices(projector)
    grads = {
        name: state.geometry.as_matrix(*[p.grad.clone() for p in state.geometry.parameters()])
        for name, state in projector.layers.items()
    }
    optimizer.step()
    after = weight_matrices(projector)
    for name in projector.target_names:
        expected = before[name] - 0.1 * projector.project(name, grads[name])
        assert torch.allclose(after[name], expected, atol=1e-6)
        assert blocked_leak(projector, name, after[name] - before[name]) < 1e-5
        # the projection removed something: the plain step would have left the subspace
        assert blocked_leak(projector, name, grads[name]) > 1e-2


def test_update_mode_keeps_cumulative_adamw_change_in_kept_subspace():
    model, projector = projected_model()
    inner = torch.optim.AdamW(target_params(projector), lr=1e-2, weight_decay=0.1)
    optimizer = CrispOptimizer(inner, projector, mode="update")
    start = weight_matrices(projector)
    train_steps(model, optimizer, range(10, 15))
    end = weight_matrices(projector)
    for name in projector.target_names:
        delta = end[name] - start[name]
        assert delta.norm() > 0
        assert blocked_leak(projector, name, delta) < 1e-4


def test_grad_mode_with_adam_can_leave_the_subspace_update_mode_cannot():
    # Adam rescales coordinates, so a projected gradient does not give a projected step: this is
    # why mode="update" exists. Both runs start from the same weights and data.
    leaks = {}
    for mode in ("grad", "update"):
        model, projector = projected_model()
        optimizer = CrispOptimizer(torch.optim.Adam(target_params(projector), lr=1e-2), projector, mode=mode)
        start = weight_matrices(projector)
        train_steps(model, optimizer, range(20, 23))
        end = weight_matrices(projector)
        leaks[mode] = max(blocked_leak(projector, n, end[n] - start[n]) for n in projector.target_names)
    assert leaks["update"] < 1e-4 < leaks["grad"]


def test_lr_scheduler_drives_the_inner_optimizer():
    model, projector = projected_model()
    inner = torch.optim.SGD(target_params(projector), lr=1.0)
    optimizer = CrispOptimizer(inner, projector)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(3):
            model(**lm_batch(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.125)
    assert optimizer.param_groups is inner.param_groups


def test_state_dict_round_trips_through_weights_only_load():
    model, projector = projected_model()
    optimizer = CrispOptimizer(torch.optim.AdamW(target_params(projector), lr=1e-3), projector, mode="update")
    model(**lm_batch(0)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["crisp"]["mode"] == "update"
    # the anchor W₀ (the weights before the first step) travels with the optimizer state
    for name, anchor in loaded["crisp"]["constraint"]["anchor"].items():
        assert not torch.equal(anchor[0], projector.layers[name].geometry.weight.detach())

    # continuing from the loaded state gives the same weights as continuing the original
    twin_model = tiny_llama()  # same seed: same initial weights, hence the same factors
    twin_projector = CrispProjector(twin_model, projector.config)
    twin_projector.collect([lm_batch(s) for s in range(3)], progress=False)
    twin_model.load_state_dict(model.state_dict())
    twin = CrispOptimizer(torch.optim.AdamW(target_params(twin_projector), lr=1e-3), twin_projector, mode="update")
    twin.load_state_dict(loaded)
    for m, opt in ((model, optimizer), (twin_model, twin)):
        m(**lm_batch(1)).loss.backward()
        opt.step()
    for p, q in zip(target_params(projector), target_params(twin_projector)):
        assert torch.allclose(p, q, atol=1e-7)


def test_warns_once_about_unprojected_trainable_parameters(recwarn):
    model, projector = projected_model()
    CrispOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), projector)
    messages = [str(w.message) for w in recwarn if "outside every projected layer" in str(w.message)]
    assert len(messages) == 1
    recwarn.clear()
    CrispOptimizer(torch.optim.SGD(target_params(projector), lr=0.1), projector)
    assert not [w for w in recwarn if "outside every projected layer" in str(w.message)]


def test_untargeted_parameters_pass_through_untouched():
    model, projector = projected_model()
    other = model.model.layers[0].mlp.up_proj.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = CrispOptimizer(torch.optim.SGD(target_params(projector) + [other], lr=0.1), projector)
    model(**lm_batch(3)).loss.backward()
    expected = other.detach() - 0.1 * other.grad
    optimizer.step()
    assert torch.allclose(other.detach(), expected)


def test_closure_is_evaluated_once_and_returned():
    model, projector = projected_model()
    optimizer = CrispOptimizer(torch.optim.SGD(target_params(projector), lr=0.1), projector)
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = model(**lm_batch(4)).loss
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)


def test_bad_arguments_are_rejected_with_guidance():
    model, projector = projected_model()
    with pytest.raises(ValueError, match="mode"):
        CrispOptimizer(torch.optim.SGD(target_params(projector), lr=0.1), projector, mode="weights")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        CrispOptimizer(object(), projector)  # type: ignore[arg-type]
    fresh = CrispProjector(tiny_llama(), CrispConfig(target_modules=TARGETS))
    optimizer = CrispOptimizer(torch.optim.SGD(target_params(fresh), lr=0.1), fresh)
    fresh.model(**lm_batch(0)).loss.backward()
    with pytest.raises(RuntimeError, match="collect"):
        optimizer.step()


def test_step_without_any_target_gradient_warns_once():
    model, projector = projected_model()
    other = model.model.layers[0].mlp.up_proj.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = CrispOptimizer(torch.optim.SGD(target_params(projector) + [other], lr=0.1), projector)
    for p in target_params(projector):
        p.requires_grad_(False)  # targets frozen: only the other parameter trains
    with pytest.warns(UserWarning, match="no target layer"):
        model(**lm_batch(5)).loss.backward()
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.zero_grad()
        model(**lm_batch(6)).loss.backward()
        optimizer.step()
