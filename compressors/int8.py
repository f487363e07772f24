"""Blockwise int8 with absmax scales (as in 8-bit optimizers and DeDLOC's 8-bit exchange, §8.4).

Per block of B consecutive elements: Δ = max|x|/127, q = round(x/Δ) ∈ [−127, 127], x̂ = Δ·q.
Round to nearest gives |x̂ − x| ≤ Δ/2 (biased); stochastic rounding, q = ⌊x/Δ⌋ + Bernoulli(frac),
is unbiased with |x̂ − x| < Δ. Wire: one fp32 Δ per block + one int8 per element (8 + 32/B bits).
Gather kind: the scales differ between workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import bucketize_flat, expect_field
from compressors.packet import Packet

QMAX = 127


@register
@dataclass(frozen=True)
class Int8(Codec):
    name: ClassVar[str] = "int8"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "blockwise int8, fp32 absmax scale per block (8 + 32/block bits/element)"
    #: With the default round-to-nearest; ``rounding="stochastic"`` makes it unbiased.
    unbiased: ClassVar[bool] = False

    block: int = 256
    rounding: Literal["nearest", "stochastic"] = "nearest"

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"block={self.block} must be >= 1")

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1).to(torch.float32)
        rows = bucketize_flat(flat, self.block)
        step = rows.abs().amax(dim=1) / QMAX
        r = rows / torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(1)
        if self.rounding == "nearest":
            q = r.round()
        else:
            u = torch.rand(r.shape, generator=info.generator(r.device), device=r.device)
            q = r.floor() + (u < r - r.floor()).to(r.dtype)
        q = q.clamp_(-QMAX, QMAX).to(torch.int8).reshape(-1)[: flat.numel()]
        return Packet(self.name, flat.numel(), (step, q))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        step, q = self.check(packet, info, 2)
        n = packet.numel
        step = expect_field(step, torch.float32, math.ceil(n / self.block), "int8 scales")
        q = expect_field(q, torch.int8, n, "int8 values")
        return step.repeat_interleave(self.block)[:n] * q.to(torch.float32)
