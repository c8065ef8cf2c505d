"""The memory report (torch_crisp.memory) against what a projector really holds and allocates.

Resident bytes are summed over every tensor a layer state keeps after ``collect``; transient peaks
are read from torch.profiler's allocation events on the CPU (its running "Total Allocated").
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector
from torch_crisp.config import ProjectionOptions
from torch_crisp.layers import LinearGeometry
from torch_crisp.memory import basis_peak_bytes, held_bytes, memory_report, projection_peak_bytes
from torch_crisp.state import LayerState


def peak_allocated(fn, tmp_path) -> tuple[int, int]:
    """``(peak, retained)`` bytes allocated during ``fn()`` above what was allocated before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start, events[-1]["Total Allocated"] - start


def _collected(model, batches, **options) -> CrispProjector:
    config = CrispConfig(target_modules="all-linear", gamma=0.9, **options)
    projector = CrispProjector(model, config)
    for state in projector.layers.values():  # what CrispProjector.__init__ does once it passes the options
        state.options = config.projection_options
    projector.collect(batches, progress=False)
    return projector


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])  # gpt2: Conv1D layers with a bias column
def test_the_report_from_shapes_is_what_collect_holds(model_name, request, lm_batches):
    model = request.getfixturevalue(model_name)
    config = CrispConfig(target_modules="all-linear", gamma=0.9)
    before = memory_report(model, config)  # from module shapes, no data yet
    projector = _collected(model, lm_batches)
    for row in before.layers:
        measured = held_bytes(projector.layers[row.name])
        assert row.factor_sums_bytes + row.basis_bytes == measured
    assert before.training_bytes >= sum(held_bytes(s) for s in projector.layers.values())


def test_blocked_storage_is_reported_exactly_after_collect_and_bounded_before(llama, lm_batches):
    options = {"basis_storage": "blocked", "offload_factors": True, "projection": "complement"}  # tiny: forced
    config = CrispConfig(target_modules="all-linear", gamma=0.9, **options)
    bound = memory_report(llama, config)
    projector = _collected(llama, lm_batches, **options)
    exact = memory_report(projector.layers, config)
    for before, after in zip(bound.layers, exact.layers):
        state = projector.layers[after.name]
        sums = sum(t.numel() * t.element_size() for t in (state.A_sum, state.S_sum))
        assert after.basis_bytes == held_bytes(state) - sums and after.exact_basis
        assert before.basis_bytes >= after.basis_bytes and not before.exact_basis
    assert sum(a.basis_bytes for a in exact.layers) < 0.8 * sum(b.basis_bytes for b in bound.layers)
    assert exact.host_bytes == sum(x.factor_sums_bytes for x in exact.layers) and exact.sums_device_bytes == 0
    assert "collection peak" in exact.format()


@pytest.mark.parametrize(("d_out", "d_in", "bias"), [(48, 160, False), (160, 48, True), (200, 400, False)])
@pytest.mark.parametrize("storage", ["full", "blocked"])
def test_basis_peak_within_ten_percent_of_the_measured_allocations(d_out, d_in, bias, storage, tmp_path):
    torch.manual_seed(0)
    state = LayerState("x", LinearGeometry.of(nn.Linear(d_in, d_out, bias=bias)), torch.float32,
                       ProjectionOptions(basis_storage=storage))
    state.accumulate(torch.randn(500, d_in) * torch.logspace(0, -3, d_in),
                     torch.randn(500, d_out) * torch.logspace(0, -2, d_out))
    peak, retained = peak_allocated(lambda: state.compute_basis(0.9), tmp_path)
    basis = state.basis
    reduced = 4 * basis.plan().reduced_floats() if storage == "blocked" and hasattr(basis, "U_side") else None
    assert retained == sum(t.numel() * t.element_size() for t in basis.tensors().values())
    predicted = basis_peak_bytes(d_out, d_in + bias, 4, reduced)
    assert abs(predicted - (peak - retained)) <= 0.1 * (peak - retained)


@pytest.mark.parametrize("projection", ["full", "complement"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_peak_within_ten_percent_of_the_measured_allocations(projection, dtype, tmp_path):
    d_out, d_in = 128, 512
    state = LayerState("x", LinearGeometry.of(nn.Linear(d_in, d_out, bias=False)), torch.float32,
                       ProjectionOptions(projection=projection))
    state.A_sum = torch.diag(torch.arange(1, d_in + 1, dtype=torch.float32).pow(-1.5))
    state.S_sum = torch.diag(torch.arange(1, d_out + 1, dtype=torch.float32).pow(-1.5))
    state.token_count = 1
    state.compute_basis(0.9)
    Q = torch.randn(d_out, d_in).to(dtype)
    state.project(Q)  # the plan is made once, on first use
    peak, _ = peak_allocated(lambda: state.project(Q), tmp_path)
    predicted = projection_peak_bytes(d_out, d_in, Q.element_size(), state.basis.plan(projection))
    assert abs(predicted - peak) <= 0.1 * peak


def test_update_mode_anchors_are_counted(llama, lm_batches):
    config = CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9)
    projector = CrispProjector(llama, config)
    projector.collect(lm_batches, progress=False)
    params = [p for s in projector.layers.values() for p in s.geometry.parameters()]
    optimizer = CrispOptimizer(torch.optim.SGD(params, lr=1e-3), projector, mode="update")
    llama(**lm_batches[0]).loss.backward()
    optimizer.step()
    anchored = optimizer.constraint.state_dict()["anchor"].values()
    anchors = sum(t.numel() * t.element_size() for tensors in anchored for t in tensors)
    report = memory_report(projector.layers, config, mode="update")
    assert sum(x.anchor_bytes for x in report.layers) == anchors > 0
    assert sum(x.anchor_bytes for x in memory_report(projector.layers, config).layers) == 0  # grad mode: none


def test_an_8b_model_on_the_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama3_8b)
    full = memory_report(model, CrispConfig(target_modules="all-linear"))
    assert len(full.layers) == 32 * 7
    down = next(x for x in full.layers if x.name.endswith("layers.0.mlp.down_proj"))
    # the 1.84 GB for one down_proj: sums + bases + mask
    assert down.factor_sums_bytes + down.basis_bytes == pytest.approx(1.84e9, rel=0.01)
    # 96 MLP layers at 1.84 GB and 128 attention layers: ~205 GB (the "~150 GB" undercounted)
    assert 185 * 2**30 < full.training_bytes < 195 * 2**30
    lean = memory_report(model, CrispConfig(target_modules="all-linear", basis_storage="blocked", offload_factors=True),
                         blocked_rank_fraction=0.1)
    assert lean.training_bytes < 0.15 * full.training_bytes and lean.host_bytes == full.sums_device_bytes
    with pytest.raises(ValueError, match="blocked_rank_fraction"):
        memory_report(model, CrispConfig(), blocked_rank_fraction=1.5)
