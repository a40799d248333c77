"""curvscope: the curvature of trained neural networks, layer by layer.

Stable API (docs/DESIGN.md §3): :func:`load_checkpoint`, :func:`pseudo_hessian`,
:func:`newton_step`, :func:`eigenvalues`, :func:`trace`, :func:`spectral_density`,
:func:`curvature_operator`, :func:`kfac`.

The names are imported on first use, so that importing a light part of the
package (the results-file store, the command line's entry point) does not pull
in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "newton_step": "curvscope.curvature.newton_step",
    "pseudo_hessian": "curvscope.curvature.pseudo_curvature",
    "eigenvalues": "curvscope.curvature.spectrum",
    "spectral_density": "curvscope.curvature.spectrum",
    "trace": "curvscope.curvature.spectrum",
    "CurvscopeError": "curvscope.errors",
    "Checkpoint": "curvscope.sources.checkpoint",
    "load_checkpoint": "curvscope.sources.checkpoint",
    "save_checkpoint": "curvscope.sources.checkpoint",
    "CurvatureOperator": "curvscope.curvature.operator",
    "curvature_operator": "curvscope.curvature.registry",
    "kfac": "curvscope.curvature.kfac",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    """The public API, imported from its module when first asked for (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'curvscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
