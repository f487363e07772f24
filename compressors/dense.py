"""Dense codecs: fp32 (the uncompressed baseline) and the 16-bit casts. All linear."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import Codec, Kind, TensorInfo, register
from compressors.packet import Packet


@dataclass(frozen=True)
class _Cast(Codec):
    kind: ClassVar[Kind] = Kind.LINEAR
    dtype: ClassVar[torch.dtype] = torch.float32

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        return Packet(self.name, x.numel(), (x.reshape(-1).to(self.dtype),))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        (values,) = self.check(packet, info, 1)
        return values.reshape(-1).to(torch.float32)


@register
@dataclass(frozen=True)
class NoCompression(_Cast):
    """fp32 as is: the dense all-reduce baseline (32 bits per element)."""

    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "the tensor in its own dtype (fp32: 32 bits/element), uncompressed"
    dtype: ClassVar[torch.dtype] = torch.float32

    @property
    def unbiased(self) -> bool:
        return True

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Lossless means bit-exact in the tensor's own dtype: float64 stays float64."""
        return dtype if dtype.is_floating_point else torch.float32

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        flat = x.reshape(-1)
        return Packet(self.name, flat.numel(), (flat if flat.is_floating_point() else flat.to(torch.float32),))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        (values,) = self.check(packet, info, 1)
        return values.reshape(-1)


@register
@dataclass(frozen=True)
class Float16(_Cast):
    """IEEE half precision (16 bits per element), as in DDP's fp16_compress_hook."""

    name: ClassVar[str] = "fp16"
    summary: ClassVar[str] = "IEEE fp16 cast (16 bits/element)"
    source: ClassVar[str] = "as PyTorch DDP's fp16_compress_hook"
    dtype: ClassVar[torch.dtype] = torch.float16


@register
@dataclass(frozen=True)
class BFloat16(_Cast):
    """bfloat16 (16 bits per element, fp32's exponent range)."""

    name: ClassVar[str] = "bf16"
    summary: ClassVar[str] = "bfloat16 cast (16 bits/element)"
    dtype: ClassVar[torch.dtype] = torch.bfloat16
