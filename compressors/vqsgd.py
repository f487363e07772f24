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
inverse-CDF on the tensor's device. Cross and Hadamard draw from the same mixture, mass on one signed
coordinate picked by float32 cumulative sums of its magnitudes and γ spread evenly (on the CPU in
one compiled pass per block); Hadamard's coordinates are those of ``H·g_b``. Simplex uses float64
cumulative sums of its point probabilities. The Hadamard transform is one matrix product with H for
blocks of up to 256 (padded) coordinates, and a vectorised butterfly beyond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import bucketize_flat, pack_into, packed_nbytes, slices, uniform_lanes, unpack_codes
from compressors.jit import compiled
from compressors.packet import Packet, PacketError
from compressors.staging import host_kernels

#: up to this length the transform is one matrix product with H (one pass; a butterfly takes log2 P)
_MATMUL_FWHT = 256
_SYLVESTER: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last axis (length a power of 2):
    ``x @ H`` with the Sylvester matrix ``H`` (symmetric, ``H·H = P·I``)."""
    size = x.shape[-1]
    if size & (size - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {size}")
    if 1 < size <= _MATMUL_FWHT and x.is_floating_point():
        key = (size, x.dtype, str(x.device))
        if key not in _SYLVESTER:
            _SYLVESTER[key] = _butterflies(torch.eye(size, dtype=x.dtype, device=x.device))
        return x @ _SYLVESTER[key]
    return _butterflies(x)


def _butterflies(x: torch.Tensor) -> torch.Tensor:
    """:func:`fwht` as log2(P) rounds of sums and differences."""
    size = x.shape[-1]
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
    fixed_layout: ClassVar[bool] = True
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
        flat = x.reshape(-1)
        n = flat.numel()
        m = self.block_size(n)
        bits = self.index_bits(n)
        blocks = -(-n // m) if n else 0
        packed = torch.empty(packed_nbytes(blocks * self.reps, bits), dtype=torch.uint8, device=flat.device)
        norms = []
        gen = info.generator(flat.device)
        # whole blocks per slice, and a multiple of 8 draws so every slice packs to whole bytes
        unit = m * 8 // math.gcd(self.reps, 8)
        for lo, hi in slices(n, flat.device, unit):
            rows = bucketize_flat(flat[lo:hi].to(torch.float32), m)
            norm = torch.linalg.vector_norm(rows, dim=1)
            first = lo // m * self.reps
            u = uniform_lanes(gen, rows.shape[0] * self.reps, flat.device).view(-1, self.reps)
            u = u.to(torch.float32).mul_(2.0**-32).add_(0.5)        # uniform on [0, 1)
            safe = torch.where(norm > 0, norm, 1.0).unsqueeze(1)
            if self.points == "hadamard":
                # c = H·g_b/(‖g_b‖·P): the cross sampler over the rows H·g_b, with the norm scaled by √P so
                # that its first part has mass ‖c‖₁ (at most 1) and γ = 1 − ‖c‖₁ is spread over all 2P points
                size = dimension(self.points, m)
                rows = fwht(torch.nn.functional.pad(rows, (0, size - m)))
                safe = safe * math.sqrt(size)
            if self.points == "simplex":
                index = self._sample_simplex_compiled(rows, safe, u) if host_kernels(rows.device) \
                    else self._sample(rows / safe, u)
            elif host_kernels(rows.device):
                index = self._sample_cross_compiled(rows, safe, u)
            else:
                index = self._sample_cross(rows, safe, u)
            pack_into(index, bits, packed[first * bits // 8: packed_nbytes(first + index.numel(), bits)])
            norms.append(norm)
        norms = torch.cat(norms) if norms else flat.new_zeros(0, dtype=torch.float32)
        return Packet(self.name, n, (norms, packed))

    def _sample_cross_compiled(self, rows: torch.Tensor, norm: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """:meth:`_sample_cross` on the CPU, in one compiled pass per row (the same draws)."""
        index = torch.empty(u.shape, dtype=torch.int64)
        _sample_cross_rows(rows.numpy(), norm.numpy(), u.numpy(), np.float32(math.sqrt(rows.shape[1])), index.numpy())
        return index

    def _sample_simplex_compiled(self, rows: torch.Tensor, norm: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """:meth:`_sample` for the simplex on the CPU: one compiled pass per row, in float32."""
        index = torch.empty(u.shape, dtype=torch.int64)
        _sample_simplex_rows(rows.numpy(), norm.numpy(), u.numpy(), index.numpy())
        return index

    def _sample_cross(self, rows: torch.Tensor, norm: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Draws ``J`` with ``P(±e_i) = max(±v_i, 0)/√m + γ/(2m)`` (``v`` = a row over its ``norm``) as the
        mixture it is: mass ‖v‖₁/√m on ``sgn(v_i)·e_i`` with ``i ∝ |v_i|``, and γ spread evenly over the 2m
        points; one uniform per draw, the inverse CDF of |row| in the first part."""
        m = rows.shape[1]
        cum = rows.abs().cumsum(dim=1)
        l1 = cum[:, -1:]
        lean = l1 / (norm * math.sqrt(m))                        # ‖v‖₁/√m, the mass of the first part
        gamma = (1 - lean).clamp_(min=0)
        t = u.mul_(lean + gamma)                                  # a point of [0, total mass)
        first = t < lean
        coordinate = torch.searchsorted(cum, t * (l1 / torch.where(lean > 0, lean, 1.0)), right=True).clamp_(max=m - 1)
        point = coordinate + m * (torch.gather(rows, 1, coordinate) < 0)
        spread = t.sub_(lean).mul_((2 * m) / torch.where(gamma > 0, gamma, 1.0)).to(torch.int64).clamp_(0, 2 * m - 1)
        return torch.where(first, point, spread)

    def _sample(self, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draws over the point set's probabilities (float64 cumulative sums; the simplex's)."""
        cdf = point_probabilities(v.to(torch.float64), self.points).cumsum(dim=1)
        return torch.searchsorted(cdf, u.to(torch.float64) * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)

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
        index = unpack_codes(packed, bits, blocks * self.reps).to(torch.int64).view(blocks, self.reps)
        if count < 1 << bits:  # codes that name no point (none with 2^bits points, as by default) decode as
            index.clamp_(max=count - 1)  # the last point: never out of bounds, nothing read (integrity: the CRC)
        if self.points == "cross":                 # Σ_j c_{J_j} = √m·(hits of +e_i − hits of −e_i)
            total = torch.zeros((blocks, m), dtype=torch.float32, device=norms.device)
            total.scatter_add_(1, index % m, 1.0 - 2.0 * (index >= m).to(torch.float32))
            out = total.mul_((norms * (math.sqrt(m) / self.reps)).unsqueeze(1))
        elif self.points == "hadamard":            # Σ_j c_{J_j} = H·(hits of +h_i − hits of −h_i)
            size = count // 2
            total = torch.zeros((blocks, size), dtype=torch.float32, device=norms.device)
            total.scatter_add_(1, index % size, 1.0 - 2.0 * (index >= size).to(torch.float32))
            out = fwht(total)[:, :m].mul_((norms / self.reps).unsqueeze(1))
        else:  # simplex: sum_points written out in place, (hits_<m + hits_m/(r−1) − s(1 + 1/(r−1))/(m+1))·√(m(m+1))
            hits = torch.zeros((blocks, count), dtype=torch.float32, device=norms.device)
            hits.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
            r = math.sqrt(m + 1)
            out = hits[:, :m].add_(hits[:, m:], alpha=1 / (r - 1)).sub_(self.reps / (m + 1) * (1 + 1 / (r - 1)))
            out.mul_((norms * (math.sqrt(m * (m + 1)) / self.reps)).unsqueeze(1))
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


#: blocks up to this size find a draw's coordinate by counting, larger ones by binary search
_LINEAR_SEARCH = 256


@compiled
def _sample_cross_rows(rows, norm, u, root_m, out):
    """:meth:`VQSGD._sample_cross` as one compiled pass per row, with the same float32 operations in the
    same order, so it draws exactly the same points: rows ``[B, m]``, norms ``[B, 1]`` (1 where a row is
    zero), uniforms ``[B, s]``; writes the point indices ``[B, s]``."""
    m = rows.shape[1]
    cum = np.empty(m, np.float32)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    width = np.float32(2 * m)
    for b in range(rows.shape[0]):
        total = zero
        for j in range(m):
            total += abs(rows[b, j])
            cum[j] = total
        lean = total / (norm[b, 0] * root_m)
        gamma = max(one - lean, zero)
        mass = lean + gamma
        per = total / (lean if lean > zero else one)
        spread_scale = width / (gamma if gamma > zero else one)
        for r in range(u.shape[1]):
            t = u[b, r] * mass
            if t < lean:
                q = t * per
                if m <= _LINEAR_SEARCH:      # searchsorted(right=True): the entries of cum ≤ q
                    lo = 0
                    for j in range(m):       # counted with vector compares
                        lo += np.int64(cum[j] <= q)
                else:
                    lo = 0
                    size = m
                    while size > 1:
                        half = size >> 1
                        lo = lo + half if cum[lo + half] <= q else lo
                        size -= half
                    lo += 1 if cum[lo] <= q else 0
                c = min(lo, m - 1)
                out[b, r] = c + m if rows[b, c] < zero else c
            else:
                k = np.int64((t - lean) * spread_scale)
                out[b, r] = min(max(k, 0), 2 * m - 1)


@compiled
def _sample_simplex_rows(rows, norm, u, out):
    """Simplex draws for rows ``[B, m]`` over their norms ``[B, 1]`` (1 where a row is zero), uniforms
    ``[B, s]``: the cumulative sums of ``a_k = (√(m(m+1))·x_k + m)/(m(m+1))`` over the m+1 vertices, ``x`` the
    row's unit vector reflected into R^(m+1) (:func:`_householder_in`), then inverse-CDF per draw; writes the
    vertex indices ``[B, s]``."""
    m = rows.shape[1]
    r = np.float32(np.sqrt(np.float32(m + 1)))
    scale = np.float32(np.sqrt(np.float32(m) * np.float32(m + 1)))
    per = np.float32(1.0) / (np.float32(m) * np.float32(m + 1))
    fm = np.float32(m)
    zero = np.float32(0.0)
    cum = np.empty(m + 1, np.float32)
    for b in range(rows.shape[0]):
        inv = np.float32(1.0) / norm[b, 0]
        total = zero
        for j in range(m):
            total += rows[b, j]
        total *= inv
        shift = total / ((r - np.float32(1.0)) * r)
        acc = zero
        for j in range(m):
            acc += max((scale * (rows[b, j] * inv - shift) + fm) * per, zero)
            cum[j] = acc
        acc += max((scale * (total / r) + fm) * per, zero)
        cum[m] = acc
        for k in range(u.shape[1]):
            t = u[b, k] * acc
            if m < _LINEAR_SEARCH:
                lo = 0
                for j in range(m + 1):
                    lo += np.int64(cum[j] <= t)
            else:
                lo = 0
                size = m + 1
                while size > 1:
                    half = size >> 1
                    lo = lo + half if cum[lo + half] <= t else lo
                    size -= half
                lo += 1 if cum[lo] <= t else 0
            out[b, k] = min(lo, m)
