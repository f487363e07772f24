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
from compressors.bits import (
    add_rows_, byte_table, expect_field, lookup, pack_into, packed_nbytes, scale_rows_, slices, stochastic_round_,
    uniform_lanes, unpack_codes,
)
from compressors.packet import Packet

QMAX = 127


@register
@dataclass(frozen=True)
class Int8(Codec):
    name: ClassVar[str] = "int8"
    kind: ClassVar[Kind] = Kind.GATHER
    fixed_layout: ClassVar[bool] = True
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

    def _rows(self, flat: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Elements ``lo:hi`` as float32 rows of a block; a short last block is padded with its own first
        element (so the padding changes neither its absmax nor its range)."""
        part = flat[lo:hi].to(torch.float32)
        pad = (-part.numel()) % self.block
        if pad:
            part = torch.cat([part, part[-(self.block - pad):][:1].expand(pad)])
        return part.view(-1, self.block)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1)
        n = flat.numel()
        gen = info.generator(flat.device) if self.rounding == "stochastic" else None
        steps, mins = [], []
        if self.bits == 8 and self.mode == "symmetric":
            out = torch.empty(n, dtype=torch.int8, device=flat.device)
        else:
            out = torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8, device=flat.device)
        for lo, hi in slices(n, flat.device, self.block):
            rows = self._rows(flat, lo, hi)
            if self.mode == "symmetric":
                top = rows.abs().amax(dim=1)
                step = top / self.qmax
                r = (rows / torch.where(top > 0, top, 1.0).unsqueeze(1)).mul_(self.qmax)
                low, high = -self.qmax, self.qmax
            else:
                least, most = torch.aminmax(rows, dim=1)
                span = most - least
                step = span / self.qmax
                r = ((rows - least.unsqueeze(1)) / torch.where(span > 0, span, 1.0).unsqueeze(1)).mul_(self.qmax)
                low, high = 0, self.qmax
                mins.append(least)
            if self.rounding == "nearest":
                r.round_()
            else:
                stochastic_round_(r, uniform_lanes(gen, r.numel(), flat.device))
            q = r.clamp_(low, high).view(-1)[: hi - lo]
            steps.append(step)
            if out.dtype == torch.int8:
                out[lo:hi].copy_(q)
            else:
                pack_into(q.to(torch.int16).add_(-low), self.bits, out[lo * self.bits // 8: packed_nbytes(hi, self.bits)])
        fields = (torch.cat(steps) if len(steps) > 1 else steps[0],) if steps else (flat.new_zeros(0, dtype=torch.float32),)
        if self.mode == "affine":
            fields += (torch.cat(mins) if len(mins) > 1 else mins[0],) if mins else (fields[0],)
        return Packet(self.name, n, (*fields, out))

    def _codes(self, q: torch.Tensor, n: int, offset: float, device: torch.device) -> torch.Tensor:
        """The packed codes as float32 values ``code − offset``."""
        bits = self.bits
        if 8 % bits:
            return unpack_codes(q, bits, n).to(torch.float32).sub_(offset)
        table = byte_table(torch.arange(1 << bits, dtype=torch.float32, device=device) - offset, bits)
        out = torch.empty(q.numel() * 8 // bits, dtype=torch.float32, device=device)
        for lo, hi in slices(q.numel(), device):
            lookup(q[lo:hi], table, out[lo * 8 // bits: hi * 8 // bits])
        return out[:n]

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        n = packet.numel
        blocks = math.ceil(n / self.block)
        if self.mode == "symmetric":
            step, q = self.check(packet, info, 2)
            step = expect_field(step, torch.float32, blocks, "int8 scales")
            if self.bits == 8:
                q = expect_field(q, torch.int8, n, "int8 values")
                out = torch.empty(n, dtype=torch.float32, device=step.device)
                for lo, hi in slices(n, step.device, self.block):
                    scale_rows_(out[lo:hi].copy_(q[lo:hi]), step[lo // self.block:], self.block)
                return out
            q = expect_field(q, torch.uint8, packed_nbytes(n, self.bits), "packed values")
            out = self._codes(q, n, self.qmax, step.device)
            for lo, hi in slices(n, step.device, self.block):
                scale_rows_(out[lo:hi], step[lo // self.block:], self.block)
            return out
        step, lo_, q = self.check(packet, info, 3)
        step = expect_field(step, torch.float32, blocks, "affine scales")
        least = expect_field(lo_, torch.float32, blocks, "affine minima")
        q = expect_field(q, torch.uint8, packed_nbytes(n, self.bits), "packed values")
        out = self._codes(q, n, 0.0, step.device)
        for lo, hi in slices(n, step.device, self.block):
            part = scale_rows_(out[lo:hi], step[lo // self.block:], self.block)
            add_rows_(part, least[lo // self.block:], self.block)
        return out
