"""Gaussian_k: approximate top-k by a normal-tail threshold (Shi, Chu, Cheung, See, 2019).

    μ, σ = mean(u), std(u);  thr = μ + σ·Φ⁻¹(1 − ρ/2)
    up to ``loops`` times: n = #{|u_i| > thr};  n < 2k/3 → thr·0.5;  n > 4k/3 → thr·1.5;  else stop
    send { (i, u_i) : |u_i| > thr }

O(d) with no sort. The count is *not* exactly k: heavy tails overshoot (Laplace, ρ = 0.01: ≈1.65k
after 3 loops), so with ``trim`` a final exact top-k cuts a count above 4k/3 back to k.
The refinement runs as fixed-shape tensor code (an in-range threshold is a fixed point of the
update), so only the final selection reads a count back to the host. On the CPU the refinement's
counts and the selection are compiled passes over the vector (no |u| temporary; the loop stops at
the fixed point), with the same float32 comparisons and updates. Biased: use error feedback.

Wire: the selected fp32 values in index order and their Elias–Fano coded indices
(:mod:`compressors.sparse_index`); the count is the values field's length. Gather kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import numpy as np
import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.jit import compiled
from compressors.packet import Packet
from compressors.sparse_index import check_density, densify, density_count, sparse_fields
from compressors.staging import host_kernels


@compiled
def _refine(u, thr, k, loops):
    """The refinement loop of :meth:`GaussianK.threshold` over a float32 array (``thr`` float32)."""
    steps = 0
    for _ in range(loops):
        n = 0
        for i in range(u.shape[0]):
            if abs(u[i]) > thr:
                n += 1
        if n < 2 * k / 3:
            thr = np.float32(thr * np.float32(0.5))
        elif n > 4 * k / 3:
            thr = np.float32(thr * np.float32(1.5))
        else:
            break  # a fixed point: every further loop would count the same
        steps += 1
    return thr, steps


@compiled
def _above(u, thr):
    """Ascending indices of |u_i| > thr."""
    n = 0
    for i in range(u.shape[0]):
        if abs(u[i]) > thr:
            n += 1
    out = np.empty(n, dtype=np.int64)
    j = 0
    for i in range(u.shape[0]):
        if abs(u[i]) > thr:
            out[j] = i
            j += 1
    return out


@register
@dataclass(frozen=True)
class GaussianK(Codec):
    name: ClassVar[str] = "gaussiank"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "normal-tail threshold ≈ top-k without a sort; use with error feedback"
    source: ClassVar[str] = "Shi, Chu, Cheung, See: GaussianK-SGD, arXiv 1911.08772, 2019"

    density: float = 0.01
    loops: int = 3
    trim: bool = True

    def __post_init__(self) -> None:
        check_density(self.density)
        if not 0 <= self.loops <= 16:
            raise ValueError(f"loops={self.loops} must be in 0..16")

    def threshold(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The refined threshold and how many refinement steps changed it (0-d tensors, on u's device)."""
        k = density_count(self.density, u.numel())
        std, mean = torch.std_mean(u, correction=0)
        thr = mean + std * NormalDist().inv_cdf(1.0 - self.density / 2.0)
        if host_kernels(u.device) and u.is_contiguous():
            return self._refine_compiled(u, thr, k)
        return self._refine_tensor(u, thr, k)

    def _refine_compiled(self, u: torch.Tensor, thr: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        refined, steps = _refine(u.numpy(), thr.numpy()[()], k, self.loops)
        return torch.tensor(refined, dtype=torch.float32), torch.tensor(steps, dtype=torch.int64)

    def _refine_tensor(self, u: torch.Tensor, thr: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        mag = u.abs()
        steps = torch.zeros((), dtype=torch.int64, device=u.device)
        for _ in range(self.loops):
            n = (mag > thr).sum()
            low, high = n < 2 * k / 3, n > 4 * k / 3
            thr = torch.where(low, thr * 0.5, torch.where(high, thr * 1.5, thr))
            steps += (low | high).to(torch.int64)
        return thr, steps

    def select(self, u: torch.Tensor) -> torch.Tensor:
        """Indices (ascending) of the coordinates sent for the flat fp32 vector ``u``."""
        thr, _ = self.threshold(u)
        if host_kernels(u.device) and u.is_contiguous():
            idx = torch.from_numpy(_above(u.numpy(), thr.numpy()[()]))
        else:
            idx = (u.abs() > thr).nonzero().reshape(-1)
        k = density_count(self.density, u.numel())
        if self.trim and 3 * idx.numel() > 4 * k:
            idx = idx[u[idx].abs().topk(k, sorted=False).indices].sort().values
        return idx

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1).to(torch.float32)
        idx = self.select(flat)
        return Packet(self.name, flat.numel(), sparse_fields(flat[idx], idx, flat.numel()))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        values, code = self.check(packet, info, 2)
        return densify(values, code, packet.numel)
