"""Elias γ and δ codes for streams of positive integers (Elias, IEEE Trans. Inf. Theory, 1975).

γ(n) = ⌊log2 n⌋ zeros, then n in binary (MSB first): 2⌊log2 n⌋ + 1 bits.
δ(n) = γ(⌊log2 n⌋ + 1), then the ⌊log2 n⌋ bits of n below its leading one:
⌊log2 n⌋ + 2⌊log2(⌊log2 n⌋ + 1)⌋ + 1 bits. γ is never longer up to n = 31, δ is shorter from
n = 32 on; :func:`encode_ints` picks the shorter for a whole stream from the exact lengths.

A stream is the codes back to back, packed LSB-first into bytes by :func:`compressors.bits.pack_bits`,
zero-padded to a whole byte. The decoder is told how many codes to read.

Cost. Encoding writes every bit with one scatter: O(total bits) work, a few kernels, one host sync
(the stream length). Decoding has to find where each code starts, which depends on every code before
it; instead of a Python loop over codes it computes, for *every* bit position p, where a code starting
at p would end (``jump[p]``), then follows the chain from 0 by binary lifting (pointer doubling):
O((bits + codes)·log2 codes) work in ⌈log2 codes⌉ rounds of gathers, O(bits) memory, a few host
syncs for validation. Values must lie in 1..2**62 − 1.
"""

from __future__ import annotations

import enum
import math

import torch

from compressors.bits import pack_bits, unpack_bits
from compressors.packet import PacketError

MAX_VALUE = (1 << 62) - 1
#: δ codes of values ≤ MAX_VALUE have at most this many leading zeros (⌊log2 62⌋).
_DELTA_MAX_ZEROS = 5


class IntCode(enum.IntEnum):
    """Which Elias code a stream uses; the value goes on the wire."""

    GAMMA = 0
    DELTA = 1


def floor_log2(values: torch.Tensor) -> torch.Tensor:
    """⌊log2 n⌋ for int64 n in 1..2**62 − 1, exact: the float64 exponent, less one where the
    conversion rounded n (> 2**53) up to the next power of two."""
    v = values.to(torch.int64)
    f = torch.frexp(v.to(torch.float64)).exponent.to(torch.int64) - 1
    return torch.where((torch.ones_like(v) << f) > v, f - 1, f)


def gamma_lengths(values: torch.Tensor) -> torch.Tensor:
    """Bits of γ(n) per value: 2⌊log2 n⌋ + 1."""
    return 2 * floor_log2(values) + 1


def delta_lengths(values: torch.Tensor) -> torch.Tensor:
    """Bits of δ(n) per value: ⌊log2 n⌋ + 2⌊log2(⌊log2 n⌋ + 1)⌋ + 1."""
    low = floor_log2(values)
    return low + 2 * floor_log2(low + 1) + 1


def _check_values(values: torch.Tensor) -> torch.Tensor:
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and bool(((v < 1) | (v > MAX_VALUE)).any()):
        raise ValueError(f"Elias codes take integers in 1..{MAX_VALUE}; got min {int(v.min())}, max {int(v.max())}")
    return v


