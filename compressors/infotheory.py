"""Information-theory primitives shared by the entropy-coded codecs (Cover & Thomas, Elements of Information Theory; Gish & Pierce 1968).

Gaussian rate–distortion ``R(D) = max(0, ½·log2(σ²/D))`` and the high-rate gap of entropy-coded
scalar quantisation ``½·log2(πe/6)``; exact cell moments of N(0,1), a :class:`ScalarQuantizer`
value (thresholds, levels, cell probabilities) with its distortion and output entropy; Lloyd–Max
(fixed-rate MSE-optimal) design; Huffman code lengths and entropy.

All design maths runs in numpy float64 on the CPU: designs are small (at most a few thousand cells),
made once and cached by their users; quantising data happens in torch on the data's device.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

#: ½·log2(πe/6): bits above R(D) paid by an entropy-coded uniform quantiser at high rate (Gish & Pierce 1968).
HIGH_RATE_GAP = 0.5 * math.log2(math.pi * math.e / 6)

_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)
#: Grid cells over a quantiser's threshold span in :meth:`ScalarQuantizer.quantize`.
_GRID_CELLS = 4096
_INV_SQRT_2 = 1.0 / math.sqrt(2)
_erfc = np.frompyfunc(math.erfc, 1, 1)
Array = np.ndarray


def gaussian_rate(distortion: float, variance: float = 1.0) -> float:
    """R(D) = max(0, ½·log2(σ²/D)) bits per sample for N(0, σ²) under MSE."""
    if distortion <= 0:
        raise ValueError(f"distortion={distortion} must be > 0")
    return max(0.0, 0.5 * math.log2(variance / distortion))


def gaussian_distortion(rate: float, variance: float = 1.0) -> float:
    """D(R) = σ²·2^(−2R), the inverse of :func:`gaussian_rate` ."""
    if rate < 0:
        raise ValueError(f"rate={rate} must be >= 0")
    return variance * 2.0 ** (-2.0 * rate)


def normal_pdf(x: Array) -> Array:
    """φ(x), zero at ±∞."""
    return np.exp(-0.5 * x * x) * _INV_SQRT_2PI


def normal_cdf(x: Array) -> Array:
    """Φ(x) = ½·erfc(−x/√2), accurate far into the lower tail (``torch.special.ndtr`` loses digits
    below −8 and returns 0 below about −8.3)."""
    return 0.5 * _erfc(-np.asarray(x, dtype=np.float64) * _INV_SQRT_2).astype(np.float64)


def cell_probabilities(lower: Array, upper: Array) -> Array:
    """P(lower < Z ≤ upper) for Z ~ N(0,1), accurate in both tails (no 1 − tiny cancellation)."""
    right = lower >= 0
    return np.where(right, normal_cdf(-lower) - normal_cdf(-upper), normal_cdf(upper) - normal_cdf(lower))


def entropy(p: Array | torch.Tensor | list[float]) -> float:
    """Shannon entropy −Σ p log2 p in bits of a probability vector (zeros contribute nothing)."""
    p = _as_array(p)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def empirical_entropy(counts: Array | torch.Tensor) -> float:
    """Entropy in bits per symbol of the histogram ``counts``."""
    counts = _as_array(counts)
    total = counts.sum()
    return entropy(counts / total) if total > 0 else 0.0


def _as_array(p: Array | torch.Tensor | list[float]) -> Array:
    if isinstance(p, torch.Tensor):
        p = p.detach().cpu().numpy()
    return np.asarray(p, dtype=np.float64).reshape(-1)


def huffman_lengths(p: Array | torch.Tensor | list[float]) -> list[int]:
    """Code lengths of a binary Huffman code for ``p`` (two-smallest merge).

    Ties are broken by insertion order, so the lengths are deterministic. A single symbol gets a
    1-bit code (a prefix code needs at least one bit to be decodable symbol by symbol).
    """
    probs = _as_array(p).tolist()
    if not probs:
        raise ValueError("huffman_lengths needs at least one symbol")
    if any(v < 0 or not math.isfinite(v) for v in probs):
        raise ValueError(f"probabilities must be finite and >= 0, got {probs}")
    if len(probs) == 1:
        return [1]
    lengths = [0] * len(probs)
    heap = [(v, i, [i]) for i, v in enumerate(probs)]
    heapq.heapify(heap)
    order = len(probs)
    while len(heap) > 1:
        p1, _, s1 = heapq.heappop(heap)
        p2, _, s2 = heapq.heappop(heap)
        for i in s1 + s2:
            lengths[i] += 1
        heapq.heappush(heap, (p1 + p2, order, s1 + s2))
        order += 1
    return lengths


def average_length(p: Array | torch.Tensor | list[float], lengths: list[int]) -> float:
    """Expected code length Σ p_i ℓ_i in bits."""
    return float((_as_array(p) * np.asarray(lengths, dtype=np.float64)).sum())


@dataclass(frozen=True, eq=False)
class ScalarQuantizer:
    """A scalar quantiser of N(0,1): ``K−1`` increasing thresholds, ``K`` levels, ``K`` cell probabilities.

    Index ``i`` covers ``(t_{i−1}, t_i]`` with ``t_0 = −∞``, ``t_K = +∞``; float64 numpy arrays.
    """

    thresholds: Array
    levels: Array
    probs: Array
    _on_device: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_cells(cls, thresholds: Array, levels: Array | None = None) -> ScalarQuantizer:
        """Cells from thresholds; levels default to the N(0,1) centroids of the cells."""
        t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        lower, upper = cell_bounds(t)
        p = cell_probabilities(lower, upper)
        if levels is None:
            levels = (normal_pdf(lower) - normal_pdf(upper)) / p
        return cls(t, np.asarray(levels, dtype=np.float64).reshape(-1), p)

    @property
    def size(self) -> int:
        return self.levels.size

    @property
    def entropy(self) -> float:
        """Output entropy H = −Σ p_i log2 p_i (bits per sample)."""
        return entropy(self.probs)

    @property
    def distortion(self) -> float:
        """E(Z − q_I)² for Z ~ N(0,1), from the closed-form cell moments."""
        lower, upper = cell_bounds(self.thresholds)
        m1 = normal_pdf(lower) - normal_pdf(upper)
        m2 = self.probs + _times_pdf(lower) - _times_pdf(upper)
        q = self.levels
        return float((m2 - 2 * q * m1 + q * q * self.probs).sum())

    @property
    def huffman_length(self) -> float:
        """Average length of the Huffman code built for the cell probabilities."""
        return average_length(self.probs, huffman_lengths(self.probs))

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (torch.as_tensor(self.thresholds, dtype=torch.float32, device=device),
                                    torch.as_tensor(self.levels, dtype=torch.float32, device=device))
        return self._on_device[key]

    def _grid(self, device: torch.device) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """A uniform grid over the thresholds for :meth:`quantize`: origin, cells per unit, and per cell the
        number of thresholds left of its window (one cell either side) and the window's thresholds (+∞ pads)."""
        key = ("grid", str(device))
        if key not in self._on_device:
            t = self._tensors(torch.device("cpu"))[0].to(torch.float64)
            lo, hi = float(t[0]), float(t[-1])
            cells = _GRID_CELLS
            per = cells / max(hi - lo, 1e-12)
            left = lo + (torch.arange(cells, dtype=torch.float64) - 1) / per     # window: cells c−1 .. c+1
            right = lo + (torch.arange(cells, dtype=torch.float64) + 2) / per
            base = torch.searchsorted(t, left, right=False)                        # thresholds < window
            end = torch.searchsorted(t, right, right=False)
            width = max(1, int((end - base).max()))
            padded = torch.cat([t.to(torch.float32), torch.full((width,), float("inf"))])
            window = padded[base.unsqueeze(1) + torch.arange(width)]
            self._on_device[key] = (lo, per, base.to(torch.int32).to(device), window.T.contiguous().to(device))
        return self._on_device[key]

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Cell index (int32) of each element of float32 ``z`` (any device): ``i`` with ``t_{i−1} < z ≤ t_i``.

        Exactly ``torch.bucketize(z, t)``, without its binary search: a uniform grid cell (off by at most
        one under rounding) gives the count of thresholds below its window, and the few thresholds in the
        window are compared one by one."""
        if self.thresholds.size == 0:
            return torch.zeros(z.shape, dtype=torch.int32, device=z.device)
        lo, per, base, window = self._grid(z.device)
        cell = (z - lo).mul_(per).clamp_(0, base.numel() - 1).to(torch.int32)
        index = base.index_select(0, cell.reshape(-1)).view(z.shape)
        for column in window:
            index += z > column.index_select(0, cell.reshape(-1)).view(z.shape)
        return index

    def reconstruct(self, index: torch.Tensor) -> torch.Tensor:
        """Levels of the cells ``index`` as float32 on ``index``'s device."""
        return self._tensors(index.device)[1][index]


