"""What ``torch-crisp demo`` can change, checked before any work starts.

:class:`DemoSettings` validates itself on construction (and :func:`~.compare.run_demo` checks
again before it starts), so a bad value fails in milliseconds instead of after minutes of
pretraining. A bad value raises :class:`DemoSettingError`, a ``ValueError`` that names the
setting, so the command line can name its flag instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .grid import SWEEP_BUDGETS, SWEEP_GAMMAS, canonical, grid_methods, sweep_methods
from .pretrain import ModelSpec, TrainSpec
from .world import WorldSpec

__all__ = ["ALL_METHODS", "DemoSettingError", "DemoSettings"]

ALL_METHODS = (
    "ft", "crisp", "crisp-update", "crisp-ekfac", "crisp-budget", "activations", "lora", "lora-crisp", "corda", "ewc",
    "l2sp",
)


class DemoSettingError(ValueError):
    """A demo setting out of its range; ``field`` names the setting, ``rule`` what it must be."""

    def __init__(self, field_name: str, rule: str, value: Any) -> None:
        super().__init__(f"{field_name} {rule}, got {value!r}")
        self.field = field_name
        self.rule = rule
        self.value = value


@dataclass
class DemoSettings:
    """Everything ``torch-crisp demo`` can change (the CLI maps its flags onto these)."""

    quick: bool = False
    num_edits: int | None = None  # default: 100 (6 with quick)
    num_anchors: int | None = None  # anchor entities of the capability corpus (default: WorldSpec's)
    methods: Sequence[str] = ALL_METHODS
    gamma: float = 0.995
    # crisp-budget's ε (nats of the tempered per-token capability loss), set by a rule before any run:
    # 1 % of the seed-0 base model's held-out loss (1.8 nats, perplexity 6.08), to one significant figure.
    budget: float = 0.02
    capability_temperature: float = 3.0  # softmax temperature of the curvature collection (1 = plain)
    lr: float = 5e-3
    lora_lr: float = 3e-3
    lora_rank: int = 8
    # The peers' settings: chosen from their grids (grid.PEER_GRIDS) by grid.GRID_RULE over seeds 0-3
    # (benchmarks/results/demo/seeds_grid.json; docs/editing.md).
    ewc_lambda: float = 1000.0
    l2sp_alpha: float = 0.01
    corda_lr: float = 1e-3
    grid: bool = False  # replace each peer (ewc, l2sp, corda) by its whole grid
    sweep: bool = False  # run the sweeps below instead of the methods
    sweep_budgets: Sequence[float] = SWEEP_BUDGETS
    sweep_gammas: Sequence[float] = SWEEP_GAMMAS
    layers: Sequence[int] | None = None  # default: every block (see compare._default_layers)
    max_epochs: int = 300  # EK-FAC (crisp-ekfac) needs ~270 at lr 5e-3; the others stop far earlier
    batch_size: int = 8
    seed: int = 0
    # torch CPU threads for the run (restored afterwards; None keeps torch's setting). One by
    # default: on 2 cores with one kept busy by another process, two threads pretrained at 5.5
    # steps/s against 13.1 for one (docs/editing.md); idle, two gave 19.5 against 13.6.
    threads: int | None = 1
    cache_dir: str | None = None
    retrain: bool = False
    progress: bool = True
    world_spec: WorldSpec | None = None  # overrides quick / num_edits / num_anchors / seed when given
    model_spec: ModelSpec | None = None
    train_spec: TrainSpec | None = None
    log: Callable[[str], None] = field(default=print, repr=False)
    # Where the table's lines go as each row is measured (legend and header first); None: nowhere.
    table: Callable[[str], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`DemoSettingError` for the first setting out of its range."""
        _check_methods(self.methods)
        _check_range("gamma", self.gamma, 0.0, 1.0)
        for name in ("budget", "capability_temperature", "lr", "lora_lr", "ewc_lambda", "l2sp_alpha", "corda_lr"):
            _check_positive_number(name, getattr(self, name))
        _check_sweep(self)
        for name in ("lora_rank", "max_epochs", "batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_edits", "num_anchors", "threads"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise DemoSettingError("seed", "must be a non-negative integer", self.seed)
        if self.layers is not None:
            _check_layers(self.layers, self.resolved_specs()[1].num_hidden_layers)

    def resolved_methods(self) -> list[str]:
        """The rows this run edits with: the sweep's, or ``methods`` (each peer's grid with ``grid``)."""
        if self.sweep:
            return sweep_methods(self.sweep_budgets, self.sweep_gammas)
        methods = [canonical(m, ALL_METHODS) for m in self.methods]
        return grid_methods(methods) if self.grid else methods

    def resolved_specs(self) -> tuple[WorldSpec, ModelSpec, TrainSpec]:
        """The world, model and pretraining specs this run uses (quick or full, with overrides)."""
        if self.world_spec is not None:
            world = self.world_spec
        else:
            if self.quick:
                world = WorldSpec.quick(num_edits=self.num_edits or 6, seed=self.seed)
            else:
                world = WorldSpec(num_edits=self.num_edits or 100, seed=self.seed)
            if self.num_anchors is not None:
                world = replace(world, num_anchor_entities=self.num_anchors)
        model = self.model_spec or (ModelSpec.quick() if self.quick else ModelSpec())
        train = self.train_spec or (TrainSpec.quick() if self.quick else TrainSpec())
        return world, model, train


def _check_methods(methods: Sequence[str]) -> None:
    if not methods:
        raise DemoSettingError("methods", "must name at least one method", list(methods))
    names = []
    for method in methods:
        try:
            names.append(canonical(method, ALL_METHODS))
        except ValueError as err:
            raise DemoSettingError("methods", str(err), method) from None
    if len(set(names)) != len(names):
        # a repeated method would silently overwrite its own row
        raise DemoSettingError("methods", "must not repeat a method", list(methods))


def _check_sweep(settings: DemoSettings) -> None:
    if settings.sweep and settings.grid:
        raise DemoSettingError("grid", "cannot be combined with --sweep (the sweep replaces the methods)", True)
    for value in settings.sweep_budgets:
        _check_positive_number("sweep_budgets", value)
    for value in settings.sweep_gammas:
        _check_range("sweep_gammas", value, 0.0, 1.0)
    for name in ("sweep_budgets", "sweep_gammas"):
        values = list(getattr(settings, name))
        if len(set(values)) != len(values):
            raise DemoSettingError(name, "must not repeat a value", values)
    if settings.sweep and not (settings.sweep_budgets or settings.sweep_gammas):
        raise DemoSettingError("sweep_budgets", "must name at least one budget or gamma", [])


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (isinstance(value, (int, float)) and low < value < high):
        raise DemoSettingError(name, f"must be in ({low:g}, {high:g})", value)


def _check_positive_number(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise DemoSettingError(name, "must be a positive number", value)


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DemoSettingError(name, "must be a positive integer", value)


def _check_layers(layers: Sequence[int], num_blocks: int) -> None:
    if not layers:
        raise DemoSettingError("layers", "must name at least one block", list(layers))
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_blocks]
    if bad:
        raise DemoSettingError("layers", f"must be block indices 0-{num_blocks - 1} (the model has {num_blocks})", bad)
    if len(set(layers)) != len(layers):
        raise DemoSettingError("layers", "must not repeat a block", list(layers))
