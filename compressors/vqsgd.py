"""vqSGD (Gandikota, Kane, Maity, Mazumdar; AISTATS 2021): vector quantisation to
the vertices of a point set whose convex hull contains the unit ball.

Per block ``g_b`` (block-product variant): send ``‖g_b‖`` and ``s`` i.i.d. indices of
points ``c_J`` drawn with ``P(J = j) = a_j``, where ``v = g_b/‖g_b‖ = Σ a_j c_j`` (``a ≥ 0``,
``Σ a = 1``). The receiver returns ``‖g_b‖·(1/s)·Σ c_J``: unbiased, with
``E‖Q(g_b) − g_b‖² = ‖g_b‖²(r² − 1)/s`` for points of norm ``r``.

Point sets (``m`` = block dimension):

* ``cross``: ``±√m·e_i`` (2m points): ``a(±e_i) = max(±v_i, 0)/√m + γ/(2m)``, ``γ = 1 − ‖v‖₁/√m``.
* ``hadamard``: ``±h_i``, the rows of the ±1 Sylvester–Hadamard matrix of order ``P`` (the block is
  zero-padded to ``P = 2^⌈log2 m⌉``): ``c = Hv/P``, mass ``|c_i|`` on ``sgn(c_i)h_i`` and
  ``γ = 1 − ‖c‖₁`` spread over all 2P points. ``r² = P``.
* ``simplex``: the m+1 vertices of a regular simplex with circumradius m (inradius 1),
  ``a_k = (v·u_k + m)/(m(m+1))``; ``r² = m²``. The vertices are never stored: they are
  ``√(m(m+1))·(e_k − 1/(m+1))`` in R^(m+1), carried into R^m by the Householder reflection that
  swaps the all-ones direction with the last axis.

Wire: fields ``(block norms: fp32[blocks], indices: ⌈log2 N⌉ bits each, s per block, packed)``.
A last, shorter block is zero-padded to the block size (still unbiased; its variance is that of a
full block). ``block = 0`` (or ``≥ numel``) treats the whole tensor as one block. Sampling is
inverse-CDF (float64 cumulative sums) on the tensor's device; the Hadamard transform is a
vectorised butterfly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import bucketize_flat, packed_nbytes, pack_bits, unpack_bits
from compressors.packet import Packet, PacketError

def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last axis (length a power of 2):
    ``x @ H`` with the Sylvester matrix ``H`` (symmetric, ``H·H = P·I``)."""
    size = x.shape[-1]
    if size & (size - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {size}")
    lead = x.shape[:-1]
    y = x.reshape(-1, size)
    h = 1
    while h < size:
        y = y.view(-1, size // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*lead, size)


def dimension(points: str, block: int) -> int:
    """Dimension of the point set used for blocks of ``block`` coordinates."""
    return 1 << (block - 1).bit_length() if points == "hadamard" else block


def num_points(points: str, block: int) -> int:
    m = dimension(points, block)
    return m + 1 if points == "simplex" else 2 * m


def point_probabilities(v: torch.Tensor, points: str) -> torch.Tensor:
    """``a`` of each row of ``v`` (rows with ``‖v‖ ≤ 1``, float64) over the point set's N points.

    Cross and Hadamard order the points as ``+c_0..+c_{m−1}, −c_0..−c_{m−1}``; the simplex as
    its vertices ``u_0..u_m``.
    """
    m = v.shape[1]
    if points == "cross":
        root = math.sqrt(m)
        gamma = (1 - v.abs().sum(dim=1, keepdim=True) / root).clamp(min=0)
        return torch.cat([v.clamp(min=0) / root, (-v).clamp(min=0) / root], dim=1) + gamma / (2 * m)
    if points == "hadamard":
        size = dimension(points, m)
        padded = torch.nn.functional.pad(v, (0, size - m))
        c = fwht(padded) / size
        gamma = (1 - c.abs().sum(dim=1, keepdim=True)).clamp(min=0)
        return torch.cat([c.clamp(min=0), (-c).clamp(min=0)], dim=1) + gamma / (2 * size)
    if points == "simplex":
        x = _householder_in(v)
        scale = math.sqrt(m * (m + 1))
        return ((scale * x + m) / (m * (m + 1))).clamp(min=0)
    raise ValueError(f"points={points!r} is not a vqsgd point set; choose one of: cross, simplex, hadamard")


def _householder_in(v: torch.Tensor) -> torch.Tensor:
    """``H·[v; 0]`` in R^(m+1), ``H`` the reflection swapping ``1/√(m+1)`` and ``e_m``: the result is
    orthogonal to the all-ones vector and ``v·u_k = √(m(m+1))·x_k`` for every simplex vertex."""
    m = v.shape[1]
    r = math.sqrt(m + 1)
    total = v.sum(dim=1, keepdim=True)
    return torch.cat([v - total / ((r - 1) * r), total / r], dim=1)


def _householder_out(y: torch.Tensor) -> torch.Tensor:
    """First m coordinates of ``H·y`` for rows ``y`` in R^(m+1) orthogonal to the all-ones vector."""
    m = y.shape[1] - 1
    r = math.sqrt(m + 1)
    return y[:, :m] + y[:, m:] / (r - 1)


@register
@dataclass(frozen=True)
class VQSGD(Codec):
    name: ClassVar[str] = "vqsgd"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "unbiased vector quantiser: s sampled points per block + block norm"
    source: ClassVar[str] = "Gandikota, Kane, Maity, Mazumdar: vqSGD, AISTATS 2021"

    points: Literal["cross", "simplex", "hadamard"] = "cross"
    reps: int = 16
    block: int = 64

    @property
    def unbiased(self) -> bool:
        return True

    def __post_init__(self) -> None:
        if self.points not in ("cross", "simplex", "hadamard"):
            raise ValueError(f"points={self.points!r} is not a vqsgd point set; choose one of: cross, simplex, hadamard")
        if not 1 <= self.reps <= 65536:
            raise ValueError(f"reps={self.reps} must be in 1..65536")
        if self.block < 0:
            raise ValueError(f"block={self.block} must be >= 0 (0: the whole tensor is one block)")

    def block_size(self, numel: int) -> int:
        if self.block == 0 or self.block >= numel:
            return max(1, numel)
        return self.block

    def index_bits(self, numel: int) -> int:
        return max(1, math.ceil(math.log2(num_points(self.points, self.block_size(numel)))))

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1).to(torch.float32)
        n = flat.numel()
        m = self.block_size(n)
        rows = bucketize_flat(flat, m)
        norms = rows.norm(dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        v = (rows / safe.unsqueeze(1)).to(torch.float64)
        # rounding can leave ‖v‖ a hair above 1; the coefficients clamp γ at 0
        cdf = point_probabilities(v, self.points).cumsum(dim=1)
        gen = info.generator(flat.device)
        u = torch.rand((rows.shape[0], self.reps), generator=gen, device=flat.device, dtype=torch.float64)
        index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)
        return Packet(self.name, n, (norms, pack_bits(index, self.index_bits(n))))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        norms, packed = self.check(packet, info, 2)
        n = packet.numel
        m = self.block_size(n)
        blocks = -(-n // m) if n else 0
        bits = self.index_bits(n)
        if norms.dtype != torch.float32 or norms.numel() != blocks:
            raise PacketError(f"vqsgd packet has {norms.numel()} {norms.dtype} norms; {blocks} float32 expected "
                              f"for {n} elements in blocks of {m}")
        if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(blocks * self.reps, bits):
            raise PacketError(f"vqsgd packet has {packed.numel()} index bytes; "
                              f"{packed_nbytes(blocks * self.reps, bits)} expected")
        if n == 0:
            return norms.new_zeros(0)
        count = num_points(self.points, m)
        index = unpack_bits(packed, bits, blocks * self.reps).view(blocks, self.reps)
        if int(index.max()) >= count:
            raise PacketError(f"vqsgd packet names point {int(index.max())}; the {self.points} set has {count}")
        hits = torch.zeros((blocks, count), dtype=torch.float32, device=norms.device)
        hits.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
        total = self.sum_points(hits, m)           # Σ_j c_{J_j} per block
        out = total * (norms / self.reps).unsqueeze(1)
        return out.reshape(-1)[:n]

    def sum_points(self, hits: torch.Tensor, m: int) -> torch.Tensor:
        """``Σ_j hits[b, j]·c_j`` per block ``b`` (rows of ``hits`` count the draws of each point)."""
        if self.points == "cross":
            return (hits[:, :m] - hits[:, m:]) * math.sqrt(m)
        if self.points == "hadamard":
            size = hits.shape[1] // 2
            return fwht(hits[:, :size] - hits[:, size:])[:, :m]
        centred = hits - self.reps / (m + 1)
        return _householder_out(centred) * math.sqrt(m * (m + 1))
