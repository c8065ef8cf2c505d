"""Peer comparison: the same K-FAC factors from torch_crisp and from curvlinops' ``KFACLinearOperator``.

    python benchmarks/peer_curvlinops.py            # Llama 256/1024/4 layers, 2 batches of 8×128 tokens
    python benchmarks/peer_curvlinops.py --smoke    # tiny sizes, seconds (exercised by the tests)

Both compute, for the four MLP down-projections, ``A = (1/N) Σ_t a_t a_tᵀ`` and
``S = (1/N) Σ_t g_t g_tᵀ`` of the empirical Fisher (the data's labels), curvlinops with
``kfac_approx=EXPAND`` and mean reduction, on the same model and data. The model is wrapped so that
it maps input ids to ``(batch, classes, positions)`` logits with one label per position (the layout
``nn.CrossEntropyLoss`` takes), so both libraries see exactly the same loss terms. Per round, in a
rotating order:

* ``curvlinops``: ``KFACLinearOperator(...)`` + ``compute_kronecker_factors()``;
* ``torch_crisp_factors``: ``projector.capture()`` + the same forward/backward passes (factors
  only), with the down-projection weights trainable exactly as curvlinops has them (it
  differentiates w.r.t. the parameters it is given, so it computes their gradients too);
* ``torch_crisp_factors_frozen``: the same with every weight frozen, which is what
  ``collect`` does (no weight gradient is needed for the factors);
* ``torch_crisp_collect``: ``projector.collect`` (factors and the eigendecompositions).

Ratios are medians of per-round ratios (each taken within one round), which cancels most of the
load drift of a shared machine.

The factors of the two libraries are compared once (relative max difference), so that the time is
that of the same result. Target: torch_crisp no slower than curvlinops. ``--profile`` prints where
each one's time goes (``torch.profiler``, one call each).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_llama, benchmark_parser, interleave, ms, print_table, set_threads, write_result  # noqa: E402

from torch_crisp import CrispConfig, CrispProjector  # noqa: E402

FULL = {"hidden": 256, "intermediate": 1024, "layers": 4, "vocab": 1024, "batch": 8, "seq": 128, "batches": 2,
        "rounds": 9}
SMOKE = {"hidden": 32, "intermediate": 64, "layers": 2, "vocab": 64, "batch": 2, "seq": 16, "batches": 2, "rounds": 2}


class LogitsByPosition(nn.Module):
    """``input_ids -> (batch, vocab, seq)`` logits of a causal LM (``nn.CrossEntropyLoss`` layout)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits.transpose(1, 2)


def run(
    smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None, profile: bool = False
) -> dict[str, Any]:
    """Time both libraries interleaved, compare their factors; ``profile`` prints a
    ``torch.profiler`` table of one call of each (where the time goes)."""
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import FisherType, KFACType

    sizes = dict(SMOKE if smoke else FULL)
    rounds = rounds or sizes["rounds"]
    lm = benchmark_llama(sizes["hidden"], sizes["intermediate"], sizes["layers"], sizes["vocab"])
    model = LogitsByPosition(lm).eval()
    g = torch.Generator().manual_seed(1)
    shape = (sizes["batch"], sizes["seq"])
    data = [
        (torch.randint(3, sizes["vocab"], shape, generator=g), torch.randint(0, sizes["vocab"], shape, generator=g))
        for _ in range(sizes["batches"])
    ]
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9))
    names = projector.target_names
    modules = dict(model.named_modules())
    params = [modules[name].weight for name in names]
    # curvlinops differentiates w.r.t. the parameters it is given; the rest stay frozen, as in collect().
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def sum_loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="sum")

    peer_holder: dict[str, Any] = {}

    def curvlinops_factors() -> None:
        op = KFACLinearOperator(
            model, nn.CrossEntropyLoss(), params, data,
            fisher_type=FisherType.EMPIRICAL, kfac_approx=KFACType.EXPAND,
            separate_weight_and_bias=False, check_deterministic=False, progressbar=False,
        )
        op.compute_kronecker_factors()
        peer_holder["op"] = op

    def crisp_factors() -> None:
        projector.reset()
        with projector.capture():
            for batch in data:
                sum_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    def crisp_factors_frozen() -> None:
        for p in params:
            p.requires_grad_(False)
        try:
            crisp_factors()
        finally:
            for p in params:
                p.requires_grad_(True)

    def crisp_collect() -> None:
        projector.reset()
        projector.collect(data, loss_fn=sum_loss, progress=False)

    timings = interleave(
        {
            "curvlinops": curvlinops_factors,
            "torch_crisp_factors": crisp_factors,
            "torch_crisp_factors_frozen": crisp_factors_frozen,
            "torch_crisp_collect": crisp_collect,
        },
        rounds=rounds,
        warmup=1,
    )

    if profile:
        from torch.profiler import profile as torch_profile

        for label, fn in (("curvlinops", curvlinops_factors), ("torch_crisp capture", crisp_factors)):
            with torch_profile() as prof:
                fn()
            print(f"\nprofile: {label}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))

    crisp_factors()
    curvlinops_factors()
    op = peer_holder["op"]
    # curvlinops keys its factors by module name (or by parameter ids); accept either layout.
    input_cov, grad_cov = op._input_covariances, op._gradient_covariances
    max_rel = 0.0
    for name, param in zip(names, params):
        key = name if name in input_cov else next(k for k in input_cov if str(id(param)) in str(k) or k == name)
        A, S = projector.factors(name)
        for ours, theirs in ((A, input_cov[key]), (S, grad_cov[key])):
            max_rel = max(max_rel, float((ours - theirs).abs().max() / theirs.abs().max()))
    for p in model.parameters():
        p.requires_grad_(True)

    result = {
        "sizes": sizes,
        "timings": timings.summary(),
        "factors_max_relative_difference": max_rel,
        "ratio_crisp_factors_over_curvlinops": timings.paired_median_ratio("torch_crisp_factors", "curvlinops"),
        "ratio_crisp_factors_frozen_over_curvlinops": timings.paired_median_ratio(
            "torch_crisp_factors_frozen", "curvlinops"
        ),
        "ratio_crisp_collect_over_curvlinops": timings.paired_median_ratio("torch_crisp_collect", "curvlinops"),
        "target_ratio": 1.0,
    }
    write_result("peer_curvlinops_smoke" if smoke else "peer_curvlinops", result, out_dir)
    print_table(
        f"peer: K-FAC factors of {len(names)} down_proj layers, {sizes['batches']} batches of "
        f"{sizes['batch']}×{sizes['seq']} tokens, {rounds} rounds, medians",
        [
            ("curvlinops KFACLinearOperator (factors)", ms(timings.median("curvlinops"))),
            ("torch_crisp capture (factors, weights trainable)", ms(timings.median("torch_crisp_factors"))),
            ("torch_crisp capture (factors, weights frozen)", ms(timings.median("torch_crisp_factors_frozen"))),
            ("torch_crisp collect (factors + eigh)", ms(timings.median("torch_crisp_collect"))),
            ("torch_crisp factors / curvlinops", f"{result['ratio_crisp_factors_over_curvlinops']:.2f}"),
            ("torch_crisp factors, frozen / curvlinops", f"{result['ratio_crisp_factors_frozen_over_curvlinops']:.2f}"),
            ("torch_crisp collect / curvlinops", f"{result['ratio_crisp_collect_over_curvlinops']:.2f}"),
            ("max relative factor difference", f"{max_rel:.1e}"),
        ],
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of each")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    run(smoke=args.smoke, rounds=args.rounds, out_dir=args.out, profile=args.profile)


if __name__ == "__main__":
    main()
