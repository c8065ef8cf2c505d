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
                "scaling_smoke", "threshold_smoke", "micro_smoke", "gpu_llm_layers_smoke", "summary_smoke"}
    assert {p.stem for p in tmp_path.glob("*.json")} == expected
    for name in expected:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["command"].startswith("python ") and "environment" in record
    assert all(isinstance(v, float) for v in summary.values())
    peer = json.loads((tmp_path / "peer_curvlinops_smoke.json").read_text())
    assert peer["factors_max_relative_difference"] < 1e-4  # the two libraries computed the same factors
    memory = json.loads((tmp_path / "memory_smoke.json").read_text())
    assert all(not layer["d_out_by_d_in_float_tensors"] for layer in memory["per_layer"])


def test_gpu_script_smoke_runs_on_cpu(benchmarks_on_path, tmp_path: Path):
    import gpu_llm_layers

    result = gpu_llm_layers.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / "gpu_llm_layers_smoke.json").exists()
    sections = {row["section"] for row in result["rows"]}
    assert sections == {"rates", "factors", "eigh", "project", "edit loop"}
    assert result["edit_loop"]["crisp_s"] > 0
    assert max(result["projection_errors"].values()) < 5e-2


def test_memory_child_measures_a_peak(benchmarks_on_path):
    import memory

    # in a fresh interpreter, as the benchmark does: inside pytest, freeing earlier tests' memory
    # during the operation could make the resident size shrink and the difference meaningless
    peak = memory.peak_in_fresh_process("collect", dict(memory.SMOKE))
    assert peak["before_bytes"] > 0 and peak["peak_extra_bytes"] > 0
