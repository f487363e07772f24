"""Sparse vectors on the wire (Elias 1974; Fano 1971; Shi et al. 2019 for the density rule): the density rule, and Elias–Fano index coding.

Elias–Fano (Vigna, "Quasi-succinct indices", WSDM 2013) splits each index x_i (sorted, i = 0..k−1,
all < d) into ``l`` low bits, packed at fixed width, and the high part x_i >> l, stored as a unary
code of the *gaps* between consecutive high parts: bit (x_i >> l) + i of a bit vector of
k + ((d−1) >> l) + 1 bits is set. With l ≈ log2(d/k) that costs at most ≈ log2(d/k) + 2 bits per
index, within ~0.5 bit of the log2 C(d, k) / k ≈ log2(d/k) + 1.44 bound for a uniformly spread set,
and the worst case holds for *any* set (clustered top-k indices included), unlike γ-coded gaps
(2·log2(d/k) + 1 bits each on average). When the set is dense a plain bitmap of d bits is cheaper;
the cheaper layout is picked from (k, d) alone, so the byte size is known before encoding.
An entropy coder (rANS, as RC-FED uses) would get within ~0.05 bit of the bound, but needs a host round
trip and a model per tensor, to save ≤ 0.6 of the ≈ 40 bits a top-k entry costs with its fp32 value.

Both directions are fixed-shape tensor code on the indices' device: no host synchronisation, no
per-element Python. Integrity is the packet's CRC; a well-formed but inconsistent buffer (not k
ones in the unary part) decodes to indices clamped into range, never reads out of bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from compressors.bits import pack_bits, packed_nbytes, slices, unpack_bits
from compressors.packet import PacketError
from compressors.staging import host_kernels


#: Elements in the strided sample that sets top-k's candidate threshold.
_SAMPLE = 1 << 15


def density_count(density: float, numel: int) -> int:
    """k = max(1, ⌊ρ·d⌋), at most d."""
    return min(numel, max(1, int(density * numel)))


def check_density(density: float) -> None:
    """Top-k, Gaussian_k and random-k keep a fraction ρ ∈ (0, 1] of the coordinates."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]")


@dataclass(frozen=True)
class IndexLayout:
    """How ``count`` sorted indices below ``numel`` are laid out: Elias–Fano or a bitmap."""

    count: int
    numel: int
    bitmap: bool
    low_bits: int
    upper_len: int

    @property
    def nbytes(self) -> int:
        if self.count == 0:
            return 0
        if self.bitmap:
            return packed_nbytes(self.numel, 1)
        low = packed_nbytes(self.count, self.low_bits) if self.low_bits else 0
        return low + packed_nbytes(self.upper_len, 1)


@lru_cache(maxsize=4096)
def layout(count: int, numel: int) -> IndexLayout:
    """The cheapest layout for ``count`` distinct indices in [0, numel); depends on the sizes only."""
    if not 0 <= count <= numel:
        raise ValueError(f"cannot code {count} distinct indices below {numel}")
    best = IndexLayout(count, numel, True, 0, 0)
    best_bytes = best.nbytes
    for low in range(1, max(1, (numel - 1).bit_length()) + 1):
        cand = IndexLayout(count, numel, False, low, count + ((numel - 1) >> low) + 1)
        if cand.nbytes < best_bytes:
            best, best_bytes = cand, cand.nbytes
    return best


