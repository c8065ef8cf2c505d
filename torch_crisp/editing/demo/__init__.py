"""The self-contained editing demo: a generated world, a local tokenizer, a tiny Llama pretrained
on the CPU, and the comparison of editing methods behind ``torch-crisp demo``."""

from .compare import run_demo
from .report import format_table
from .seeds import run_seeds
from .settings import ALL_METHODS, DemoSettingError, DemoSettings
from .world import World, WorldSpec, build_world

__all__ = [
    "ALL_METHODS",
    "DemoSettingError",
    "DemoSettings",
    "World",
    "WorldSpec",
    "build_world",
    "format_table",
    "run_demo",
    "run_seeds",
]
