"""Run every CPU benchmark and write their JSON to ``benchmarks/results/`` (one command).

    python benchmarks/run_all.py              # full CPU sizes, about 6–10 minutes on 2 busy cores
    python benchmarks/run_all.py --smoke      # tiny sizes, seconds

Runs step overhead, collection overhead, the curvlinops peer comparison, memory, scaling, the
energy-threshold search, the micro-benchmarks of the mask and the bias column and the complement
path / blocked storage (``complement.py``; its demo-model part runs when the demo's base model is
cached, see ``--demo-cache``), the low-rank edit step (``low_rank.py``, the same demo model), the
communication of sharded bases on two gloo ranks (``sharded.py``), plus
the GPU script's ``--smoke`` (the GPU script itself at full size needs CUDA:
``python benchmarks/gpu_llm_layers.py``). Each benchmark prints its table; ``summary.json``
gathers the headline ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import collection_overhead  # noqa: E402
import complement  # noqa: E402
import gpu_llm_layers  # noqa: E402
import low_rank  # noqa: E402
import memory  # noqa: E402
import micro  # noqa: E402
import peer_curvlinops  # noqa: E402
import scaling  # noqa: E402
import sharded  # noqa: E402
import step_overhead  # noqa: E402
import threshold  # noqa: E402
from common import RESULTS, set_threads, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few rounds each")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, see common.set_threads)")
    parser.add_argument("--skip-peak", action="store_true", help="memory: skip the child processes measuring peaks")
    parser.add_argument("--demo-cache", default=None, help="complement: the demo's cache folder (default: its own)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    out = args.out or RESULTS
    step = step_overhead.run(smoke=args.smoke, out_dir=out)
    collection = collection_overhead.run(smoke=args.smoke, out_dir=out)
    peer = peer_curvlinops.run(smoke=args.smoke, out_dir=out)
    mem = memory.run(smoke=args.smoke, out_dir=out, measure_peak=not args.skip_peak)
    scale = scaling.run(smoke=args.smoke, out_dir=out)
    search = threshold.run(smoke=args.smoke, out_dir=out)
    micro.run(smoke=args.smoke, out_dir=out)
    plan = complement.run(smoke=args.smoke, out_dir=out, demo_cache=args.demo_cache)
    step_from_tokens = low_rank.run(smoke=args.smoke, out_dir=out, demo_cache=args.demo_cache)
    mem_opt = sharded.run(smoke=args.smoke, out_dir=out, threads=args.threads)
    gpu_args = ["--smoke", "--out", str(out)]
    gpu_llm_layers.main(gpu_args)
    set_threads(args.threads)
    summary = {
        "step_overhead_ratio_full_step": step["ratio_full_step_over_floor"],
        "step_overhead_ratio_opt_step_phase": step["ratio_opt_step_phase_over_floor"],
        "step_overhead_ratio_project_only": step["ratio_project_over_floor"],
        "collection_overhead_ratio": collection["ratio_collect_over_floor"],
        "peer_crisp_factors_over_curvlinops": peer["ratio_crisp_factors_over_curvlinops"],
        "peer_crisp_collect_over_curvlinops": peer["ratio_crisp_collect_over_curvlinops"],
        "memory_resident_over_bases": mem["per_layer"][0]["ratio_resident_over_floor"],
        "scaling_achieved_fraction_largest": scale["shapes"][-1]["achieved_fraction_project"],
        "threshold_search_over_sort_largest": search["shapes"][-1]["ratio_search_over_sort"],
        "complement_auto_over_floor_power_law": max(r["ratio_auto_over_floor"] for r in plan["power_law"]),
        "complement_resident_over_bases_power_law": max(r["resident_ratio_blocked"] for r in plan["power_law"]),
        "complement_worst_auto_over_floor": plan["worst_ratio_auto_over_floor"],
        "low_rank_complement_over_floor_power_law": max(
            r["ratios_over_floor"]["low-rank complement"] for r in step_from_tokens["power_law"]
        ),
        "low_rank_auto_over_floor_power_law": max(
            r["ratios_over_floor"]["low-rank auto"] for r in step_from_tokens["power_law"]
        ),
        "sharded_step_over_replicated": mem_opt["projections"]["auto"]["ratio_over_replicated"]["sharded"],
        "sharded_broadcast_bytes_per_step": float(mem_opt["projections"]["auto"]["broadcast_bytes_per_step"]),
    }
    write_result("summary_smoke" if args.smoke else "summary", {"summary": summary}, out)
    print("\nsummary\n-------")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