def encode_indices(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """Code sorted, distinct int64 indices in [0, numel) as a uint8 tensor of ``layout(...).nbytes``."""
    idx = idx.reshape(-1).to(torch.int64)
    lay = layout(idx.numel(), numel)
    device = idx.device
    if lay.count == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if lay.bitmap:
        bits = torch.zeros(numel, dtype=torch.uint8, device=device).index_fill_(0, idx, 1)
        return pack_bits(bits, 1)
    upper = torch.zeros(lay.upper_len, dtype=torch.uint8, device=device)
    upper.index_fill_(0, (idx >> lay.low_bits) + torch.arange(lay.count, device=device), 1)
    low = pack_bits(idx & ((1 << lay.low_bits) - 1), lay.low_bits)
    return torch.cat([low, pack_bits(upper, 1)])


def decode_indices(data: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_indices`: the ``count`` indices, sorted, as int64."""
    lay = layout(count, numel)
    if data.numel() != lay.nbytes:
        raise PacketError(f"index code has {data.numel()} bytes, {lay.nbytes} expected for {count} of {numel}")
    device = data.device
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if lay.bitmap:
        return _ones_positions(unpack_bits(data, 1, numel), count).clamp_(max=numel - 1)
    n_low = packed_nbytes(count, lay.low_bits)
    low = unpack_bits(data[:n_low], lay.low_bits, count)
    upper = unpack_bits(data[n_low:], 1, lay.upper_len)
    high = _ones_positions(upper, count) - torch.arange(count, device=device)
    return ((high << lay.low_bits) | low).clamp_(0, numel - 1)


def _ones_positions(bits: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the first ``count`` ones of a 0/1 vector, without a data-dependent shape:
    the j-th one sits where the running count first reaches j + 1."""
    running = torch.cumsum(bits, 0)
    want = torch.arange(1, count + 1, device=bits.device, dtype=running.dtype)
    return torch.searchsorted(running, want).clamp_(max=bits.numel() - 1)


def top_magnitudes(x: torch.Tensor, k: int, sync_free: bool | None = None) -> torch.Tensor:
    """Ascending indices of the ``k`` largest |x_i| of a flat tensor; among equal magnitudes at the cut
    the lowest indices win, so the set is exactly k and deterministic.

    On the CPU a sort of d elements is avoided: a threshold taken from a strided sample (a little below the
    sample's own k/d quantile) leaves ≈ 1.1k candidates in one pass; the exact cut is the k-th largest of
    those. Too few candidates (an unlucky sample) lowers the threshold; the exact fallback is a full
    selection. The candidates' count is read by the host, so on other devices (``sync_free``, the default
    there) the cut comes from ``topk`` over all d and the k positions from a running count, with shapes
    known in advance and nothing read back: the same set."""
    d = x.numel()
    if not 0 < k <= d:
        return torch.empty(0, dtype=torch.int64, device=x.device) if k == 0 else top_magnitudes(x, d, sync_free)
    if sync_free if sync_free is not None else not host_kernels(x.device):
        magnitude = x.abs()
        cut = magnitude.topk(k, sorted=False).values.min()                 # the k-th largest
        above = magnitude > cut
        tied = magnitude == cut
        keep = above | (tied & (torch.cumsum(tied, 0) <= k - above.sum()))
        return _ones_positions(keep.to(torch.int32), k)
    stride = max(1, d // _SAMPLE)
    sample = x[::stride].abs()
    for margin in (1.1, 1.5, 4.0):
        want = min(sample.numel(), math.ceil(margin * k * sample.numel() / d + 3 * math.sqrt(k * sample.numel() / d) + 1))
        if want >= sample.numel() or 4 * k >= d:
            candidates = torch.arange(d, device=x.device)
            break
        threshold = sample.kthvalue(sample.numel() - want + 1).values
        candidates = torch.cat([(x[lo:hi].abs() >= threshold).nonzero().reshape(-1).add_(lo)
                                for lo, hi in slices(d, x.device)])
        if candidates.numel() >= k:
            break
    else:
        candidates = torch.arange(d, device=x.device)
    magnitude = x[candidates].abs()
    cut = magnitude.kthvalue(candidates.numel() - k + 1).values          # the k-th largest
    above = magnitude > cut
    tied = magnitude == cut
    keep = above | (tied & (torch.cumsum(tied, 0) <= k - above.sum()))
    return candidates[keep]


def sparse_fields(values: torch.Tensor, idx: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packet fields of a sparse vector: fp32 values in index order, and the coded sorted indices."""
    idx, order = idx.reshape(-1).to(torch.int64).sort()
    return values.reshape(-1)[order].to(torch.float32), encode_indices(idx, numel)


def densify(values: torch.Tensor, code: torch.Tensor, numel: int) -> torch.Tensor:
    """The dense fp32 vector of :func:`sparse_fields`' output (zeros off the support)."""
    idx = decode_indices(code, values.numel(), numel)
    return torch.zeros(numel, dtype=torch.float32, device=values.device).index_put_((idx,), values.to(torch.float32))
