"""RC-FED (Hamidi & Bereyhi, ICASSP 2025, arXiv 2409.06319): rate-constrained ECSQ + entropy coding.

Per tensor: ``z = (u − μ)/σ``; ``i_j = bucketize(z_j, t)`` with the ECSQ of N(0,1) designed at a
rate (:mod:`compressors.ecsq`); the indices are rANS-coded (:mod:`compressors.rans`) with the static
model of the design probabilities at 16-bit precision, so no code table is sent. The receiver rebuilds the
same design from its rate and returns ``û_j = μ + σ·q_{i_j}``. Deterministic and biased;
values beyond the outermost thresholds are clipped to the outermost levels by construction.

Rate matching: ``rate`` constrains the *coded* length of the index stream, in bits per coordinate.
On N(0,1) data the design at ``rate`` codes to ``rate`` (its entropy). Real gradients are heavier
tailed, so the encoder measures the coded length ``Σ_i n_i·(−log2 p_i)`` of the actual cell counts
(plus the coder's 64-bit final states) and, if it misses ``rate·numel`` by more than 0.5%, moves the
*design* rate until the coded length matches: secant steps on the grid ``rate·k/128``, ``k`` in
64..256 (half to twice ``rate``, 0.78% apart, so at most 193 designs per rate, each made once per
process in milliseconds), at most 8 designs per tensor. ``k`` is sent (2 bytes). ``adapt=False``
always uses the design at ``rate``.

Encoder and decoder rebuild the design from ``(rate, k)``; the model probabilities are rounded to
float32 first, so a last-ulp difference in the float64 design maths between two machines almost
never changes the coder's fixed-point model.

Wire: fields ``(μ σ: fp32[2], design code: int16[1], rANS words: uint8[2·w])``; the symbol count is
``packet.numel``. Bucketing and the histogram run on the tensor's device; the indices are moved to
the CPU for entropy coding (a compiled CPU loop) and the decoded indices back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import ClassVar

import numpy as np
import torch

from compressors import ecsq, rans
from compressors.base import Codec, Kind, TensorInfo, register
from compressors.bits import slices
from compressors.infotheory import ScalarQuantizer
from compressors.jit import compiled
from compressors.packet import Packet, PacketError
from compressors.staging import host_kernels

MIN_RATE, MAX_RATE = 0.05, 4.0
#: the design rate is ``rate·k/GRID`` for a code ``k`` in ``CODES`` (half to twice the target)
GRID = 128
CODES = (GRID // 2, 2 * GRID)
_ADAPT_TOL = 0.005       # relative miss of the coded rate that triggers adaptation
_ADAPT_DESIGNS = 8       # designs tried at most per tensor
_CODER_OVERHEAD = rans.OVERHEAD_BITS + 8  # bits the stream adds to Σ ℓ on average (final states, whole words)
_CODER_EXCESS = 0.0017   # and relatively: rANS with 2**16 states and a 2**16 model codes ~0.17% above Σ ℓ


@dataclass(frozen=True, eq=False)
class _Design:
    """One ECSQ design with its entropy model, ready for coding."""

    quantizer: ScalarQuantizer
    model: rans.Model       # the coder's integer model of the cell probabilities

    def quantize(self, u: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> float:
        """Cell indices of ``z = (u − μ)/σ`` into the integer tensor ``out``; returns their coded length in bits
        under this design's model. On the CPU one compiled pass (the same float32 ``z``, the same
        cells as :meth:`ScalarQuantizer.quantize`); elsewhere tensor operations on the device."""
        if host_kernels(u.device) and self.quantizer.size > 1:
            counts = np.zeros(self.quantizer.size, dtype=np.int64)
            _quantize_count(u.to(torch.float32).contiguous().numpy(), np.float32(mu), np.float32(sigma),
                            *self._cpu_grid, out.numpy(), counts)
            return float(counts @ self.model.lengths)
        counts = torch.zeros(self.quantizer.size, dtype=torch.int64, device=u.device)
        for lo, hi in slices(u.numel(), u.device):
            index = self.quantizer.quantize((u[lo:hi].to(torch.float32) - mu).div_(sigma))
            out[lo:hi] = index
            counts += torch.bincount(index, minlength=self.quantizer.size)
        return float(counts.cpu().numpy() @ self.model.lengths)

    @cached_property
    def _cpu_grid(self) -> tuple[np.ndarray, float, float, np.ndarray, np.ndarray]:
        t = self.quantizer._tensors(torch.device("cpu"))[0].numpy()
        lo, per, base, window = self.quantizer._grid(torch.device("cpu"))
        return t, lo, per, base.numpy(), window.T.contiguous().numpy()


#: up to this many thresholds, counting the thresholds below z beats looking up its grid cell
_LINEAR_THRESHOLDS = 16
_BLOCK = 2048


@compiled
def _quantize_count(u, mu, sigma, t, lo, per, base, window, out, counts):
    """``out[i]`` = the number of thresholds ``t`` below ``z = (u[i] − μ)/σ`` (float32, as torch computes
    it), and ``counts`` += their histogram. Few thresholds: compare a block of ``z`` with each threshold
    (vectorised; the histogram follows from how many ``z`` exceed each threshold). Many: the grid cell
    of ``z`` and the thresholds in its window, as :meth:`ScalarQuantizer.quantize` does."""
    n = u.size
    if t.size <= _LINEAR_THRESHOLDS:
        z = np.empty(_BLOCK, np.float32)
        above = np.zeros(t.size, np.int64)
        for lo_i in range(0, n, _BLOCK):
            m = min(n, lo_i + _BLOCK) - lo_i
            for i in range(m):
                z[i] = (u[lo_i + i] - mu) / sigma
            index = out[lo_i:lo_i + m]
            index[:] = 0
            for j in range(t.size):
                tj = t[j]
                hits = 0
                for i in range(m):
                    b = np.int32(z[i] > tj)
                    index[i] += b
                    hits += b
                above[j] += hits
        below = n
        for j in range(t.size):
            counts[j] += below - above[j]
            below = above[j]
        counts[t.size] += below
        return
    last = np.float64(base.size - 1)
    for i in range(n):
        z1 = (u[i] - mu) / sigma
        k = int(min(max((np.float64(z1) - lo) * per, 0.0), last))
        index1 = base[k]
        for w in range(window.shape[1]):
            index1 += np.int32(z1 > window[k, w])
        out[i] = index1
    lanes = np.zeros((4, counts.size), np.int64)   # four histograms: no stall on repeated cells
    for i in range(n):
        lanes[i & 3, out[i]] += 1
    for j in range(4):
        counts += lanes[j]


@lru_cache(maxsize=4096)
def _design(rate: float, code: int) -> _Design:
    sq = ecsq.design(rate * code / GRID)     # ≥ 3 cells: the lowest design rate is MIN_RATE/2
    return _Design(sq, rans.Model.from_probs(sq.probs.astype(np.float32).astype(np.float64)))


def _moments(u: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(μ, σ) of a flat tensor as float32 (population σ) in two passes over cache-sized slices: μ from
    float64 sums, then σ² = mean (u − μ)²; and whether the tensor is constant (σ exactly 0)."""
    n = u.numel()
    if n == 0:
        return u.new_zeros(2, dtype=torch.float32), True
    spans = slices(n, u.device)
    mu = (torch.stack([u[lo:hi].sum(dtype=torch.float64) for lo, hi in spans]).sum() / n).to(torch.float32)
    second = torch.stack([torch.linalg.vector_norm(u[lo:hi].to(torch.float32) - mu).to(torch.float64).square()
                          for lo, hi in spans]).sum() / n
    stats = torch.stack([mu, second.sqrt().to(torch.float32)])
    return stats, bool(second == 0)


