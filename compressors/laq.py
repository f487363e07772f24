"""LAQ's quantizer of the gradient innovation (Sun, Chen, Giannakis, Yang, NeurIPS 2019).

Given the innovation v = ∇f(θ^k) − Q(θ̂) (current gradient minus the last uploaded quantized one):

    R = ‖v‖∞ ;  τ = 1/(2^b − 1) ;  q = ⌊(v + R)/(2τR) + ½⌋ ∈ {0..2^b−1} ;  δQ = 2τR·q − R

so that ‖δQ − v‖∞ ≤ τR. Wire: R (fp32) + b bits per coordinate, whatever the values (a fixed layout, so
nothing is read back to the host to lay a packet out). Deterministic; R = 0 (v = 0) codes against a unit
radius, and every code decodes to 2τ·0·q − 0 = 0. The lazy upload rule and the reference bookkeeping live in
rayq.laq (LAQ).

Encoding quantises and packs cache-sized slices on the CPU, with codes in the narrowest integer type;
decoding of 1-, 2-, 4- and 8-bit codes is a byte-table lookup of the 2^b values δQ can take, computed
with the same float32 operations as the per-element formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import byte_table, lookup, pack_into, packed_nbytes, slices, unpack_bits
from compressors.packet import Packet, PacketError


@register
@dataclass(frozen=True)
class LAQQuantizer(Codec):
    name: ClassVar[str] = "laq"
    kind: ClassVar[Kind] = Kind.GATHER
    fixed_layout: ClassVar[bool] = True
    summary: ClassVar[str] = "b-bit innovation quantizer of LAQ, radius ‖v‖∞ (for sync.schedule=laq)"
    source: ClassVar[str] = "Sun, Chen, Giannakis, Yang: LAQ, NeurIPS 2019"

    bits: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits} must be in 1..16")

    def _codes(self, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """q for a float32 slice, as the narrowest integer type that holds 2^b − 1 (``radius`` > 0)."""
        tau = 1.0 / (2**self.bits - 1)
        q = v.add(radius).div_(2 * tau * radius).add_(0.5).floor_().clamp_(0, 2**self.bits - 1)
        return q.to(torch.uint8 if self.bits <= 8 else torch.int32)

    @staticmethod
    def _radius(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R = max |v| (exact), and the radius the codes are taken against: R, or 1 where R = 0 (then v = 0)."""
        radius = torch.linalg.vector_norm(v.to(torch.float32), float("inf")) if v.numel() else \
            v.new_zeros((), dtype=torch.float32)
        return radius, torch.where(radius > 0, radius, 1.0)

    def quantize(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = v.reshape(-1).to(torch.float32)
        radius, unit = self._radius(v)
        return radius.reshape(1), self._codes(v, unit).to(torch.int64)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        v = x.reshape(-1)
        n = v.numel()
        radius, unit = self._radius(v)
        packed = torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8, device=v.device)
        for lo, hi in slices(n, v.device):
            pack_into(self._codes(v[lo:hi].to(torch.float32), unit), self.bits,
                      packed[lo * self.bits // 8: packed_nbytes(hi, self.bits)])
        return Packet(self.name, n, (radius.reshape(1), packed))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        radius, data = self.check(packet, info, 2)
        radius = radius.to(torch.float32)
        if radius.numel() != 1 or data.dtype != torch.uint8 or data.numel() != packed_nbytes(packet.numel, self.bits):
            raise PacketError(f"laq packet has a radius of {radius.numel()} values and {data.numel()} {data.dtype} "
                              f"code bytes; 1 and {packed_nbytes(packet.numel, self.bits)} uint8 expected")
        tau = 1.0 / (2**self.bits - 1)
        if self.bits in (1, 2, 4, 8):
            levels = torch.arange(2**self.bits, dtype=torch.float32, device=radius.device)
            table = byte_table(2 * tau * radius * levels - radius, self.bits)
            data = data.reshape(-1)
            out = torch.empty(data.numel() * (8 // self.bits), dtype=torch.float32, device=radius.device)
            for lo, hi in slices(data.numel(), radius.device):
                lookup(data[lo:hi], table, out[lo * (8 // self.bits): hi * (8 // self.bits)])
            return out[:packet.numel]
        q = unpack_bits(data, self.bits, packet.numel).to(torch.float32)
        return 2 * tau * radius * q - radius