def _spans(width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For variable-width fields: the field each bit belongs to, and the bit's rank inside it."""
    total = int(width.sum())
    owner = torch.repeat_interleave(torch.arange(width.numel(), device=width.device), width, output_size=total)
    first = torch.cumsum(width, 0) - width
    return owner, torch.arange(total, device=width.device) - first.index_select(0, owner)


def _write(bits: torch.Tensor, pos: torch.Tensor, value: torch.Tensor, width: torch.Tensor) -> None:
    """Write the low ``width`` bits of each value, MSB first, at ``pos`` of a 0/1 uint8 tensor."""
    owner, j = _spans(width)
    shift = width.index_select(0, owner) - 1 - j
    at = pos.index_select(0, owner) + j
    bits.index_copy_(0, at, ((value.index_select(0, owner) >> shift) & 1).to(torch.uint8))


def _read(bits: torch.Tensor, pos: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Read ``width`` bits MSB first at ``pos`` (the inverse of :func:`_write`), as int64."""
    owner, j = _spans(width)
    shift = width.index_select(0, owner) - 1 - j
    got = bits.index_select(0, pos.index_select(0, owner) + j)
    out = torch.zeros(pos.numel(), dtype=torch.int64, device=bits.device)
    return out.index_add_(0, owner, got << shift)


def encode_gamma(values: torch.Tensor) -> torch.Tensor:
    """γ-code a stream of positive integers; returns the packed bytes (uint8)."""
    v = _check_values(values)
    return _encode_gamma(v, floor_log2(v))


def encode_delta(values: torch.Tensor) -> torch.Tensor:
    """δ-code a stream of positive integers; returns the packed bytes (uint8)."""
    v = _check_values(values)
    return _encode_delta(v, floor_log2(v))


def _encode_gamma(v: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    length = 2 * low + 1
    start = torch.cumsum(length, 0) - length
    bits = torch.zeros(int(length.sum()), dtype=torch.uint8, device=v.device)
    _write(bits, start + low, v, low + 1)
    return pack_bits(bits, 1)


def _encode_delta(v: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    zeros = floor_log2(low + 1)
    length = low + 2 * zeros + 1
    start = torch.cumsum(length, 0) - length
    bits = torch.zeros(int(length.sum()), dtype=torch.uint8, device=v.device)
    # γ(⌊log2 n⌋ + 1) then the low bits of n, as one batch of fields
    pos = torch.cat([start + zeros, start + 2 * zeros + 1])
    _write(bits, pos, torch.cat([low + 1, v]), torch.cat([zeros + 1, low]))
    return pack_bits(bits, 1)


def _stream_bits(data: torch.Tensor, count: int, what: str) -> torch.Tensor:
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise PacketError(f"{what}: an Elias stream is a flat uint8 field, "
                          f"got {data.dtype} of shape {tuple(data.shape)}")
    if count < 0:
        raise PacketError(f"{what}: negative code count {count}")
    if count == 0 and data.numel():
        raise PacketError(f"{what}: {data.numel()} bytes for an empty stream")
    return unpack_bits(data, 1, 8 * data.numel())


def _next_one(bits: torch.Tensor) -> torch.Tensor:
    """For each position, the position of the first 1 at or after it (``len(bits)`` if none)."""
    n = bits.numel()
    pos = torch.arange(n, device=bits.device)
    cand = torch.where(bits.bool(), pos, torch.full_like(pos, n))
    return cand.flip(0).cummin(0).values.flip(0)


def _chain(jump: torch.Tensor, count: int, nbits: int, what: str) -> tuple[torch.Tensor, int]:
    """Start positions of the first ``count`` codes, 0, jump[0], jump[jump[0]], ... (binary lifting),
    and the bit position where the last one ends.

    ``jump`` has ``nbits + 2`` entries: a code starting at p ends at jump[p] ≤ nbits, or jump[p] is
    ``nbits + 1`` when no code can start at p; ``nbits`` and ``nbits + 1`` are sinks.
    """
    pos = torch.zeros(1, dtype=torch.int64, device=jump.device)
    table = jump  # jump applied 2**k times; pos holds the starts of codes 0 .. 2**k − 1
    while pos.numel() < count:
        pos = torch.cat([pos, table.index_select(0, pos)])
        if pos.numel() < count:
            table = table.index_select(0, table)
    pos = pos[:count]
    last = int(pos[-1])
    end = int(jump[last]) if last < nbits else nbits + 1
    if end > nbits:
        raise PacketError(f"{what}: the stream holds fewer than the {count} codes the packet announces")
    if math.ceil(end / 8) * 8 != nbits:
        raise PacketError(f"{what}: {nbits // 8} bytes for {end} bits of codes")
    return pos, end


def _jump_table(start_ok: torch.Tensor, length: torch.Tensor, nbits: int) -> torch.Tensor:
    pos = torch.arange(nbits, device=length.device)
    end = pos + length
    bad = ~start_ok | (end > nbits)
    jump = torch.where(bad, torch.full_like(end, nbits + 1), end)
    sinks = torch.tensor([nbits + 1, nbits + 1], dtype=torch.int64, device=length.device)
    return torch.cat([jump, sinks])


def _check_padding(bits: torch.Tensor, end: int, what: str) -> None:
    if bool(bits[end:].any()):
        raise PacketError(f"{what}: nonzero padding after the last code")


def decode_gamma(data: torch.Tensor, count: int, what: str = "gamma stream") -> torch.Tensor:
    """Read ``count`` γ codes from packed bytes; the inverse of :func:`encode_gamma` (int64)."""
    bits = _stream_bits(data, count, what)
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=data.device)
    nbits = bits.numel()
    zeros = _next_one(bits) - torch.arange(nbits, device=bits.device)
    jump = _jump_table(zeros <= 61, 2 * zeros + 1, nbits)
    pos, end = _chain(jump, count, nbits, what)
    _check_padding(bits, end, what)
    low = zeros.index_select(0, pos)
    return _read(bits, pos + low, low + 1)


def decode_delta(data: torch.Tensor, count: int, what: str = "delta stream") -> torch.Tensor:
    """Read ``count`` δ codes from packed bytes; the inverse of :func:`encode_delta` (int64)."""
    bits = _stream_bits(data, count, what)
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=data.device)
    nbits = bits.numel()
    device = bits.device
    zeros = _next_one(bits) - torch.arange(nbits, device=device)
    # The γ-coded length ⌊log2 n⌋+1 at every position p: its zeros+1 bits start at p + zeros, and
    # span at most _DELTA_MAX_ZEROS + 1 bits, so read a fixed window there and shift off the excess.
    win = _DELTA_MAX_ZEROS + 1
    padded = torch.cat([bits, bits.new_zeros(2 * win)])
    window = torch.zeros(nbits, dtype=torch.int64, device=device)
    at = torch.arange(nbits, device=device) + zeros.clamp(max=win)
    for j in range(win):  # a fixed window of 6 bits, not a loop over data
        window = window | (padded.index_select(0, at + j) << (win - 1 - j))
    ok = zeros <= _DELTA_MAX_ZEROS
    low = (window >> (win - 1 - zeros.clamp(max=win - 1))) - 1
    ok &= low <= 61
    jump = _jump_table(ok, 2 * zeros + 1 + low.clamp(min=0), nbits)
    pos, end = _chain(jump, count, nbits, what)
    _check_padding(bits, end, what)
    low_at, zeros_at = low.index_select(0, pos), zeros.index_select(0, pos)
    rest = _read(bits, pos + 2 * zeros_at + 1, low_at)
    return (torch.ones_like(low_at) << low_at) | rest


def encode_ints(values: torch.Tensor) -> tuple[IntCode, torch.Tensor]:
    """The shorter of the γ and δ streams of ``values`` (exact lengths; γ on ties) and its bytes."""
    v = _check_values(values)
    low = floor_log2(v)
    gamma_minus_delta = int((low - 2 * floor_log2(low + 1)).sum())
    if gamma_minus_delta > 0:
        return IntCode.DELTA, _encode_delta(v, low)
    return IntCode.GAMMA, _encode_gamma(v, low)


def decode_ints(code: int, data: torch.Tensor, count: int, what: str = "Elias stream") -> torch.Tensor:
    """Inverse of :func:`encode_ints` given the code flag read from the packet."""
    if code == IntCode.GAMMA:
        return decode_gamma(data, count, what)
    if code == IntCode.DELTA:
        return decode_delta(data, count, what)
    raise PacketError(f"{what}: unknown Elias code flag {code}; allowed: {[c.value for c in IntCode]}")
