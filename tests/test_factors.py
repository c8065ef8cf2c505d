"""K-FAC factors checked against independent oracles.

* curvlinops' KFACLinearOperator (empirical Fisher, KFAC-expand, mean reduction, weight and bias
  treated jointly) on a small sequence network;
* a brute-force per-position computation on tiny Llama and GPT-2 models: inputs recorded by a
  plain hook, output gradients from torch.autograd.grad of a cross-entropy summed by hand, padding
  excluded by the attention mask — no code shared with the library's capture path.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import lm_batch, tiny_gpt2, tiny_llama
from torch import nn

from torch_crisp import CrispConfig, CrispProjector


class ClassesFirst(nn.Module):
    """(batch, seq, classes) -> (batch, classes, seq), the layout nn.CrossEntropyLoss expects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def test_factors_match_curvlinops_kfac_expand():
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import FisherType, KFACType

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), ClassesFirst()).double()
    data = [(torch.randn(3, 6, 5, dtype=torch.float64), torch.randint(0, 4, (3, 6))) for _ in range(3)]
    oracle = KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), data,
        fisher_type=FisherType.EMPIRICAL, kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False, check_deterministic=False,
    )
    oracle.compute_kronecker_factors()

    projector = CrispProjector(model, CrispConfig(target_modules=["0", "2"], factor_dtype="float64"))

    def sum_loss(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x), y, reduction="sum")

    projector.collect(data, loss_fn=sum_loss, progress=False)
    for name in ("0", "2"):
        A, S = projector.factors(name)
        assert torch.allclose(A, oracle._input_covariances[name], rtol=1e-10, atol=1e-12)
        assert torch.allclose(S, oracle._gradient_covariances[name], rtol=1e-10, atol=1e-12)


def test_mean_loss_with_term_count_equals_sum_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))) for _ in range(2)]
    by_sum = CrispProjector(model, CrispConfig(target_modules=["0"], factor_dtype="float64"))
    by_sum.collect(data, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum"),
                   progress=False)
    by_mean = CrispProjector(model, CrispConfig(target_modules=["0"], factor_dtype="float64"))
    by_mean.collect(data, loss_fn=lambda m, b: (nn.functional.cross_entropy(m(b[0]), b[1]), len(b[1])),
                    progress=False)
    for a, b in zip(by_sum.factors("0"), by_mean.factors("0")):
        assert torch.allclose(a, b, rtol=1e-12)


def brute_force_factors(model, batches, module_name: str, transposed: bool):
    """Σ over non-padding positions of [a,1][a,1]ᵀ and g gᵀ, divided by their count."""
    module = dict(model.named_modules())[module_name]
    model.eval()  # as collect() does: no dropout
    A_sum = S_sum = None
    count = 0
    for batch in batches:
        recorded = {}

        def keep(mod, args, out, recorded=recorded):
            recorded["a"], recorded["z"] = args[0], out

        handle = module.register_forward_hook(keep)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        handle.remove()
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).double(), labels.reshape(-1),
            ignore_index=-100, reduction="sum",
        )
        (g,) = torch.autograd.grad(loss, recorded["z"])
        keep_pos = batch["attention_mask"].bool()
        a = recorded["a"].detach()[keep_pos].double()
        if getattr(module, "bias", None) is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        g = g[keep_pos].double()
        A_sum = a.T @ a if A_sum is None else A_sum + a.T @ a
        S_sum = g.T @ g if S_sum is None else S_sum + g.T @ g
        count += a.shape[0]
    return A_sum / count, S_sum / count, count


