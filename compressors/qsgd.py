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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import (
    bucketize_flat, byte_table, expect_field, lookup, pack_bits, pack_into, packed_nbytes, scale_rows_, slices,
    stochastic_round_, uniform_lanes, unpack_bits, unpack_codes,
)
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

    @property
    def fixed_layout(self) -> bool:  # type: ignore[override]
        return self.coding == "fixed"

    def __post_init__(self) -> None:
        if not 1 <= self.levels <= 2**15:
            raise ValueError(f"levels={self.levels} must be in 1..32768")
        if self.bucket < 1:
            raise ValueError(f"bucket={self.bucket} must be >= 1")

    @property
    def code_bits(self) -> int:
        return 1 + math.ceil(math.log2(self.levels + 1))

    def _code_dtype(self) -> torch.dtype:
        return torch.int8 if self.code_bits <= 7 else torch.int16 if self.code_bits <= 15 else torch.int32

    def _slices(self, x: torch.Tensor, info: TensorInfo) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Per slice of whole buckets: (lo, hi, its bucket scales, its signed levels as float32).

        ``level = ⌊s·v/n⌋ + Bernoulli(frac)`` on the signed ratio, the same law as rounding ``|v|`` and
        restoring the sign; the uniforms come from the generator of this worker, step and tensor."""
        flat = x.reshape(-1)
        n = flat.numel()
        bucket = min(self.bucket, max(1, n))
        gen = info.generator(flat.device)
        for lo, hi in slices(n, flat.device, bucket):
            rows = bucketize_flat(flat[lo:hi].to(torch.float32), bucket)
            scale = torch.linalg.vector_norm(rows, dim=1) if self.norm == "l2" else rows.abs().amax(dim=1)
            r = rows * (self.levels / torch.where(scale > 0, scale, 1.0)).unsqueeze(1)
            level = stochastic_round_(r, uniform_lanes(gen, r.numel(), flat.device)).clamp_(-self.levels, self.levels)
            yield lo, hi, scale, level.view(-1)[: hi - lo]

    def quantize(self, x: torch.Tensor, info: TensorInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bucket scales (fp32) and signed integer levels in [-s, s] for the first numel entries."""
        parts = [(scale, level.to(torch.int64)) for _, _, scale, level in self._slices(x, info)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        if self.coding == "elias":
            return self._encode_elias(x, info)
        n, bits = x.numel(), self.code_bits
        packed = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=x.device)
        scales = []
        shift = torch.iinfo(self._code_dtype()).bits - 1
        for lo, hi, scale, level in self._slices(x, info):
            signed = level.to(self._code_dtype())
            code = signed.abs().mul_(2).sub_(signed >> shift)      # 2|l| + (l < 0)
            pack_into(code, bits, packed[lo * bits // 8: packed_nbytes(hi, bits)])
            scales.append(scale)
        return Packet(self.name, n, (torch.cat(scales) if len(scales) > 1 else scales[0], packed))

    def _encode_elias(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        scale, signed = self.quantize(x, info)
        idx = signed.nonzero().reshape(-1)
        kept = signed[idx]
        gap_code, gaps = encode_ints(torch.diff(idx, prepend=idx.new_full((1,), -1)))
        level_code, levels = encode_ints(kept.abs())
        meta = torch.tensor([idx.numel(), gap_code, level_code], dtype=torch.int64, device=scale.device)
        signs = pack_bits((kept < 0).to(torch.uint8), 1)
        return Packet(self.name, x.numel(), (scale, meta, gaps, levels, signs))

    def _values(self, device: torch.device) -> torch.Tensor:
        """The value sgn·level/s of every code 2·level + (sign < 0), float32."""
        codes = torch.arange(1 << self.code_bits, device=device)
        return (1.0 - 2.0 * (codes & 1).to(torch.float32)) * (codes >> 1).to(torch.float32) / self.levels

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        n = packet.numel
        bucket = min(self.bucket, max(1, n))
        n_buckets = math.ceil(n / bucket)
        if self.coding == "fixed":
            scale, packed = self.check(packet, info, 2)
            scale = expect_field(scale, torch.float32, n_buckets, "qsgd scales")
            packed = expect_field(packed, torch.uint8, packed_nbytes(n, self.code_bits), "qsgd codes")
            bits, device = self.code_bits, scale.device
            if 8 % bits:
                out = self._values(device).index_select(0, unpack_codes(packed, bits, n).to(torch.int32))
            else:
                out = torch.empty(packed.numel() * 8 // bits, dtype=torch.float32, device=device)
                table = byte_table(self._values(device), bits)
                for lo, hi in slices(packed.numel(), device, bucket):
                    lookup(packed[lo:hi], table, out[lo * 8 // bits: hi * 8 // bits])
            out = out[:n]
            for lo, hi in slices(n, device, bucket):
                scale_rows_(out[lo:hi], scale[lo // bucket:], bucket)
            return out
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
        values = self._values(scale.device)[2 * level + negative] * scale[idx // bucket]
        return torch.zeros(n, dtype=torch.float32, device=scale.device).index_put_((idx,), values)
