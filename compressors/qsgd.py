"""QSGD (Alistarh, Grubic, Li, Tomioka, Vojnović, NeurIPS 2017): stochastic rounding to s levels per bucket.

Per bucket of B coordinates with scale n = ‖v‖₂ (or ‖v‖∞): r = s|v|/n, level = ⌊r⌋ + Bernoulli(r−⌊r⌋),
Q(v) = n·sgn(v)·level/s. Unbiased; E‖Q(v)−v‖² = (n/s)²·Σp(1−p) ≤ min(d/s², √d/s)‖v‖² (Lemma 3.1).

Wire, ``coding="fixed"``: one fp32 scale per bucket + per coordinate a sign bit and a ⌈log2(s+1)⌉-bit
level, packed. ``coding="elias"`` (the paper's Theorem 3.2 scheme): the same scales, then only
the nonzero coordinates: the gaps between their positions and their levels as Elias-coded integer
streams (γ or δ, whichever is shorter for the packet, :mod:`compressors.intcodes`) and one sign bit
each. Both codings decode to identical tensors. Gather kind: levels from different workers do not
add up before decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import bucketize_flat, expect_field, pack_bits, packed_nbytes, unpack_bits
from compressors.intcodes import decode_ints, encode_ints
from compressors.packet import Packet, PacketError


@register
@dataclass(frozen=True)
class QSGD(Codec):
    name: ClassVar[str] = "qsgd"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "stochastic s-level quantizer per bucket, unbiased"
    source: ClassVar[str] = "Alistarh, Grubic, Li, Tomioka, Vojnović: QSGD, NeurIPS 2017"

    levels: int = 7
    bucket: int = 512
    norm: Literal["l2", "max"] = "l2"
    coding: Literal["fixed", "elias"] = "fixed"

    @property
    def unbiased(self) -> bool:
        return True

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
        if self.coding == "fixed":
            codes = signed.abs() * 2 + (signed < 0).to(torch.int64)
            return Packet(self.name, x.numel(), (scale, pack_bits(codes, self.code_bits)))
        idx = signed.nonzero().reshape(-1)
        kept = signed[idx]
        gap_code, gaps = encode_ints(torch.diff(idx, prepend=idx.new_full((1,), -1)))
        level_code, levels = encode_ints(kept.abs())
        meta = torch.tensor([idx.numel(), gap_code, level_code], dtype=torch.int64, device=scale.device)
        signs = pack_bits((kept < 0).to(torch.uint8), 1)
        return Packet(self.name, x.numel(), (scale, meta, gaps, levels, signs))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        n = packet.numel
        bucket = min(self.bucket, max(1, n))
        n_buckets = math.ceil(n / bucket)
        if self.coding == "fixed":
            scale, packed = self.check(packet, info, 2)
            scale = expect_field(scale, torch.float32, n_buckets, "qsgd scales")
            codes = unpack_bits(expect_field(packed, torch.uint8, packed_nbytes(n, self.code_bits), "qsgd codes"),
                                self.code_bits, n)
            level = (codes >> 1).to(torch.float32)
            sign = 1.0 - 2.0 * (codes & 1).to(torch.float32)
            per_elem = scale.repeat_interleave(bucket)[:n]
            return per_elem * sign * level / self.levels
        scale, meta, gaps, levels, signs = self.check(packet, info, 5)
        scale = expect_field(scale, torch.float32, n_buckets, "qsgd scales")
        k, gap_code, level_code = expect_field(meta, torch.int64, 3, "qsgd elias header").tolist()
        if not 0 <= k <= n:
            raise PacketError(f"qsgd: {k} nonzero levels for {n} elements")
        idx = torch.cumsum(decode_ints(gap_code, gaps, k, "qsgd gaps"), 0) - 1
        level = decode_ints(level_code, levels, k, "qsgd levels")
        if k and (int(idx[-1]) >= n or int(level.max()) > self.levels):
            raise PacketError(f"qsgd: position {int(idx[-1])} or level {int(level.max())} out of range "
                              f"(numel {n}, levels {self.levels})")
        negative = unpack_bits(expect_field(signs, torch.uint8, packed_nbytes(k, 1), "qsgd signs"), 1, k)
        sign = 1.0 - 2.0 * negative.to(torch.float32)
        values = scale[idx // bucket] * sign * level.to(torch.float32) / self.levels
        return torch.zeros(n, dtype=torch.float32, device=scale.device).index_put_((idx,), values)
