"""Memory: what a projector keeps per layer, and the peak memory of a collection.

    python benchmarks/memory.py            # Llama 256/1024/4 layers, 4 batches of 8×128 tokens
    python benchmarks/memory.py --smoke    # tiny sizes (exercised by the tests)

* **Resident bytes per layer**: every tensor a :class:`~torch_crisp.state.LayerState` holds after
  ``collect`` (factor sums, eigenvalues, eigenbases, mask), against ``4·(d_in² + d_out²)``, the
  float32 eigenbases that any projection needs. Listed by name, shape and dtype, so one can check
  that no ``d_out × d_in`` float tensor is kept (the mask is boolean: one byte per entry).
* **Peak during collection**: a fresh child process per measurement builds the model and the
  batches, then runs either ``collect`` or a plain frozen-parameter forward+backward of the same
  batches; the peak resident set size (``VmHWM``, reset just before) minus the resident size
  before the operation is the peak *extra* memory of that operation (glibc is told to give large
  blocks back to the system when freed, see ``CHILD_ENV``, so the resident size tracks live
  tensors). Their difference is what collecting costs, shown beside its expected size: the layer
  inputs kept until each layer's backward (``tokens · d_in · 4`` bytes per layer, as for any
  K-FAC) plus the factor sums.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_llama, benchmark_parser, lm_batches, print_table, set_threads, write_result  # noqa: E402

from torch_crisp import CrispConfig, CrispProjector  # noqa: E402

FULL = {"hidden": 256, "intermediate": 1024, "layers": 4, "vocab": 1024, "batch": 8, "seq": 128, "batches": 4}
SMOKE = {"hidden": 32, "intermediate": 64, "layers": 2, "vocab": 64, "batch": 2, "seq": 16, "batches": 2}


# glibc keeps freed heap memory mapped, so the resident size would remember every earlier
# allocation; with a low mmap threshold each tensor of 64 KiB or more gets its own mapping, which
# goes back to the system when it is freed, and the resident size follows the live tensors.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-size high-water mark (Linux ≥ 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """High-water mark of the resident size since the last reset (``VmHWM``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _build(sizes: dict[str, int]) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    model = benchmark_llama(sizes["hidden"], sizes["intermediate"], sizes["layers"], sizes["vocab"])
    return model, lm_batches(sizes["batches"], sizes["batch"], sizes["seq"], sizes["vocab"], seed=1)


def child(kind: str, sizes: dict[str, int]) -> dict[str, int]:
    """Run one operation in this (fresh) process and return its peak extra resident bytes."""
    torch.set_num_threads(1)
    model, batches = _build(sizes)
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9))
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    # touch the allocator once with a small pass so that one-off initialisation is not counted
    with torch.no_grad():
        model(**batches[0])
    # without the reset, the peak of building the model would hide the operation's own peak
    reset = _reset_peak_rss()
    # the high-water mark just after the reset is the resident size at the reset; reading the
    # baseline from the same (approximate, per-CPU batched) kernel counter as the peak keeps the
    # difference from going negative by a few pages of counter noise
    before = _peak_rss_bytes() if reset else _current_rss_bytes()
    if kind == "collect":
        projector.collect(batches, progress=False)
    elif kind == "fwd_bwd_frozen":
        handle = embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
        for batch in batches:
            model(**batch).loss.backward()
        handle.remove()
    else:
        raise ValueError(kind)
    return {"before_bytes": before, "peak_extra_bytes": _peak_rss_bytes() - before, "peak_reset": int(reset)}


