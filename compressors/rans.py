"""Static-model rANS entropy coding of small-alphabet symbol streams (Duda, arXiv 1311.2540, 2013;
interleaving after Giesen, arXiv 1402.3392, 2014).

The model (:class:`Model`) is an integer frequency table summing to ``2**PRECISION``; encoder and
decoder must build it from the same probabilities with :meth:`Model.from_probs`. Two interleaved 32-bit states (symbol ``i``
uses state ``i % 2``) keep the decoder's two dependency chains busy at once. Each state lives in
``[2**16, 2**32)`` and is renormalised by whole 16-bit words, at most one per symbol, so a symbol's
decode is a table lookup, a multiply-add and at most one word read.

Stream layout (little-endian uint16 words): the two final encoder states (high word first), then
the renormalisation words in decoding order. The encoder starts both states at ``2**16``, so a
decoder that has read every word must end at that state again: the check that rejects streams that
were truncated, padded or corrupted (a corrupted word escapes it with probability about ``2**-32``).

Cost: one compiled pass in each direction (:mod:`compressors.jit`), about 3–5 ns per symbol on one
core. Ideal code length of symbol ``s``: ``PRECISION − log2 f_s`` bits, plus
64 bits for the final states and at most 16 bits of word rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressors.jit import compiled

PRECISION = 16
TOTAL = 1 << PRECISION
_LOW = 1 << 16          # lower end of a normalised state; states are < 2**32
#: bits a stream adds to the ideal code length Σ −log2(f/TOTAL): the two final 32-bit states
OVERHEAD_BITS = 64


class StreamError(ValueError):
    """A rANS stream is not one this model's encoder could have written."""


