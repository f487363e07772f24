"""LAQ's quantizer of the gradient innovation (Sun, Chen, Giannakis, Yang, NeurIPS 2019).

Given the innovation v = ∇f(θ^k) − Q(θ̂) (current gradient minus the last uploaded quantized one):

    R = ‖v‖∞ ;  τ = 1/(2^b − 1) ;  q = ⌊(v + R)/(2τR) + ½⌋ ∈ {0..2^b−1} ;  δQ = 2τR·q − R

so that ‖δQ − v‖∞ ≤ τR. Wire: R (fp32) + b bits per coordinate. Deterministic; R = 0 sends R only
and decodes to zeros. The lazy upload rule and the reference bookkeeping live in rayq.sync (LAQ).

Encoding quantises and packs cache-sized slices on the CPU, with codes in the narrowest integer type;
decoding of 1-, 2-, 4- and 8-bit codes is a byte-table lookup of the 2^b values δQ can take, computed
with the same float32 operations as the per-element formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import byte_table, lookup, pack_bits, pack_into, packed_nbytes, slices, unpack_bits
from compressors.packet import Packet


@register
@dataclass(frozen=True)
class LAQQuantizer(Codec):
    name: ClassVar[str] = "laq"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "b-bit innovation quantizer of LAQ, radius ‖v‖∞ (for sync.schedule=laq)"
    source: ClassVar[str] = "Sun, Chen, Giannakis, Yang: LAQ, NeurIPS 2019"

    bits: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits} must be in 1..16")

    def _codes(self, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """q for a float32 slice, as the narrowest integer type that holds 2^b − 1."""
        tau = 1.0 / (2**self.bits - 1)
        q = v.add(radius).div_(2 * tau * radius).add_(0.5).floor_().clamp_(0, 2**self.bits - 1)
        return q.to(torch.uint8 if self.bits <= 8 else torch.int32)

    def quantize(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = v.reshape(-1).to(torch.float32)
        radius = v.abs().max() if v.numel() else v.new_zeros(())
        if float(radius) == 0.0:
            return radius.reshape(1), torch.zeros_like(v, dtype=torch.int64)
        return radius.reshape(1), self._codes(v, radius).to(torch.int64)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        v = x.reshape(-1)
        n = v.numel()
        if n:
            radius = torch.linalg.vector_norm(v.to(torch.float32), float("inf"))   # max |v|, exact
        else:
            radius = v.new_zeros((), dtype=torch.float32)
        if float(radius) == 0.0:
            return Packet(self.name, n, (radius.reshape(1),))
        packed = torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8, device=v.device)
        for lo, hi in slices(n, v.device):
            pack_into(self._codes(v[lo:hi].to(torch.float32), radius), self.bits,
                      packed[lo * self.bits // 8: packed_nbytes(hi, self.bits)])
        return Packet(self.name, n, (radius.reshape(1), packed))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        if packet.codec != self.name or packet.numel != info.numel or len(packet.fields) not in (1, 2):
            self.check(packet, info, 2)
        radius = packet.fields[0].to(torch.float32)
        if len(packet.fields) == 1:
            return torch.zeros(packet.numel, dtype=torch.float32, device=radius.device)
        tau = 1.0 / (2**self.bits - 1)
        if self.bits in (1, 2, 4, 8):
            levels = torch.arange(2**self.bits, dtype=torch.float32, device=radius.device)
            table = byte_table(2 * tau * radius * levels - radius, self.bits)
            data = packet.fields[1].reshape(-1)
            out = torch.empty(data.numel() * (8 // self.bits), dtype=torch.float32, device=radius.device)
            for lo, hi in slices(data.numel(), radius.device):
                lookup(data[lo:hi], table, out[lo * (8 // self.bits): hi * (8 // self.bits)])
            return out[:packet.numel]
        q = unpack_bits(packet.fields[1], self.bits, packet.numel).to(torch.float32)
        return 2 * tau * radius * q - radius
