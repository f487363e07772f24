"""Threshold quantiser of QCMD / QRDA AdaGrad (Xu, Wangni, Zhang, Ye, Wu, Zhao, 2022;
the quantiser itself is our reconstruction: the paper's exact rule is not public).

Support T = {i : |g_i| > κ·r} with r = mean|g| (``reference="mean"``) or ‖g‖∞ (``"max"``);
Q(g)_i = a·sgn(g_i)·1[i ∈ T] with a = mean_{i∈T}|g_i|, the scale minimising ‖Q(g) − g‖² for that
support. Deterministic and biased; error ‖g_{T^c}‖² + Σ_{i∈T}(|g_i| − a)².

Wire: fp32 a, |T| (int64), one sign bit per element of T, and T as an index code
(:mod:`compressors.sparse_index`: Elias–Fano or a d-bit bitmap, whichever is smaller; the choice
follows from (|T|, d), so both ends know it without a flag).

On the CPU one compiled pass writes the bitmap of T, the packed signs, |T| and Σ_T|g| together, and
one compiled pass decodes a bitmap-coded packet (the usual case: κ = 0.5 keeps most of a layer); the
tensor path (other devices, and Elias–Fano supports) gives the same packets and the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import expect_field, pack_bits, packed_nbytes, unpack_bits
from compressors.jit import compiled
from compressors.packet import Packet, PacketError
from compressors.sparse_index import decode_indices, encode_indices, layout
from compressors.staging import host_kernels


@compiled
def _mark_support(g, t, mask, signs):
    """Set bit i of ``mask`` where |g_i| > t, and the sign bits (1: negative) of the kept elements, in
    order, in ``signs`` (both zeroed, LSB first as ``pack_bits``); return |T| and Σ_T |g_i|."""
    k = 0
    total = 0.0
    for i in range(g.shape[0]):
        v = g[i]
        a = abs(v)
        if a > t:
            mask[i >> 3] |= np.uint8(1 << (i & 7))
            if v < 0:
                signs[k >> 3] |= np.uint8(1 << (k & 7))
            k += 1
            total += a
    return k, total


@compiled
def _fill_support(mask, signs, a, k, out):
    """out_i = ±a on the bitmap's ones, in order of the sign bits; return the ones' count, or -1 as soon
    as there are more than ``k`` (a corrupted bitmap: its signs would be read past their end)."""
    j = 0
    for i in range(out.shape[0]):
        if (mask[i >> 3] >> (i & 7)) & 1:
            if j >= k:
                return -1
            out[i] = -a if (signs[j >> 3] >> (j & 7)) & 1 else a
            j += 1
    return j


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

    def cut(self, mag: torch.Tensor) -> torch.Tensor:
        """κ·r for the magnitudes |g| of a non-empty flat fp32 tensor (a float32 0-d tensor)."""
        return self.kappa * (mag.amax() if self.reference == "max" else mag.mean())

    def support(self, g: torch.Tensor) -> torch.Tensor:
        """The boolean mask of T for a flat fp32 tensor."""
        mag = g.abs()
        if not g.numel():
            return mag > 0
        return mag > self.cut(mag)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        g = x.reshape(-1).to(torch.float32)
        if host_kernels(g.device) and g.numel():
            return self._encode_cpu(g)
        return self._encode_tensor(g)

    def _encode_tensor(self, g: torch.Tensor) -> Packet:
        mask = self.support(g)
        idx = mask.nonzero().reshape(-1)
        kept = g[idx]
        a = (kept.abs().sum() / max(1, idx.numel())).reshape(1)
        count = torch.tensor([idx.numel()], dtype=torch.int64, device=g.device)
        signs = pack_bits((kept < 0).to(torch.uint8), 1)
        return Packet(self.name, g.numel(), (a, count, signs, encode_indices(idx, g.numel())))

    def _encode_cpu(self, g: torch.Tensor) -> Packet:
        n = g.numel()
        t = self.cut(g.abs()).numpy()[()]   # the float32 threshold of ``support``
        mask = np.zeros(packed_nbytes(n, 1), dtype=np.uint8)
        signs = np.zeros(packed_nbytes(n, 1), dtype=np.uint8)
        k, total = _mark_support(g.numpy(), t, mask, signs)
        a = torch.tensor([total / max(1, k)], dtype=torch.float32)
        bitmap = torch.from_numpy(mask)
        code = bitmap if k and layout(k, n).bitmap else encode_indices(unpack_bits(bitmap, 1, n).nonzero().reshape(-1), n)
        return Packet(self.name, n, (a, torch.tensor([k], dtype=torch.int64),
                                     torch.from_numpy(signs[:packed_nbytes(k, 1)]), code))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        a, count, signs, code = self.check(packet, info, 4)
        n = packet.numel
        a = expect_field(a, torch.float32, 1, "threshold scale")
        k = int(expect_field(count, torch.int64, 1, "threshold support size")[0])
        if not 0 <= k <= n:
            raise PacketError(f"threshold: support size {k} is not in 0..{n}")
        signs = expect_field(signs, torch.uint8, packed_nbytes(k, 1), "threshold signs")
        code = expect_field(code, torch.uint8, layout(k, n).nbytes, "threshold support")
        out = torch.zeros(n, dtype=torch.float32, device=a.device)
        if host_kernels(a.device) and layout(k, n).bitmap and k:
            if _fill_support(code.contiguous().numpy(), signs.contiguous().numpy(), a.numpy()[0], k, out.numpy()) != k:
                raise PacketError(f"threshold: the support bitmap does not hold {k} elements")
            return out
        return self._decode_tensor(a, signs, code, k, out)

    def _decode_tensor(self, a: torch.Tensor, signs: torch.Tensor, code: torch.Tensor, k: int,
                       out: torch.Tensor) -> torch.Tensor:
        n = out.numel()
        negative = unpack_bits(signs, 1, k)
        idx = decode_indices(code, k, n)
        return out.index_put_((idx,), a * (1.0 - 2.0 * negative.to(torch.float32)))
