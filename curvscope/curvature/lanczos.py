"""Lanczos in torch: extreme eigenpairs with residuals (thick restart, bounded memory), and Gauss quadrature for SLQ.

The three-term recurrence runs in float64 on the operator's device with full
reorthogonalisation against the Krylov basis (one classical Gram-Schmidt
pass, a second one only when the first cancels much of the vector: the DGKS
criterion), so Ritz values do not duplicate. Every coefficient removed from
H q_j is recorded, which gives the exact relation

    H Q_m = Q_m (T_m + E_m) + β_m q_{m+1} e_mᵀ + Lᵀ D_m

with T_m tridiagonal (α, β), E_m the reorthogonalisation coefficients and D_m
the components along locked vectors L. A Ritz pair (θ, x = Q_m s) of T_m has
the residual ‖H x − θ x‖² = ‖E_m s‖² + ‖D_m s‖² + (β_m s_m)², known without
another product.

Extreme eigenpairs use thick-restart Lanczos (Wu & Simon, SIAM J. Matrix Anal.
Appl. 22, 2000): the basis never holds more than `basis` vectors. When it is
full, the `keep` largest Ritz pairs (θ_i, y_i = Q_m s_i) and the residual
direction q_{m+1} become the new basis; T becomes diag(θ) bordered by the
couplings β_m s_{m,i} (an arrowhead), E and D are carried over as Sᵀ E S and
D S, and the part of E S outside span(S) — rounding-level — is added, as a
bound, to every later residual. Memory is fixed (:func:`lanczos_memory`) and a
run may take any number of products. SLQ may also run without
reorthogonalisation (:func:`quadrature`, :func:`slq_memory`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal


class MatVec(Protocol):
    """v ↦ H v for a symmetric H, in float64: written into `out` when given, else a new tensor."""

    def __call__(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...


MIN_CHECK_STEPS = 8  # the check run's Krylov space must be at least this large before it can clear
CHECK_BASIS = 3  # the least basis of the check run (one wanted eigenpair, and room to restart)
BREAKDOWN = 1e-12  # β_j <= BREAKDOWN·max|α|: the Krylov space is invariant, the Ritz values are exact
DGKS = 2 ** -0.5  # reorthogonalise again when a pass leaves less than this fraction of the vector's norm
CHUNK = 1 << 15  # columns per block when a basis is rotated in place (scratch: basis x CHUNK numbers)
KEEP = 0.25  # a restart keeps the wanted Ritz vectors and this fraction of the rest of the basis
RESTART_CYCLES = 20  # default product budget of a restarted run: max(max_steps, RESTART_CYCLES x basis)
REORTHOGONALISE = ("full", "none")  # SLQ: against the whole basis, or the bare three-term recurrence


def default_basis(k: int) -> int:
    """The most Lanczos vectors :func:`extreme_eigenpairs` keeps for k wanted eigenpairs, by default."""
    return max(2 * k + 10, 30)


def _basis_size(n: int, k: int, basis: int | None) -> int:
    b = default_basis(k) if basis is None else int(basis)
    if b < k + 2:
        raise ValueError(f"a restarted Lanczos basis for {k} eigenpairs needs at least {k + 2} vectors, not {b}")
    return min(b, n)


def default_products(max_steps: int, basis: int) -> int:
    """The product budget of one restarted run when `max_products` is not given: max(max_steps, 20 x basis)."""
    return max(max_steps, RESTART_CYCLES * basis)


def _check_basis(n: int, k: int, basis: int) -> int:
    """The basis of :func:`extreme_eigenpairs`' check run: what the k Ritz vectors leave of the first run's
    `basis` rows, but at least the 3 a restarted run for one eigenpair needs (and at most the n − k directions
    left)."""
    return min(max(basis - k, CHECK_BASIS), n - k)


def lanczos_memory(n: int, k: int, basis: int | None = None) -> int:
    """Bytes of float64 storage :func:`extreme_eigenpairs` holds at once for an operator of size n, whatever its
    number of products: one buffer of `basis` Lanczos vectors (at least k + 3: the check run's basis lives
    beside the k Ritz vectors it stays orthogonal to, in the same rows), one product vector, and the scratch of
    an in-place rotation. The operator's own memory (graphs, model) is extra."""
    k = max(1, min(k, n))
    b = _basis_size(n, k, basis)
    rows = max(b, k + _check_basis(n, k, b)) if k < n else b
    return 8 * (n * (rows + 1) + 2 * b * min(n, CHUNK))


