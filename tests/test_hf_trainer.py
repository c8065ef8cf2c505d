"""CrispCallback / CrispOptimizer inside a Hugging Face Trainer (tiny config models, CPU, few steps)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import VOCAB, lm_batch, tiny_llama
from torch_crisp.integrations.hf_trainer import PROJECTOR_DIR, CrispCallback, crisp_optimizer_cls_and_kwargs
from transformers import Trainer, TrainerCallback, TrainingArguments

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector

TARGETS = ["mlp.down_proj"]


class Examples(torch.utils.data.Dataset):
    """Single causal-LM examples of a narrow 'edit' distribution (tokens from a small range)."""

    def __init__(self, n: int = 24, seq: int = 10, seed: int = 1, low: int = 3, high: int = 12) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(low, high, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_model(seed: int = 0, train_only_targets: bool = True):
    model = tiny_llama(seed)
    if train_only_targets:
        for name, p in model.named_parameters():
            p.requires_grad_(any(t in name for t in TARGETS))
    return model


def collected(model, gamma: float = 0.9) -> CrispProjector:
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS, gamma=gamma))
    return projector.collect([lm_batch(s) for s in range(3)], progress=False)


def args_for(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def weights(projector: CrispProjector) -> dict[str, torch.Tensor]:
    return {name: s.geometry.weight.detach().clone() for name, s in projector.layers.items()}


def relative_leak(projector: CrispProjector, before: dict, after: dict) -> float:
    """max over layers of ‖Δ − P(Δ)‖ / ‖Δ‖ for the total change Δ of each projected layer."""
    worst = 0.0
    for name in projector.layers:
        delta = after[name] - before[name]
        assert delta.norm() > 0, f"{name} did not move"
        worst = max(worst, float((delta - projector.project(name, delta)).norm() / delta.norm()))
    return worst


def train(model, args, callbacks=(), **kwargs) -> Trainer:
    trainer = Trainer(model=model, args=args, train_dataset=Examples(), callbacks=list(callbacks), **kwargs)
    trainer.train()
    return trainer


# --------------------------------------------------------------------------- the guarantee
def test_sgd_grad_mode_total_change_in_kept_subspace_and_logged(tmp_path):
    model = make_model()
    projector = collected(model)
    before = weights(projector)
    callback = CrispCallback(projector)
    trainer = train(model, args_for(tmp_path), [callback])
    assert relative_leak(projector, before, weights(projector)) < 1e-5
    # one projection per optimizer step, and it removed something
    assert [step for step, _ in callback.removed_fractions] == [1, 2, 3, 4]
    assert all(0.01 < f < 1.0 for _, f in callback.removed_fractions)
    logged = [entry["crisp/removed_fraction"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([f for _, f in callback.removed_fractions])


def test_the_prediction_is_logged_whichever_path_projects(tmp_path):
    # The complement path's steps skip the full rotation L̂ needs; the callback computes it at log time.
    logged = {}
    for projection in ("full", "complement"):
        model = make_model()
        projector = CrispProjector(model, CrispConfig(target_modules=TARGETS, gamma=0.9, projection=projection))
        projector.collect([lm_batch(s) for s in range(3)], progress=False)
        trainer = train(model, args_for(tmp_path / projection, optim="adamw_torch", learning_rate=1e-2),
                        [CrispCallback(projector)])
        history = trainer.state.log_history
        logged[projection] = [e["crisp/predicted_capability_increase"] for e in history if "loss" in e]
        if projection == "complement":  # the steps themselves did not know it
            assert projector.predicted_capability_increase is None
    assert len(logged["full"]) == 4 and all(v > 0 for v in logged["full"])
    assert logged["complement"] == pytest.approx(logged["full"], rel=1e-3)


def test_without_callback_the_same_run_leaks(tmp_path):
    # control for the test above: the leak bound is not met by plain fine-tuning
    model = make_model()
    projector = collected(model)
    before = weights(projector)
    train(model, args_for(tmp_path))
    assert relative_leak(projector, before, weights(projector)) > 0.1


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adafactor"])  # non-fused AdamW: the factory test
def test_update_mode_keeps_adaptive_optimizers_in_kept_subspace(tmp_path, optim):
    model = make_model()
    projector = collected(model)
    before = weights(projector)
    callback = CrispCallback(projector, mode="update")
    train(model, args_for(tmp_path, optim=optim, learning_rate=1e-2, weight_decay=0.1), [callback])
    assert relative_leak(projector, before, weights(projector)) < 1e-5
    assert len(callback.removed_fractions) == 4


def test_gradient_accumulation_projects_once_per_optimizer_step(tmp_path, monkeypatch):
    model = make_model()
    projector = collected(model)
    calls = []
    original = projector.project_
    monkeypatch.setattr(projector, "project_", lambda **kwargs: calls.append(1) or original(**kwargs))
    before = weights(projector)
    callback = CrispCallback(projector, mode="grad", low_rank="always")
    train(model, args_for(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2), [callback])
    assert len(calls) == 4 and len(callback.removed_fractions) == 4
    assert relative_leak(projector, before, weights(projector)) < 1e-5
    # the two micro-batches' factors (20 tokens) reproduced each step's gradient: projected from them
    assert set(projector.last_projection.low_rank) == set(projector.layers)
    assert all(not s.geometry.module._forward_hooks for s in projector.layers.values())  # removed at train end


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # CPU autocast (fp16 runs without a grad scaler here)
def test_mixed_precision_keeps_float32_factors_and_projects(tmp_path, precision):
    model = make_model()
    projector = collected(model)
    before = weights(projector)
    callback = CrispCallback(projector)
    trainer = train(model, args_for(tmp_path, max_steps=3, **{precision: True}), [callback])
    assert trainer.accelerator.mixed_precision == precision
    for state in projector.layers.values():
        assert state.A_sum.dtype == torch.float32 and state.basis.U_in.dtype == torch.float32
    assert relative_leak(projector, before, weights(projector)) < 1e-5


# --------------------------------------------------------------------------- the optimizer door
def test_crisp_optimizer_door_with_logging_callback(tmp_path):
    model = make_model()
    projector = collected(model)
    before = weights(projector)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = CrispOptimizer(torch.optim.SGD(trainable, lr=0.5), projector, mode="grad")
    callback = CrispCallback(projector, mode="grad")  # sees the CrispOptimizer: logs, does not project twice
    calls = []
    original = projector.project_
    projector.project_ = lambda **kwargs: calls.append(1) or original(**kwargs)  # type: ignore[method-assign]
    trainer = train(model, args_for(tmp_path), [callback], optimizers=(optimizer, None))
    assert len(calls) == 4  # once per step, by the optimizer only
    assert relative_leak(projector, before, weights(projector)) < 1e-5
    assert sum("crisp/removed_fraction" in e for e in trainer.state.log_history) == 4


def test_optimizer_cls_and_kwargs_factory_receives_the_model(tmp_path):
    model = make_model()
    projector = collected(model)
    before = weights(projector)
    factory = crisp_optimizer_cls_and_kwargs(projector, torch.optim.AdamW, mode="update", lr=1e-2, weight_decay=0.1)
    trainer = train(model, args_for(tmp_path), optimizer_cls_and_kwargs=factory)
    inner = trainer.optimizer
    while not isinstance(inner, CrispOptimizer):
        inner = inner.optimizer
    assert inner.mode == "update" and isinstance(inner.optimizer, torch.optim.AdamW)
    assert relative_leak(projector, before, weights(projector)) < 1e-5


# --------------------------------------------------------------------------- collection on train begin
def test_collects_capability_examples_with_the_trainers_collator(tmp_path):
    capability = Examples(n=8, seed=5, low=3, high=VOCAB)
    model = make_model()
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS))
    seen = []

    def collator(examples):
        seen.append(len(examples))
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    callback = CrispCallback(projector, capability_data=capability, capability_batch_size=4)
    train(model, args_for(tmp_path, max_steps=1), [callback], data_collator=collator)
    assert seen[:2] == [4, 4]  # the two capability batches went through the Trainer's collator
    # same factors as collecting the same batches by hand
    reference = CrispProjector(make_model(), CrispConfig(target_modules=TARGETS))
    reference.collect([collator([capability[i] for i in range(j, j + 4)]) for j in (0, 4)], progress=False)
    for name in projector.layers:
        A, S = projector.factors(name)
        A_ref, S_ref = reference.factors(name)
        torch.testing.assert_close(A, A_ref)
        torch.testing.assert_close(S, S_ref)


# --------------------------------------------------------------------------- checkpoints
class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=0.3)
    model = make_model()
    projector = collected(model)
    train(model, args_for(tmp_path / "full", **common), [CrispCallback(projector)])
    uninterrupted = weights(projector)

    model = make_model()
    projector = collected(model)
    train(model, args_for(tmp_path / "cut", **common), [CrispCallback(projector), StopAt(3)])
    assert (tmp_path / "cut" / "checkpoint-3" / PROJECTOR_DIR / "crisp_config.json").is_file()

    # a fresh process: new model, new projector without a basis and without capability data,
    # so the basis can only come from the checkpoint
    model = make_model()
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS))
    trainer = Trainer(model=model, args=args_for(tmp_path / "cut", **common), train_dataset=Examples(),
                      callbacks=[CrispCallback(projector)])
    trainer.train(resume_from_checkpoint=True)
    resumed = weights(projector)
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6)

    # explicit restore, for checkpoints outside output_dir: the saved bases come back unchanged
    fresh = CrispProjector(make_model(), CrispConfig(target_modules=TARGETS))
    CrispCallback(fresh).load_checkpoint(tmp_path / "cut" / "checkpoint-3")
    for name, state in fresh.layers.items():
        assert torch.equal(state.basis.U_out, projector.layers[name].basis.U_out)
        assert torch.equal(state.basis.mask, projector.layers[name].basis.mask)


# --------------------------------------------------------------------------- bad input
def test_projector_of_another_model_is_refused(tmp_path):
    projector = collected(make_model())
    with pytest.raises(ValueError, match="other module objects"):
        train(make_model(), args_for(tmp_path), [CrispCallback(projector)])
    gpt_like = make_model()
    gpt_like.model.layers = gpt_like.model.layers[:1]
    with pytest.raises(ValueError, match="built for another model"):
        train(gpt_like, args_for(tmp_path), [CrispCallback(collected(make_model()))])


def test_frozen_target_warns_and_all_frozen_targets_fail(tmp_path):
    model = make_model()
    projector = collected(model)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"):
        train(model, args_for(tmp_path, max_steps=1), [CrispCallback(projector)])

    model = make_model(train_only_targets=False)
    projector = collected(model)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="protect nothing"):
        train(model, args_for(tmp_path, max_steps=1), [CrispCallback(projector)])


def test_trainable_parameters_outside_targets_warn(tmp_path):
    model = make_model(train_only_targets=False)
    projector = collected(model)
    with pytest.warns(UserWarning, match="outside every projected layer"):
        train(model, args_for(tmp_path, max_steps=1), [CrispCallback(projector)])


class WithUnusedLayer(torch.nn.Module):
    """A tiny LM with a target layer that never takes part in the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)
        self.unused = torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embed(input_ids))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def test_target_without_gradient_fails_loudly(tmp_path):
    model = WithUnusedLayer()
    projector = CrispProjector(model, CrispConfig(target_modules=["unused"]))
    state = projector.layers["unused"]
    state.accumulate(torch.randn(32, 16), torch.randn(32, 16))  # a basis, as if collected elsewhere
    projector.update_basis()
    with pytest.raises(RuntimeError, match="no target module of the projector has a gradient"):
        with pytest.warns(UserWarning, match="outside every projected layer"):  # embed and head train
            train(model, args_for(tmp_path, max_steps=1), [CrispCallback(projector)])


def test_no_basis_and_no_data_is_an_error(tmp_path):
    model = make_model()
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="no eigenbasis"):
        train(model, args_for(tmp_path, max_steps=1), [CrispCallback(projector)])
    with pytest.raises(ValueError, match="mode must be one of"):
        CrispCallback(projector, mode="weights")


def test_no_warning_in_the_plain_setup(tmp_path):
    model = make_model()
    projector = collected(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", module="transformers.*")
        warnings.filterwarnings("ignore", module="accelerate.*")
        warnings.filterwarnings("ignore", module="torch.*")
        train(model, args_for(tmp_path, max_steps=1), [CrispCallback(projector)])


# --------------------------------------------------------------------------- the example
def test_example_script_runs_quick(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trainer_edit.py"
    spec = importlib.util.spec_from_file_location("trainer_edit_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick"])
    for row in ("crisp", "budget"):
        assert results[f"{row}_max_relative_leak"] < 1e-5
        assert results[f"{row}_edit_loss"] < results["edit_loss_before"]  # the edit still lands
        assert results[f"{row}_predicted_increase"] > 0
    assert 0.0 < results["crisp_mean_removed_fraction"] < 1.0
    assert "capability loss" in capsys.readouterr().out
