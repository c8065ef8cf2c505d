"""The low-rank edit step against the dense floor, with and without the complement path, side by side.

    python benchmarks/low_rank.py                    # power laws at 512×2048 and 1024×4096, the demo model
    python benchmarks/low_rank.py --smoke            # tiny shapes and models (the tests run this)
    python benchmarks/low_rank.py --demo-cache DIR   # where `torch-crisp demo` cached its base model

An edit step's gradient of a layer over ``T`` positions (default 16) is ``Q = Gᵀ X`` with ``G`` the
output gradients and ``X`` the inputs (random here, float32). For every case one "step" projects
every layer of the case once; these run interleaved, in a rotating order:

* ``floor``: the four bare float32 products of the dense full path, ``U_outᵀ Q U_in`` and back;
* ``dense``: ``LayerState.project``'s path on ``Q`` (the plan's cheaper of full and complement);
* ``low-rank full``: the check that the factors reproduce ``Q``
  (:func:`torch_crisp.low_rank.reproduction_scale`) plus the full path from the factors;
* ``low-rank complement``: the check plus the complement path from the factors;
* ``low-rank auto``: the check plus what :class:`~torch_crisp.low_rank_step.LowRankStep` does per
  layer (:func:`torch_crisp.low_rank.choose_path`: the cheapest low-rank path, or the dense one).

Reported: medians of per-round time ratios to the floor, the largest relative error of each path
against a float64 reference (relative to ``‖P(Q)‖``, floored at 10 % of ``‖Q‖``), the cost model's
estimates and the paths ``auto`` took. Also the **margin of the check** on real gradients: a small
Llama (hidden 64, MLP 256) trained through the library's hooks (3 padded micro-batches per step), in
float32, in bf16, and in float32 under bf16 autocast; per layer and step the residual
``‖.grad − α·Gᵀ X‖ / ‖.grad‖`` beside the tolerance ``ρ`` the step accepts. And **whole edit steps**:
``step_overhead.py``'s model (a random Llama, hidden 256, MLP 1024, its four ``down_proj`` projected,
collected on 4 batches of 8×128 tokens, γ = 0.9) trained in grad mode (SGD) on one 16-token row per
step, twice from the same state: ``CrispOptimizer(low_rank="auto")`` and ``low_rank="off"``; per
round each runs forward and backward (hooks included) and its optimizer step, interleaved; then the
``auto`` model's forward and backward with its hooks installed and removed in turn (the hooks' cost
on one model). And the **cost of an entry-wise pass** the cost model charges: ``vector_norm`` and
``copy_`` of float32 512×2048 and 1024×4096 matrices against a 1024² product, in FLOPs per entry. Spectra: power laws
``λ_k = k^-1.5`` (γ = 0.9, random orthonormal bases; ``spectra.py``) and every linear layer of the
demo's pretrained model at γ = 0.9, 0.99, 0.995 (all 28 layers, and its four edited ``down_proj``),
when it is cached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, interleave, set_threads, write_result  # noqa: E402
from spectra import demo_projector, power_law_basis  # noqa: E402

from torch_crisp import functional, low_rank  # noqa: E402
from torch_crisp.basis import Basis  # noqa: E402
from torch_crisp.low_rank_step import project_from_factors  # noqa: E402

POWER_LAW = [(512, 2048), (1024, 4096)]
SMOKE_POWER_LAW = [(24, 96), (96, 24)]
GAMMAS = (0.9, 0.99, 0.995)
TOKENS = 16
PATHS = ("dense", "low-rank full", "low-rank complement", "low-rank auto")


def _floor(Q: torch.Tensor, basis: Basis) -> None:
    C = basis.U_out.mT @ Q @ basis.U_in
    basis.U_out @ C @ basis.U_in.mT


def low_rank_step(basis: Basis, G: torch.Tensor, X: torch.Tensor, Q: torch.Tensor, path: str,
                  budget: int | None = None) -> torch.Tensor:
    """One layer of the step as the library runs it. ``"auto"``: a layer whose tokens exceed its (cached) token
    budget keeps no factors and takes the dense path; below it, the check and the cheaper low-rank path
    (``project_from_factors`` chooses); ``"full"`` / ``"complement"``: the check and that path."""
    if path == "auto":
        if budget is None or G.shape[0] > budget:
            return basis.project(Q, "auto")
        path = "auto"
    alpha = low_rank.reproduction_scale(Q, G, X)
    assert alpha is not None, "the factors must reproduce their own product"
    return project_from_factors(basis, path, G, X, alpha, Q)  # type: ignore[arg-type]


def measure_step(bases: list[Basis], tokens: int, rounds: int, seed: int = 0, max_inner: int = 100,
                 device: torch.device | None = None) -> dict[str, Any]:
    """Time one step over ``bases`` per candidate, interleaved; errors, chosen paths and cost estimates."""
    device = device or bases[0].device
    g = torch.Generator(device=device).manual_seed(seed)
    factors = [(torch.randn(tokens, b.shape[0], generator=g, device=device),
                torch.randn(tokens, b.shape[1], generator=g, device=device)) for b in bases]
    grads = [G.mT @ X for G, X in factors]
    for b in bases:  # plans are made on first use, once per basis: not part of a step
        b.plan("auto"), b.plan("complement")
    budgets = {id(b): low_rank.token_budget(b, "auto", device, "auto") for b in bases}  # cached by the library too

    def step(fn) -> Any:
        return lambda: [fn(b, G, X, Q) for b, (G, X), Q in zip(bases, factors, grads)]

    candidates = {
        "floor": step(lambda b, G, X, Q: _floor(Q, b)),
        "dense": step(lambda b, G, X, Q: b.project(Q, "auto")),
        "low-rank full": step(lambda b, G, X, Q: low_rank_step(b, G, X, Q, "full")),
        "low-rank complement": step(lambda b, G, X, Q: low_rank_step(b, G, X, Q, "complement")),
        "low-rank auto": step(lambda b, G, X, Q: low_rank_step(b, G, X, Q, "auto", budgets[id(b)])),
    }
    full_flops = sum(b.plan().full_flops for b in bases)
    inner = min(max_inner, max(1, int(0.02 / (full_flops / 1e11))))  # samples of ~20 ms on one CPU core
    timings = interleave(candidates, rounds=rounds, warmup=1, inner=inner, device=device)
    errors = {}
    for name in PATHS:
        worst = 0.0
        for b, (G, X), Q in zip(bases, factors, grads):
            result = b.project(Q, "auto") if name == "dense" else low_rank_step(b, G, X, Q, name.split()[-1],
                                                                                 budgets[id(b)])
            exact = functional.project(Q.double(), b.U_out.double(), b.U_in.double(), b.mask)
            worst = max(worst, float((result.double() - exact).norm() / max(exact.norm(), 0.1 * Q.double().norm())))
        errors[name] = worst
    chosen = [low_rank.choose_path(b, "auto", tokens, device, "auto") for b in bases]
    costs = [low_rank.path_costs(b, "auto", tokens, device) for b in bases]
    return {
        "layers": len(bases), "tokens": tokens,
        "ratios_over_floor": {name: timings.paired_median_ratio(name, "floor") for name in PATHS},
        "estimated_over_dense": {path: sum(c[path] for c in costs) / sum(c["dense"] for c in costs)
                                 for path in ("full", "complement")},
        "auto_paths": {path: chosen.count(path) for path in ("dense", "full", "complement")},
        "token_budgets": list(budgets.values()),
        "max_relative_error": errors,
        "timings": timings.summary(),
    }


def check_margins(steps: int = 2, micro_batches: int = 3) -> dict[str, Any]:
    """Residuals of the check on real gradients against its tolerance (see the module docstring)."""
    from common import benchmark_llama

    from torch_crisp import CrispConfig, CrispProjector
    from torch_crisp.token_capture import TokenCapture

    result = {}
    for label, dtype, autocast in (("float32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                   ("float32 + bf16 autocast", torch.float32, True)):
        model = benchmark_llama(hidden=64, intermediate=256, layers=2, vocab=256).to(dtype)
        projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj", "self_attn.q_proj"]))
        for name, param in model.named_parameters():
            param.requires_grad_(any(name.startswith(n + ".") for n in projector.layers))
        capture = TokenCapture(projector.layers, model, budget=lambda name: 10**9)
        capture.start()
        g = torch.Generator().manual_seed(0)
        rows = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            capture.clear()
            for _ in range(micro_batches):
                ids = torch.randint(3, 256, (2, 12), generator=g)
                mask = torch.ones_like(ids)
                mask[0, 9:] = 0  # one padded row: its positions are not kept
                labels = ids.masked_fill(mask == 0, -100)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            records, _ = capture.take()
            for name, state in projector.layers.items():
                G = torch.cat([G for G, _ in records[name]])
                X = torch.cat([X for _, X in records[name]])
                grad = state.geometry.as_matrix(state.geometry.weight.grad)
                _, residual = low_rank.reproduction_residual(grad, G, X)
                tolerance = low_rank.reproduction_tolerance((grad.dtype, G.dtype, X.dtype), G.shape[0],
                                                            len(records[name]))
                rows.append({"layer": name, "tokens": G.shape[0], "residual": residual, "tolerance": tolerance,
                             "margin": tolerance / max(residual, 1e-300)})
        capture.stop()
        result[label] = {"rows": rows, "min_margin": min(r["margin"] for r in rows),
                         "max_margin": max(r["margin"] for r in rows)}
        print(f"  check on real gradients, {label}: residual / ‖.grad‖ up to "
              f"{max(r['residual'] for r in rows):.1e}, tolerance {rows[0]['tolerance']:.1e}: margin "
              f"{result[label]['min_margin']:.1f}–{result[label]['max_margin']:.1f}×", flush=True)
    return result


def edit_steps(smoke: bool, rounds: int, tokens: int) -> dict[str, Any]:
    """Whole grad-mode edit steps with ``low_rank="auto"`` and ``"off"`` (see the module docstring)."""
    import statistics
    import time

    from common import benchmark_llama, lm_batches

    from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector

    size = {"hidden": 32, "intermediate": 96, "layers": 2, "vocab": 64} if smoke else \
        {"hidden": 256, "intermediate": 1024, "layers": 4, "vocab": 1024}
    config = CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9)
    runs = {}
    reference = None
    for policy in ("auto", "off"):
        model = benchmark_llama(**size)
        projector = CrispProjector(model, config)
        if reference is None:
            projector.collect(lm_batches(2 if smoke else 4, 8, 128 if not smoke else 16, size["vocab"]),
                              progress=False)
            reference = projector.state_dict(include_basis=True)
        else:
            projector.load_state_dict(reference)
        params = projector.projected_parameters()
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
        runs[policy] = (model, projector, CrispOptimizer(torch.optim.SGD(params, lr=1e-3), projector, mode="grad",
                                                         low_rank=policy))
    batch = lm_batches(1, 1, tokens, size["vocab"], seed=5)[0]
    samples: dict[str, dict[str, list[float]]] = {p: {"backward": [], "step": []} for p in runs}
    low = []
    for r in range(rounds + 1):  # round 0 warms up
        for policy in (("auto", "off") if r % 2 else ("off", "auto")):
            model, projector, optimizer = runs[policy]
            optimizer.zero_grad()
            start = time.perf_counter()
            model(**batch).loss.backward()
            middle = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
            if r:
                samples[policy]["backward"].append(middle - start)
                samples[policy]["step"].append(end - middle)
                if policy == "auto":
                    low.append(len(projector.last_projection.low_rank))
    median = {p: {k: statistics.median(v) for k, v in phases.items()} for p, phases in samples.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(samples["auto"][k], samples["off"][k]))
             for k in ("backward", "step")}
    budgets = [runs["auto"][2].constraint.low_rank.budget(n) for n in runs["auto"][1].layers]
    model, projector, optimizer = runs["auto"]
    capture = optimizer.constraint.low_rank.capture
    hooks: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(2 * rounds + 1):  # the same model with its hooks installed and removed in turn
        for state in (("on", "off") if r % 2 else ("off", "on")):
            capture.start() if state == "on" else capture.stop()
            optimizer.zero_grad()
            start = time.perf_counter()
            model(**batch).loss.backward()
            if r:
                hooks[state].append(time.perf_counter() - start)
    capture.stop()
    hooks_median = {k: statistics.median(v) for k, v in hooks.items()}
    print(f"  whole edit steps, T = {tokens}: forward+backward auto/off {ratio['backward']:.3f}, optimizer step "
          f"auto/off {ratio['step']:.3f} ({median['auto']['step'] * 1e3:.1f} vs {median['off']['step'] * 1e3:.1f} ms); "
          f"layers from factors per step {sorted(set(low))}, token budgets {budgets}; one model, forward+backward "
          f"with / without hooks {hooks_median['on'] * 1e3:.2f} / {hooks_median['off'] * 1e3:.2f} ms", flush=True)
    return {"tokens": tokens, "median_s": median, "ratio_auto_over_off": ratio, "low_rank_layers": sorted(set(low)),
            "token_budgets": budgets, "hooks_on_off_s": hooks_median}


def pass_costs(smoke: bool, rounds: int) -> dict[str, Any]:
    """FLOP-equivalents per entry of a float32 norm and copy, at the rate of a square product timed alongside."""
    n = 256 if smoke else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    result = {}
    for d_out, d_in in [(32, 96)] if smoke else [(512, 2048), (1024, 4096)]:
        x, y = torch.randn(d_out, d_in), torch.randn(d_out, d_in)
        t = interleave({"mm": lambda: a @ b, "norm": lambda x=x: torch.linalg.vector_norm(x),
                        "copy": lambda x=x, y=y: x.copy_(y)}, rounds=rounds, inner=5)
        rate = 2.0 * n**3 / t.median("mm")
        result[f"{d_out}x{d_in}"] = {k: t.median(k) * rate / (d_out * d_in) for k in ("norm", "copy")}
    print(f"  entry-wise passes, FLOPs per entry at the matmul rate: {result}", flush=True)
    return result


def _print(label: str, m: dict[str, Any]) -> None:
    r = m["ratios_over_floor"]
    print(f"  {label}: time / floor: dense {r['dense']:.3f}, low-rank full {r['low-rank full']:.3f}, "
          f"low-rank complement {r['low-rank complement']:.3f}, low-rank auto {r['low-rank auto']:.3f} "
          f"(auto paths {m['auto_paths']}); max error {max(m['max_relative_error'].values()):.1e}", flush=True)


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None, demo_cache: str | None = None,
        pretrain_demo: bool = False, tokens: int = TOKENS) -> dict[str, Any]:
    rounds = rounds or (2 if smoke else 9)
    max_inner = 2 if smoke else 100
    result: dict[str, Any] = {"tokens": tokens, "power_law": [], "demo": None}
    for d_out, d_in in SMOKE_POWER_LAW if smoke else POWER_LAW:
        entry = {"d_out": d_out, "d_in": d_in, "gamma": 0.9, "exponent": 1.5,
                 **measure_step([power_law_basis(d_out, d_in, 0.9)], tokens, rounds, max_inner=max_inner)}
        result["power_law"].append(entry)
        _print(f"power law {d_out}×{d_in}, γ = 0.9, T = {tokens}", entry)
    result["check_margins"] = check_margins(steps=1 if smoke else 2)
    result["edit_steps"] = edit_steps(smoke, 3 if smoke else 15, tokens)
    result["pass_costs"] = pass_costs(smoke, rounds)
    demo = demo_projector(demo_cache, pretrain_demo, smoke)
    if demo is not None:
        projector, description = demo
        result["demo"] = {"source": description, "gammas": {}}
        for gamma in GAMMAS[1:2] if smoke else GAMMAS:
            projector.set_gamma(gamma)
            every = [s.basis for s in projector.layers.values()]
            down = [s.basis for n, s in projector.layers.items() if n.endswith("mlp.down_proj")]
            entry = {"all_layers": measure_step(every, tokens, rounds, max_inner=max_inner),
                     "down_proj": measure_step(down, tokens, rounds, max_inner=max_inner)}
            result["demo"]["gammas"][str(gamma)] = entry
            _print(f"{description}, γ = {gamma}, all {len(every)} layers", entry["all_layers"])
            _print(f"{description}, γ = {gamma}, the {len(down)} down_proj", entry["down_proj"])
    write_result("low_rank_smoke" if smoke else "low_rank", result, out_dir)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser: argparse.ArgumentParser = benchmark_parser(__doc__)
    parser.add_argument("--demo-cache", default=None, help="the demo's cache folder (default: the demo's own)")
    parser.add_argument("--pretrain-demo", action="store_true", help="pretrain the demo's base model if not cached")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="positions of the step's gradient (T)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    return run(args.smoke, args.rounds, args.out, args.demo_cache, args.pretrain_demo, args.tokens)


if __name__ == "__main__":
    main()
