"""The guarantee where users train, and curvature that cannot be lost (regression tests).

Each test reproduces a failure found by trying the library as users (and bad data) would: a NaN
batch, an interrupted collection, EK-FAC across rounds, late backward passes, one-shot iterables,
non-finite gradients, frozen biases, replaced layers, encoder-decoder positions, DeepSpeed.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from tiny_models import VOCAB, lm_batch, tiny_gpt2, tiny_llama
from torch import nn

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector, SequentialEditor

TARGETS = ["mlp.down_proj"]


def factors_of(projector: CrispProjector) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    return {n: (s.A_sum.clone(), s.S_sum.clone(), s.token_count) for n, s in projector.layers.items()}


def nan_loss(model, batch):
    """The sum-reduced loss; NaN for batches marked ``poison``."""
    inputs = {k: v for k, v in batch.items() if k != "poison"}
    loss = model(**inputs).loss * int((inputs["labels"][:, 1:] != -100).sum())
    return loss * float("nan") if "poison" in batch else loss


# --------------------------------------------------------------------------- curvature that cannot be lost
def test_a_nan_batch_is_skipped_and_later_collections_still_work():
    batches = [lm_batch(s) for s in range(3)]
    poisoned = batches[:1] + [{**lm_batch(7), "poison": torch.ones(1)}] + batches[1:]
    projector = CrispProjector(tiny_llama(), CrispConfig(target_modules=TARGETS))
    with pytest.warns(UserWarning, match="NaN/inf loss"):
        projector.collect(poisoned, loss_fn=nan_loss, progress=False)
    assert projector.last_collection.nonfinite_batches == 1
    reference = CrispProjector(tiny_llama(), CrispConfig(target_modules=TARGETS))
    reference.collect(batches, loss_fn=nan_loss, progress=False)
    for (a, s, n), (a_ref, s_ref, n_ref) in zip(factors_of(projector).values(), factors_of(reference).values()):
        assert torch.equal(a, a_ref) and torch.equal(s, s_ref) and n == n_ref
    projector.collect([lm_batch(9)], progress=False)  # clean data after a bad batch works
    assert all(torch.isfinite(s.basis.U_in).all() for s in projector.layers.values())


def test_a_non_finite_contribution_never_reaches_the_sums():
    projector = CrispProjector(tiny_llama(), CrispConfig(target_modules=TARGETS))
    state = next(iter(projector.layers.values()))
    good = torch.randn(5, state.geometry.d_in), torch.randn(5, state.geometry.d_out)
    state.accumulate(*good)
    before = state.A_sum.clone(), state.S_sum.clone()
    bad_inputs = torch.randn(4, state.geometry.d_in)
    bad_inputs[1, 2] = float("inf")
    state.accumulate(bad_inputs, torch.randn(4, state.geometry.d_out))
    assert state.settle_rejections() == 4
    assert torch.equal(state.A_sum, before[0]) and torch.equal(state.S_sum, before[1])
    assert state.token_count == 5


class Interrupting:
    """Batches that raise after ``after`` of them (a bad batch, an OOM, a Ctrl-C)."""

    def __init__(self, batches, after, error):
        self.batches, self.after, self.error = batches, after, error

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.after:
                raise self.error
            yield batch

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("out of memory")])
def test_a_failed_collection_leaves_the_projector_as_it_was(error):
    projector = CrispProjector(tiny_llama(), CrispConfig(target_modules=TARGETS))
    projector.collect([lm_batch(s) for s in range(2)], progress=False)
    before = factors_of(projector)
    bases = {n: s.basis for n, s in projector.layers.items()}
    with pytest.raises(type(error)):
        projector.collect(Interrupting([lm_batch(s) for s in range(2, 6)], 2, error), progress=False)
    for name, (a, s, n) in factors_of(projector).items():
        assert torch.equal(a, before[name][0]) and torch.equal(s, before[name][1]) and n == before[name][2]
        assert projector.layers[name].basis is bases[name]
    # the retry counts every token once
    projector.collect([lm_batch(s) for s in range(2, 6)], progress=False)
    expected = CrispProjector(tiny_llama(), CrispConfig(target_modules=TARGETS))
    expected.collect([lm_batch(s) for s in range(6)], progress=False)
    for name in projector.layers:
        assert projector.num_tokens(name) == expected.num_tokens(name)


def test_ekfac_round_two_needs_every_data_set_and_then_equals_one_shot():
    first, second = [lm_batch(s) for s in range(2)], [lm_batch(s) for s in range(2, 4)]
    config = dict(target_modules=TARGETS, curvature="ekfac", gamma=0.9)
    rounds = CrispProjector(tiny_llama(), CrispConfig(**config)).collect(first, progress=False)
    with pytest.raises(ValueError, match="correction_batches"):
        rounds.collect(second, progress=False)
    rounds.collect(second, correction_batches=first + second, progress=False)
    one_shot = CrispProjector(tiny_llama(), CrispConfig(**config)).collect(first + second, progress=False)
    for name in rounds.layers:
        assert torch.equal(rounds.layers[name].basis.mask, one_shot.layers[name].basis.mask)
        assert rounds.layers[name].example_count == one_shot.layers[name].example_count == 12


def test_a_backward_after_the_capture_block_adds_nothing():
    model = tiny_llama()
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS))
    with projector.capture() as session:
        session.position_mask = lm_batch(0)["attention_mask"]
        model(**lm_batch(0)).loss.backward()
        late = model(**lm_batch(1)).loss  # forward inside, backward after the block
    before = factors_of(projector)
    with pytest.warns(UserWarning, match="after its capture"):
        late.backward()
    for name, (a, s, n) in factors_of(projector).items():
        assert torch.equal(a, before[name][0]) and torch.equal(s, before[name][1]) and n == before[name][2]


def test_sequential_editor_materialises_a_generator_and_adds_the_rounds_curvature():
    model = tiny_llama()
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS)).collect(
        [lm_batch(s) for s in range(2)], progress=False
    )
    optimizer = CrispOptimizer(torch.optim.SGD(projector.projected_parameters(), lr=0.1), projector)
    tokens = projector.num_tokens(projector.target_names[0])
    stats = SequentialEditor(projector, optimizer).edit_round(lm_batch(s) for s in range(10, 12))
    assert stats.steps == 2 and projector.num_tokens(projector.target_names[0]) > tokens
    ekfac = CrispProjector(tiny_llama(), CrispConfig(target_modules=TARGETS, curvature="ekfac"))
    ekfac.collect([lm_batch(0)], progress=False)
    with pytest.raises(ValueError, match="ekfac"):
        SequentialEditor(ekfac, CrispOptimizer(torch.optim.SGD(ekfac.projected_parameters(), lr=0.1), ekfac))


# --------------------------------------------------------------------------- the guarantee in training
def trained_targets(model):
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in TARGETS))
    return model


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_one_nan_gradient_entry_is_not_spread_over_the_layer(mode):
    model = trained_targets(tiny_llama())
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS)).collect(
        [lm_batch(s) for s in range(2)], progress=False
    )
    optimizer = CrispOptimizer(torch.optim.SGD(projector.projected_parameters(), lr=0.1), projector, mode=mode)
    model(**lm_batch(5)).loss.backward()
    name = projector.target_names[0]
    weight = projector.layers[name].geometry.weight
    weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN/inf gradient"):
        optimizer.step()
    assert int(torch.isnan(weight).sum()) == 1  # what the bare optimizer does: only that entry
    assert projector.last_projection.skipped == (name,)


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_a_frozen_bias_with_a_trainable_weight_keeps_the_change_in_the_kept_subspace(mode):
    model = tiny_gpt2()
    targets = ["mlp.c_fc"]  # Conv1D with a bias
    for name, p in model.named_parameters():
        p.requires_grad_("mlp.c_fc.weight" in name)
    projector = CrispProjector(model, CrispConfig(target_modules=targets)).collect(
        [lm_batch(s) for s in range(2)], progress=False
    )
    before = {n: s.geometry.as_matrix(s.geometry.weight.detach(), s.geometry.bias.detach()).clone()
              for n, s in projector.layers.items()}
    inner = torch.optim.SGD(projector.projected_parameters(), lr=0.5) if mode == "grad" else torch.optim.AdamW(
        projector.projected_parameters(), lr=1e-2)
    optimizer = CrispOptimizer(inner, projector, mode=mode)
    for step in range(3):
        model(**lm_batch(20 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, state in projector.layers.items():
        delta = state.geometry.as_matrix(state.geometry.weight.detach(), state.geometry.bias.detach()) - before[name]
        assert delta[:, -1].abs().max() == 0  # the bias did not move
        assert delta.norm() > 0
        leak = (delta - projector.project(name, delta)).norm() / delta.norm()
        assert leak < 1e-5, leak


def test_a_trainable_bias_with_a_frozen_weight_is_refused():
    model = tiny_gpt2()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp.c_fc.bias" in name)
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.c_fc"])).collect([lm_batch(0)], progress=False)
    optimizer = CrispOptimizer(torch.optim.SGD(projector.projected_parameters(), lr=0.5), projector)
    model(**lm_batch(1)).loss.backward()
    with pytest.raises(ValueError, match="frozen weight"):
        optimizer.step()


def test_a_replaced_or_resized_target_is_detected():
    model = trained_targets(tiny_llama())
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS)).collect([lm_batch(0)], progress=False)
    optimizer = CrispOptimizer(torch.optim.AdamW(projector.projected_parameters(), lr=1e-3), projector, mode="update")
    model.model.layers[0].mlp.down_proj = nn.Linear(64, 32, bias=False)
    model(**lm_batch(1)).loss.backward()
    with pytest.raises(RuntimeError, match="replaced"):
        optimizer.step()


def test_encoder_decoder_layers_count_their_own_positions():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0,
    ))
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(3, VOCAB, (2, 13), generator=g)
    mask = torch.ones_like(inputs)
    mask[0, 10:] = 0
    labels = torch.randint(3, VOCAB, (2, 16), generator=g)
    labels[1, 12:] = -100
    projector = CrispProjector(model, CrispConfig(target_modules=["DenseReluDense.wo"]))
    projector.collect([{"input_ids": inputs, "attention_mask": mask, "labels": labels}], progress=False)
    counts = {name.split(".")[0]: projector.num_tokens(name) for name in projector.target_names}
    assert counts == {"encoder": int(mask.sum()), "decoder": int((labels != -100).sum())}


def test_the_trainer_callback_refuses_deepspeed_up_front():
    from torch_crisp.integrations.hf_callback import _check_not_deepspeed

    with pytest.raises(RuntimeError, match="DeepSpeed"):
        _check_not_deepspeed(types.SimpleNamespace(deepspeed="ds_config.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_not_deepspeed(types.SimpleNamespace(deepspeed=None))


def test_quantized_layers_are_refused_clearly():
    model = tiny_llama()
    layer = model.model.layers[0].mlp.down_proj
    layer.weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.uint8), requires_grad=False)  # packed 4-bit stand-in
    with pytest.raises(ValueError, match="quantized"):
        CrispProjector(model, CrispConfig(target_modules=TARGETS))
