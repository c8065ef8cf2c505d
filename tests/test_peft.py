"""LoRA guarantee: ΔW = scaling·B·A of every projected LoRA layer stays in its kept subspace."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import IA3Config, LoraConfig, get_peft_model
from tiny_models import lm_batch, tiny_gpt2, tiny_llama
from torch_crisp.integrations.hf_trainer import CrispCallback
from torch_crisp.integrations.peft import check_lora_model, lora_delta, lora_leakage, lora_report
from transformers import Trainer, TrainingArguments

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector, functional
from torch_crisp.lora import kept_rectangle, rectangle_bases

LEAK_BOUND = 1e-5


def peft_llama(rank: int = 4, seed: int = 0, **lora):
    lora = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["down_proj", "q_proj"], "lora_dropout": 0.0, **lora}
    return get_peft_model(tiny_llama(seed), LoraConfig(**lora))


def peft_gpt2(rank: int = 4, seed: int = 0):
    # GPT-2's Conv1D layers have a bias: exercises the bias-augmented input space
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_fc"], fan_in_fan_out=True, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_gpt2(seed), config)


def collected(model, targets, gamma=0.9) -> CrispProjector:
    projector = CrispProjector(model, CrispConfig(target_modules=targets, gamma=gamma))
    return projector.collect([lm_batch(s) for s in range(2)], progress=False)


def edit_steps(model, optimizer, steps: int, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(3, 12, (4, 10), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# --------------------------------------------------------------------------- pure math
def _kfac_mask(d_out: int, d_in: int, gamma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eig_out = torch.rand(d_out, generator=g, dtype=torch.float64) ** 3
    eig_in = torch.rand(d_in, generator=g, dtype=torch.float64) ** 3
    return functional.low_curvature_mask(eig_out, eig_in, gamma)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.floats(0.05, 0.99), st.integers(0, 10_000))
def test_kept_rectangle_is_the_largest_for_kfac_masks(d_out, d_in, gamma, seed):
    mask = _kfac_mask(d_out, d_in, gamma, seed)
    rows, cols = kept_rectangle(mask)
    assert mask[rows][:, cols].all()
    # Brute force: K-FAC rows' kept sets are nested, so an optimal rectangle is limited by one
    # row t; its best partner rows are all rows whose kept set contains row t's.
    best = 0
    for t in range(d_out):
        containing = (mask | ~mask[t]).all(dim=1).sum().item()
        best = max(best, containing * int(mask[t].sum()))
    assert len(rows) * len(cols) == best


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_kept_rectangle_lies_in_any_mask(d_out, d_in, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(d_out, d_in, generator=g) < density
    rows, cols = kept_rectangle(mask)
    assert mask[rows][:, cols].all()
    assert (len(rows) * len(cols) > 0) == bool(mask.any())


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 10), st.integers(1, 9), st.integers(0, 10_000))
def test_rectangle_bases_with_bias_stay_in_span_and_off_the_bias(d_in, n_cols, seed):
    g = torch.Generator().manual_seed(seed)
    U_in, _ = torch.linalg.qr(torch.randn(d_in + 1, d_in + 1, generator=g, dtype=torch.float64))
    U_out, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    cols = torch.randperm(d_in + 1, generator=g)[: min(n_cols, d_in + 1)].sort().values
    out_basis, in_basis = rectangle_bases(U_out, U_in, torch.tensor([0, 2]), cols, d_in)
    torch.testing.assert_close(out_basis, U_out[:, [0, 2]])
    k = in_basis.shape[1]
    assert k == len(cols) - 1  # generic eigenvectors: exactly one dimension is lost to the bias
    torch.testing.assert_close(in_basis.mT @ in_basis, torch.eye(k, dtype=torch.float64))
    augmented = torch.cat([in_basis, in_basis.new_zeros(1, k)])  # [v, 0]
    blocked = torch.ones(d_in + 1, dtype=torch.bool)
    blocked[cols] = False
    leaked = (U_in.mT @ augmented)[blocked]
    assert leaked.numel() == 0 or leaked.abs().max() < 1e-10


# --------------------------------------------------------------------------- the guarantee
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["llama", "gpt2"]),
    rank=st.sampled_from([1, 2, 4]),
    gamma=st.floats(0.5, 0.99),
    lr=st.floats(1e-3, 5e-2),
    mode=st.sampled_from(["grad", "update"]),
    steps=st.integers(2, 5),
)
def test_lora_delta_stays_in_kept_subspace_under_adamw(arch, rank, gamma, lr, mode, steps):
    model = peft_llama(rank) if arch == "llama" else peft_gpt2(rank)
    targets = ["mlp.down_proj"] if arch == "llama" else ["mlp.c_fc"]
    projector = collected(model, targets, gamma)
    assert set(projector.lora_layers) == set(projector.layers)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "mlp" in n]
    optimizer = CrispOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=0.1), projector, mode=mode)
    edit_steps(model, optimizer, steps)
    for name in projector.lora_layers:
        assert lora_delta(projector, name).norm() > 0, "the adapters did not move"
    leaks = lora_leakage(projector)
    assert max(leaks.values()) < LEAK_BOUND, leaks


def test_unconstrained_lora_leaks():
    # control: the same training without the projector breaks the bound by orders of magnitude
    model = peft_llama()
    projector = collected(model, ["mlp.down_proj"])
    for _ in range(2):  # undo the projection of A's initialisation done by collect()
        for lora_layer in projector.lora_layers.values():
            for _, A, _ in lora_layer.adapters():
                torch.nn.init.normal_(A.weight)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "mlp" in n]
    edit_steps(model, torch.optim.AdamW(params, lr=1e-2), 3)
    assert min(lora_leakage(projector).values()) > 1e-2


def test_collect_moves_lora_A_into_the_rectangle_and_merged_change_is_kept():
    model = peft_llama()
    projector = collected(model, ["mlp.down_proj"])
    for name, lora_layer in projector.lora_layers.items():
        rect = lora_layer.rectangle(projector.layers[name].basis)
        for _, A, _ in lora_layer.adapters():
            A_w = A.weight.detach()
            assert A_w.norm() > 0
            torch.testing.assert_close(A_w @ rect.in_basis @ rect.in_basis.mT, A_w, atol=1e-6, rtol=0)
    before = {n: s.geometry.weight.detach().clone() for n, s in projector.layers.items()}
    params = [p for n, p in model.named_parameters() if p.requires_grad and "mlp" in n]
    edit_steps(model, CrispOptimizer(torch.optim.AdamW(params, lr=1e-2), projector), 3)
    deltas = {n: lora_delta(projector, n) for n in projector.lora_layers}
    merged = model.merge_and_unload()
    for name, delta in deltas.items():
        short = name.removeprefix("base_model.model.")
        change = merged.get_submodule(short).weight.detach() - before[name]
        torch.testing.assert_close(change, delta, atol=1e-6, rtol=1e-4)
        assert (change - projector.project(name, change)).norm() / change.norm() < LEAK_BOUND


def test_report_kept_fraction_against_full_weight_projection():
    model = peft_gpt2()
    projector = collected(model, ["mlp.c_fc"])
    reports = lora_report(projector)
    fractions = projector.lora_kept_fraction()
    for report in reports:
        rows, cols = report.rectangle
        assert report.kept_directions == int(projector.layers[report.name].basis.mask.sum())
        assert report.kept_fraction == pytest.approx(rows * cols / report.kept_directions)
        assert report.kept_fraction == fractions[report.name]
        assert 0.0 < report.kept_fraction <= 1.0 and report.rank == 4


# --------------------------------------------------------------------------- with the Trainer
@pytest.mark.parametrize("mode", ["grad", "update"])
def test_trainer_callback_keeps_lora_in_kept_subspace(tmp_path, mode):
    model = peft_llama()
    projector = collected(model, ["mlp.down_proj"])
    for n, p in model.named_parameters():  # train only the projected adapters
        p.requires_grad_(p.requires_grad and "mlp" in n)
    ids = torch.randint(3, 12, (16, 10), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        optim="adamw_torch", weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1,
    )
    callback = CrispCallback(projector, mode=mode)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert all(lora_delta(projector, n).norm() > 0 for n in projector.lora_layers)
    assert max(lora_leakage(projector).values()) < LEAK_BOUND
    assert len(callback.removed_fractions) == 3


# --------------------------------------------------------------------------- bad input
def test_non_lora_peft_methods_are_refused():
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="constrains only LoRA"):
        CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"]))
    with pytest.raises(ValueError, match="LoRA"):
        check_lora_model(model)
    with pytest.raises(ValueError, match="DoRA"):
        CrispProjector(peft_llama(use_dora=True), CrispConfig(target_modules=["mlp.down_proj"]))
    with pytest.raises(ValueError, match="bias='none'"):
        CrispProjector(peft_llama(bias="all"), CrispConfig(target_modules=["mlp.down_proj"]))
    with pytest.raises(ValueError, match="no LoRA layer"):
        check_lora_model(tiny_llama())


def test_all_linear_sees_wrapped_layers_not_the_adapters():
    model = peft_llama()
    projector = CrispProjector(model, CrispConfig(target_modules="all-linear"))
    names = list(projector.layers)
    assert not any(part in n for n in names for part in ("lora_A", "lora_B", "base_layer"))
    assert "base_model.model.model.layers.0.mlp.down_proj" in names
    assert set(projector.lora_layers) == {n for n in names if n.endswith(("down_proj", "q_proj"))}


def test_projector_built_before_get_peft_model_is_refused(tmp_path):
    base = tiny_llama()
    projector = collected(base, ["mlp.down_proj"])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["down_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    data = [lm_batch(0, batch=1) | {}]
    data = [{k: v[0] for k, v in data[0].items()}] * 4
    with pytest.raises(ValueError, match="get_peft_model"):
        Trainer(model=model, args=args, train_dataset=data, callbacks=[CrispCallback(projector)]).train()


def test_saved_projector_reloads_onto_the_peft_model(tmp_path):
    model = peft_llama()
    projector = collected(model, ["mlp.down_proj"])
    projector.save_pretrained(tmp_path / "proj", include_basis=True)
    loaded = CrispProjector.from_pretrained(tmp_path / "proj", model)
    assert set(loaded.lora_layers) == set(projector.lora_layers)
    for name, lora_layer in loaded.lora_layers.items():
        got = lora_layer.rectangle(loaded.layers[name].basis)
        want = projector.lora_layers[name].rectangle(projector.layers[name].basis)
        assert torch.equal(got.rows, want.rows) and torch.equal(got.cols, want.cols)


def test_rectangle_follows_a_new_mask_on_the_same_eigenbases():
    # EK-FAC's correction keeps the eigenvectors and replaces the mask; the rectangle must follow
    model = peft_llama()
    projector = collected(model, ["mlp.down_proj"], gamma=0.5)
    name = next(iter(projector.lora_layers))
    old = projector.lora_layers[name].rectangle(projector.layers[name].basis)
    mask = projector.layers[name].basis.mask.clone()
    mask[:, : mask.shape[1] // 2] = False  # block half of the input directions
    basis = projector.layers[name].basis = dataclasses.replace(projector.layers[name].basis, mask=mask)
    new = projector.lora_layers[name].rectangle(basis)
    assert new.cols.max() >= basis.mask.shape[1] // 2 and not torch.equal(new.cols, old.cols)
    projector.project_lora_parameters_()
    params = [p for n, p in model.named_parameters() if p.requires_grad and "mlp" in n]
    edit_steps(model, CrispOptimizer(torch.optim.AdamW(params, lr=1e-2), projector, mode="update"), 2)
    assert lora_leakage(projector)[name] < LEAK_BOUND


def test_new_basis_after_training_warns_that_lora_changes_are_cut():
    model = peft_llama()
    projector = collected(model, ["mlp.down_proj"], gamma=0.5)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "mlp" in n]
    edit_steps(model, CrispOptimizer(torch.optim.AdamW(params, lr=1e-2), projector), 2)
    projector.config.gamma = 0.99  # a much stricter constraint: the trained ΔW no longer fits
    with pytest.warns(UserWarning, match="merge the adapters"):
        projector.update_basis()
    assert max(lora_leakage(projector).values()) < LEAK_BOUND


@pytest.mark.parametrize("curvature", ["ekfac", "activations"])
def test_guarantee_holds_for_other_curvature_models(curvature):
    # EK-FAC masks are not staircases: the rectangle is then a valid, not necessarily largest, one
    model = peft_gpt2()
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.c_fc"], gamma=0.9, curvature=curvature))
    projector.collect([lm_batch(s) for s in range(2)], progress=False)
    for name, lora_layer in projector.lora_layers.items():
        rect = lora_layer.rectangle(projector.layers[name].basis)
        assert projector.layers[name].basis.mask[rect.rows][:, rect.cols].all() and not rect.is_empty
    params = [p for n, p in model.named_parameters() if p.requires_grad and "mlp" in n]
    edit_steps(model, CrispOptimizer(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), projector), 3)
    assert max(lora_leakage(projector).values()) < LEAK_BOUND


def test_empty_rectangle_warns_and_holds_lora_at_zero():
    model = peft_llama()
    projector = collected(model, ["mlp.down_proj"])
    name = next(iter(projector.lora_layers))
    basis = projector.layers[name].basis
    projector.layers[name].basis = dataclasses.replace(basis, mask=torch.zeros_like(basis.mask))  # nothing kept
    with pytest.warns(UserWarning, match="no usable rectangle"):
        projector.project_lora_parameters_()
    assert lora_delta(projector, name).abs().max() == 0