@pytest.mark.parametrize(
    "make_model, names, transposed",
    [
        (tiny_llama, ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"], False),
        (tiny_gpt2, ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj"], True),
    ],
    ids=["llama", "gpt2-conv1d"],
)
def test_factors_match_brute_force_per_position(make_model, names, transposed):
    model = make_model()
    batches = [lm_batch(seed, pad_rows=2) for seed in range(2)]
    projector = CrispProjector(model, CrispConfig(target_modules=names, factor_dtype="float64"))
    projector.collect(batches, progress=False)
    for name in names:
        A_ref, S_ref, count = brute_force_factors(model, batches, name, transposed)
        A, S = projector.factors(name)
        assert projector.num_tokens(name) == count == sum(int(b["attention_mask"].sum()) for b in batches)
        assert A.shape == A_ref.shape and S.shape == S_ref.shape
        # float32 model: agreement to float32 round-off relative to the factor's scale
        assert (A - A_ref).abs().max() <= 1e-5 * A_ref.abs().max()
        assert (S - S_ref).abs().max() <= 1e-5 * S_ref.abs().max()


def test_conv1d_orientation_and_bias_column():
    model = tiny_gpt2()
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.c_fc"]))
    module = model.transformer.h[0].mlp.c_fc  # Conv1D: weight stored as (d_in, d_out)
    geometry = projector.layers["transformer.h.0.mlp.c_fc"].geometry
    assert geometry.transposed and (geometry.d_out, geometry.d_in) == (module.weight.shape[1], module.weight.shape[0])
    projector.collect([lm_batch(0)], progress=False)
    A, S = projector.factors("transformer.h.0.mlp.c_fc")
    assert A.shape == (geometry.d_in + 1, geometry.d_in + 1) and S.shape == (geometry.d_out, geometry.d_out)
    assert torch.isclose(A[-1, -1], torch.tensor(1.0))  # mean of the appended constant 1


def test_collect_accumulates_like_one_pass_over_the_union(llama, lm_batches):
    one = CrispProjector(llama, CrispConfig(target_modules=["down_proj"], factor_dtype="float64"))
    one.collect(lm_batches, progress=False)
    two = CrispProjector(llama, CrispConfig(target_modules=["down_proj"], factor_dtype="float64"))
    two.collect(lm_batches[:1], progress=False).collect(lm_batches[1:], progress=False)
    for name in one.target_names:
        for a, b in zip(one.factors(name), two.factors(name)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_bf16_model_gives_float32_factors_close_to_float32_model():
    batches = [lm_batch(s) for s in range(2)]
    reference = CrispProjector(tiny_llama(), CrispConfig(target_modules=["down_proj"])).collect(batches, progress=False)
    half = CrispProjector(tiny_llama(dtype=torch.bfloat16), CrispConfig(target_modules=["down_proj"]))
    half.collect(batches, progress=False)
    for name in half.target_names:
        A, S = half.factors(name)
        A_ref, S_ref = reference.factors(name)
        assert A.dtype == torch.float32 and S.dtype == torch.float32
        assert half.layers[name].basis.U_in.dtype == torch.float32
        assert (A - A_ref).norm() / A_ref.norm() < 0.05
        assert (S - S_ref).norm() / S_ref.norm() < 0.1


def test_collect_leaves_grads_mode_and_requires_grad_as_found(llama, lm_batches):
    llama.train()
    llama.lm_head.weight.requires_grad_(False)
    llama(**lm_batches[0]).loss.backward()
    grads = {n: p.grad.clone() for n, p in llama.named_parameters() if p.grad is not None}
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    CrispProjector(llama, CrispConfig(target_modules=["down_proj"])).collect(lm_batches, progress=False)
    assert llama.training
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    for n, p in llama.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n])
        else:
            assert p.grad is None


def test_capture_context_feeds_a_custom_loop(llama, lm_batches):
    reference = CrispProjector(llama, CrispConfig(target_modules=["down_proj"], factor_dtype="float64"))
    reference.collect(lm_batches, progress=False)
    custom = CrispProjector(llama, CrispConfig(target_modules=["down_proj"], factor_dtype="float64"))
    with custom.capture() as session:
        for batch in lm_batches:
            session.position_mask = batch["attention_mask"]
            out = llama(**batch)
            n_terms = int((batch["labels"][:, 1:] != -100).sum())
            (out.loss * n_terms).backward()
    llama.zero_grad(set_to_none=True)
    custom.update_basis()
    # The custom loop runs the same forward passes (the tiny model has no dropout, so train mode
    # computes what collect's eval mode does) and backpropagates the same sum-reduced loss with the
    # same position mask: the hooks receive identical tensors in the same order, so the sums, and
    # everything computed from them, are bit-identical.
    for name in reference.target_names:
        for a, b in zip(reference.factors(name), custom.factors(name)):
            assert torch.equal(a, b)
        assert torch.equal(reference.layers[name].basis.mask, custom.layers[name].basis.mask)
        assert reference.layers[name].basis.tau == custom.layers[name].basis.tau
