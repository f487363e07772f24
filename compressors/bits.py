"""Bit packing and the element-wise building blocks shared by the codecs.

Packing: codes of ``bits`` bits go back to back, LSB first, zero-padded to a whole byte (byte ``i``
holds stream bits ``8i..8i+7``). It runs on 64-bit words of the tensor's device: widths 1, 2 and 4 by
shift-or compaction of the one-byte codes inside a word, 3..8 bits as 8 codes per word, 16 and 32 as
the little-endian integers themselves, other widths through a bit matrix. Decoders that want values
rather than codes read them through a 256-row table indexed by the packed byte (:func:`lookup`).

Slices: on the CPU the codecs run their element-wise work over slices of :data:`SLICE` elements, so
the temporaries stay in a core's cache and no full-size buffer is allocated (page faults of a fresh
44 MB buffer cost more than the arithmetic on it); on an accelerator one slice is the whole tensor.

Randomness: uniform 32-bit lanes, two per 64-bit draw of the codec's generator (half the generator calls
of ``torch.rand``), and stochastic rounding by an exact comparison with the fraction.
"""

from __future__ import annotations

import math

import torch

from compressors.packet import PacketError
from compressors.staging import host_kernels

#: Elements per slice on the CPU (a multiple of 8, so every slice packs to whole bytes).
SLICE = 1 << 16

_CACHE: dict[tuple, torch.Tensor] = {}


