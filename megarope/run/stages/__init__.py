"""The stage registry: every module of this package is a stage kind, named after the module.

A kind module defines ``KIND = StageKind(config, run, check)`` (``megarope.run.context``): its
config (a ``StageConfig`` subclass with the kind's own settings), ``run(ctx) -> outputs`` and an
optional ``check(ctx)`` that fails on bad input before any stage writes. Adding a kind is adding a
module (docs/extending.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from megarope.run.context import StageKind

STAGES: dict[str, StageKind] = {
    name: importlib.import_module(f"{__name__}.{name}").KIND for _, name, _ in pkgutil.iter_modules(__path__)
}
