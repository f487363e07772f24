"""TernGrad (Wen et al., NeurIPS 2017): stochastic ternary {−s, 0, s} per tensor.

Optionally clip g_i to ±c·σ first, with σ the tensor's root-mean-square ‖g‖/√d (the std about zero:
equal to the std for zero-mean gradients, and never 0 for a constant nonzero tensor). Then
s = ‖g‖∞, b_i ~ Bernoulli(|g_i|/s), Q(g)_i = s·sgn(g_i)·b_i. Unbiased for the (clipped) input, with
E‖Q(g) − g‖² = s‖g‖₁ − ‖g‖² exactly.

Wire: one fp32 scale + 2 bits per coordinate (0, +s, −s), packed. Scaler sharing (s = max over
workers) would need a collective inside the codec, so each worker sends its own s: gather kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import expect_field, pack_bits, packed_nbytes, unpack_bits
from compressors.packet import Packet


@register
@dataclass(frozen=True)
class TernGrad(Codec):
    name: ClassVar[str] = "terngrad"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "stochastic ternary {-s,0,s}, s=max|g| after c·σ clipping, 2 bits/element"
    source: ClassVar[str] = "Wen, Xu, Yan, Wu, Wang, Chen, Li: TernGrad, NeurIPS 2017"

    clip: float = 2.5

    @property
    def unbiased(self) -> bool:
        return self.clip == 0

    def __post_init__(self) -> None:
        if self.clip < 0:
            raise ValueError(f"clip={self.clip} must be >= 0 (0 disables clipping)")

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        g = x.reshape(-1).to(torch.float32)
        if self.clip > 0 and g.numel():
            bound = self.clip * g.norm() / g.numel() ** 0.5
            g = torch.maximum(torch.minimum(g, bound), -bound)
        scale = g.abs().amax().reshape(1) if g.numel() else g.new_zeros(1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        u = torch.rand(g.shape, generator=info.generator(g.device), device=g.device)
        keep = u < g.abs() / safe
        codes = keep.to(torch.uint8) * torch.where(g < 0, 2, 1).to(torch.uint8)
        return Packet(self.name, g.numel(), (scale, pack_bits(codes, 2)))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        scale, packed = self.check(packet, info, 2)
        n = packet.numel
        scale = expect_field(scale, torch.float32, 1, "terngrad scale")
        codes = unpack_bits(expect_field(packed, torch.uint8, packed_nbytes(n, 2), "terngrad codes"), 2, n)
        return scale * ((codes == 1).to(torch.float32) - (codes == 2).to(torch.float32))
