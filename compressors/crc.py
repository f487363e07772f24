"""CRC-32 (zlib's polynomial, the packets' checksum) computed with tensor operations on the data's device.

``zlib.crc32`` needs the bytes in host memory; a frame built on a GPU would have to be copied to the host
just to be checksummed. CRC-32 is linear over GF(2), which lets the work run in parallel:

* the message is cut into blocks of :data:`BLOCK` bytes; the checksum of each block (from a zero
  register) is the XOR of one table entry per byte, ``T[p][b]`` = the contribution of byte value ``b``
  at position ``p`` — a gather and a few XOR halvings over all blocks at once;
* neighbouring block checksums are merged pairwise, ``crc(L‖R) = Z^|R|(crc(L)) ⊕ crc(R)``, where
  ``Z^n`` (the register advanced over ``n`` zero bytes) is a 32×32 bit matrix applied as four 256-entry
  byte tables — log₂(blocks) levels;
* zero bytes in front of a message leave a zero register unchanged, so rows of a batch share one
  padded length; zlib's initial and final XOR with 0xFFFFFFFF are a host constant for the true length.

Only host constants (the tables, built once per device) move host→device; nothing moves back. The
result is an int64 tensor on the data's device, equal to ``zlib.crc32`` (tested against it).
"""

from __future__ import annotations

import functools
import threading
import zlib

import numpy as np
import torch

from compressors.staging import to_device

#: Bytes per first-level block.
BLOCK = 16
_POLY = 0xEDB88320
_ALL = 0xFFFFFFFF
#: ``zlib.crc32(m + crc32(m) as 4 little-endian bytes)`` for every message ``m``: an intact packet
#: (body and its own checksum) always checks to this value.
RESIDUE = 0x2144DF1C


def _byte_table() -> np.ndarray:
    c = np.arange(256, dtype=np.uint64)
    for _ in range(8):
        c = np.where(c & 1, (c >> np.uint64(1)) ^ np.uint64(_POLY), c >> np.uint64(1))
    return c


_TABLE = _byte_table()
_BITS = np.arange(32, dtype=np.uint64)


def _zero_byte(s: np.ndarray) -> np.ndarray:
    """The register after one zero byte: Z(s)."""
    return _TABLE[(s & np.uint64(0xFF)).astype(np.int64)] ^ (s >> np.uint64(8))


