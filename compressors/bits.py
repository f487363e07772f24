"""Bit packing shared by every codec that sends integer codes narrower than a byte.

Vectorised on the tensor's device: codes become a bit matrix, eight bits become one byte (LSB
first). Works for any width 1..32; widths 1, 2, 4 and 8 take a faster shift path.
"""

from __future__ import annotations

import math

import torch

from compressors.packet import PacketError

_SHIFTS8 = {}


def _shifts(n: int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    key = (n, device, dtype)
    if key not in _SHIFTS8:
        _SHIFTS8[key] = torch.arange(n, device=device, dtype=dtype)
    return _SHIFTS8[key]


def packed_nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a uint8 tensor of ceil(n*bits/8) bytes."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    codes = codes.reshape(-1)
    n = codes.numel()
    device = codes.device
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        c = codes.to(torch.uint8)
        pad = (-n) % per
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        c = c.view(-1, per).to(torch.int32) << (_shifts(per, device, torch.int32) * bits)
        return c.sum(dim=1, dtype=torch.int32).to(torch.uint8)
    bitmat = (codes.to(torch.int64).unsqueeze(1) >> _shifts(bits, device)) & 1
    flat = bitmat.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _shifts(8, device)).sum(dim=1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as int64."""
    if data.numel() != packed_nbytes(count, bits):
        raise ValueError(f"packed buffer has {data.numel()} bytes, {packed_nbytes(count, bits)} expected "
                         f"for {count} codes of {bits} bits")
    device = data.device
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        d = data.to(torch.int32).unsqueeze(1) >> (_shifts(per, device, torch.int32) * bits)
        return (d & ((1 << bits) - 1)).reshape(-1)[:count].to(torch.int64)
    flat = ((data.to(torch.int64).unsqueeze(1) >> _shifts(8, device)) & 1).reshape(-1)[: count * bits]
    return (flat.view(count, bits) << _shifts(bits, device)).sum(dim=1)


def bucketize_flat(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """View a flat tensor as rows of ``bucket`` elements, zero-padding the last row."""
    n = x.numel()
    pad = (-n) % bucket
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, bucket)


def expect_field(field: torch.Tensor, dtype: torch.dtype, numel: int, what: str) -> torch.Tensor:
    """A packet field flattened, after checking the dtype and element count its decoder needs.

    A packet whose CRC is fine can still disagree with the decoder (another codec version, other
    parameters such as a different block size): that is a :class:`PacketError`, never garbage.
    """
    if field.dtype != dtype or field.numel() != numel:
        raise PacketError(f"{what}: field holds {field.numel()} {field.dtype} elements, "
                          f"the decoder needs {numel} {dtype}")
    return field.reshape(-1)
