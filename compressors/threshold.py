"""Threshold quantiser of QCMD / QRDA AdaGrad (Xu, Wangni, Zhang, Ye, Wu, Zhao, 2022;
the quantiser itself is our reconstruction: the paper's exact rule is not public).

Support T = {i : |g_i| > κ·r} with r = mean|g| (``reference="mean"``) or ‖g‖∞ (``"max"``);
Q(g)_i = a·sgn(g_i)·1[i ∈ T] with a = mean_{i∈T}|g_i|, the scale minimising ‖Q(g) − g‖² for that
support. Deterministic and biased; error ‖g_{T^c}‖² + Σ_{i∈T}(|g_i| − a)².

Wire: fp32 a, |T| (int64), one sign bit per element of T, and T as an index code
(:mod:`compressors.sparse_index`: Elias–Fano or a d-bit bitmap, whichever is smaller; the choice
follows from (|T|, d), so both ends know it without a flag).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import expect_field, pack_bits, packed_nbytes, unpack_bits
from compressors.packet import Packet, PacketError
from compressors.sparse_index import decode_indices, encode_indices, layout


@register
@dataclass(frozen=True)
class Threshold(Codec):
    name: ClassVar[str] = "threshold"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "a·sgn(g) where |g| > κ·mean|g| (or κ·max|g|), a = mean |g| there"
    source: ClassVar[str] = "Xu, Wangni, Zhang, Ye, Wu, Zhao: QCMD/QRDA AdaGrad, 2022 (our reconstruction)"

    kappa: float = 0.5
    #: "mean" by default: κ·mean|g| keeps a stable fraction of a layer whatever its size, where
    #: κ·‖g‖∞ keeps fewer coordinates the larger d is (the max of d Gaussians grows like √(2 ln d)).
    reference: Literal["max", "mean"] = "mean"

    def __post_init__(self) -> None:
        if self.kappa < 0:
            raise ValueError(f"kappa={self.kappa} must be >= 0")

    def support(self, g: torch.Tensor) -> torch.Tensor:
        """The boolean mask of T for a flat fp32 tensor."""
        mag = g.abs()
        if not g.numel():
            return mag > 0
        ref = mag.amax() if self.reference == "max" else mag.mean()
        return mag > self.kappa * ref

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        g = x.reshape(-1).to(torch.float32)
        mask = self.support(g)
        idx = mask.nonzero().reshape(-1)
        kept = g[idx]
        a = (kept.abs().sum() / max(1, idx.numel())).reshape(1)
        count = torch.tensor([idx.numel()], dtype=torch.int64, device=g.device)
        signs = pack_bits((kept < 0).to(torch.uint8), 1)
        return Packet(self.name, g.numel(), (a, count, signs, encode_indices(idx, g.numel())))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        a, count, signs, code = self.check(packet, info, 4)
        n = packet.numel
        a = expect_field(a, torch.float32, 1, "threshold scale")
        k = int(expect_field(count, torch.int64, 1, "threshold support size")[0])
        if not 0 <= k <= n:
            raise PacketError(f"threshold: support size {k} is not in 0..{n}")
        negative = unpack_bits(expect_field(signs, torch.uint8, packed_nbytes(k, 1), "threshold signs"), 1, k)
        idx = decode_indices(expect_field(code, torch.uint8, layout(k, n).nbytes, "threshold support"), k, n)
        out = torch.zeros(n, dtype=torch.float32, device=a.device)
        return out.index_put_((idx,), a * (1.0 - 2.0 * negative.to(torch.float32)))
