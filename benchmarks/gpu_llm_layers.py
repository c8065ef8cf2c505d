"""LLaMA-3-8B-shaped layers on one GPU: every cost of CrispEdit beside its floor, in one run (< 5 min).

    python benchmarks/gpu_llm_layers.py                 # CUDA, down_proj 4096×14336, five layers
    python benchmarks/gpu_llm_layers.py --smoke         # CPU or GPU, tiny shapes, seconds (tests run this)

Random data throughout (nothing is downloaded). Sections, each printed as ``time | floor | time/floor``:

1. **rates**: the machine's measured matmul rate in fp32, tf32 and bf16 (square products) and its
   memory bandwidth (a large device copy); every floor below is FLOPs over the matching rate, or
   bytes over the bandwidth.
2. **factor accumulation**: ``A += aᵀa`` (``d_in²``) and ``S += gᵀg`` (``d_out²``) for a chunk of
   tokens, in fp32 as the library accumulates; reported per token and for the five layers.
3. **eigendecomposition** (fp32, ``torch.linalg.eigh``) of one layer's ``A`` and ``S``, and the
   energy threshold and mask of its ``d_out × d_in`` grid; the floor of ``eigh`` is an estimate
   (``≈ 4 n³`` FLOPs: tridiagonal reduction plus back-transformation) and is labelled as such.
4. **projection per step** of the five layers' gradients (bf16, as a bf16 model produces them):
   the library's path with fp32 bases and TF32 off (``fp32``), with TF32 on (``tf32``), and with
   the bases cast to bf16 (``bf16``), with each one's error against a float64 reference.
4b. **complement path** (:mod:`torch_crisp.plan`): the same step on the path ``LayerState.project``
   takes (``projection="auto"``) and on the complement path forced, for the mask of section 3 and
   for power-law spectra (``λ_k = k^-1.5``, ``γ = 0.9``) on the same eigenvectors, each in fp32,
   tf32 and bf16 with its error; the floor column is the **dense** path's floor, so the ratio is
   the saving. Also the plan (``r``, ``J(0)``, blocked fraction, FLOPs against the dense path) and
   the bytes one layer keeps with ``basis_storage="blocked"`` (and offloaded sums) against
   ``4·(d_in² + d_out²)``.
4c. **low-rank step** (:mod:`torch_crisp.low_rank`): an edit step's gradient over ``T = 16`` positions,
   ``Q = Gᵀ X`` with bf16 factors (as a bf16 model's hooks keep them) and ``Q`` rounded to bf16, projected
   from the factors with the library's check: on the full path, on the complement path and as
   ``LowRankStep`` chooses, for the mask of section 3 and the power law of 4b, in fp32 and tf32, each
   with its error; the floor column is the dense path's floor again.
5. **edit loop with cached factors**: a randomly initialised model with the LLaMA-3-8B config in
   bf16 (fewer decoder layers if the whole model does not fit, same layer shapes), five MLP
   down-projections trainable and projected by :class:`~torch_crisp.CrispOptimizer` (AdamW), the
   bases precomputed; ``--edits`` edits in batches of ``--edit-batch``, ``--steps-per-batch``
   optimizer steps each. Reported: total time, time per edit, and the share spent in projection
   (the same loop with plain AdamW runs first for the difference).

GPU numbers have not been measured in this repository yet (no GPU was available when it was
written); ``docs/performance.md`` says so until they are. Results go to
``benchmarks/results/gpu_llm_layers[_smoke].json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleave, set_threads, sync, write_result  # noqa: E402

from torch_crisp import (  # noqa: E402
    CrispConfig,
    CrispOptimizer,
    CrispProjector,
    functional,  # noqa: E402
    low_rank,
)
from torch_crisp.basis import Basis  # noqa: E402

LLAMA3_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
}
SMOKE_MODEL = {
    "hidden_size": 32, "intermediate_size": 112, "num_hidden_layers": 6, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64,
}
EDIT_LAYERS = (4, 5, 6, 7, 8)  # the MLP layers MEMIT/AlphaEdit/CrispEdit edit in LLaMA-3-8B
SMOKE_EDIT_LAYERS = (1, 2)


class Report:
    """Collects rows ``(section, name, seconds, floor seconds, note)`` and prints them as they come."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, section: str, name: str, seconds: float, floor: float | None = None, note: str = "") -> None:
        ratio = seconds / floor if floor else None
        self.rows.append({"section": section, "name": name, "seconds": seconds, "floor_seconds": floor,
                          "ratio": ratio, "note": note})
        floor_text = f"{floor * 1e3:10.3f} ms" if floor else " " * 13
        ratio_text = f"{ratio:6.2f}" if ratio else "      "
        print(f"  {section:<10} {name:<44} {seconds * 1e3:10.3f} ms | {floor_text} | {ratio_text}  {note}", flush=True)


