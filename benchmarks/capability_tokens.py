"""How many capability tokens before the projection settles? Measured on the demo's base model.

    python benchmarks/capability_tokens.py       # needs the demo's cached base model (torch-crisp demo, once)

The demo's capability corpus (seed 0) is shuffled and the four MLP ``down_proj`` (d_in 768) are
collected on its first 1/16, 1/8, 1/4, 1/2 and all of it (temperature 3, as the demo collects).
For each, the projection of random matrices is compared with the projection from the whole
corpus: ``‖P_part(Q) − P_all(Q)‖ / ‖P_all(Q)‖`` (largest over the layers). When it stops falling,
more data would not change what is protected.
"""

from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, print_table, set_threads, write_result  # noqa: E402

from torch_crisp import CrispConfig, CrispProjector  # noqa: E402
from torch_crisp.editing.batching import collate_texts  # noqa: E402
from torch_crisp.editing.demo.pretrain import load_or_pretrain  # noqa: E402
from torch_crisp.editing.demo.settings import DemoSettings  # noqa: E402
from torch_crisp.editing.demo.world import build_world  # noqa: E402


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None, cache_dir: str | None = None):
    settings = DemoSettings(quick=smoke, cache_dir=cache_dir, progress=False)
    world_spec, model_spec, train_spec = settings.resolved_specs()
    world = build_world(world_spec)
    base = load_or_pretrain(world, model_spec, train_spec, cache_dir=cache_dir, progress=False)
    texts = world.capability_texts()
    random.Random(0).shuffle(texts)

    def collect(count: int, gamma: float) -> CrispProjector:
        batches = [collate_texts(base.tokenizer, texts[i : min(i + 64, count)]) for i in range(0, count, 64)]
        config = CrispConfig(target_modules=["mlp.down_proj"], gamma=gamma, temperature=3.0)
        return CrispProjector(base.model, config).collect(batches, progress=False)

    rows, points = [], []
    for gamma in (0.99, 0.995):
        everything = collect(len(texts), gamma)
        for fraction in (1 / 16, 1 / 8, 1 / 4, 1 / 2):
            part = collect(max(1, int(len(texts) * fraction)), gamma)
            differences = []
            for name, state in everything.layers.items():
                Q = torch.randn(32, *state.basis.mask.shape, generator=torch.Generator().manual_seed(0))
                full = everything.project(name, Q)
                differences.append(float((part.project(name, Q) - full).norm() / full.norm()))
            tokens = part.num_tokens(part.target_names[0])
            point = {"gamma": gamma, "fraction": fraction, "tokens": tokens,
                     "tokens_all": everything.num_tokens(everything.target_names[0]),
                     "relative_change_of_projection": max(differences)}
            points.append(point)
            rows.append((f"γ {gamma}  {fraction:6.4f} of the corpus ({tokens:>6.0f} tokens)",
                         f"projection differs from all {point['tokens_all']:.0f} tokens' by {max(differences):.3f}"))
    print_table("capability tokens against the projection they give (demo, down_proj, d_in 768)", rows)
    payload = {"targets": ["mlp.down_proj"], "temperature": 3.0, "points": points}
    write_result("capability_tokens", payload, out_dir)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--cache-dir", default=None, help="the demo's cache (default: the user cache)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(smoke=args.smoke, rounds=args.rounds, out_dir=args.out, cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()