def slq_memory(n: int, steps: int, reorthogonalise: str = "full") -> int:
    """Bytes of float64 vectors one :func:`quadrature` run holds at once, its probe included: the whole basis
    (min(steps, n) vectors) plus two with full reorthogonalisation; four without."""
    if reorthogonalise not in REORTHOGONALISE:
        raise ValueError(f"reorthogonalise must be one of {', '.join(REORTHOGONALISE)}, not {reorthogonalise!r}")
    return 8 * n * (min(max(steps, 1), n) + 2 if reorthogonalise == "full" else 4)


def _vectors(rows: int, n: int, device: torch.device) -> torch.Tensor:
    """Uninitialised float64 rows of length n: every model-sized buffer of the restarted solver comes from here."""
    return torch.empty(rows, n, dtype=torch.float64, device=device)


def _fill_random(dst: torch.Tensor, generator: torch.Generator) -> None:
    """dst ← the N(0, I) vector :func:`random_start` would draw, without another model-sized vector on a CPU."""
    if dst.device.type == "cpu":
        torch.randn(dst.shape, generator=generator, dtype=torch.float64, out=dst)
    else:
        dst.copy_(random_start(dst.numel(), generator, torch.device("cpu")))


def _rotate(rows: torch.Tensor, s: np.ndarray) -> None:
    """rows[:l] ← sᵀ rows[:m] in place for s (m x l), CHUNK columns at a time: Ritz vectors without a new basis."""
    m, ell = s.shape
    st = torch.as_tensor(np.ascontiguousarray(s.T), dtype=torch.float64, device=rows.device)
    for c in range(0, rows.shape[1], CHUNK):
        rows[:ell, c:c + CHUNK] = st @ rows[:m, c:c + CHUNK]


