"""Smoke runs of the benchmark scripts (tiny sizes, seconds): they run and write their JSON.

The numbers themselves are not asserted (timings on a shared CPU are noise at these sizes); the
real runs are ``python benchmarks/run_all.py`` and ``docs/performance.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmarks_on_path():
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)  # the scripts pin one thread


def test_run_all_smoke_writes_every_result(benchmarks_on_path, tmp_path: Path):
    import run_all

    summary = run_all.main(["--smoke", "--skip-peak", "--out", str(tmp_path)])
    expected = {"step_overhead_smoke", "collection_overhead_smoke", "peer_curvlinops_smoke", "memory_smoke",
                "scaling_smoke", "threshold_smoke", "micro_smoke", "complement_smoke", "gpu_llm_layers_smoke",
                "low_rank_smoke", "sharded_smoke", "summary_smoke"}
    assert {p.stem for p in tmp_path.glob("*.json")} == expected
    for name in expected:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["command"].startswith("python ") and "environment" in record
    assert all(isinstance(v, float) for v in summary.values())
    peer = json.loads((tmp_path / "peer_curvlinops_smoke.json").read_text())
    assert peer["factors_max_relative_difference"] < 1e-4  # the two libraries computed the same factors
    memory = json.loads((tmp_path / "memory_smoke.json").read_text())
    assert all(not layer["d_out_by_d_in_float_tensors"] for layer in memory["per_layer"])
    plan = json.loads((tmp_path / "complement_smoke.json").read_text())
    assert plan["demo"] is not None and set(plan["control"]["gammas"]) == {"0.9", "0.99", "0.995"}
    for case in plan["power_law"]:  # every path computed the same projection
        assert max(case["max_relative_error"].values()) < 1e-5
    steps = json.loads((tmp_path / "low_rank_smoke.json").read_text())
    assert steps["demo"] is not None
    for case in steps["power_law"]:  # the low-rank paths computed the dense path's projection
        assert max(case["max_relative_error"].values()) < 1e-5
    mem_opt = json.loads((tmp_path / "sharded_smoke.json").read_text())
    for case in mem_opt["projections"].values():  # two gloo ranks: the same gradients, one broadcast per layer
        assert case["bit_identical"] and case["broadcast_bytes_per_step"] == case["all_reduce_bytes_per_step"]


def test_gpu_script_smoke_runs_on_cpu(benchmarks_on_path, tmp_path: Path):
    import gpu_llm_layers

    result = gpu_llm_layers.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / "gpu_llm_layers_smoke.json").exists()
    sections = {row["section"] for row in result["rows"]}
    assert sections == {"rates", "factors", "eigh", "project", "complement", "low-rank", "edit loop"}
    assert result["edit_loop"]["crisp_s"] > 0
    assert max(result["projection_errors"].values()) < 5e-2
    for case in result["complement"].values():
        assert case["relative_time"] <= 1.0  # the auto plan never expects to be slower than the full path
        assert max(v["relative_error"] for v in case["variants"].values()) < 5e-2
    for case in result["low_rank"].values():  # bf16 factors: the bf16 gradient's own rounding, ~1e-3
        assert max(v["relative_error"] for v in case["variants"].values()) < 1e-2


def test_memory_child_measures_a_peak(benchmarks_on_path):
    import memory

    # in a fresh interpreter, as the benchmark does: inside pytest, freeing earlier tests' memory
    # during the operation could make the resident size shrink and the difference meaningless
    peak = memory.peak_in_fresh_process("collect", dict(memory.SMOKE))
    assert peak["before_bytes"] > 0 and peak["peak_extra_bytes"] > 0
