"""Energy threshold: sort-free search versus the full sort of the ``d_out × d_in`` curvature grid.

    python benchmarks/threshold.py            # grids from 2^14 to 2^26 entries (LLaMA-3-8B down_proj last)
    python benchmarks/threshold.py --smoke    # tiny grids

For each shape, on decaying random spectra, these run interleaved:

* ``sort``: :func:`torch_crisp.functional.threshold_from_curvature` of
  :func:`~torch_crisp.functional.curvature_grid` (materialise, sort, cumulative sum);
* ``search``: ``functional._kfac_threshold_by_search`` (sorted spectra, suffix sums, a search over
  float64 bit patterns; no grid).

Both must return the same ``τ`` (checked on every shape). :func:`~torch_crisp.functional.energy_threshold`
switches from the sort to the search above ``functional._SEARCH_MIN_GRID`` entries.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleave, run_from_command_line, write_result  # noqa: E402

from torch_crisp import functional  # noqa: E402

FULL_SHAPES = [(64, 256), (128, 512), (256, 1024), (512, 2048), (1024, 4096), (4096, 14336)]
SMOKE_SHAPES = [(8, 16), (32, 64)]


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    shapes = SMOKE_SHAPES if smoke else FULL_SHAPES
    rows = []
    g = torch.Generator().manual_seed(0)
    print(f"{'d_out×d_in':>12} {'entries':>10} {'sort':>10} {'search':>10} {'search/sort':>11}  same τ")
    for d_out, d_in in shapes:
        eig_out = torch.rand(d_out, generator=g, dtype=torch.float64) ** 6
        eig_in = torch.rand(d_in, generator=g, dtype=torch.float64) ** 6
        big = d_out * d_in > 1 << 24
        r = 1 if big else (rounds or (2 if smoke else 5))
        def by_sort(o=eig_out, i=eig_in):
            return functional.threshold_from_curvature(functional.curvature_grid(o, i), 0.99)

        def by_search(o=eig_out, i=eig_in):
            return functional._kfac_threshold_by_search(o, i, 0.99)

        timings = interleave({"sort": by_sort, "search": by_search}, rounds=r, warmup=0 if big else 1)
        same = by_sort() == by_search()
        row = {"d_out": d_out, "d_in": d_in, "timings": timings.summary(), "same_tau": same,
               "ratio_search_over_sort": timings.paired_median_ratio("search", "sort")}
        rows.append(row)
        print(f"{d_out:>5}×{d_in:<6} {d_out * d_in:>10} {timings.median('sort') * 1e3:8.1f}ms "
              f"{timings.median('search') * 1e3:8.1f}ms {row['ratio_search_over_sort']:11.3f}  {same}")
    result = {"gamma": 0.99, "switch_above_entries": functional._SEARCH_MIN_GRID, "shapes": rows}
    write_result("threshold_smoke" if smoke else "threshold", result, out_dir)
    return result


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
