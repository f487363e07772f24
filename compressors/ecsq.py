"""Entropy-constrained scalar quantiser (ECSQ) of N(0,1) at a target rate (Hamidi & Bereyhi, ICASSP 2025: RC-FED's offline design).

Lagrangian design (Chou, Lookabaugh, Gray 1989): for a multiplier λ minimise ``J = D + λ·H`` with
ideal lengths ``ℓ_i = −log2 p_i`` by alternating

* boundaries (modified nearest neighbour) ``t_i = (q_i+q_{i+1})/2 + λ(ℓ_{i+1}−ℓ_i) / (2(q_{i+1}−q_i))``,
  dropping cells that become empty,
* centroid levels ``q_i = (φ(t_{i−1}) − φ(t_i)) / p_i`` and lengths from the new cells,

starting from a uniform grid of step ``Δ = √(6λ/ln 2)`` over ±8 (the high-rate optimum has
``λ = 2 ln2·D`` and ``D = Δ²/12``). An outer safeguarded secant search on ``log λ`` finds the
design whose output entropy equals the target rate. Designs are deterministic functions of the
rate and cached per process: encoder and decoder rebuild the same quantiser from the rate alone.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from compressors.infotheory import ScalarQuantizer, cell_bounds, cell_probabilities, normal_pdf

_SPAN = 8.0          # the initial grid covers ±8σ; cells further out carry < 1e-15 of the mass
_MIN_PROB = 1e-12    # cells below this are dropped: they change H and D by < 1e-10
MAX_RATE = 8.0


def design_for_lambda(lam: float, tol: float = 1e-9, max_iter: int = 500) -> ScalarQuantizer:
    """The Lagrangian ECSQ for multiplier ``lam`` (bits are weighted by ``lam`` against MSE).

    Iterates until ``J`` changes by less than ``tol`` relative (or ``max_iter`` times). Near the
    optimum ``J`` is very flat: at high rate the iteration then only slides the design along the
    ``D·2^(2H)`` = const curve (1e-3 bits over hundreds of steps for a 1e-8 change in ``J``), which the
    rate search in :func:`design` absorbs, so stopping there costs nothing and keeps designs fast.
    """
    if not lam > 0:
        raise ValueError(f"lam={lam} must be > 0")
    step = math.sqrt(6 * lam / math.log(2))
    half = math.ceil(_SPAN / step)
    q = np.arange(-half, half + 1, dtype=np.float64) * step
    sq = ScalarQuantizer.from_cells((q[:-1] + q[1:]) / 2)
    q, ell = sq.levels, -np.log2(sq.probs)
    cost = math.inf
    for _ in range(max_iter):
        q, ell, t = _boundaries(q, ell, lam)
        lower, upper = cell_bounds(t)
        p = cell_probabilities(lower, upper)
        keep = p > _MIN_PROB
        if not keep.all():
            q, ell, t = _boundaries(q[keep], ell[keep], lam)
            lower, upper = cell_bounds(t)
            p = cell_probabilities(lower, upper)
        q = (normal_pdf(lower) - normal_pdf(upper)) / p
        ell = -np.log2(p)
        # with centroid levels D = 1 − Σ p q², so J = 1 − Σ p (q² − λℓ)
        new_cost = 1.0 - float((p * (q * q - lam * ell)).sum())
        if abs(cost - new_cost) <= tol * new_cost:
            break
        cost = new_cost
    return ScalarQuantizer(t, q, p)


def _boundaries(q: np.ndarray, ell: np.ndarray, lam: float) -> tuple[np.ndarray, ...]:
    """Modified nearest-neighbour thresholds; drops levels whose cell has become empty.

    Returns the surviving levels, their lengths and the thresholds between them.
    """
    while True:
        if q.size == 1:
            return q, ell, q[:0]
        t = (q[:-1] + q[1:]) / 2 + lam * (ell[1:] - ell[:-1]) / (2 * (q[1:] - q[:-1]))
        # cell i (between t[i-1] and t[i]) is empty when t[i-1] >= t[i]
        empty = np.zeros(q.size, dtype=bool)
        empty[1:-1] = t[:-1] >= t[1:]
        if not empty.any():
            return q, ell, t
        q, ell = q[~empty], ell[~empty]


@lru_cache(maxsize=4096)
def design(rate: float, tol: float = 1e-4) -> ScalarQuantizer:
    """The ECSQ of N(0,1) whose output entropy is ``rate`` bits (within ``tol``), cached by rate.

    ``rate = 0`` is the one-cell quantiser (everything maps to 0).
    """
    if not 0 <= rate <= MAX_RATE:
        raise ValueError(f"rate={rate} must be in [0, {MAX_RATE}] bits per coordinate")
    if rate == 0:
        return ScalarQuantizer.from_cells(np.empty(0))

    def excess(log_lam: float) -> tuple[float, ScalarQuantizer]:
        sq = design_for_lambda(math.exp(log_lam))
        return sq.entropy - rate, sq

    # Secant search on log λ. H(log λ) is decreasing with slope ≈ −1/(2 ln 2) (high rate:
    # λ = 2 ln2·D, D ∝ 2^(−2H)), which also gives the first step from the high-rate guess.
    x0 = math.log(2 * math.log(2) * 1.4233 * 2.0 ** (-2 * rate))
    f0, best = excess(x0)
    best_err = abs(f0)
    x1 = x0 + 2 * math.log(2) * f0
    for _ in range(60):
        if best_err <= tol:
            break
        f1, sq = excess(x1)
        if abs(f1) < best_err:
            best, best_err = sq, abs(f1)
        slope = (f1 - f0) / (x1 - x0) if x1 != x0 else 0.0
        if not slope < 0:  # flat or noisy: fall back to the high-rate slope
            slope = -1 / (2 * math.log(2))
        x0, f0 = x1, f1
        x1 = x1 - max(-2.0, min(2.0, f1 / slope))
    return best
