"""QSGD (Alistarh et al., NeurIPS 2017; ALGORITHMS.md §2.1): stochastic rounding to s levels per bucket.

Per bucket of B coordinates with scale n = ‖v‖₂ (or ‖v‖∞): r = s|v|/n, level = ⌊r⌋ + Bernoulli(r−⌊r⌋),
Q(v) = n·sgn(v)·level/s. Unbiased; E‖Q(v)−v‖² = (n/s)²·Σp(1−p) ≤ min(d/s², √d/s)‖v‖² (Lemma 3.1).

Wire ("fixed" coding): one fp32 scale per bucket + per coordinate a sign bit and a ⌈log2(s+1)⌉-bit level,
packed. Gather kind: levels from different workers do not add up before decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import bucketize_flat, pack_bits, unpack_bits
from compressors.packet import Packet


@register
@dataclass(frozen=True)
class QSGD(Codec):
    name: ClassVar[str] = "qsgd"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "stochastic s-level quantizer per bucket, unbiased (§2.1)"
    unbiased: ClassVar[bool] = True

    levels: int = 7
    bucket: int = 512
    norm: Literal["l2", "max"] = "l2"

    def __post_init__(self) -> None:
        if not 1 <= self.levels <= 2**15:
            raise ValueError(f"levels={self.levels} must be in 1..32768")
        if self.bucket < 1:
            raise ValueError(f"bucket={self.bucket} must be >= 1")

    @property
    def code_bits(self) -> int:
        return 1 + math.ceil(math.log2(self.levels + 1))

    def quantize(self, x: torch.Tensor, info: TensorInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bucket scales (fp32) and signed integer levels in [-s, s] for the first numel entries."""
        flat = x.reshape(-1).to(torch.float32)
        rows = bucketize_flat(flat, min(self.bucket, max(1, flat.numel())))
        scale = rows.norm(dim=1) if self.norm == "l2" else rows.abs().amax(dim=1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        r = rows.abs() * (self.levels / safe).unsqueeze(1)
        low = r.floor()
        u = torch.rand(r.shape, generator=info.generator(r.device), device=r.device)
        level = (low + (u < (r - low)).to(r.dtype)).clamp_(max=self.levels)
        signed = torch.where(rows < 0, -level, level).reshape(-1)[: flat.numel()]
        return scale, signed.to(torch.int64)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        scale, signed = self.quantize(x, info)
        codes = signed.abs() * 2 + (signed < 0).to(torch.int64)
        return Packet(self.name, x.numel(), (scale, pack_bits(codes, self.code_bits)))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        scale, packed = self.check(packet, info, 2)
        n = packet.numel
        codes = unpack_bits(packed, self.code_bits, n)
        level = (codes >> 1).to(torch.float32)
        sign = 1.0 - 2.0 * (codes & 1).to(torch.float32)
        bucket = min(self.bucket, max(1, n))
        per_elem = scale.repeat_interleave(bucket)[:n] if scale.numel() else scale
        return per_elem * sign * level / self.levels
