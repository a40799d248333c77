"""User code named on the command line: "package.module:function" plug-ins for models, data and losses.

Importing a module the user named is trusting it explicitly; curvscope never
imports anything a checkpoint file names.
"""
from __future__ import annotations

import importlib

from curvscope.errors import CurvscopeError


def call_plugin(spec: str, kwargs: dict | None, what: str) -> object:
    """Import "package.module:function" and call it with `kwargs`; any failure is a CurvscopeError."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CurvscopeError(f"cannot import the {what} plug-in {spec!r}: {type(exc).__name__}: {exc}. "
                             f"Check the name and that its package is importable (on PYTHONPATH).") from None
    try:
        return fn(**(kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - the user's code may fail in any way
        raise CurvscopeError(f"the {what} plug-in {spec!r} raised {type(exc).__name__}: {exc}.") from None
