"""Sign codecs: signSGD with majority vote (Bernstein et al., ICML 2018 / ICLR 2019) and the
scaled sign of EF-SignSGD (Karimireddy, Rebjock, Stich, Jaggi, ICML 2019).

Both send one bit per nonzero coordinate (1 = negative). Exact zeros keep sgn(0) = 0: their
positions go in an index code (:mod:`compressors.sparse_index`, empty when there are none, a bitmap
when most are zero), and their sign bits are left out. A dense gradient thus costs d bits plus a
few header bytes, and a zero tensor decodes to zero instead of to a drift of ±1 steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import byte_table, expect_field, lookup, pack_bits, pack_into, packed_nbytes, slices
from compressors.packet import Packet, PacketError
from compressors.sparse_index import decode_indices, encode_indices, layout
from compressors.staging import to_device


def encode_signs(x: torch.Tensor, l1: bool = False) -> tuple[torch.Tensor, ...]:
    """Fields for sgn(x) ∈ {−1, 0, 1}: zero count (int64[1]), sign bits of the nonzeros, zero positions;
    with ``l1`` also ‖x‖₁ (float32, 0-d) from the same pass.

    One pass over cache-sized slices packs every sign bit and finds each slice's smallest |x|; only when
    one is 0 (exact zeros) a second pass over those slices leaves the zeros' bits out."""
    flat = x.reshape(-1)
    n = flat.numel()
    spans = slices(n, flat.device)
    packed = torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=flat.device)
    least, total = [], []
    for lo, hi in spans:
        part = flat[lo:hi].to(torch.float32)
        magnitude = part.abs()
        least.append(magnitude.amin())
        if l1:
            total.append(magnitude.sum())
        pack_into(part < 0, 1, packed[lo // 8: packed_nbytes(hi, 1)])
    norm = (torch.stack(total).sum() if total else flat.new_zeros((), dtype=torch.float32),) if l1 else ()
    has_zero = (torch.stack(least) == 0).tolist() if n else []
    if not any(has_zero):
        empty = torch.empty(0, dtype=torch.uint8, device=flat.device)
        return torch.zeros(1, dtype=torch.int64, device=flat.device), packed, empty, *norm
    negative, zeros = [], []
    for (lo, hi), zero in zip(spans, has_zero):
        part = flat[lo:hi]
        if zero:
            kept = part != 0
            zeros.append((~kept).nonzero().reshape(-1).add_(lo))
            part = part[kept]
        negative.append(part < 0)
    idx = torch.cat(zeros)
    count = torch.tensor([idx.numel()], dtype=torch.int64, device=flat.device)
    return count, pack_bits(torch.cat(negative), 1), encode_indices(idx, n), *norm


def decode_signs(count: torch.Tensor, signs: torch.Tensor, zeros: torch.Tensor, numel: int, what: str,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`encode_signs`: sgn(x) as float32 in {−1, 0, 1}, times ``scale`` when given."""
    count = expect_field(count, torch.int64, 1, f"{what} zero count")
    # no zero positions: no zeros (every index code of one or more positions takes bytes), so the count is
    # not read back from the device; it is 0 in every packet encode_signs writes
    k = int(count[0]) if zeros.numel() else 0
    if not 0 <= k <= numel:
        raise PacketError(f"{what}: zero count {k} is not in 0..{numel}")
    expect_field(zeros, torch.uint8, layout(k, numel).nbytes, f"{what} zero positions")
    signs = expect_field(signs, torch.uint8, packed_nbytes(numel - k, 1), f"{what} signs")
    unit = to_device([1.0, -1.0], torch.float32, signs.device)
    table = byte_table(unit if scale is None else unit * scale, 1)
    values = torch.empty(signs.numel() * 8, dtype=torch.float32, device=signs.device)
    for lo, hi in slices(signs.numel(), signs.device):
        lookup(signs[lo:hi], table, values[lo * 8: hi * 8])
    if k == 0:
        return values[:numel]
    # the nonzeros' values go around the zeros, slice by slice (a slice without zeros is one copy)
    idx = decode_indices(zeros.reshape(-1), k, numel)
    spans = slices(numel, signs.device)
    ends = torch.tensor([hi for _, hi in spans], device=idx.device)
    before = torch.searchsorted(idx, ends).tolist()            # zeros before each slice's end
    out = torch.empty(numel, dtype=torch.float32, device=signs.device)
    z = taken = 0
    for (lo, hi), z_end in zip(spans, before):
        part = out[lo:hi]
        m = (hi - lo) - (z_end - z)
        if z_end == z:
            part.copy_(values[taken: taken + m])
        else:
            nonzero = torch.ones(hi - lo, dtype=torch.bool, device=out.device)
            nonzero[idx[z:z_end] - lo] = False
            part.zero_().masked_scatter_(nonzero, values[taken: taken + m])
        z, taken = z_end, taken + m
    return out


@register
@dataclass(frozen=True)
class Sign(Codec):
    """signSGD (Bernstein et al., ICML 2018 / ICLR 2019): send sgn(g), the server takes a majority vote.

    Decode gives the signs themselves (±1, 0 at exact zeros); the learning rate is the step size.
    Signum is this codec behind local momentum (the optimizer's, before the sign).
    """

    name: ClassVar[str] = "sign"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "signSGD: 1 bit/element, majority vote sgn(sum of signs)"
    source: ClassVar[str] = "Bernstein, Wang, Azizzadenesheli, Anandkumar: signSGD, ICML 2018 / ICLR 2019"

    @property
    def carries_scale(self) -> bool:
        """The vote decodes to ±1: the learning rate, not the packet, carries the step size."""
        return False

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        return Packet(self.name, x.numel(), encode_signs(x))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        count, signs, zeros = self.check(packet, info, 3)
        return decode_signs(count, signs, zeros, packet.numel, self.name)

    def aggregate(self, decoded: list[torch.Tensor], weights: list[float] | torch.Tensor) -> torch.Tensor:
        """Weighted majority vote sgn(Σ_m w_m·sgn(g_m)); a tie (the sum exactly 0) votes 0."""
        total = torch.zeros_like(decoded[0], dtype=torch.float64)
        for i, d in enumerate(decoded):
            if isinstance(weights, torch.Tensor):  # weights on the device: no read back
                total.add_(d.to(torch.float64) * weights[i].to(device=d.device, dtype=torch.float64))
            else:
                total.add_(d.to(torch.float64), alpha=float(weights[i]))
        return torch.sign(total).to(torch.float32)


@register
@dataclass(frozen=True)
class ScaledSign(Codec):
    """Scaled sign C(p) = (‖p‖₁/d)·sgn(p) of EF-SignSGD (Karimireddy et al., ICML 2019).

    A δ-compressor: ‖C(p) − p‖² = (1 − δ)‖p‖² with δ = ‖p‖₁²/(d‖p‖²) when p has no zeros (at most
    that otherwise). Biased: meant to run with ``compression.error_feedback: true``. Wire: one fp32
    scale + the sign fields of :func:`encode_signs`. The server averages the decoded updates.
    """

    name: ClassVar[str] = "ef_sign"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "scaled sign (|p|_1/d)·sgn(p), 1 bit/element + fp32; use with error feedback"
    source: ClassVar[str] = "Karimireddy, Rebjock, Stich, Jaggi: EF-SignSGD, ICML 2019"

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        count, signs, zeros, l1 = encode_signs(x, l1=True)
        return Packet(self.name, x.numel(), ((l1 / max(1, x.numel())).reshape(1), count, signs, zeros))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        scale, count, signs, zeros = self.check(packet, info, 4)
        scale = expect_field(scale, torch.float32, 1, f"{self.name} scale")
        return decode_signs(count, signs, zeros, packet.numel, self.name, scale)