@dataclass(frozen=True)
class Krylov:
    """m Lanczos steps: basis Q (m x n), T_m's diagonal α and off-diagonal β (β[-1] is β_m), and the
    coefficients beyond T_m, `extra` ((m + locked) x m: E_m stacked on D_m)."""

    basis: torch.Tensor
    alpha: np.ndarray
    beta: np.ndarray
    extra: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.alpha)

    @property
    def invariant(self) -> bool:
        """True when the recurrence broke down: span(Q) is an invariant subspace."""
        return bool(self.beta[-1] <= BREAKDOWN * max(np.abs(self.alpha).max(), 1e-300))

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), the eigenvectors s_i of T_m (columns) and the residuals ‖H Q s_i − θ_i Q s_i‖."""
        theta, s = eigh_tridiagonal(self.alpha, self.beta[:-1])
        tail = 0.0 if self.invariant else self.beta[-1] * s[-1]
        return theta, s, np.sqrt(np.sum((self.extra @ s) ** 2, axis=0) + tail ** 2)


def _project_out(w: torch.Tensor, bases: list[torch.Tensor]) -> np.ndarray:
    """Remove from w, in place, its components along the rows of `bases` (one classical Gram-Schmidt
    pass); return those components. In place because a new vector of a large model's size costs more
    in page faults than the arithmetic."""
    coef = torch.cat([q @ w for q in bases])
    start = 0
    for q in bases:
        w.addmv_(q.T, coef[start:start + q.shape[0]], alpha=-1)
        start += q.shape[0]
    return coef.cpu().numpy()


def lanczos(matvec: MatVec, start: torch.Tensor, steps: int, *, locked: torch.Tensor | None = None,
            stop: Callable[[Krylov], bool] | None = None) -> Krylov:
    """Up to `steps` Lanczos steps from `start`, kept orthogonal to the rows of `locked`.

    `stop(krylov)` is asked after every step; the run also ends when the
    Krylov space becomes invariant. Every product is written into one
    vector: a new vector of a large model's size costs page faults.
    """
    n = start.numel()
    locked = torch.zeros(0, n, dtype=torch.float64, device=start.device) if locked is None else locked
    n_locked = locked.shape[0]
    steps = max(1, min(steps, n - n_locked))
    basis = torch.empty(steps, n, dtype=torch.float64, device=start.device)
    w = torch.empty(n, dtype=torch.float64, device=start.device)
    extra = np.zeros((steps + n_locked, steps))
    basis[0] = start
    for _ in range(2):
        _project_out(basis[0], [locked])
    basis[0] /= torch.linalg.vector_norm(basis[0])
    alpha, beta = np.zeros(steps), np.zeros(steps)
    for j in range(steps):
        q = basis[j]
        matvec(q, w)
        alpha[j] = float(q @ w)
        w.sub_(q, alpha=alpha[j])
        if j:
            w.sub_(basis[j - 1], alpha=beta[j - 1])
        for _ in range(2):  # full reorthogonalisation; the second pass only when DGKS asks for it
            before = float(torch.linalg.vector_norm(w))
            coef = _project_out(w, [basis[:j + 1], locked])
            alpha[j] += coef[j]
            coef[j] = 0.0
            extra[:j + 1, j] += coef[:j + 1]
            extra[steps:, j] += coef[j + 1:]
            beta[j] = float(torch.linalg.vector_norm(w))
            if beta[j] >= DGKS * before:
                break
        krylov = Krylov(basis[:j + 1], alpha[:j + 1], beta[:j + 1],
                        np.concatenate([extra[:j + 1, :j + 1], extra[steps:, :j + 1]]))
        if krylov.invariant or j + 1 == steps or (stop is not None and stop(krylov)):
            return krylov
        torch.div(w, beta[j], out=basis[j + 1])
    return krylov


@dataclass(frozen=True)
class Subspace:
    """The state of a thick-restart run: basis V (m x n, orthonormal, a view of the run's buffer), the symmetric
    T (m x m) the recurrence defines (tridiagonal, with an arrowhead block after a restart), the coefficients
    beyond it (`extra`: E stacked on D, (m + locked) x m) and β, the coupling to the next direction, so that

        H V = V (T + E) + β v₊ e_mᵀ + Lᵀ D  (+ parts dropped at restarts, of norm at most `floor`)."""

    basis: torch.Tensor
    t: np.ndarray
    extra: np.ndarray
    beta: float
    floor: float
    steps: int  # products, restarts included
    restarts: int

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), T's eigenvectors (columns) and bounds on ‖H V s_i − θ_i V s_i‖."""
        theta, s = np.linalg.eigh(self.t)
        est = np.sqrt(np.sum((self.extra @ s) ** 2, axis=0) + (self.beta * s[-1]) ** 2) + self.floor
        return theta, s, est


def _orthonormalise(w: torch.Tensor, bases: list[torch.Tensor]) -> None:
    """w ← w with its components along the rows of `bases` removed (twice), normalised."""
    for _ in range(2):
        _project_out(w, bases)
    w /= torch.linalg.vector_norm(w)


def thick_restart(matvec: MatVec, n: int, *, want: int, basis: int, products: int, generator: torch.Generator,
                  device: torch.device, locked: torch.Tensor | None = None,
                  stop: Callable[[Subspace], bool] | None = None, rows: torch.Tensor | None = None) -> Subspace:
    """Thick-restart Lanczos toward the largest eigenvalues from a random start, kept orthogonal to `locked`.

    Holds at most `basis` vectors; when they are all used, the `keep` =
    want + ⌊KEEP·(basis − want)⌋ (at most basis − 2) largest Ritz pairs and
    the residual direction are kept (KEEP = 1/4 took the fewest products on
    LeNet-5's bottom eigenvalues among 0, 1/4 and 1/2). Ends when
    `stop(subspace)` says so (asked after every product), after `products`
    products, or when the space is invariant and holds at least `want`
    vectors (an invariant space that holds fewer goes on from a fresh random
    direction, the dropped remainder, of norm β, added to the residual bound).
    """
    locked = torch.zeros(0, n, dtype=torch.float64, device=device) if locked is None else locked
    n_locked = locked.shape[0]
    room = n - n_locked
    if room < 1:
        raise ValueError(f"no room for a Lanczos vector: {n_locked} locked vectors of size {n}")
    b = max(1, min(basis, room))
    want = max(1, min(want, room))
    if b < room and b < want + 2:
        raise ValueError(f"a restarted Lanczos basis for {want} eigenpairs needs at least {want + 2} vectors, not {b}")
    keep = min(b - 2, want + int(KEEP * (b - want)))
    v = _vectors(b, n, device) if rows is None else rows[:b]
    w = _vectors(1, n, device)[0]
    t, e, d = np.zeros((b, b)), np.zeros((b, b)), np.zeros((n_locked, b))
    _fill_random(v[0], generator)
    _orthonormalise(v[0], [locked])
    m, done, restarts, floor, norm = 1, 0, 0, 0.0, 0.0
    while True:
        j = m - 1
        q = v[j]
        matvec(q, w)
        done += 1
        above = np.flatnonzero(t[:j, j])  # the recurrence's own terms: β_{j-1} q_{j-1}, or the arrowhead's
        if len(above) == 1:
            w.sub_(v[above[0]], alpha=float(t[above[0], j]))
        elif len(above):
            w.addmv_(v[:j].T, torch.as_tensor(t[:j, j], device=device), alpha=-1)
        a = float(q @ w)
        w.sub_(q, alpha=a)
        for _ in range(2):  # full reorthogonalisation; the second pass only when DGKS asks for it
            before = float(torch.linalg.vector_norm(w))
            coef = _project_out(w, [v[:j + 1], locked])
            a += coef[j]
            e[:j, j] += coef[:j]
            d[:, j] += coef[j + 1:]
            beta = float(torch.linalg.vector_norm(w))
            if beta >= DGKS * before:
                break
        t[j, j] = a
        norm = max(norm, abs(a))
        sub = Subspace(v[:m], t[:m, :m].copy(), np.concatenate([e[:m, :m], d[:, :m]]), beta, floor, done, restarts)
        closed = beta <= BREAKDOWN * max(norm, 1e-300)
        if m == room or (closed and m >= want) or done >= products or (stop is not None and stop(sub)):
            return sub
        if closed:  # an invariant space too small: go on from a fresh direction; what is dropped has norm β
            floor += beta
            beta = 0.0
            _fill_random(w, generator)
            _orthonormalise(w, [v[:m], locked])
        else:
            w /= beta
        if m < b:
            v[m] = w
            t[j, m] = t[m, j] = beta
            m += 1
            continue
        theta, s = np.linalg.eigh(t)  # the basis is full: restart from the keep largest Ritz pairs
        s = s[:, b - keep:]
        es = e @ s
        inside = s.T @ es
        floor += float(np.linalg.norm(es - s @ inside, 2))  # E's part outside the kept span, carried as a bound
        ds = d @ s
        _rotate(v, s)
        v[keep] = w
        t[:], e[:], d[:] = 0.0, 0.0, 0.0
        t[:keep, :keep] = np.diag(theta[b - keep:])
        t[:keep, keep] = t[keep, :keep] = beta * s[-1]
        e[:keep, :keep], d[:, :keep] = inside, ds
        m, restarts = keep + 1, restarts + 1


def random_start(n: int, generator: torch.Generator, device: torch.device, rademacher: bool = False) -> torch.Tensor:
    """A seeded N(0, I) (or ±1) vector, drawn on the CPU so that seeds give the same vector on every device."""
    if rademacher:
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    else:
        v = torch.randn(n, generator=generator, dtype=torch.float64)
    return v.to(device)


@dataclass(frozen=True)
class Eigenpairs:
    """The k most extreme eigenvalues of one end, most extreme first, with true residuals."""

    values: np.ndarray
    vectors: torch.Tensor  # (k, n), unit rows: a view of the run's buffer (lanczos_memory), which it keeps
    residuals: np.ndarray  # ‖H x − θ x‖, from the run's recorded Lanczos relation (no extra products)
    converged: np.ndarray  # residual <= tol·‖H‖ (‖H‖: largest |Ritz value| seen), and the check run cleared it
    steps: int  # Lanczos steps, verification runs included
    verified: bool  # a deflated run from a fresh start found nothing beyond the k-th value


def extreme_eigenpairs(matvec: MatVec, n: int, k: int, largest: bool, *, tol: float, max_steps: int,
                       generator: torch.Generator, device: torch.device, verify: bool = True,
                       basis: int | None = None, max_products: int | None = None,
                       deflate: torch.Tensor | None = None) -> Eigenpairs:
    """The k largest (or smallest) algebraic eigenpairs of the symmetric operator `matvec`.

    Thick-restart Lanczos (:func:`thick_restart`) holding at most `basis`
    vectors (default :func:`default_basis`: max(2k + 10, 30); memory
    :func:`lanczos_memory`, whatever the number of products) runs until the
    residual estimates of the k wanted Ritz values are below tol·‖H‖, or
    `max_products` products (default :func:`default_products`:
    max(max_steps, 20 x basis); `max_steps` is thus the least budget a run
    gets, and `max_products` sets it exactly). A second, deflated run from a
    fresh start vector (kept orthogonal to the k Ritz vectors, in the basis rows
    they leave free: basis − k, at least 3) checks that no
    eigenvalue beyond the k-th θ_k was missed — a single Krylov space sees only
    one copy of a repeated eigenvalue. It clears the values once its top Ritz
    value θ' satisfies θ' + r' < θ_k (r' its residual estimate; after at least
    MIN_CHECK_STEPS steps, as extreme eigenvalues are the first a Krylov space
    resolves); an eigenvalue it finds beyond θ_k replaces the k-th, and the
    check repeats. The check is skipped when the first run did not settle (the
    values are then flagged unconverged anyway). Residuals come from each run's
    recorded relation (see the module docstring), reorthogonalisation included.

    `deflate` (orthonormal rows, e.g. the other end's eigenvectors, held besides :func:`lanczos_memory`): the
    first run stays orthogonal to them. Eigenvectors of the wanted end are orthogonal to the other end's, so
    nothing is lost, while the spread of eigenvalues the run must resolve shrinks to what the rows leave: the
    smallest eigenvalues of a Hessian whose top ones are outliers converge in fewer products (the shipped
    LeNet-5's bottom 5: 189 instead of 231). The residuals count the components along the rows (D in the module
    docstring), so they stay true residuals even where the rows are only approximate eigenvectors.
    """
    sign = 1.0 if largest else -1.0

    def op(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return matvec(v, out) if largest else matvec(v, out).neg_()  # in place: no second model-sized vector

    k = max(1, min(k, n))
    b = _basis_size(n, k, basis)
    budget = default_products(max_steps, b) if max_products is None else max(1, max_products)
    scale = [0.0]

    def settled(want: int) -> Callable[[Subspace], bool]:
        def check(sub: Subspace) -> bool:
            theta, _, est = sub.ritz()
            scale[0] = max(scale[0], float(np.abs(theta).max()))
            return len(theta) >= want and bool(np.all(est[-want:] <= tol * scale[0]))
        return check

    check_basis = _check_basis(n, k, b) if verify and k < n else 0
    buffer = _vectors(max(b, k + check_basis), n, device)  # the first run's basis, then the Ritz vectors + the check's
    first = thick_restart(op, n, want=k, basis=b, products=budget, generator=generator, device=device,
                          stop=settled(k), rows=buffer, locked=deflate)
    theta, s, est = first.ritz()
    scale[0] = max(scale[0], float(np.abs(theta).max()))
    order = np.argsort(-theta)[:k]
    settled_first = bool(np.all(est[order] <= tol * scale[0]))
    values, residuals = list(theta[order]), list(est[order])
    _rotate(first.basis, s[:, order])  # the Ritz vectors, in the basis's own rows
    vectors = buffer[:len(order)]
    steps, verified = first.steps, False
    while check_basis and settled_first and len(values) == k:
        kth = values[-1]

        def decided(sub: Subspace) -> bool:
            th, _, est_ = sub.ritz()
            i = int(np.argmax(th))
            below = sub.steps >= MIN_CHECK_STEPS and th[i] + est_[i] < kth
            return below or (th[i] > kth + tol * scale[0] and est_[i] <= tol * scale[0])

        check = thick_restart(op, n, want=1, basis=check_basis, products=budget, generator=generator,
                              device=device, locked=vectors, stop=decided, rows=buffer[k:])
        steps += check.steps
        th2, s2, est2 = check.ritz()
        top = int(np.argmax(th2))
        if th2[top] <= kth + tol * scale[0]:
            verified = bool(th2[top] + est2[top] < kth or est2[top] <= tol * scale[0])
            break
        _rotate(check.basis, s2[:, [top]])  # a missed eigenpair: it takes its place, the k-th value leaves
        pos = int(np.searchsorted(-np.asarray(values), -th2[top]))
        values.insert(pos, float(th2[top]))
        residuals.insert(pos, float(est2[top]))
        for i in range(k - 1, pos, -1):
            vectors[i] = vectors[i - 1]
        vectors[pos] = check.basis[0]
        values, residuals = values[:k], residuals[:k]
    vals, res = np.asarray(values), np.asarray(residuals)
    converged = res <= tol * scale[0]
    if verify and k < n:
        converged &= verified
    return Eigenpairs(sign * vals, vectors, res, converged, steps, verified or k == n)


def three_term(matvec: MatVec, start: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `steps` Lanczos steps from `start` without reorthogonalisation: T's diagonal α and off-diagonal β
    (β[-1] the last coupling). Holds three vectors besides `start` (Paige's variant: w = H q_j − β_{j−1} q_{j−1},
    α_j = q_jᵀ w, w −= α_j q_j). Orthogonality is lost as Ritz values converge, and T then shows extra ("ghost")
    copies of them, but its Gauss quadrature of smooth functions stays accurate (Greenbaum 1989; Knizhnerman 1996)."""
    n = start.numel()
    steps = max(1, min(steps, n))
    cur = start / torch.linalg.vector_norm(start)
    prev, w = torch.empty_like(cur), torch.empty_like(cur)
    alpha, beta = np.zeros(steps), np.zeros(steps)
    for j in range(steps):
        matvec(cur, w)
        if j:
            w.sub_(prev, alpha=beta[j - 1])
        alpha[j] = float(cur @ w)
        w.sub_(cur, alpha=alpha[j])
        beta[j] = float(torch.linalg.vector_norm(w))
        if beta[j] <= BREAKDOWN * max(np.abs(alpha[:j + 1]).max(), 1e-300) or j + 1 == steps:
            return alpha[:j + 1], beta[:j + 1]
        torch.div(w, beta[j], out=prev)  # q_{j-1} is no longer needed: its buffer takes q_{j+1}
        prev, cur = cur, prev
    return alpha, beta


def quadrature(matvec: MatVec, start: torch.Tensor, steps: int, *,
               reorthogonalise: str = "full") -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of the spectral measure of `start`: nodes θ_i and weights (s_{1,i})², summing to 1.

    `reorthogonalise`: "full" keeps the whole basis (steps vectors, :func:`slq_memory`) and reorthogonalises
    against it, so nodes do not repeat; "none" runs the bare three-term recurrence (:func:`three_term`, four
    vectors): converged nodes may then appear more than once, their weight shared among the copies.
    """
    if reorthogonalise not in REORTHOGONALISE:
        raise ValueError(f"reorthogonalise must be one of {', '.join(REORTHOGONALISE)}, not {reorthogonalise!r}")
    if reorthogonalise == "none":
        alpha, beta = three_term(matvec, start, steps)
        theta, s = eigh_tridiagonal(alpha, beta[:-1])
        return theta, s[0] ** 2
    krylov = lanczos(matvec, start, steps)
    theta, s, _ = krylov.ritz()
    return theta, s[0] ** 2