def timed(fn: Callable[[], Any], device: torch.device, rounds: int) -> float:
    """Median seconds of ``fn`` over ``rounds`` calls after one warm-up (GPU synchronised)."""
    return interleave({"fn": fn}, rounds=rounds, warmup=1, device=device).median("fn")


def measure_rates(device: torch.device, n: int, rounds: int) -> dict[str, float]:
    """Matmul FLOP/s in fp32 (TF32 off), tf32 and bf16, and copy bandwidth in bytes/s."""
    rates: dict[str, float] = {}
    a32, b32 = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    cuda = device.type == "cuda"
    previous = torch.backends.cuda.matmul.allow_tf32 if cuda else False
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
        rates["fp32"] = 2 * n**3 / timed(lambda: a32 @ b32, device, rounds)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            rates["tf32"] = 2 * n**3 / timed(lambda: a32 @ b32, device, rounds)
        else:
            rates["tf32"] = rates["fp32"]  # no TF32 on the CPU
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = previous
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    rates["bf16"] = 2 * n**3 / timed(lambda: a16 @ b16, device, rounds)
    big = torch.empty(64 * 2**20 if cuda else 4 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(big)
    rates["bandwidth"] = 2 * big.numel() * 4 / timed(lambda: dst.copy_(big), device, rounds)
    return rates


def random_psd(n: int, tokens: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """``XᵀX / tokens`` of random rows with a decaying scale (a spectrum like real activations')."""
    scale = torch.logspace(0, -3, n, device=device)
    x = torch.randn(tokens, n, device=device, generator=generator) * scale
    return x.mT @ x / tokens


def section_factors(report: Report, d_out: int, d_in: int, layers: int, tokens: int, device: torch.device,
                    rates: dict[str, float], rounds: int) -> None:
    a = torch.randn(tokens, d_in, device=device)
    g = torch.randn(tokens, d_out, device=device)
    A_sum = torch.zeros(d_in, d_in, device=device)
    S_sum = torch.zeros(d_out, d_out, device=device)

    def accumulate() -> None:
        A_sum.addmm_(a.mT, a)
        S_sum.addmm_(g.mT, g)

    seconds = timed(accumulate, device, rounds)
    flops = 2.0 * tokens * (d_in**2 + d_out**2)
    report.add("factors", f"aᵀa + gᵀg, {tokens} tokens, 1 layer (fp32)", seconds, flops / rates["fp32"])
    report.add("factors", "per token, five layers", seconds / tokens * layers, flops / tokens * layers / rates["fp32"])


def section_eigh(report: Report, d_out: int, d_in: int, device: torch.device, rates: dict[str, float],
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    A = random_psd(d_in, max(d_in, 256), device, gen)
    S = random_psd(d_out, max(d_out, 256), device, gen)
    sync(device)
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, matrix in (("A", A), ("S", S)):
        start = time.perf_counter()
        results[name] = functional.symmetric_eigh(matrix)
        sync(device)
        seconds = time.perf_counter() - start
        n = matrix.shape[0]
        report.add("eigh", f"{name} ({n}×{n}, fp32, once)", seconds, 4.0 * n**3 / rates["fp32"], "floor ≈ 4n³ FLOPs")
    eig_in, U_in = results["A"]
    eig_out, U_out = results["S"]
    start = time.perf_counter()
    tau = functional.energy_threshold(eig_out, eig_in, gamma)
    sync(device)
    seconds = time.perf_counter() - start
    report.add("eigh", f"energy threshold of the {d_out}×{d_in} grid", seconds,
               d_out * d_in * 8 / rates["bandwidth"], "floor: one pass over a float64 grid")
    start = time.perf_counter()
    mask = functional.curvature_grid(eig_out, eig_in) < tau
    sync(device)
    report.add("eigh", "mask of the grid", time.perf_counter() - start, d_out * d_in * 9 / rates["bandwidth"],
               f"kept {mask.float().mean().item():.1%}")
    return U_out, U_in, mask, eig_out


def section_projection(report: Report, U_out: torch.Tensor, U_in: torch.Tensor, mask: torch.Tensor, layers: int,
                       device: torch.device, rates: dict[str, float], rounds: int) -> dict[str, float]:
    d_out, d_in = mask.shape
    gen = torch.Generator(device=device).manual_seed(1)
    grads = [torch.randn(d_out, d_in, device=device, generator=gen).bfloat16() for _ in range(layers)]
    U_out16, U_in16 = U_out.bfloat16(), U_in.bfloat16()
    flops = 4.0 * d_out * d_in * (d_out + d_in) * layers
    # bytes every variant must move at least: read Q, the bases and the mask, write P
    min_bytes = layers * (d_out * d_in * (2 + 2 + 1) + 4 * (d_out**2 + d_in**2))
    cuda = device.type == "cuda"
    errors: dict[str, float] = {}
    reference = functional.project(grads[0].double(), U_out.double(), U_in.double(), mask)

    def run(variant: str) -> Callable[[], None]:
        bases = (U_out16, U_in16) if variant == "bf16" else (U_out, U_in)

        def fn() -> None:
            for Q in grads:
                functional.project(Q, bases[0], bases[1], mask)

        return fn

    for variant in ("fp32", "tf32", "bf16"):
        previous = torch.backends.cuda.matmul.allow_tf32 if cuda else False
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
        try:
            seconds = timed(run(variant), device, rounds)
            bases = (U_out16, U_in16) if variant == "bf16" else (U_out, U_in)
            P = functional.project(grads[0], bases[0], bases[1], mask).double()
        finally:
            if cuda:
                torch.backends.cuda.matmul.allow_tf32 = previous
        errors[variant] = float((P - reference).norm() / reference.norm())
        floor = max(flops / rates[variant], min_bytes / rates["bandwidth"])
        report.add("project", f"{layers} layers, {variant} products, bf16 grads", seconds, floor,
                   f"rel. error {errors[variant]:.1e} (result in bf16, as the gradient)")
    return errors


def _power_law_mask(d_out: int, d_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``k^-1.5`` on both sides (ascending, as eigh returns them) and their mask at γ = 0.9."""
    eig_out = torch.arange(1, d_out + 1, dtype=torch.float32, device=device).pow(-1.5).flip(0)
    eig_in = torch.arange(1, d_in + 1, dtype=torch.float32, device=device).pow(-1.5).flip(0)
    return eig_out, functional.low_curvature_mask(eig_out, eig_in, 0.9)


def section_complement(report: Report, U_out: torch.Tensor, U_in: torch.Tensor, mask: torch.Tensor,
                       eig_out: torch.Tensor, layers: int, device: torch.device, rates: dict[str, float],
                       rounds: int, gamma: float) -> dict[str, Any]:
    """The dense step of section 4 on the plan's paths, for this mask and for power-law spectra."""
    d_out, d_in = mask.shape
    gen = torch.Generator(device=device).manual_seed(1)
    grads = [torch.randn(d_out, d_in, device=device, generator=gen).bfloat16() for _ in range(layers)]
    dense_flops = 4.0 * d_out * d_in * (d_out + d_in) * layers
    cuda = device.type == "cuda"
    eig_in = torch.ones(d_in, device=device)
    result: dict[str, Any] = {}
    for label, (eigenvalues, case_mask) in {f"γ={gamma:g} mask": (eig_out, mask),
                                           "power law γ=0.9": _power_law_mask(d_out, d_in, device)}.items():
        basis = Basis(eig_in=eig_in, U_in=U_in, eig_out=eigenvalues, U_out=U_out, mask=case_mask, tau=1.0)
        plan = basis.plan("auto")
        stored = basis.stored("blocked")
        kept_bytes = sum(t.numel() * t.element_size() for t in stored.tensors().values())
        resident = kept_bytes / (4 * (d_out**2 + d_in**2))
        reference = functional.project(grads[0].double(), U_out.double(), U_in.double(), case_mask)
        entry: dict[str, Any] = {"path": plan.path, "r": plan.blocked_rows, "J0": plan.max_blocked_per_row,
                                 "blocked_fraction": plan.blocked_fraction, "flop_ratio": plan.flop_ratio,
                                 "relative_time": plan.relative_time,
                                 "complement_flop_ratio": plan.complement_flops / plan.full_flops,
                                 "resident_ratio_blocked": resident, "variants": {}}
        print(f"  complement {label}: plan {plan.path}, r={plan.blocked_rows}, J(0)={plan.max_blocked_per_row}, "
              f"blocked {plan.blocked_fraction:.2%}, FLOPs {plan.flop_ratio:.3f} of dense; blocked storage keeps "
              f"{resident:.3f} of 4(d_in²+d_out²)", flush=True)
        for variant in ("fp32", "tf32", "bf16"):
            case = basis if variant != "bf16" else Basis(eig_in=eig_in, U_in=U_in.bfloat16(), eig_out=eigenvalues,
                                                         U_out=U_out.bfloat16(), mask=case_mask, tau=1.0)
            for projection in ("auto", "complement"):
                case.plan(projection)  # made once per basis, outside the timing
                previous = torch.backends.cuda.matmul.allow_tf32 if cuda else False
                if cuda:
                    torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
                try:
                    seconds = timed(lambda c=case, p=projection: [c.project(Q, p) for Q in grads], device, rounds)
                    error = float((case.project(grads[0], projection).double() - reference).norm() / reference.norm())
                finally:
                    if cuda:
                        torch.backends.cuda.matmul.allow_tf32 = previous
                entry["variants"][f"{projection}/{variant}"] = {"seconds": seconds, "relative_error": error}
                report.add("complement", f"{label}: {layers} layers, {projection}, {variant}", seconds,
                           dense_flops / rates[variant], f"rel. error {error:.1e}; floor = dense path's")
        result[label] = entry
    return result


def section_low_rank(report: Report, U_out: torch.Tensor, U_in: torch.Tensor, mask: torch.Tensor,
                     eig_out: torch.Tensor, layers: int, device: torch.device, rates: dict[str, float],
                     rounds: int, gamma: float, tokens: int = 16) -> dict[str, Any]:
    """The step of section 4 from the per-token factors of a ``tokens``-position gradient (``low_rank.py``)."""
    from low_rank import low_rank_step

    d_out, d_in = mask.shape
    gen = torch.Generator(device=device).manual_seed(3)
    factors = [(torch.randn(tokens, d_out, device=device, generator=gen).bfloat16(),
                torch.randn(tokens, d_in, device=device, generator=gen).bfloat16()) for _ in range(layers)]
    grads = [(G.float().mT @ X.float()).bfloat16() for G, X in factors]
    dense_flops = 4.0 * d_out * d_in * (d_out + d_in) * layers
    cuda = device.type == "cuda"
    result: dict[str, Any] = {}
    for label, (eigenvalues, case_mask) in {f"γ={gamma:g} mask": (eig_out, mask),
                                           "power law γ=0.9": _power_law_mask(d_out, d_in, device)}.items():
        basis = Basis(eig_in=torch.ones(d_in, device=device), U_in=U_in, eig_out=eigenvalues, U_out=U_out,
                      mask=case_mask, tau=1.0)
        basis.plan("auto"), basis.plan("complement")
        budget = low_rank.token_budget(basis, "auto", device, "auto")
        reference = functional.project(grads[0].double(), U_out.double(), U_in.double(), case_mask)
        entry: dict[str, Any] = {"tokens": tokens, "token_budget": budget, "variants": {}}
        for variant in ("fp32", "tf32"):
            for path in ("full", "complement", "auto"):
                previous = torch.backends.cuda.matmul.allow_tf32 if cuda else False
                if cuda:
                    torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
                try:
                    seconds = timed(lambda p=path, b=basis, n=budget: [low_rank_step(b, G, X, Q, p, n)
                                                                       for (G, X), Q in zip(factors, grads)],
                                    device, rounds)
                    G, X = factors[0]
                    P = low_rank_step(basis, G, X, grads[0], path, budget).double()
                finally:
                    if cuda:
                        torch.backends.cuda.matmul.allow_tf32 = previous
                error = float((P - reference).norm() / max(reference.norm(), 0.1 * grads[0].double().norm()))
                entry["variants"][f"{path}/{variant}"] = {"seconds": seconds, "relative_error": error}
                report.add("low-rank", f"{label}: {layers} layers, T={tokens}, {path}, {variant}", seconds,
                           dense_flops / rates[variant], f"rel. error {error:.1e}; floor = dense path's")
        result[label] = entry
    return result


def build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def fitting_depth(config: dict[str, Any], device: torch.device, dtype: torch.dtype, needed_layers: int) -> int:
    """Decoder layers that fit in half the free GPU memory (the rest is for activations and the loop)."""
    if device.type != "cuda":
        return config["num_hidden_layers"]
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = (2 * h * h + 2 * h * kv + 3 * h * i) * torch.finfo(dtype).bits // 8
    fixed = 2 * v * h * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    fits = int((0.5 * free - fixed) // per_layer)
    return max(needed_layers, min(config["num_hidden_layers"], fits))


def section_edit_loop(report: Report, args: argparse.Namespace, device: torch.device,
                      basis_parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    config = dict(SMOKE_MODEL if args.smoke else LLAMA3_8B)
    edit_layers = SMOKE_EDIT_LAYERS if args.smoke else EDIT_LAYERS
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    depth = fitting_depth(config, device, dtype, max(edit_layers) + 1)
    reduced = depth < config["num_hidden_layers"]
    config["num_hidden_layers"] = depth
    start = time.perf_counter()
    model = build_model(config, device, dtype)
    sync(device)
    build_s = time.perf_counter() - start
    names = [f"model.layers.{i}.mlp.down_proj" for i in edit_layers]
    projector = CrispProjector(model, CrispConfig(target_modules=names, gamma=0.99))
    U_out, U_in, mask, eig_out = basis_parts
    # cached factors: every layer gets the precomputed basis (copies, as if loaded from disk)
    from torch_crisp.state import Basis

    for state in projector.layers.values():
        state.basis = Basis(eig_in=torch.ones(U_in.shape[0], device=device), U_in=U_in.clone(),
                            eig_out=eig_out.clone(), U_out=U_out.clone(), mask=mask.clone(), tau=1.0)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for s in projector.layers.values() for p in s.geometry.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    gen = torch.Generator(device=device).manual_seed(2)
    steps = math.ceil(args.edits / args.edit_batch) * args.steps_per_batch
    batch = torch.randint(3, config["vocab_size"], (args.edit_batch, args.edit_tokens), device=device, generator=gen)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def loop(optimizer: torch.optim.Optimizer, count: int = steps) -> float:
        sync(device)
        begin = time.perf_counter()
        for _ in range(count):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - begin

    plain = torch.optim.AdamW(trainable, lr=1e-5)
    crisp = CrispOptimizer(torch.optim.AdamW(trainable, lr=1e-5), projector)
    loop(plain, 1)  # warm-up: kernels, cuBLAS workspaces, allocator, AdamW state
    loop(crisp, 1)
    plain_s = loop(plain)
    crisp_s = loop(crisp)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    note = (f"{depth} decoder layers{' (reduced to fit)' if reduced else ''}, {steps} steps, "
            f"model built in {build_s:.1f}s")
    report.add("edit loop", f"{args.edits} edits, plain AdamW", plain_s, None, note)
    report.add("edit loop", f"{args.edits} edits, CrispOptimizer(AdamW)", crisp_s, plain_s,
               "floor here = the plain loop")
    report.add("edit loop", "per edit, CrispOptimizer(AdamW)", crisp_s / args.edits)
    return {"decoder_layers": depth, "reduced_depth": reduced, "steps": steps, "plain_s": plain_s,
            "crisp_s": crisp_s, "peak_memory_bytes": peak, "build_s": build_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on the CPU in seconds)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--layers", type=int, default=5, help="projected layers (LLaMA-3-8B edits five)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per factor-accumulation chunk")
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--edits", type=int, default=None, help="edits in the loop (default 3000; smoke 8)")
    parser.add_argument("--edit-batch", type=int, default=None, help="edits per step batch (default 100; smoke 4)")
    parser.add_argument("--edit-tokens", type=int, default=None, help="tokens per edit (default 32; smoke 8)")
    parser.add_argument("--steps-per-batch", type=int, default=None, help="steps per edit batch (default 1)")
    parser.add_argument("--skip-loop", action="store_true", help="skip the edit loop (section 5)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        set_threads(1)
    if not args.smoke and device.type != "cuda":
        parser.error("the full-size run needs a CUDA device (8B-shaped layers); use --smoke on the CPU")
    smoke = args.smoke
    d_out, d_in = (32, 112) if smoke else (4096, 14336)
    tokens = args.tokens or (64 if smoke else 8192)
    args.edits = args.edits or (8 if smoke else 3000)
    args.edit_batch = args.edit_batch or (4 if smoke else 100)
    args.edit_tokens = args.edit_tokens or (8 if smoke else 32)
    args.steps_per_batch = args.steps_per_batch or 1
    rounds = 2 if smoke else 5
    torch.manual_seed(0)
    report = Report()
    started = time.perf_counter()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"down_proj {d_out}×{d_in}, {args.layers} layers")
    print(f"  {'section':<10} {'what':<44} {'time':>13} | {'floor':>13} | ratio")
    n = 256 if smoke else 8192
    rates = measure_rates(device, n, rounds)
    for key in ("fp32", "tf32", "bf16"):  # the time column is one n×n product
        report.add("rates", f"matmul {key} ({n}²): {rates[key] / 1e12:.3f} TFLOP/s", 2.0 * n**3 / rates[key])
    copy_bytes = 2 * (64 * 2**20 if device.type == "cuda" else 4 * 2**20) * 4
    report.add("rates", f"copy bandwidth: {rates['bandwidth'] / 1e9:.1f} GB/s", copy_bytes / rates["bandwidth"])
    section_factors(report, d_out, d_in, args.layers, tokens, device, rates, rounds)
    basis_parts = section_eigh(report, d_out, d_in, device, rates, args.gamma)
    errors = section_projection(report, *basis_parts[:3], args.layers, device, rates, rounds)
    complement = section_complement(report, *basis_parts, args.layers, device, rates, rounds, args.gamma)
    low_rank_step = section_low_rank(report, *basis_parts, args.layers, device, rates, rounds, args.gamma)
    loop = None if args.skip_loop else section_edit_loop(report, args, device, basis_parts)
    total = time.perf_counter() - started
    print(f"total {total:.1f} s")
    result = {"device": str(device), "shape": {"d_out": d_out, "d_in": d_in}, "layers": args.layers,
              "rates": rates, "rows": report.rows, "projection_errors": errors, "complement": complement,
              "low_rank": low_rank_step, "edit_loop": loop,
              "total_s": total, "smoke": smoke}
    write_result("gpu_llm_layers_smoke" if smoke else "gpu_llm_layers", result, args.out)
    return result


if __name__ == "__main__":
    main()