def _apply(cols: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The linear map whose image of bit i is ``cols[i]``, applied to each of ``values``."""
    bits = (values[..., None] >> _BITS) & np.uint64(1)
    return np.bitwise_xor.reduce(np.where(bits == 1, cols, np.uint64(0)), axis=-1)


_POWERS: list[np.ndarray] = [_zero_byte(np.uint64(1) << _BITS)]  # _POWERS[j]: columns of Z^(2^j)
_POWERS_LOCK = threading.Lock()


def _power(j: int) -> np.ndarray:
    if len(_POWERS) <= j:
        with _POWERS_LOCK:  # workers may share a process (threads): two appends of one square corrupt the list
            while len(_POWERS) <= j:
                _POWERS.append(_apply(_POWERS[-1], _POWERS[-1]))
    return _POWERS[j]


@functools.lru_cache(maxsize=4096)
def shift(value: int, nbytes: int) -> int:
    """Z^nbytes(value): a register advanced over ``nbytes`` zero bytes (host arithmetic)."""
    v = np.array([value], dtype=np.uint64)
    j = 0
    while nbytes:
        if nbytes & 1:
            v = _apply(_power(j), v)
        nbytes >>= 1
        j += 1
    return int(v[0])


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """``zlib.crc32(a + b)`` from the checksums of ``a`` and ``b`` and the length of ``b``."""
    return shift(crc_a, len_b) ^ crc_b


@functools.lru_cache(maxsize=256)
def frame_crc(lengths: tuple[int, ...]) -> int:
    """``zlib.crc32`` of intact packets of these lengths laid end to end (each checks to RESIDUE). Cached:
    a frame's packet lengths repeat from step to step."""
    crc = zlib.crc32(b"")
    for n in lengths:
        crc = combine(crc, RESIDUE, n)
    return crc


_DEVICE_TABLES: dict[tuple[str, int], torch.Tensor] = {}


def _block_table(device: torch.device) -> torch.Tensor:
    """(BLOCK · 256,) int64: entry 256p + b is byte b's checksum contribution at position p of a block."""
    key = (str(device), -1)
    if key not in _DEVICE_TABLES:
        rows = [_TABLE]
        for _ in range(BLOCK - 1):
            rows.append(_zero_byte(rows[-1]))
        table = np.stack(rows[::-1]).astype(np.int64).reshape(-1)
        _DEVICE_TABLES[key] = to_device(table, torch.int64, device)
    return _DEVICE_TABLES[key]


def _shift_table(level: int, device: torch.device) -> torch.Tensor:
    """(4 · 256,) int64: Z^(BLOCK · 2^level) as byte tables (entry 256k + b: the image of b << 8k)."""
    key = (str(device), level)
    if key not in _DEVICE_TABLES:
        cols = _power(level + BLOCK.bit_length() - 1)
        values = np.arange(256, dtype=np.uint64)[None, :] << (np.uint64(8) * np.arange(4, dtype=np.uint64)[:, None])
        _DEVICE_TABLES[key] = to_device(_apply(cols, values).astype(np.int64).reshape(-1),
                                        torch.int64, device)
    return _DEVICE_TABLES[key]


def _offsets(device: torch.device) -> torch.Tensor:
    key = (str(device), -2)
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = torch.arange(0, 256 * BLOCK, 256, dtype=torch.int64, device=device)
    return _DEVICE_TABLES[key]


def crc32(rows: torch.Tensor, chunk_blocks: int = 1 << 16) -> torch.Tensor:
    """``zlib.crc32`` of every row of a uint8 tensor (``(..., n)``; a 1-D tensor is one message), as an
    int64 tensor of the leading shape on the rows' device. ``chunk_blocks`` bounds the scratch memory."""
    if rows.dtype != torch.uint8:
        raise TypeError(f"crc32 reads uint8 bytes, got {rows.dtype}")
    lead, n = rows.shape[:-1], rows.shape[-1]
    device = rows.device
    flat = rows.reshape(-1, n) if n else torch.zeros(rows.shape[:-1].numel(), 0, dtype=torch.uint8, device=device)
    blocks = max(1, -(-n // BLOCK))
    while blocks & (blocks - 1):  # a power of two, so every merge level pairs all blocks
        blocks += blocks & -blocks
    pad = blocks * BLOCK - n
    if pad:
        flat = torch.cat([torch.zeros(flat.shape[0], pad, dtype=torch.uint8, device=device), flat], dim=1)
    flat = flat.reshape(flat.shape[0], blocks, BLOCK)
    table, offsets = _block_table(device), _offsets(device)
    sums = torch.empty(flat.shape[0], blocks, dtype=torch.int64, device=device)
    for lo in range(0, blocks, chunk_blocks):
        part = torch.take(table, flat[:, lo:lo + chunk_blocks].to(torch.int64) + offsets)
        width = BLOCK
        while width > 1:
            width //= 2
            part = part[..., :width] ^ part[..., width:]
        sums[:, lo:lo + chunk_blocks] = part[..., 0]
    level = 0
    while sums.shape[1] > 1:
        left, right = sums[:, 0::2], sums[:, 1::2]
        s = _shift_table(level, device)
        moved = (torch.take(s, left & 0xFF) ^ torch.take(s, ((left >> 8) & 0xFF) + 256)
                 ^ torch.take(s, ((left >> 16) & 0xFF) + 512) ^ torch.take(s, (left >> 24) + 768))
        sums = moved ^ right
        level += 1
    # zlib starts the register at 0xFFFFFFFF and inverts the result: both are constants for length n
    return (sums[:, 0] ^ (shift(_ALL, n) ^ _ALL)).reshape(lead)


def to_le_bytes(crc: torch.Tensor) -> torch.Tensor:
    """An int64 checksum tensor (``(...)``) as its 4 little-endian bytes (``(..., 4)`` uint8), on device."""
    key = (str(crc.device), -3)
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = to_device([0, 8, 16, 24], torch.int64, crc.device)
    return ((crc.unsqueeze(-1) >> _DEVICE_TABLES[key]) & 0xFF).to(torch.uint8)
