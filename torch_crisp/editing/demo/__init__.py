"""The self-contained editing demo: a generated world, a local tokenizer, a tiny Llama pretrained
on the CPU, and the comparison of editing methods behind ``torch-crisp demo``."""

from .compare import ALL_METHODS, DemoSettings, format_table, run_demo
from .world import World, WorldSpec, build_world

__all__ = ["ALL_METHODS", "DemoSettings", "World", "WorldSpec", "build_world", "format_table", "run_demo"]