def frequencies(probs: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to ``TOTAL``, each ≥ 1, close to ``probs·TOTAL`` (a deterministic
    function of ``probs``: the rounding error goes to the most probable symbol)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or not 1 <= p.size <= TOTAL // 2 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"a rANS model needs 1..{TOTAL // 2} finite non-negative probabilities with a positive sum")
    f = np.maximum(1, np.floor(p / p.sum() * TOTAL + 0.5)).astype(np.int64)
    f[int(np.argmax(f))] += TOTAL - int(f.sum())
    if f.min() < 1:   # only possible when many symbols were raised to 1 at once
        raise ValueError(f"{p.size} symbols cannot all be coded at {PRECISION}-bit precision")
    return f.astype(np.uint32)


@dataclass(frozen=True, eq=False)
class Model:
    """A static model ready for coding: the frequencies, their running sums and the slot → symbol table."""

    freq: np.ndarray        # uint32, sums to TOTAL
    cum: np.ndarray         # uint32, the frequencies of the symbols before each
    table: np.ndarray       # the symbol of each of the TOTAL slots
    lengths: np.ndarray     # ideal code length in bits of each symbol: PRECISION − log2 f

    @classmethod
    def from_probs(cls, probs: np.ndarray) -> "Model":
        freq = frequencies(probs)
        cum = np.concatenate([[0], np.cumsum(freq[:-1])]).astype(np.uint32)
        table = np.repeat(np.arange(freq.size, dtype=np.uint8 if freq.size <= 256 else np.uint16), freq)
        return cls(freq, cum, table, PRECISION - np.log2(freq.astype(np.float64)))

    @property
    def size(self) -> int:
        return self.freq.size


def encode(symbols: np.ndarray, model: Model) -> np.ndarray:
    """Code ``symbols`` (integers in ``0..model.size−1``); returns the uint16 words."""
    symbols = np.ascontiguousarray(symbols)
    if symbols.dtype not in (np.uint8, np.int16, np.int32, np.int64):
        symbols = symbols.astype(np.int32)
    out = np.empty(symbols.size + 4, dtype=np.uint16)
    start = _encode(symbols, model.freq, model.cum, out)
    if start < 0:
        raise ValueError(f"symbol {symbols.reshape(-1)[-start - 1]} is outside the model's {model.size} symbols")
    return out[start:]


def decode(words: np.ndarray, model: Model, count: int, values: np.ndarray | None = None) -> np.ndarray:
    """Read ``count`` symbols from ``words`` (uint16); raises :class:`StreamError` unless the stream
    is exactly what :func:`encode` writes for some ``count`` symbols under ``model``. Returns the
    symbols (int32), or ``values[symbol]`` for each when a lookup table ``values`` is given."""
    words = np.ascontiguousarray(words, dtype=np.uint16)
    if words.size < 4:
        raise StreamError(f"a rANS stream holds at least 4 words (its two states); got {words.size}")
    if values is None:
        values = np.arange(model.size, dtype=np.int32)
    elif values.shape != (model.size,):
        raise ValueError(f"a lookup table for {model.size} symbols has shape {values.shape}")
    out = np.empty(count, dtype=values.dtype)
    status = _decode(words, model.freq, model.cum, model.table, values, out)
    if status == 1:
        raise StreamError(f"the stream's {words.size} words end before {count} symbols are read")
    if status == 2:
        raise StreamError("the stream does not end where its encoder started (corrupted or holds other data)")
    if status == 3:
        raise StreamError("the stream's initial states are out of range")
    return out


@compiled
def _encode(symbols, freq, cum, out):
    """Writes the stream backwards from the end of ``out``; returns where it starts, or ``−(i + 1)``
    for the first symbol ``i`` outside the model. Symbol ``i`` uses state ``i % 2``; the symbols are
    coded in reverse, a pair at a time, so the two states' divisions overlap."""
    nsym = freq.size
    pos = out.size
    x0 = np.uint64(_LOW)
    x1 = np.uint64(_LOW)
    shift = np.uint64(32 - PRECISION)
    i = symbols.size - 1
    if i >= 0 and i % 2 == 0:          # an odd count: the last symbol is state 0's alone
        s = symbols[i]
        if s < 0 or s >= nsym:
            return -(i + 1)
        f = np.uint64(freq[s])
        if x0 >= f << shift:
            pos -= 1
            out[pos] = np.uint16(x0 & np.uint64(0xFFFF))
            x0 >>= np.uint64(16)
        q = x0 // f
        x0 = (q << np.uint64(PRECISION)) + (x0 - q * f) + np.uint64(cum[s])
        i -= 1
    while i > 0:                        # symbols i (state 1) and i − 1 (state 0)
        s1 = symbols[i]
        s0 = symbols[i - 1]
        if s1 < 0 or s1 >= nsym:
            return -(i + 1)
        if s0 < 0 or s0 >= nsym:
            return -i
        f1 = np.uint64(freq[s1])
        f0 = np.uint64(freq[s0])
        if x1 >= f1 << shift:
            pos -= 1
            out[pos] = np.uint16(x1 & np.uint64(0xFFFF))
            x1 >>= np.uint64(16)
        q1 = x1 // f1
        x1 = (q1 << np.uint64(PRECISION)) + (x1 - q1 * f1) + np.uint64(cum[s1])
        if x0 >= f0 << shift:
            pos -= 1
            out[pos] = np.uint16(x0 & np.uint64(0xFFFF))
            x0 >>= np.uint64(16)
        q0 = x0 // f0
        x0 = (q0 << np.uint64(PRECISION)) + (x0 - q0 * f0) + np.uint64(cum[s0])
        i -= 2
    for x in (x1, x0):
        pos -= 1
        out[pos] = np.uint16(x & np.uint64(0xFFFF))
        pos -= 1
        out[pos] = np.uint16(x >> np.uint64(16))
    return pos


@compiled
def _decode(words, freq, cum, table, values, out):
    m = words.size
    x0 = (np.uint64(words[0]) << np.uint64(16)) | np.uint64(words[1])
    x1 = (np.uint64(words[2]) << np.uint64(16)) | np.uint64(words[3])
    if x0 < _LOW or x1 < _LOW:
        return 3
    pos = 4
    mask = np.uint64(TOTAL - 1)
    n = out.size
    i = 0
    while i + 1 < n:
        slot0 = x0 & mask
        slot1 = x1 & mask
        s0 = table[slot0]
        s1 = table[slot1]
        x0 = np.uint64(freq[s0]) * (x0 >> np.uint64(PRECISION)) + slot0 - np.uint64(cum[s0])
        x1 = np.uint64(freq[s1]) * (x1 >> np.uint64(PRECISION)) + slot1 - np.uint64(cum[s1])
        out[i] = values[s0]
        out[i + 1] = values[s1]
        if x0 < _LOW:
            if pos >= m:
                return 1
            x0 = (x0 << np.uint64(16)) | np.uint64(words[pos])
            pos += 1
        if x1 < _LOW:
            if pos >= m:
                return 1
            x1 = (x1 << np.uint64(16)) | np.uint64(words[pos])
            pos += 1
        i += 2
    if i < n:
        slot0 = x0 & mask
        s0 = table[slot0]
        x0 = np.uint64(freq[s0]) * (x0 >> np.uint64(PRECISION)) + slot0 - np.uint64(cum[s0])
        out[i] = values[s0]
        if x0 < _LOW:
            if pos >= m:
                return 1
            x0 = (x0 << np.uint64(16)) | np.uint64(words[pos])
            pos += 1
    if pos != m or x0 != _LOW or x1 != _LOW:
        return 2
    return 0

