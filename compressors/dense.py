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
    summary: ClassVar[str] = "fp32, uncompressed (32 bits/element)"
    unbiased: ClassVar[bool] = True
    dtype: ClassVar[torch.dtype] = torch.float32


@register
@dataclass(frozen=True)
class Float16(_Cast):
    """IEEE half precision (16 bits per element), as in DDP's fp16_compress_hook."""

    name: ClassVar[str] = "fp16"
    summary: ClassVar[str] = "IEEE fp16 cast (16 bits/element)"
    dtype: ClassVar[torch.dtype] = torch.float16


@register
@dataclass(frozen=True)
class BFloat16(_Cast):
    """bfloat16 (16 bits per element, fp32's exponent range)."""

    name: ClassVar[str] = "bf16"
    summary: ClassVar[str] = "bfloat16 cast (16 bits/element)"
    dtype: ClassVar[torch.dtype] = torch.bfloat16
