"""LAQ's quantizer of the gradient innovation (Sun, Chen, Giannakis, Yang, NeurIPS 2019).

Given the innovation v = ∇f(θ^k) − Q(θ̂) (current gradient minus the last uploaded quantized one):

    R = ‖v‖∞ ;  τ = 1/(2^b − 1) ;  q = ⌊(v + R)/(2τR) + ½⌋ ∈ {0..2^b−1} ;  δQ = 2τR·q − R

so that ‖δQ − v‖∞ ≤ τR. Wire: R (fp32) + b bits per coordinate. Deterministic; R = 0 sends R only
and decodes to zeros. The lazy upload rule and the reference bookkeeping live in rayq.sync (LAQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import pack_bits, unpack_bits
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

    def quantize(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = v.reshape(-1).to(torch.float32)
        radius = v.abs().max() if v.numel() else v.new_zeros(())
        if float(radius) == 0.0:
            return radius.reshape(1), torch.zeros_like(v, dtype=torch.int64)
        tau = 1.0 / (2**self.bits - 1)
        q = torch.floor((v + radius) / (2 * tau * radius) + 0.5).clamp_(0, 2**self.bits - 1)
        return radius.reshape(1), q.to(torch.int64)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        radius, q = self.quantize(x)
        if float(radius) == 0.0:
            return Packet(self.name, x.numel(), (radius,))
        return Packet(self.name, x.numel(), (radius, pack_bits(q, self.bits)))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        if packet.codec != self.name or packet.numel != info.numel or len(packet.fields) not in (1, 2):
            self.check(packet, info, 2)
        radius = packet.fields[0].to(torch.float32)
        if len(packet.fields) == 1:
            return torch.zeros(packet.numel, dtype=torch.float32, device=radius.device)
        q = unpack_bits(packet.fields[1], self.bits, packet.numel).to(torch.float32)
        tau = 1.0 / (2**self.bits - 1)
        return 2 * tau * radius * q - radius
