"""A stand-in for ``accelerate.Accelerator``: what ``torch_crisp.integrations.accelerate`` reads of one.

Lets the integration's single-process paths (refusals, save/load hooks, resume) be tested without
``accelerate launch``.
"""

from __future__ import annotations

import collections

import torch


class FakeAccelerator:
    """``distributed_type`` from ``kind`` (a ``DistributedType`` name); the FSDP plugin's version."""

    def __init__(self, kind: str = "NO", fsdp_version: int | None = None) -> None:
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType[kind]
        plugin = None if fsdp_version is None else type("Plugin", (), {"fsdp_version": fsdp_version})()
        self.state = type("State", (), {"fsdp_plugin": plugin})()
        self.project_configuration = type("Config", (), {"save_on_each_node": False})()
        self.is_main_process = self.is_local_main_process = True
        self.save_hooks: dict = collections.OrderedDict()  # RemovableHandle keeps a weak reference
        self.load_hooks: dict = collections.OrderedDict()

    def register_save_state_pre_hook(self, hook):
        handle = torch.utils.hooks.RemovableHandle(self.save_hooks)
        self.save_hooks[handle.id] = hook
        return handle

    def register_load_state_pre_hook(self, hook):
        handle = torch.utils.hooks.RemovableHandle(self.load_hooks)
        self.load_hooks[handle.id] = hook
        return handle
