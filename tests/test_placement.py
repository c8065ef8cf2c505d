"""basis_placement in one process: the refusals, the memory report's per-rank figures, and no effect alone.

The two-rank behaviour (bit-identical to replicated bases, broadcasts, loading) is checked in
tests/test_distributed.py through tests/distributed_workers/placement_scenarios.py.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import lm_batch, tiny_gpt2, tiny_llama

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector
from torch_crisp.memory import memory_report


def test_config_refuses_sharding_what_needs_every_basis_everywhere():
    with pytest.raises(ValueError, match="capability_budget.*basis_placement='replicated'"):
        CrispConfig(basis_placement="sharded", capability_budget=0.1)
    with pytest.raises(ValueError, match="ekfac.*basis_placement='replicated'"):
        CrispConfig(basis_placement="sharded", curvature="ekfac")
    with pytest.raises(ValueError, match="basis_placement must be one of"):
        CrispConfig(basis_placement="everywhere")
    # "auto" stays replicated where every rank needs every basis
    projector = CrispProjector(tiny_gpt2(), CrispConfig(target_modules=["mlp.c_proj"], capability_budget=0.1))
    assert projector.basis_placement == "replicated"
    assert CrispProjector(tiny_gpt2(), CrispConfig(target_modules=["mlp.c_proj"])).basis_placement == "auto"


def test_lora_refuses_sharded_bases():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_proj"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="LoRA.*basis_placement='replicated'"):
        CrispProjector(model, CrispConfig(target_modules=["mlp.c_proj"], basis_placement="sharded"))


def test_sharded_placement_without_a_process_group_is_the_usual_projector():
    results = []
    for placement in ("replicated", "sharded"):
        model = tiny_gpt2(seed=3).eval()
        projector = CrispProjector(model, CrispConfig(target_modules=["mlp.c_proj"], basis_placement=placement))
        projector.collect([lm_batch(s) for s in range(2)], progress=False)
        assert not projector.bases_sharded
        params = projector.projected_parameters()
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
        optimizer = CrispOptimizer(torch.optim.SGD(params, lr=0.1), projector, mode="grad")
        model(**lm_batch(9)).loss.backward()
        optimizer.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_memory_report_gives_one_ranks_share_of_sharded_bases():
    model = tiny_llama()
    replicated = memory_report(model, CrispConfig(target_modules="all-linear"), world_size=4)
    sharded = memory_report(model, CrispConfig(target_modules="all-linear", basis_placement="sharded"), world_size=4)
    total = replicated.replicated_bases_bytes
    assert replicated.bases_per_rank_bytes == total  # "auto" reports the replicated figure
    assert total / 4 <= sharded.bases_per_rank_bytes == sharded.sharded_bases_bytes < total
    assert sharded.training_bytes == replicated.training_bytes - total + sharded.sharded_bases_bytes
    alone = memory_report(model, CrispConfig(target_modules="all-linear", basis_placement="sharded"))
    assert alone.bases_per_rank_bytes == total  # one rank holds everything
    assert "sharded" in sharded.format()
    with pytest.raises(ValueError, match="world_size"):
        memory_report(model, CrispConfig(), world_size=0)