@register
@dataclass(frozen=True)
class RCFed(Codec):
    name: ClassVar[str] = "rcfed"
    kind: ClassVar[Kind] = Kind.GATHER
    summary: ClassVar[str] = "normalised ECSQ at a target coded rate + ANS entropy coding, biased"
    source: ClassVar[str] = "Hamidi & Bereyhi: RC-FED, ICASSP 2025"

    rate: float = 2.0
    adapt: bool = True

    def __post_init__(self) -> None:
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise ValueError(f"rate={self.rate} bits per coordinate must be in [{MIN_RATE}, {MAX_RATE}]")

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        u = x.reshape(-1)
        n = u.numel()
        stats, constant = _moments(u)
        mu_f, sigma_f = stats.tolist()
        if not (math.isfinite(mu_f) and math.isfinite(sigma_f)):
            raise ValueError(f"rcfed cannot encode tensor {info.name!r}: it holds non-finite values, or values so "
                             "large that their float32 spread overflows (|x| beyond about 1e19)")
        if constant:  # σ = 0: μ says it all
            return self._packet(n, stats, GRID, np.zeros(0, dtype=np.uint16))
        code, index = self._choose(u, stats[0], stats[1])
        words = self._code(index, _design(self.rate, code))
        return self._packet(n, stats, code, words)

    def _choose(self, u: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The design code whose coded length on ``(u − μ)/σ`` is closest to ``rate``, and its indices."""
        budget = self.rate * u.numel()
        target = max(budget - _CODER_OVERHEAD, 0.75 * budget) / (1 + _CODER_EXCESS)
        code = GRID
        index = torch.empty(u.numel(), dtype=self._index_dtype(u.device), device=u.device)
        bits = _design(self.rate, code).quantize(u, mu, sigma, index)
        if not self.adapt:
            return code, index
        best = (abs(bits - target), code, index)
        spare = torch.empty_like(index)
        prev: tuple[int, float] | None = None
        for _ in range(_ADAPT_DESIGNS - 1):
            if best[0] <= _ADAPT_TOL * target:
                break
            # secant on the code; the first step assumes the coded rate moves one-for-one
            slope = GRID / target
            if prev is not None and bits != prev[1]:
                slope = (code - prev[0]) / (bits - prev[1])
                if slope <= 0:
                    slope = GRID / target
            new = max(CODES[0], min(CODES[1], code + round((target - bits) * slope)))
            if new == code or (prev is not None and new == prev[0]):
                break
            prev = (code, bits)
            code = new
            bits = _design(self.rate, code).quantize(u, mu, sigma, spare)
            if abs(bits - target) < best[0]:
                spare, best = best[2], (abs(bits - target), code, spare)
        return best[1], best[2]

    def _index_dtype(self, device: torch.device) -> torch.dtype:
        """Cell indices on the CPU take the narrowest type every design of this rate fits (less memory to
        fault in and to read back); on other devices int32, what the tensor quantiser returns."""
        if not host_kernels(device):
            return torch.int32
        return torch.uint8 if _design(self.rate, CODES[1]).quantizer.size <= 256 else torch.int16

    @staticmethod
    def _code(index: torch.Tensor, design: _Design) -> np.ndarray:
        return rans.encode(index.cpu().reshape(-1).numpy(), design.model)

    def _packet(self, n: int, stats: torch.Tensor, code: int, words: np.ndarray) -> Packet:
        device = stats.device
        stream = torch.from_numpy(words.astype("<u2").view(np.uint8)).to(device)
        design = torch.tensor([code], dtype=torch.int16, device=device)
        return Packet(self.name, n, (stats.to(torch.float32), design, stream))

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        stats, design_code, stream = self.check(packet, info, 3)
        n = packet.numel
        if stats.numel() != 2 or design_code.numel() != 1 or stream.dtype != torch.uint8:
            raise PacketError(f"rcfed packet fields have the wrong layout: stats {stats.numel()} values "
                              f"(2 expected), design {design_code.numel()} (1 expected), stream {stream.dtype}")
        code = int(design_code.reshape(()).item())
        if not CODES[0] <= code <= CODES[1]:
            raise PacketError(f"rcfed packet names design code {code}; allowed {CODES[0]}..{CODES[1]}")
        mu, sigma = stats.to(torch.float32).reshape(2)
        design = _design(self.rate, code)
        if stream.numel() == 0:  # a constant tensor
            if float(sigma) != 0.0:
                raise PacketError(f"rcfed packet for {n} elements with σ={float(sigma)} has an empty stream")
            return mu.expand(n).clone()
        if stream.numel() % 2:
            raise PacketError(f"rcfed stream of {stream.numel()} bytes is not a whole number of 16-bit words")
        words = stream.cpu().numpy().view("<u2")
        try:
            values = mu.cpu() + sigma.cpu() * design.quantizer.reconstruct(torch.arange(design.quantizer.size))
            out = rans.decode(words, design.model, n, values.numpy())   # μ + σ·q_i, looked up as decoded
        except rans.StreamError as err:
            raise PacketError(f"rcfed stream of {n} symbols cannot be decoded: {err}") from err
        return torch.from_numpy(out).to(stats.device)
