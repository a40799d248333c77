"""Default settings of the engines, in a module without torch so that the command line can show them."""
from __future__ import annotations

DEFAULT_TOL = 1e-5  # Lanczos: residual <= tol·‖H‖; the eigenvalue error is then <= min(r, r²/gap)
DEFAULT_STEPS = 80  # most Lanczos steps per run, and the SLQ steps
DEFAULT_TRACE_MATVECS = 30  # Hessian-vector products per Hutch++ trace
DEFAULT_MAX_MEMORY = 2 * 1024 ** 3  # bytes of double-backward graphs kept for reuse
INT64_MAX = 2 ** 63 - 1  # the largest count or seed a results file (int64 attributes) can hold
BATCHNORM_MODES = ("eval", "batch")  # BatchNorm statistics: the running ones, or each batch's own
