"""curvscope: the curvature of trained neural networks, layer by layer.

Stable API (DESIGN.md §3): :func:`load_checkpoint`, :func:`pseudo_hessian`,
:func:`newton_step`.
"""
__version__ = "0.1.0"

from curvscope.curvature.newton_step import newton_step  # noqa: E402
from curvscope.curvature.pseudo_hessian import pseudo_hessian  # noqa: E402
from curvscope.errors import CurvscopeError  # noqa: E402
from curvscope.sources.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["Checkpoint", "CurvscopeError", "load_checkpoint", "newton_step", "pseudo_hessian",
           "save_checkpoint", "__version__"]
