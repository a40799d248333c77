"""curvscope: the curvature of trained neural networks, layer by layer.

Stable API (DESIGN.md §3): :func:`load_checkpoint`, :func:`pseudo_hessian`,
:func:`newton_step`, :func:`eigenvalues`, :func:`trace`, :func:`spectral_density`.
"""
__version__ = "0.1.0"

from curvscope.curvature.newton_step import newton_step  # noqa: E402
from curvscope.curvature.pseudo_hessian import pseudo_hessian  # noqa: E402
from curvscope.curvature.spectrum import eigenvalues, spectral_density, trace  # noqa: E402
from curvscope.errors import CurvscopeError  # noqa: E402
from curvscope.sources.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["Checkpoint", "CurvscopeError", "eigenvalues", "load_checkpoint", "newton_step", "pseudo_hessian",
           "save_checkpoint", "spectral_density", "trace", "__version__"]
