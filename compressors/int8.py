"""Blockwise integer quantization with absmax scales: int8 by default (as in 8-bit optimizers and
DeDLOC's 8-bit exchange, Diskin et al., NeurIPS 2021), any width 2..8 bits for mixed precision per layer
(Ovi, Dey, Roy, Gangopadhyay, arXiv 2210.13457).

Symmetric (default), per block of B elements: Δ = max|x|/(2^(b−1)−1), q = round(x/Δ), x̂ = Δ·q.
Affine: Δ = (max−min)/(2^b−1), q = round((x−min)/Δ) ∈ [0, 2^b−1], x̂ = min + Δ·q (min sent as fp32).
Round to nearest gives |x̂ − x| ≤ Δ/2 (biased); stochastic rounding, q = ⌊r⌋ + Bernoulli(r−⌊r⌋),
is unbiased with |x̂ − x| < Δ. Wire per block: fp32 Δ (+ fp32 min, affine) and b bits per element.
Gather kind: the scales differ between workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import bucketize_flat, expect_field, pack_bits, packed_nbytes, unpack_bits
from compressors.packet import Packet

QMAX = 127


@register
@dataclass(frozen=True)
class Int8(Codec):
    name: ClassVar[str] = "int8"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "blockwise int8, fp32 absmax scale per block (8 + 32/block bits/element)"
    source: ClassVar[str] = "8-bit exchange as in DeDLOC (Diskin et al., NeurIPS 2021); 2-8 bits for mixed precision (Ovi et al., 2022)"

    block: int = 256
    rounding: Literal["nearest", "stochastic"] = "nearest"
    bits: int = 8
    mode: Literal["symmetric", "affine"] = "symmetric"

    @property
    def unbiased(self) -> bool:
        return self.rounding == "stochastic"

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"block={self.block} must be >= 1")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits} must be in 2..8")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.mode == "symmetric" else 2**self.bits - 1

    def _round(self, r: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        if self.rounding == "nearest":
            return r.round()
        u = torch.rand(r.shape, generator=info.generator(r.device), device=r.device)
        return r.floor() + (u < r - r.floor()).to(r.dtype)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1).to(torch.float32)
        n = flat.numel()
        rows = bucketize_flat(flat, self.block)
        if self.mode == "symmetric":
            step = rows.abs().amax(dim=1) / self.qmax
            r = rows / torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(1)
            q = self._round(r, info).clamp_(-self.qmax, self.qmax).reshape(-1)[:n]
            if self.bits == 8:
                return Packet(self.name, n, (step, q.to(torch.int8)))
            return Packet(self.name, n, (step, pack_bits((q + self.qmax).to(torch.int64), self.bits)))
        # affine: the padding of the last block must not widen its range
        pad = rows.numel() - n
        valid = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
        if pad:
            valid[n:] = False
        valid = valid.view_as(rows)
        lo = torch.where(valid, rows, torch.full_like(rows, float("inf"))).amin(dim=1)
        hi = torch.where(valid, rows, torch.full_like(rows, float("-inf"))).amax(dim=1)
        step = (hi - lo) / self.qmax
        r = (rows - lo.unsqueeze(1)) / torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(1)
        q = self._round(r, info).clamp_(0, self.qmax).reshape(-1)[:n]
        return Packet(self.name, n, (step, lo, pack_bits(q.to(torch.int64), self.bits)))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        n = packet.numel
        blocks = math.ceil(n / self.block)
        if self.mode == "symmetric":
            step, q = self.check(packet, info, 2)
            step = expect_field(step, torch.float32, blocks, "int8 scales")
            if self.bits == 8:
                q = expect_field(q, torch.int8, n, "int8 values").to(torch.float32)
            else:
                q = expect_field(q, torch.uint8, packed_nbytes(n, self.bits), "packed values")
                q = (unpack_bits(q, self.bits, n) - self.qmax).to(torch.float32)
            return step.repeat_interleave(self.block)[:n] * q
        step, lo, q = self.check(packet, info, 3)
        step = expect_field(step, torch.float32, blocks, "affine scales")
        lo = expect_field(lo, torch.float32, blocks, "affine minima")
        q = expect_field(q, torch.uint8, packed_nbytes(n, self.bits), "packed values")
        q = unpack_bits(q, self.bits, n).to(torch.float32)
        return lo.repeat_interleave(self.block)[:n] + step.repeat_interleave(self.block)[:n] * q
