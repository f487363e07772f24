"""Load balancing for DeDLOC's butterfly all-reduce (Diskin et al., NeurIPS 2021; hivemind's
``load_balancing.py``): which fraction of the vector each peer aggregates, so the slowest link finishes
first no later than it must, and integer shard sizes that add up to the vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction




@dataclass(frozen=True)
class Shares:
    """Butterfly shard fractions and the LP objective ξ (seconds per bit of the vector).

    ``xi`` = ``max_i (1 + (N−2)·w_i)/b_i`` over the non-client peers: the round's bandwidth time is
    ``xi × 8V`` (V in bytes, b in bits/s). ``xi_fill`` is the water-filling level of the LP.
    """

    weights: tuple[float, ...]
    xi: float
    xi_fill: float


def optimize_shares(bandwidths: Sequence[float | None], client_mode: Sequence[bool] | None = None,
                    min_share: float = 0.0) -> Shares:
    """Optimal butterfly shares (DeDLOC; hivemind's ``optimize_parts_lp``) in closed form.

    LP: minimise ξ s.t. ``(1 + (N−2)w_i)/b_i ≤ ξ`` for every peer that can aggregate, ``w ≥ 0``,
    ``Σw = 1``. Water-filling: ``ξ_fill`` solves ``Σ_i max(0, ξ·b_i − 1) = N − 2``; the active peers get
    ``w_i = (ξ_fill·b_i − 1)/(N−2)``, the others 0; the optimum is ``ξ* = max(ξ_fill, 1/min_i b_i)``.
    Peers with bandwidth 0 or ``client_mode`` get ``w = 0``; unknown bandwidths (None / NaN) take the mean
    of the known positive ones. Shares below ``min_share`` are zeroed and the rest renormalised
    (hivemind's ``min_size / vector_size``). N = 2: any split is optimal; the aggregators split equally.
    """
    n = len(bandwidths)
    if n == 0:
        raise ValueError("optimize_shares needs at least one peer")
    if client_mode is not None and len(client_mode) != n:
        raise ValueError(f"client_mode has {len(client_mode)} entries for {n} peers")
    known = [b for b in bandwidths if b is not None and not math.isnan(b)]
    if any(b < 0 for b in known):
        raise ValueError(f"bandwidths={list(bandwidths)!r} must be >= 0 (0 = client mode)")
    positive = [b for b in known if b > 0]
    fill_in = sum(positive) / len(positive) if positive else 1.0
    b = [fill_in if x is None or math.isnan(x) else float(x) for x in bandwidths]
    clients = [bi == 0 or bool(client_mode and client_mode[i]) for i, bi in enumerate(b)]
    active = [i for i in range(n) if not clients[i]]
    if not active:
        raise ValueError("every peer is in client mode: no peer can aggregate a shard")
    w = [0.0] * n
    if n <= 2:
        for i in active:
            w[i] = 1.0 / len(active)
        xi_fill = 0.0 if n == 1 else 1.0 / max(b[i] for i in active)
    else:
        order = sorted(active, key=lambda i: -b[i])
        s = 0.0
        for k, i in enumerate(order, start=1):
            s += b[i]
            xi_fill = (n - 2 + k) / s
            if k == len(order) or xi_fill * b[order[k]] <= 1:
                break
        for i in order[:k]:
            w[i] = (xi_fill * b[i] - 1) / (n - 2)
    if min_share > 0:
        kept = [wi if wi >= min_share else 0.0 for wi in w]
        if sum(kept) > 0:
            w = [wi / sum(kept) for wi in kept]
    xi = 0.0 if n == 1 else max((1 + (n - 2) * w[i]) / b[i] for i in active)
    return Shares(tuple(w), xi, xi_fill)


def apportion(scores: Sequence[float], total: int) -> list[int]:
    """Hagenbach–Bischoff (D'Hondt) apportionment of ``total`` elements by ``scores``; sums to ``total``.

    Floor of the proportional quota, then each remaining element goes to the largest
    ``score_i / (allocated_i + 1)`` (lowest index on ties) — hivemind's ``hagenbach_bishoff``.
    """
    if total < 0 or any(not s >= 0 for s in scores) or not sum(scores) > 0:
        raise ValueError(f"apportion needs total >= 0 and scores >= 0 with a positive sum; got {total}, {list(scores)}")
    exact = [Fraction(s) for s in scores]
    whole = sum(exact)
    alloc = [int(total * s / whole) for s in exact]
    while sum(alloc) < total:
        i = max(range(len(exact)), key=lambda j: (exact[j] / (alloc[j] + 1), -j))
        alloc[i] += 1
    return alloc


def load_balance(bandwidths: Sequence[float | None], vector_size: int, client_mode: Sequence[bool] | None = None,
                 min_size: int = 0) -> list[int]:
    """Integer shard sizes for the butterfly all-reduce: :func:`optimize_shares` then :func:`apportion`."""
    if vector_size <= 0:
        raise ValueError(f"vector_size={vector_size!r} must be > 0")
    shares = optimize_shares(bandwidths, client_mode, min_share=min_size / vector_size)
    return apportion(shares.weights, vector_size)