def _const(key: tuple, make) -> torch.Tensor:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _arange(n: int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return _const(("arange", n, str(device), dtype), lambda: torch.arange(n, device=device, dtype=dtype))


def slices(n: int, device: torch.device, multiple: int = 8) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges covering ``n`` elements: cache-sized on the CPU (each a multiple of
    ``multiple`` and of 8, except the last), the whole range elsewhere."""
    if not host_kernels(device) or n <= SLICE:
        return [(0, n)]
    unit = math.lcm(multiple, 8)
    step = max(unit, SLICE // unit * unit)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def packed_nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def as_words(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A flat byte (or other) tensor reinterpreted as ``dtype``; copied first when its storage
    offset or length does not allow a view."""
    flat = data.reshape(-1)
    size = torch.empty((), dtype=dtype).element_size()
    if (flat.storage_offset() * flat.element_size()) % size or (flat.numel() * flat.element_size()) % size:
        flat = flat.clone()
        if (flat.numel() * flat.element_size()) % size:
            raise ValueError(f"{flat.numel()} elements of {flat.dtype} are not a whole number of {dtype}")
    return flat.view(dtype)


def _padded(codes: torch.Tensor, multiple: int, dtype: torch.dtype) -> torch.Tensor:
    """``codes`` flat as ``dtype``, zero-padded to a multiple of ``multiple`` (a view when it can be)."""
    flat = codes.reshape(-1)
    n = flat.numel()
    if n % multiple == 0 and flat.element_size() == 1 == torch.empty((), dtype=dtype).element_size() \
            and not flat.is_floating_point() and flat.storage_offset() % 8 == 0:
        return flat.view(dtype)
    out = torch.zeros(n + (-n) % multiple, dtype=dtype, device=flat.device)
    out[:n] = flat
    return out


def pack_into(codes: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits, any integer or bool dtype) into the uint8
    tensor ``out`` of ``packed_nbytes(codes.numel(), bits)`` bytes; returns ``out``."""
    n = codes.numel()
    if out.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_nbytes(n, bits)} bytes, out has {out.numel()}")
    if n == 0:
        return out
    if bits == 8:
        return out.copy_(codes.reshape(-1))
    if bits in (16, 32):
        words = codes.reshape(-1).to(torch.int16 if bits == 16 else torch.int32)  # modular: the low bits
        return out.copy_(words.view(torch.uint8))
    if bits in (1, 2, 4):
        # one code per byte, eight per word; only its low ``bits`` bits count (-1 packs as 1 bit of 1)
        w = _padded(codes, 8, torch.uint8).view(torch.int64) & (0x0101010101010101 * ((1 << bits) - 1))
        if bits == 1:    # bytes b0..b7 of 0/1: the product's top byte is b0 | b1<<1 | ... (mod 2**64)
            lanes = (w * 0x0102040810204080) >> 56
        elif bits == 2:  # pairs, then quads, in the low byte of each 32-bit lane
            w = w | (w >> 6)
            lanes = (w | (w >> 12)).view(torch.int32)
        else:            # pairs in the low byte of each 16-bit lane
            lanes = (w | (w >> 4)).view(torch.int16)
        return out.copy_(lanes[: out.numel()])   # the low byte of each lane
    if bits < 8:         # eight codes make ``bits`` whole bytes of one 64-bit word
        groups = _padded(codes, 8, torch.int64).view(-1, 8)
        words = (groups << _arange(8, codes.device) * bits).sum(dim=1)
        return out.copy_(words.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)[: out.numel()])
    if bits > 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    plane = (codes.reshape(-1).to(torch.int64).unsqueeze(1) >> _arange(bits, codes.device)) & 1
    return pack_into(plane.reshape(-1), 1, out)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a uint8 tensor of ceil(n*bits/8) bytes."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    codes = codes.reshape(-1)
    out = torch.empty(packed_nbytes(codes.numel(), bits), dtype=torch.uint8, device=codes.device)
    for lo, hi in slices(codes.numel(), codes.device):
        pack_into(codes[lo:hi], bits, out[lo * bits // 8: packed_nbytes(hi, bits)])
    return out


def _spread(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Every byte of ``data`` as its 8/bits codes, one per byte (widths 1, 2 and 4)."""
    if bits == 1:     # the byte in all 8 lanes, lane j keeps bit j, then 1 where it is set
        w = data.to(torch.int64) * 0x0101010101010101
        w &= -0x7FBFDFEFF7FBFDFF              # 0x8040201008040201
        w += 0x7F7F7F7F7F7F7F7F
        w >>= 7
        w &= 0x0101010101010101
        return w.view(torch.uint8)
    if bits == 2:
        w = data.to(torch.int32)
        w = w | (w << 6) | (w << 12) | (w << 18)
        return (w & 0x03030303).view(torch.uint8)
    w = data.to(torch.int16)
    return ((w | (w << 4)) & 0x0F0F).view(torch.uint8)


def unpack_codes(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of packed bytes: uint8 for widths up to 8, int64 above."""
    data = data.reshape(-1)
    if data.numel() != packed_nbytes(count, bits):
        raise ValueError(f"packed buffer has {data.numel()} bytes, {packed_nbytes(count, bits)} expected "
                         f"for {count} codes of {bits} bits")
    device = data.device
    if count == 0:
        return torch.empty(0, dtype=torch.uint8 if bits <= 8 else torch.int64, device=device)
    if bits == 8:
        return data.clone()
    if bits in (16, 32):
        words = as_words(data, torch.int16 if bits == 16 else torch.int32).to(torch.int64)
        return words & ((1 << bits) - 1)
    if bits in (1, 2, 4):
        return _spread(data, bits)[:count]
    if bits < 8:         # each 8 codes are ``bits`` bytes: widen them to a 64-bit word
        groups = math.ceil(count / 8)
        words = torch.zeros(groups, 8, dtype=torch.uint8, device=device)
        words[:, :bits] = _padded(data, groups * bits, torch.uint8).view(groups, bits)
        codes = (words.view(torch.int64) >> _arange(8, device) * bits) & ((1 << bits) - 1)
        return codes.reshape(-1)[:count].to(torch.uint8)
    if bits > 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    plane = _spread(data, 1)[: count * bits].view(count, bits).to(torch.int64)
    return (plane << _arange(bits, device)).sum(dim=1)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as int64."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    return unpack_codes(data, bits, count).to(torch.int64)


def byte_table(values: torch.Tensor, bits: int) -> torch.Tensor:
    """For widths 1, 2, 4, 8: row ``b`` holds ``values[code]`` of the 8/bits codes packed in byte ``b``."""
    per = 8 // bits
    codes = (torch.arange(256, device=values.device).unsqueeze(1) >> torch.arange(per, device=values.device) * bits)
    return values[codes & ((1 << bits) - 1)]


def lookup(data: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` ← the values of every code packed in the bytes ``data``, through :func:`byte_table`'s
    ``table`` (``out`` holds ``data.numel() * table.shape[1]`` elements)."""
    return torch.index_select(table, 0, data.reshape(-1).to(torch.int32), out=out.view(-1, table.shape[1]))


# ------------------------------------------------------------------------------ randomness

def uniform_lanes(generator: torch.Generator, count: int, device: torch.device) -> torch.Tensor:
    """``count`` uniform int32 lanes: the two halves of full-range 64-bit draws of ``generator`` (one
    draw per two elements instead of one per element, as ``torch.rand`` would take)."""
    words = torch.empty((count + 1) // 2, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
    return words.view(torch.int32)[:count]


def stochastic_round_(x: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
    """In place, ``x ← ⌊x⌋ + [u < x − ⌊x⌋]`` with ``u = (lane + 2³¹)/2³²`` (float32 ``x``, int32 lanes):
    unbiased stochastic rounding, exact on integers; the fraction is compared at float32 precision."""
    low = torch.floor(x)
    x.sub_(low).sub_(0.5).mul_(2.0**32)   # u < frac  ⟺  lane < (frac − ½)·2³²
    return x.gt_(lanes.view_as(x)).add_(low)


def scale_rows_(values: torch.Tensor, factors: torch.Tensor, bucket: int) -> torch.Tensor:
    """In place, ``values[i] *= factors[i // bucket]`` for a flat tensor (the last bucket may be short)."""
    return _rows_(values, factors, bucket, torch.Tensor.mul_)


def add_rows_(values: torch.Tensor, terms: torch.Tensor, bucket: int) -> torch.Tensor:
    """In place, ``values[i] += terms[i // bucket]``."""
    return _rows_(values, terms, bucket, torch.Tensor.add_)


def _rows_(values: torch.Tensor, per_row: torch.Tensor, bucket: int, op) -> torch.Tensor:
    full = values.numel() // bucket
    if full:
        op(values[: full * bucket].view(full, bucket), per_row[:full].unsqueeze(1))
    if values.numel() > full * bucket:
        op(values[full * bucket:], per_row[full])
    return values


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