def cell_bounds(thresholds: Array) -> tuple[Array, Array]:
    """Lower and upper ends of every cell: the thresholds with −∞ and +∞ added."""
    inf = np.array([np.inf])
    return np.concatenate([-inf, thresholds]), np.concatenate([thresholds, inf])


def _times_pdf(x: Array) -> Array:
    """x·φ(x), zero at ±∞ (the boundary term of ∫ z²φ)."""
    finite = np.isfinite(x)
    return np.where(finite, np.where(finite, x, 0.0) * normal_pdf(x), 0.0)


@lru_cache(maxsize=None)
def lloyd_max(bits: int, tol: float = 1e-13, max_iter: int = 100_000) -> ScalarQuantizer:
    """Fixed-rate MSE-optimal quantiser of N(0,1) with 2**bits levels (Lloyd 1982; Max 1960).

    Alternates nearest-neighbour thresholds ``t_i = (q_i + q_{i+1})/2`` and centroid levels from a
    symmetric uniform start until the levels move less than ``tol``.
    """
    if not 1 <= bits <= 12:
        raise ValueError(f"bits={bits} must be in 1..12")
    k = 2**bits
    step = 4.0 / k
    q = (np.arange(k, dtype=np.float64) - (k - 1) / 2) * step
    for _ in range(max_iter):
        t = (q[:-1] + q[1:]) / 2
        new = ScalarQuantizer.from_cells(t).levels
        moved = float(np.abs(new - q).max())
        q = new
        if moved < tol:
            break
    return ScalarQuantizer.from_cells((q[:-1] + q[1:]) / 2, q)
