"""Entropy-constrained scalar quantiser (ECSQ) of N(0,1) at a target rate (ALGORITHMS.md §3.2).

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

import torch

from compressors.infotheory import ScalarQuantizer, _bounds, cell_probabilities, normal_pdf

_F64 = torch.float64
_SPAN = 8.0          # the initial grid covers ±8σ; cells further out carry < 1e-15 of the mass
_MIN_PROB = 1e-12    # cells below this are dropped: they change H and D by < 1e-10
MAX_RATE = 12.0


def design_for_lambda(lam: float, tol: float = 1e-10, max_iter: int = 5000) -> ScalarQuantizer:
    """The Lagrangian ECSQ for multiplier ``lam`` (bits are weighted by ``lam`` against MSE).

    Iterates until ``J`` changes by less than ``tol`` relative; ``J`` is very flat near the optimum
    (a 1e-10 change in ``J`` trades about 1e-4 bits against distortion at the same ``D·2^(2H)``).
    """
    if not lam > 0:
        raise ValueError(f"lam={lam} must be > 0")
    step = math.sqrt(6 * lam / math.log(2))
    half = math.ceil(_SPAN / step)
    q = torch.arange(-half, half + 1, dtype=_F64) * step
    sq = ScalarQuantizer.from_cells((q[:-1] + q[1:]) / 2)
    q, ell = sq.levels, -torch.log2(sq.probs)
    cost = math.inf
    for _ in range(max_iter):
        q, ell, t = _boundaries(q, ell, lam)
        lower, upper = _bounds(t)
        p = cell_probabilities(lower, upper)
        keep = p > _MIN_PROB
        if not bool(keep.all()):
            q, ell, t = _boundaries(q[keep], ell[keep], lam)
            lower, upper = _bounds(t)
            p = cell_probabilities(lower, upper)
        q = (normal_pdf(lower) - normal_pdf(upper)) / p
        ell = -torch.log2(p)
        # with centroid levels D = 1 − Σ p q², so J = 1 − Σ p (q² − λℓ)
        new_cost = 1.0 - float((p * (q * q - lam * ell)).sum())
        if abs(cost - new_cost) <= tol * new_cost:
            break
        cost = new_cost
    return ScalarQuantizer(t, q, p)


def _boundaries(q: torch.Tensor, ell: torch.Tensor, lam: float) -> tuple[torch.Tensor, ...]:
    """Modified nearest-neighbour thresholds; drops levels whose cell has become empty.

    Returns the surviving levels, their lengths and the thresholds between them.
    """
    while True:
        if q.numel() == 1:
            return q, ell, q.new_empty(0)
        t = (q[:-1] + q[1:]) / 2 + lam * (ell[1:] - ell[:-1]) / (2 * (q[1:] - q[:-1]))
        # cell i (between t[i-1] and t[i]) is empty when t[i-1] >= t[i]
        empty = torch.zeros(q.numel(), dtype=torch.bool)
        empty[1:-1] = t[:-1] >= t[1:]
        if not bool(empty.any()):
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
        return ScalarQuantizer.from_cells(torch.empty(0, dtype=_F64))

    def excess(log_lam: float) -> tuple[float, ScalarQuantizer]:
        sq = design_for_lambda(math.exp(log_lam))
        return sq.entropy - rate, sq

    # high-rate guess: λ = 2 ln2 · D, D = 1.4233·2^(−2R); then bracket and refine
    x0 = math.log(2 * math.log(2) * 1.4233 * 2.0 ** (-2 * rate))
    f0, best = excess(x0)
    step = 0.7 if f0 > 0 else -0.7     # H falls as λ grows
    x1 = x0 + step
    f1, sq1 = excess(x1)
    while (f0 > 0) == (f1 > 0):
        x0, f0 = x1, f1
        x1 += step
        f1, sq1 = excess(x1)
        if abs(x1) > 60:
            raise ValueError(f"ECSQ design did not bracket rate={rate}")
    lo, flo, hi, fhi = (x0, f0, x1, f1) if f0 > 0 else (x1, f1, x0, f0)
    best = min((abs(f0), best), (abs(f1), sq1), key=lambda b: b[0])[1]
    side = 0
    for _ in range(200):
        if abs(best.entropy - rate) <= tol:
            return best
        # Illinois regula falsi: secant steps, halving the stale end's weight to keep bracketing fast
        x = (lo * fhi - hi * flo) / (fhi - flo)
        if not min(lo, hi) < x < max(lo, hi):
            x = 0.5 * (lo + hi)
        f, sq = excess(x)
        if abs(f) < abs(best.entropy - rate):
            best = sq
        if f > 0:
            lo, flo = x, f
            if side == -1:
                fhi *= 0.5
            side = -1
        else:
            hi, fhi = x, f
            if side == 1:
                flo *= 0.5
            side = 1
        if abs(hi - lo) < 1e-14:
            break
    return best
