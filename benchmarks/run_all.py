"""Run every CPU benchmark and write their JSON to ``benchmarks/results/`` (one command).

    python benchmarks/run_all.py              # full CPU sizes, about 6–10 minutes on 2 busy cores
    python benchmarks/run_all.py --smoke      # tiny sizes, seconds

Runs step overhead, collection overhead, the curvlinops peer comparison, memory, scaling, the
energy-threshold search and the micro-benchmarks of the mask and the bias column, plus
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
import gpu_llm_layers  # noqa: E402
import memory  # noqa: E402
import micro  # noqa: E402
import peer_curvlinops  # noqa: E402
import scaling  # noqa: E402
import step_overhead  # noqa: E402
import threshold  # noqa: E402
from common import RESULTS, set_threads, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few rounds each")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, see common.set_threads)")
    parser.add_argument("--skip-peak", action="store_true", help="memory: skip the child processes measuring peaks")
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
    }
    write_result("summary_smoke" if args.smoke else "summary", {"summary": summary}, out)
    print("\nsummary\n-------")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
