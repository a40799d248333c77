"""Result objects: what the engines return and the store writes (numpy float64)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from curvscope.measures.cubic import CubicStep
    from curvscope.measures.kfac import KFACMeasures


@dataclass(frozen=True)
class PseudoHessianResult:
    """ḡ_s = U_sᵀg and C̄_st = U_sᵀ C U_t over a partition, with the direction u = g = ∇L(θ).

    C is the curvature named by `curvature` (the Hessian H by default; the field
    names keep the Hessian's for every curvature). `pseudo_hessian_stderr` is the
    standard error of C̄ across batches, sqrt(B/(B-1) Σ_b w_b² (C̄_b - C̄)²) with
    w_b = n_b/N (NaN for a single batch).
    """

    names: np.ndarray  # (S,) str
    kinds: np.ndarray  # (S,) str: weight | bias | other
    layers: np.ndarray  # (S,) str
    sizes: np.ndarray  # (S,) int64
    partition: str
    pseudo_gradient: np.ndarray  # (S,)
    pseudo_hessian: np.ndarray  # (S, S)
    pseudo_hessian_stderr: np.ndarray  # (S, S)
    loss: float  # L(θ) over the analysis set
    n_samples: int
    n_batches: int
    strategy: str  # how the projection was computed (the Hessian's strategy, or the curvature's method)
    curvature: str = "hessian"  # which matrix C̄ projects: "hessian", "ggn" or "fisher"


@dataclass(frozen=True)
class NewtonStep:
    """H̄⁻¹ and the per-group step it gives (docs/DESIGN.md §2).

    `method` is "inverse" when H̄ is nonsingular, else "pseudo-inverse"
    (Moore-Penrose, eigenvalues with |λ| <= rcond·max|λ| dropped); H̄ is never
    regularised. Groups with exactly zero gradient are `excluded` (zero rows and
    columns in the inverse, η*_s = 0); `positive_definite`, `rank` and
    `condition_number` then refer to the other groups. η* = H̄⁻¹ḡ; the quadratic model q(η) = ḡᵀη - ½ηᵀH̄η predicts a
    decrease q(η*) = ½ḡᵀH̄⁻¹ḡ.
    """

    inverse: np.ndarray  # (S, S)
    method: str
    eigenvalues: np.ndarray  # (S,) of H̄, ascending
    condition_number: float  # max|λ| / min|λ|, inf when singular
    positive_definite: bool
    rank: int
    learning_rates: np.ndarray  # (S,) η*
    predicted_decrease: float
    excluded: np.ndarray  # (S,) bool: groups with exactly zero gradient, left out of the inverse


@dataclass(frozen=True)
class EigenResult:
    """The k most extreme Hessian eigenvalues of one end (`which`), most extreme first.

    `converged[i]` holds when the true residual ‖Hx_i − θ_i x_i‖ <= tol·‖H‖
    (‖H‖ estimated by the largest |Ritz value|) and a deflated check run found
    no eigenvalue beyond the k-th (`verified`). Then |θ_i − λ_i| <= residual.
    """

    values: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray  # bool per value
    which: str  # "largest" | "smallest"
    group: str  # "" for the whole model, else a tensor or layer name
    dim: int
    tol: float
    steps: int  # Lanczos steps (products), check runs included
    verified: bool
    seed: int


@dataclass(frozen=True)
class TraceResult:
    """tr(H) or of a diagonal block, with its standard error (0 when computed exactly).

    `method`: "hutch++"; "exact" (Σ_i e_iᵀHe_i, for operators of at most `matvecs`
    scalars); "hutch++ (shared products)" (a block's share of the whole model's
    Hutch++ products, with the sample standard error of its Hutchinson part: see
    curvscope.curvature.hutchpp.hutchpp_parts); or, in files of an older
    curvscope, "sum of tensor blocks" (a layer's trace as the sum of its tensors'
    traces; standard errors added in quadrature). `matvecs`: the products the
    estimate used (for a shared estimate, the whole model's).
    """

    value: float
    stderr: float
    method: str
    matvecs: int
    group: str
    dim: int
    seed: int

    @property
    def exact(self) -> bool:
        return self.method == "exact"


@dataclass(frozen=True)
class DensityResult:
    """Stochastic Lanczos quadrature: the spectral density of H/P as a sum of Gaussians.

    density(x) = (1/n_v) Σ_r Σ_j weights[r, j] · N(x; nodes[r, j], σ²). The raw
    quadrature (`nodes`, `weights`; NaN and 0 where a run ended early) is kept so
    the density can be redrawn with another width without recomputing.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray  # (runs, steps)
    weights: np.ndarray  # (runs, steps), each row sums to 1
    sigma: float
    runs: int
    steps: int
    seed: int


@dataclass(frozen=True)
class BlockSpectrum:
    """The trace and (unless not asked for: None) the top eigenvalues of one diagonal block H_BB."""

    group: str
    kind: str  # "tensor" | "layer"
    names: np.ndarray  # the tensors in the block
    top: EigenResult | None
    trace: TraceResult


@dataclass(frozen=True)
class SpectrumResult:
    """Everything `curvscope analyse` stores under spectrum/."""

    top: EigenResult
    bottom: EigenResult
    density: DensityResult
    trace: TraceResult
    blocks: list[BlockSpectrum]
    mode: str  # "cached" | "streamed" Hessian-vector products
    graph_bytes: int
    products: int  # Hessian-vector products made in all
    elapsed_s: float
    lanczos_basis: int = 0  # the most Lanczos vectors a run held
    vector_bytes: int = 0  # the most memory the Lanczos and SLQ vectors held at once


@dataclass(frozen=True)
class KFACResult:
    """K-FAC's pseudo-curvature K̄ = UᵀKU beside C̄, and how it does (see curvscope.measures.kfac).

    """

    flavour: str  # "type-2" | "empirical" | "mc"
    approximation: str  # "expand" | "reduce"
    mc_samples: int
    seed: int
    elapsed_s: float
    exact: tuple[str, ...]  # trainable tensors without a K-FAC rule, kept exact
    pseudo_curvature: np.ndarray  # (S, S) K̄
    rules: np.ndarray  # (S,) str: the rule of each group's layer ("linear", "conv2d", "exact")
    measures: "KFACMeasures"
    actual_decrease: float  # L(θ) − L(θ − Σ_s η_K,s U_s)


@dataclass(frozen=True)
class Order3Result:
    """The order-3 diagonal D of the Hessian along each group's direction and the paper's cubic-regularised
    learning rates for several λ_int (see curvscope.measures.cubic)."""

    diagonal: np.ndarray  # (S,) D_s = ∂³L/∂η_s³ at η = 0, for η ↦ L(θ − Σ_t η_t U_t)
    stderr: np.ndarray  # (S,) its standard error across batches
    steps: tuple["CubicStep", ...]  # one per λ_int, ascending
    requested: np.ndarray  # (m,) bool: a λ_int the user asked for (these join the interaction steps)
    actual_decrease: np.ndarray  # (m,) L(θ) − L(θ − Σ_s η_s U_s); NaN where no step was found
    elapsed_s: float
