"""TernGrad (Wen et al., NeurIPS 2017): stochastic ternary {−s, 0, s} per tensor.

Optionally clip g_i to ±c·σ first, with σ the tensor's root-mean-square ‖g‖/√d (the std about zero:
equal to the std for zero-mean gradients, and never 0 for a constant nonzero tensor). Then
s = ‖g‖∞, b_i ~ Bernoulli(|g_i|/s), Q(g)_i = s·sgn(g_i)·b_i. Unbiased for the (clipped) input, with
E‖Q(g) − g‖² = s‖g‖₁ − ‖g‖² exactly.

Wire: one fp32 scale + 2 bits per coordinate (0, +s, −s), packed. Scaler sharing (s = max over
workers) would need a collective inside the codec, so each worker sends its own s: gather kind.

On the CPU each cache-sized slice of a float32 tensor is clipped, drawn, coded and packed in one
compiled pass over the same random lanes, with the same float32 steps as the tensor code other
devices run (tested bit-identical).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import (
    byte_table, expect_field, lookup, pack_into, packed_nbytes, slices, uniform_lanes,
)
from compressors.jit import compiled
from compressors.packet import Packet
from compressors.staging import host_kernels, to_device


@compiled
def _ternary_pack(g, lanes, bound, per_unit, out):
    """Codes 0 / 1 (+s) / 2 (−s) of a float32 slice, four per byte (LSB first) into ``out``: the tensor
    path's ``min(|g|, bound)·per_unit − 2³¹ > float32(lane)``, shifted left by the sign bit."""
    n = g.shape[0]
    offset = np.float32(2.0**31)
    for b in range((n + 3) >> 2):
        byte = 0
        for j in range(4):
            i = 4 * b + j
            if i < n:
                v = g[i]
                a = abs(v)
                if a > bound:
                    a = bound
                if a * per_unit - offset > np.float32(lanes[i]):
                    byte |= (2 if np.signbit(v) else 1) << (2 * j)
        out[b] = byte


@register
@dataclass(frozen=True)
class TernGrad(Codec):
    name: ClassVar[str] = "terngrad"
    kind: ClassVar[Kind] = Kind.GATHER
    fixed_layout: ClassVar[bool] = True
    summary: ClassVar[str] = "stochastic ternary {-s,0,s}, s=max|g| after c·σ clipping, 2 bits/element"
    source: ClassVar[str] = "Wen, Xu, Yan, Wu, Wang, Chen, Li: TernGrad, NeurIPS 2017"

    clip: float = 2.5

    @property
    def unbiased(self) -> bool:
        return self.clip == 0

    def __post_init__(self) -> None:
        if self.clip < 0:
            raise ValueError(f"clip={self.clip} must be >= 0 (0 disables clipping)")

    def _bound_and_scale(self, flat: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The clipping bound c·‖g‖/√d (None without clipping) and s = max|clip(g)| = min(‖g‖∞, bound),
        from one pass over cache-sized slices."""
        sumsq, top = [], []
        for lo, hi in slices(flat.numel(), flat.device):
            part = flat[lo:hi].to(torch.float32)
            if self.clip > 0:
                sumsq.append(torch.linalg.vector_norm(part).square())
            top.append(part.abs().amax())
        scale = torch.stack(top).amax()
        if self.clip == 0:
            return None, scale
        bound = self.clip * torch.stack(sumsq).sum().sqrt() / flat.numel() ** 0.5
        return bound, torch.minimum(scale, bound)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1)
        n = flat.numel()
        packed = torch.empty(packed_nbytes(n, 2), dtype=torch.uint8, device=flat.device)
        if n == 0:
            return Packet(self.name, 0, (flat.new_zeros(1, dtype=torch.float32), packed))
        bound, scale = self._bound_and_scale(flat)
        per_unit = 2.0**32 / torch.where(scale > 0, scale, 1.0)
        gen = info.generator(flat.device)
        if host_kernels(flat.device) and flat.dtype == torch.float32 and flat.is_contiguous():
            self._pack_compiled(flat, bound, per_unit, gen, packed)
        else:
            self._pack_tensor(flat, bound, per_unit, gen, packed)
        return Packet(self.name, n, (scale.reshape(1), packed))

    def _pack_tensor(self, flat: torch.Tensor, bound: torch.Tensor | None, per_unit: torch.Tensor,
                     gen: torch.Generator, packed: torch.Tensor) -> None:
        # b ~ Bernoulli(|g|/s) ⟺ u < |g|/s ⟺ lane < |g|·2³²/s − 2³¹ (u = (lane + 2³¹)/2³², one 32-bit lane each)
        n = flat.numel()
        for lo, hi in slices(n, flat.device):
            g = flat[lo:hi]
            a = g.abs() if g.dtype == torch.float32 else g.to(torch.float32).abs_()
            if bound is not None:
                a.clamp_(max=bound)
            hit = a.mul_(per_unit).sub_(2.0**31).gt_(uniform_lanes(gen, hi - lo, flat.device)).to(torch.uint8)
            code = hit.bitwise_left_shift_(torch.signbit(g).view(torch.uint8))        # 0, +s → 1, −s → 2
            pack_into(code, 2, packed[lo // 4: packed_nbytes(hi, 2)])

    def _pack_compiled(self, flat: torch.Tensor, bound: torch.Tensor | None, per_unit: torch.Tensor,
                       gen: torch.Generator, packed: torch.Tensor) -> None:
        """:meth:`_pack_tensor` for a contiguous float32 CPU tensor: the same lanes, one pass per slice."""
        limit = np.float32(np.inf) if bound is None else bound.numpy()[()]
        per, values, codes = per_unit.numpy()[()], flat.numpy(), packed.numpy()
        for lo, hi in slices(flat.numel(), flat.device):
            lanes = uniform_lanes(gen, hi - lo, flat.device).numpy()
            _ternary_pack(values[lo:hi], lanes, limit, per, codes[lo // 4: packed_nbytes(hi, 2)])

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        scale, packed = self.check(packet, info, 2)
        n = packet.numel
        scale = expect_field(scale, torch.float32, 1, "terngrad scale")
        packed = expect_field(packed, torch.uint8, packed_nbytes(n, 2), "terngrad codes")
        table = byte_table(scale * to_device([0.0, 1.0, -1.0, 0.0], torch.float32, scale.device), 2)
        out = torch.empty(packed.numel() * 4, dtype=torch.float32, device=scale.device)
        for lo, hi in slices(packed.numel(), scale.device):
            lookup(packed[lo:hi], table, out[lo * 4: hi * 4])
        return out[:n]
