"""Warnings that point at the user's own line, through any number of framework frames.

A warning raised inside a Trainer callback or a wrapped optimizer would otherwise point at
``transformers/trainer_callback.py``; :func:`warn_user` attributes it to the first caller whose
module is not torch_crisp's or one of the frameworks that call it.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn_user"]

_FRAMEWORKS = frozenset({"torch_crisp", "transformers", "accelerate", "torch", "trl", "peft"})


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first frame outside torch_crisp and its hosts."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] in _FRAMEWORKS:
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)
