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
from compressors.bits import expect_field, pack_bits, packed_nbytes, unpack_bits
from compressors.packet import Packet, PacketError
from compressors.sparse_index import decode_indices, encode_indices, layout


def encode_signs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fields for sgn(x) ∈ {−1, 0, 1}: zero count (int64[1]), sign bits of the nonzeros, zero positions."""
    flat = x.reshape(-1)
    zero = flat == 0
    idx = zero.nonzero().reshape(-1)
    count = torch.tensor([idx.numel()], dtype=torch.int64, device=flat.device)
    negative = (flat[~zero] < 0).to(torch.uint8)
    return count, pack_bits(negative, 1), encode_indices(idx, flat.numel())


def decode_signs(count: torch.Tensor, signs: torch.Tensor, zeros: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    """Inverse of :func:`encode_signs`: sgn(x) as float32 in {−1, 0, 1}."""
    k = int(expect_field(count, torch.int64, 1, f"{what} zero count")[0])
    if not 0 <= k <= numel:
        raise PacketError(f"{what}: zero count {k} is not in 0..{numel}")
    expect_field(zeros, torch.uint8, layout(k, numel).nbytes, f"{what} zero positions")
    signs = expect_field(signs, torch.uint8, packed_nbytes(numel - k, 1), f"{what} signs")
    negative = unpack_bits(signs, 1, numel - k)
    values = 1.0 - 2.0 * negative.to(torch.float32)
    if k == 0:
        return values
    nonzero = torch.ones(numel, dtype=torch.bool, device=signs.device)
    nonzero[decode_indices(zeros.reshape(-1), k, numel)] = False
    out = torch.zeros(numel, dtype=torch.float32, device=signs.device)
    return out.masked_scatter_(nonzero, values)


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

    def aggregate(self, decoded: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """Weighted majority vote sgn(Σ_m w_m·sgn(g_m)); a tie (the sum exactly 0) votes 0."""
        total = torch.zeros_like(decoded[0], dtype=torch.float64)
        for d, w in zip(decoded, weights):
            total.add_(d.to(torch.float64), alpha=float(w))
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
        p = x.reshape(-1).to(torch.float32)
        scale = (p.abs().sum() / max(1, p.numel())).reshape(1)
        return Packet(self.name, p.numel(), (scale, *encode_signs(p)))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        scale, count, signs, zeros = self.check(packet, info, 4)
        scale = expect_field(scale, torch.float32, 1, f"{self.name} scale")
        return scale * decode_signs(count, signs, zeros, packet.numel, self.name)
