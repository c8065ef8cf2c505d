"""Collection overhead: ``projector.collect`` versus plain forward+backward, against its floor.

    python benchmarks/collection_overhead.py            # Llama 256/1024/4 layers, 4 batches of 8×128 tokens
    python benchmarks/collection_overhead.py --smoke    # tiny sizes, seconds (exercised by the tests)

Per round, in a rotating order:

* ``collect``: ``projector.reset(); projector.collect(batches)`` — hooks, factor sums and the
  eigendecompositions of ``update_basis`` (all four MLP down-projections);
* ``fwd_bwd_frozen``: plain forward+backward of the same batches with every parameter frozen, the
  gradient flowing through the activations only (``collect`` freezes the parameters too, so this
  is the same autograd work without the curvature);
* ``fwd_bwd_train``: plain forward+backward with every parameter trainable (a training step's
  forward+backward, for scale);
* ``floor``: the bare work the curvature needs — per batch and layer ``aᵀa`` and ``gᵀg`` over its
  tokens (float32 ``addmm`` into preallocated sums), plus one ``eigh`` of each factor.

Reported (target ≤ 1.25): ``(collect − fwd_bwd_frozen) / floor``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    benchmark_llama,
    interleave,
    lm_batches,
    ms,
    print_table,
    run_from_command_line,
    write_result,
)

from torch_crisp import CrispConfig, CrispProjector  # noqa: E402

FULL = {"hidden": 256, "intermediate": 1024, "layers": 4, "vocab": 1024, "batch": 8, "seq": 128, "batches": 4,
        "rounds": 7}
SMOKE = {"hidden": 32, "intermediate": 64, "layers": 2, "vocab": 64, "batch": 2, "seq": 16, "batches": 2, "rounds": 2}


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    sizes = dict(SMOKE if smoke else FULL)
    rounds = rounds or sizes["rounds"]
    model = benchmark_llama(sizes["hidden"], sizes["intermediate"], sizes["layers"], sizes["vocab"])
    batches = lm_batches(sizes["batches"], sizes["batch"], sizes["seq"], sizes["vocab"], seed=1)
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9))
    states = list(projector.layers.values())

    def collect() -> None:
        projector.reset()
        projector.collect(batches, progress=False)

    embeddings = model.get_input_embeddings()

    def fwd_bwd_frozen() -> None:
        # Frozen parameters, as in collect(); the embedding output is made to require a gradient
        # so the backward pass runs through every layer's activations.
        for p in model.parameters():
            p.requires_grad_(False)
        handle = embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
        try:
            for batch in batches:
                (model(**batch).loss * batch["labels"][:, 1:].numel()).backward()
        finally:
            handle.remove()

    def fwd_bwd_train() -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in batches:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    collect()  # real factors for the floor's eigendecompositions
    tokens = sizes["batch"] * sizes["seq"]
    dims = [(s.geometry.d_in_augmented, s.geometry.d_out) for s in states]
    activations = [(torch.randn(tokens, d_in), torch.randn(tokens, d_out)) for d_in, d_out in dims]
    sums = [(torch.zeros(d_in, d_in), torch.zeros(d_out, d_out)) for d_in, d_out in dims]
    factors = [tuple(t.clone() for t in s.factors()) for s in states]

    def floor() -> None:
        for _ in batches:
            for (a, g), (A_sum, S_sum) in zip(activations, sums):
                A_sum.addmm_(a.mT, a)
                S_sum.addmm_(g.mT, g)
        for A, S in factors:
            torch.linalg.eigh(A)
            torch.linalg.eigh(S)

    def outer_products_only() -> None:
        for _ in batches:
            for (a, g), (A_sum, S_sum) in zip(activations, sums):
                A_sum.addmm_(a.mT, a)
                S_sum.addmm_(g.mT, g)

    def eigh_only() -> None:
        for A, S in factors:
            torch.linalg.eigh(A)
            torch.linalg.eigh(S)

    def update_basis_only() -> None:
        projector.update_basis()

    timings = interleave(
        {
            "collect": collect,
            "fwd_bwd_frozen": fwd_bwd_frozen,
            "fwd_bwd_train": fwd_bwd_train,
            "floor": floor,
            "floor_outer_products": outer_products_only,
            "floor_eigh": eigh_only,
            "update_basis": update_basis_only,
        },
        rounds=rounds,
        warmup=1,
    )
    for p in model.parameters():
        p.requires_grad_(True)
    floor_s = timings.median("floor")
    extra = timings.paired_median_difference("collect", "fwd_bwd_frozen")
    result = {
        "sizes": sizes,
        "layers": [{"d_in_augmented": i, "d_out": o} for i, o in dims],
        "timings": timings.summary(),
        "extra_collect_s": extra,
        "ratio_collect_over_floor": extra / floor_s,
        "ratio_update_basis_over_floor_eigh": timings.median("update_basis") / timings.median("floor_eigh"),
        "collect_over_fwd_bwd_train": timings.median("collect") / timings.median("fwd_bwd_train"),
        "target_ratio": 1.25,
    }
    write_result("collection_overhead_smoke" if smoke else "collection_overhead", result, out_dir)
    print_table(
        f"collection overhead ({len(dims)} × down_proj, {sizes['batches']} batches of "
        f"{sizes['batch']}×{sizes['seq']} tokens, {rounds} rounds, medians)",
        [
            ("collect (eigh included)", ms(timings.median("collect"))),
            ("plain fwd+bwd, frozen params", ms(timings.median("fwd_bwd_frozen"))),
            ("plain fwd+bwd, trainable params", ms(timings.median("fwd_bwd_train"))),
            ("floor: aᵀa, gᵀg + eigh", ms(floor_s)),
            ("  of which eigh", ms(timings.median("floor_eigh"))),
            ("update_basis alone", ms(timings.median("update_basis"))),
            ("(collect − frozen fwd+bwd) / floor", f"{result['ratio_collect_over_floor']:.2f}"),
            ("update_basis / bare eigh", f"{result['ratio_update_basis_over_floor_eigh']:.2f}"),
            ("collect / trainable fwd+bwd", f"{result['collect_over_fwd_bwd_train']:.2f}"),
        ],
    )
    return result


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