def peak_in_fresh_process(kind: str, sizes: dict[str, int]) -> dict[str, int]:
    """:func:`child` in a fresh interpreter, so no earlier allocation of this process is counted."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--sizes", json.dumps(sizes)],
        check=True, capture_output=True, text=True, env=CHILD_ENV,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def resident_tensors(projector: CrispProjector) -> list[dict[str, Any]]:
    """Every tensor each layer state keeps, with its bytes."""
    rows = []
    for name, state in projector.layers.items():
        held: dict[str, torch.Tensor | None] = {"A_sum": state.A_sum, "S_sum": state.S_sum,
                                                "correction_sum": state.correction_sum}
        if state.basis is not None:
            b = state.basis
            held.update({"eig_in": b.eig_in, "U_in": b.U_in, "eig_out": b.eig_out, "U_out": b.U_out, "mask": b.mask})
        for key, t in held.items():
            if t is not None:
                rows.append({"layer": name, "tensor": key, "shape": list(t.shape), "dtype": str(t.dtype),
                             "bytes": t.numel() * t.element_size()})
    return rows


def run(smoke: bool = False, out_dir: Path | None = None, measure_peak: bool = True) -> dict[str, Any]:
    """Resident tensors per layer and (``measure_peak``) the peak memory of collection, in children."""
    sizes = dict(SMOKE if smoke else FULL)
    model, batches = _build(sizes)
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9))
    projector.collect(batches, progress=False)
    rows = resident_tensors(projector)
    per_layer = []
    for name, state in projector.layers.items():
        d_in, d_out = state.geometry.d_in_augmented, state.geometry.d_out
        total = sum(r["bytes"] for r in rows if r["layer"] == name)
        bases_floor = 4 * (d_in**2 + d_out**2)
        sums = sum(r["bytes"] for r in rows if r["layer"] == name and r["tensor"] in ("A_sum", "S_sum"))
        big_float = [r["tensor"] for r in rows if r["layer"] == name and r["shape"] == [d_out, d_in]
                     and r["dtype"] != "torch.bool"]
        per_layer.append({
            "layer": name, "d_in": d_in, "d_out": d_out, "resident_bytes": total, "bases_floor_bytes": bases_floor,
            "ratio_resident_over_floor": total / bases_floor,
            "ratio_without_factor_sums": (total - sums) / bases_floor,
            "d_out_by_d_in_float_tensors": big_float,
        })

    peaks = {kind: {"before_bytes": 0, "peak_extra_bytes": 0} for kind in ("fwd_bwd_frozen", "collect")}
    for kind in peaks if measure_peak else ():
        peaks[kind] = peak_in_fresh_process(kind, sizes)
    tokens = sizes["batch"] * sizes["seq"]
    saved_inputs = sum(tokens * s.geometry.d_in * 4 for s in projector.layers.values())
    sums_bytes = sum(r["bytes"] for r in rows if r["tensor"] in ("A_sum", "S_sum"))
    extra = peaks["collect"]["peak_extra_bytes"] - peaks["fwd_bwd_frozen"]["peak_extra_bytes"]
    result = {
        "sizes": sizes,
        "resident_tensors": rows,
        "per_layer": per_layer,
        "peak": peaks if measure_peak else None,
        "collect_extra_peak_bytes": extra,
        "expected_extra_bytes": {"saved_layer_inputs_per_batch": saved_inputs, "factor_sums": sums_bytes},
    }
    write_result("memory_smoke" if smoke else "memory", result, out_dir)
    layer = per_layer[0]
    print_table(
        f"memory (down_proj {layer['d_out']}×{layer['d_in']}, {sizes['batches']} batches of "
        f"{sizes['batch']}×{sizes['seq']} tokens)",
        [
            ("resident bytes per layer", f"{layer['resident_bytes'] / 2**20:.2f} MiB"),
            ("4·(d_in² + d_out²)", f"{layer['bases_floor_bytes'] / 2**20:.2f} MiB"),
            ("resident / floor", f"{layer['ratio_resident_over_floor']:.2f}"),
            ("resident / floor without the factor sums", f"{layer['ratio_without_factor_sums']:.2f}"),
            ("d_out×d_in float tensors kept", ", ".join(layer["d_out_by_d_in_float_tensors"]) or "none"),
            ("peak extra, frozen fwd+bwd", f"{peaks['fwd_bwd_frozen']['peak_extra_bytes'] / 2**20:.1f} MiB"),
            ("peak extra, collect", f"{peaks['collect']['peak_extra_bytes'] / 2**20:.1f} MiB"),
            ("difference", f"{extra / 2**20:.1f} MiB"),
            ("expected: saved inputs (1 batch) + sums", f"{(saved_inputs + sums_bytes) / 2**20:.1f} MiB"),
        ],
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, rounds=False)
    parser.add_argument("--no-peak", action="store_true", help="skip the child processes measuring peaks")
    parser.add_argument("--child", choices=("collect", "fwd_bwd_frozen"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=str, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.sizes))))
        return
    set_threads(args.threads)
    run(smoke=args.smoke, out_dir=args.out, measure_peak=not args.no_peak)


if __name__ == "__main__":
    main()
