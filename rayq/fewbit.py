"""Few-Bit Backward: activations whose backward keeps b-bit codes of the input instead of the input.

Novikov, Bershatsky, Gusak, Shonenkov, Dimitrov, Oseledets, "Few-Bit Backward: Quantized Gradients
of Activation Functions for Memory Footprint Reduction" (arXiv 2202.00441, 2022). The forward pass
computes y = f(x) exactly; autograd keeps only c = bucketize(x, borders) packed at b bits per
element, and the backward pass returns ∂L/∂x = ∂L/∂y ⊙ levels[c]: f′ is replaced by the
piecewise-constant q with 2^b pieces minimising ∫(f′ − q)² w dx.

* :func:`solve_dp` finds the global optimum of that problem over borders on a grid by dynamic
  programming (segment cost c(i,j) = ∫f′²w − (∫f′w)²/∫w, dp_k(j) = min_i dp_{k−1}(i) + c(i,j));
  :func:`solve_lloyd` is the alternating local method (levels = interval means, borders where f′
  meets the mean of the adjacent levels), kept as a baseline.
* The tables of the smooth activations are solved once (w ≡ 1 on [−100, 100], as the authors' shipped
  tables) and shipped as ``rayq/data/fewbit_tables.json``; ``python -m rayq.fewbit`` rewrites them.
* Piecewise-linear activations (relu, leaky_relu, hardtanh, ...) have a two-valued derivative, so
  one bit per element gives their exact gradient.
* Codes are bit-packed (8/b per byte for b = 1, 2, 4); 3-bit codes form a little-endian bit stream,
  code k in bits 3k..3k+2, ⌈3n/8⌉ bytes in all (the layout of :func:`compressors.bits.pack_bits`).
* :func:`saved_activation_bytes` measures what autograd really keeps, so the saving is measured,
  not assumed.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from compressors.bits import pack_bits, packed_nbytes, unpack_bits

__all__ = [
    "BITS", "PIECEWISE_LINEAR", "SMOOTH", "TABLES_PATH", "TABLE_GRID", "FewBitActivation", "FewBitCELU",
    "FewBitELU", "FewBitGELU", "FewBitHardshrink", "FewBitHardsigmoid", "FewBitHardswish", "FewBitHardtanh",
    "FewBitLeakyReLU", "FewBitLogSigmoid", "FewBitMish", "FewBitReLU", "FewBitReLU6", "FewBitSELU",
    "FewBitSiLU", "FewBitSigmoid", "FewBitSoftplus", "FewBitSoftshrink", "FewBitSoftsign", "FewBitTanh",
    "FewBitTanhshrink", "FewBitThreshold", "Grid", "StepFunction", "approximation_error", "derivative",
    "few_bit", "generate_tables", "gelu_mlp", "load_tables", "pack_codes", "saved_activation_bytes",
    "solve_dp", "solve_lloyd", "swap_activations", "table", "unpack_codes", "write_tables",
]

log = logging.getLogger(__name__)

#: Code widths the tables are solved for.
BITS = (1, 2, 3, 4)

#: Smooth activations with 1–4-bit tables: name → exact f (the forward pass), default parameters.
SMOOTH: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "celu": F.celu,
    "selu": F.selu,
    "softplus": F.softplus,
    "mish": F.mish,
    "softsign": F.softsign,
    "logsigmoid": F.logsigmoid,
    "tanhshrink": F.tanhshrink,
    "hardswish": F.hardswish,
}

#: Piecewise-linear activations whose exact gradient needs one bit per element.
PIECEWISE_LINEAR = ("relu", "leaky_relu", "hardtanh", "relu6", "hardsigmoid", "threshold", "hardshrink",
                    "softshrink")


# --------------------------------------------------------------------------------------------------
# Optimal piecewise-constant approximation of f′


def derivative(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """f′ by autograd of ``fn`` itself (float64), so the tables follow exactly the function torch runs."""

    def fprime(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().to(torch.float64).requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(x).sum(), x)
        return grad

    return fprime


def _function(fn: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(fn):
        return fn
    if fn not in SMOOTH:
        raise ValueError(f"activation {fn!r} has no derivative table; choose one of: {', '.join(SMOOTH)}")
    return SMOOTH[fn]


def _check_bits(bits: int, owner: str) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r} is invalid for {owner}; choose one of {', '.join(map(str, BITS))}")
    return int(bits)


@dataclass(frozen=True)
class Grid:
    """Where borders may lie and where the error is integrated.

    ``cells`` uniform cells on [lo, hi]; with ``reach`` set, ``tail_cells`` uniform cells on each of
    [−reach, lo] and [hi, reach] extend the domain (tails matter for the outer levels, rarely for the
    borders). Every cell is integrated by ``nodes``-point Gauss–Legendre quadrature.
    """

    lo: float = -8.0
    hi: float = 8.0
    cells: int = 1024
    reach: float | None = None
    tail_cells: int = 0
    nodes: int = 8

    def __post_init__(self) -> None:
        if not self.lo < self.hi:
            raise ValueError(f"Grid lo={self.lo} must be below hi={self.hi}")
        if self.cells < 1 or self.nodes < 1:
            raise ValueError(f"Grid cells={self.cells} and nodes={self.nodes} must both be >= 1")
        if self.reach is not None and not (self.reach > self.hi and -self.reach < self.lo and self.tail_cells >= 1):
            raise ValueError(f"Grid reach={self.reach} must exceed |lo| and |hi| ({self.lo}, {self.hi}) "
                             f"with tail_cells >= 1 (got {self.tail_cells})")

    @property
    def step(self) -> float:
        """Spacing of the core grid (the resolution of the borders there)."""
        return (self.hi - self.lo) / self.cells

    @property
    def domain(self) -> tuple[float, float]:
        return (self.lo, self.hi) if self.reach is None else (-self.reach, self.reach)

    def points(self) -> torch.Tensor:
        """The candidate borders, increasing, float64 (both ends of the domain included)."""
        core = torch.linspace(self.lo, self.hi, self.cells + 1, dtype=torch.float64)
        if self.reach is None:
            return core
        left = torch.linspace(-self.reach, self.lo, self.tail_cells + 1, dtype=torch.float64)[:-1]
        right = torch.linspace(self.hi, self.reach, self.tail_cells + 1, dtype=torch.float64)[1:]
        return torch.cat([left, core, right])


@dataclass(frozen=True)
class StepFunction:
    """q(x) = levels[i] on (borders[i−1], borders[i]] (first and last pieces unbounded); ``error`` is
    ∫(f′ − q)² w dx over the domain it was solved on."""

    borders: tuple[float, ...]
    levels: tuple[float, ...]
    error: float

    def __post_init__(self) -> None:
        if len(self.levels) != len(self.borders) + 1:
            raise ValueError(f"StepFunction has {len(self.levels)} levels for {len(self.borders)} borders; "
                             f"it needs one more level than borders")

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.levels))))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        borders = torch.tensor(self.borders, dtype=x.dtype, device=x.device)
        return torch.tensor(self.levels, dtype=x.dtype, device=x.device)[torch.bucketize(x, borders)]


@dataclass(frozen=True)
class _Prefix:
    """Prefix integrals W = ∫w, F = ∫f′w, F2 = ∫f′²w at every grid point."""

    x: torch.Tensor
    w: torch.Tensor
    f: torch.Tensor
    f2: torch.Tensor

    def cost(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Least-squares error of the best constant on [x_i, x_j]: c(i, j) = ΔF2 − ΔF²/ΔW."""
        dw = self.w[j] - self.w[i]
        df = self.f[j] - self.f[i]
        return (self.f2[j] - self.f2[i] - df * df / dw).clamp(min=0)

    def mean(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (self.f[j] - self.f[i]) / (self.w[j] - self.w[i])

    def error(self, i: torch.Tensor, j: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """∫(f′ − level)² w on [x_i, x_j] for any level."""
        return (self.f2[j] - self.f2[i] - 2 * level * (self.f[j] - self.f[i])
                + level * level * (self.w[j] - self.w[i]))


def _prefix(points: torch.Tensor, fprime: Callable[[torch.Tensor], torch.Tensor],
            weight: Callable[[torch.Tensor], torch.Tensor] | None, nodes: int) -> _Prefix:
    xi, wi = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(nodes))
    a, b = points[:-1], points[1:]
    half = ((b - a) / 2).unsqueeze(1)
    x = ((a + b) / 2).unsqueeze(1) + half * xi
    wq = half * wi
    if weight is not None:
        wq = wq * weight(x).to(torch.float64)
    d = fprime(x)
    zero = points.new_zeros(1)
    cum = [torch.cat([zero, torch.cumsum(v.sum(dim=1), 0)]) for v in (wq, wq * d, wq * d * d)]
    return _Prefix(points, *cum)


def _step_function(prefix: _Prefix, cuts: torch.Tensor) -> StepFunction:
    """Borders at the interior ``cuts`` (grid indices, with 0 and N at the ends) and optimal levels."""
    i, j = cuts[:-1], cuts[1:]
    return StepFunction(tuple(prefix.x[cuts[1:-1]].tolist()), tuple(prefix.mean(i, j).tolist()),
                        float(prefix.cost(i, j).sum()))


def solve_dp(fn: str | Callable[[torch.Tensor], torch.Tensor], bits: int, grid: Grid = Grid(),
             weight: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepFunction:
    """The 2^b-piece q minimising ∫(f′ − q)² w over borders on ``grid``: the global optimum by dynamic
    programming, dp_k(j) = min_{i<j} dp_{k−1}(i) + c(i, j), O(2^b·N²) time, O(N²) memory.

    ``fn`` is an activation name of :data:`SMOOTH` or any float64 torch function; ``weight`` defaults
    to w ≡ 1.
    """
    bits = _check_bits(bits, "solve_dp")
    pieces = 2 ** bits
    prefix = _prefix(grid.points(), derivative(_function(fn)), weight, grid.nodes)
    n = prefix.x.numel()
    if n - 1 < pieces:
        raise ValueError(f"grid has {n - 1} cells, fewer than the {pieces} pieces of {bits} bits")
    idx = torch.arange(n)
    cost = prefix.cost(idx.unsqueeze(1), idx.unsqueeze(0))
    cost = cost.masked_fill(idx.unsqueeze(1) >= idx.unsqueeze(0), math.inf)
    best = cost[0]
    back = []
    for _ in range(pieces - 1):
        best, arg = (best.unsqueeze(1) + cost).min(dim=0)
        back.append(arg)
    cuts = [n - 1]
    for arg in reversed(back):
        cuts.append(int(arg[cuts[-1]]))
    cuts.append(0)
    return _step_function(prefix, torch.tensor(cuts[::-1]))


def solve_lloyd(fn: str | Callable[[torch.Tensor], torch.Tensor], bits: int, grid: Grid = Grid(),
                weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
                max_iterations: int = 1000) -> StepFunction:
    """The alternating (Lloyd-like) local method on the same grid: levels ← interval means, then each
    border ← its best grid point between its neighbours given the levels (odd, then even borders).
    Starts from borders at the N(0, 1.5²) quantiles (the authors' initial spread); it never increases
    the error and stops at a local optimum."""
    bits = _check_bits(bits, "solve_lloyd")
    pieces = 2 ** bits
    prefix = _prefix(grid.points(), derivative(_function(fn)), weight, grid.nodes)
    n = prefix.x.numel()
    q = torch.arange(1, pieces, dtype=torch.float64) / pieces
    start = 1.5 * math.sqrt(2) * torch.erfinv(2 * q - 1)
    inner = torch.bucketize(start, prefix.x).clamp(1, n - 2)
    inner = torch.maximum(inner, torch.arange(1, pieces))          # strictly increasing, inside
    inner = torch.minimum(inner, torch.arange(n - pieces, n - 1))  # the grid even at its edges
    cuts = torch.cat([torch.tensor([0]), inner, torch.tensor([n - 1])])
    j = torch.arange(n).unsqueeze(0)
    for _ in range(max_iterations):
        before = cuts.clone()
        levels = prefix.mean(cuts[:-1], cuts[1:])
        for parity in (1, 2):
            k = torch.arange(parity, pieces, 2)
            left, right = cuts[k - 1].unsqueeze(1), cuts[k + 1].unsqueeze(1)
            total = (prefix.error(left, j, levels[k - 1].unsqueeze(1))
                     + prefix.error(j, right, levels[k].unsqueeze(1)))
            total = total.masked_fill((j <= left) | (j >= right), math.inf)
            cuts[k] = total.argmin(dim=1)
        if torch.equal(cuts, before):
            break
    return _step_function(prefix, cuts)


def approximation_error(fn: str | Callable[[torch.Tensor], torch.Tensor], step: StepFunction,
                        grid: Grid = Grid(), weight: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """∫(f′ − q)² w over ``grid``'s domain for any step function (borders anywhere), by Gauss–Legendre
    on the grid cells split at the borders."""
    lo, hi = grid.domain
    inside = torch.tensor([b for b in step.borders if lo < b < hi], dtype=torch.float64)
    points = torch.unique(torch.cat([grid.points(), inside]))
    prefix = _prefix(points, derivative(_function(fn)), weight, grid.nodes)
    mid = (points[:-1] + points[1:]) / 2
    level = step(mid)
    return float(prefix.error(torch.arange(mid.numel()), torch.arange(1, points.numel()), level).sum())


# --------------------------------------------------------------------------------------------------
# Shipped tables

#: The grid of the shipped tables: 1/128 steps on [−8, 8], unit steps out to ±100, w ≡ 1.
TABLE_GRID = Grid(lo=-8.0, hi=8.0, cells=2048, reach=100.0, tail_cells=92, nodes=8)

#: Where ``python -m rayq.fewbit`` writes the tables (the source tree).
TABLES_PATH = Path(__file__).resolve().parent / "data" / "fewbit_tables.json"

_TABLES_FORMAT = 1


def generate_tables(grid: Grid = TABLE_GRID,
                    names: tuple[str, ...] = tuple(SMOOTH)) -> dict[str, dict[int, StepFunction]]:
    """Solve every activation of ``names`` for 1–4 bits by :func:`solve_dp` (w ≡ 1)."""
    return {name: {bits: solve_dp(name, bits, grid) for bits in BITS} for name in names}


def write_tables(path: Path = TABLES_PATH, grid: Grid = TABLE_GRID) -> Path:
    """Regenerate the shipped tables and write them as JSON (floats round-trip exactly)."""
    tables = generate_tables(grid)
    document = {
        "format": _TABLES_FORMAT,
        "about": "Few-Bit Backward derivative tables (Novikov et al., arXiv 2202.00441): for each activation "
                 "and b bits, the 2^b-piece step function minimising the integral of (f' - q)^2 on the grid "
                 "below (w = 1), found by dynamic programming. q = levels[i] on (borders[i-1], borders[i]]. "
                 "Regenerate with: python -m rayq.fewbit",
        "grid": asdict(grid),
        "weight": "uniform",
        "tables": {name: {str(b): f"@{name}/{b}@" for b in per_bits} for name, per_bits in tables.items()},
    }
    text = json.dumps(document, indent=1)
    for name, per_bits in tables.items():  # one line per table: readable diffs when they are regenerated
        for b, step in per_bits.items():
            text = text.replace(f'"@{name}/{b}@"', json.dumps(asdict(step)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    log.info("wrote %d few-bit tables to %s", len(tables) * len(BITS), path)
    return path


@functools.cache
def load_tables() -> Mapping[str, Mapping[int, StepFunction]]:
    """The shipped tables, read once."""
    text = importlib.resources.files("rayq").joinpath("data", "fewbit_tables.json").read_text()
    document = json.loads(text)
    if document.get("format") != _TABLES_FORMAT:
        raise ValueError(f"few-bit tables have format {document.get('format')!r}; this rayq reads format "
                         f"{_TABLES_FORMAT} (regenerate them with python -m rayq.fewbit)")
    return {name: {int(b): StepFunction(tuple(s["borders"]), tuple(s["levels"]), float(s["error"]))
                   for b, s in per_bits.items()}
            for name, per_bits in document["tables"].items()}


def table(name: str, bits: int) -> StepFunction:
    """The shipped b-bit table of activation ``name``."""
    bits = _check_bits(bits, f"the {name} table")
    tables = load_tables()
    if name not in tables:
        raise ValueError(f"activation {name!r} has no derivative table; choose one of: {', '.join(tables)}")
    return tables[name][bits]


# --------------------------------------------------------------------------------------------------
# Packed codes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes < 2^bits as ⌈n·bits/8⌉ bytes (LSB first), on the codes' device."""
    if bits != 3:
        return pack_bits(codes, bits)
    n = codes.numel()
    c = codes.reshape(-1).to(torch.int32)
    pad = (-n) % 8
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    words = (c.view(-1, 8) << torch.arange(0, 24, 3, dtype=torch.int32, device=c.device)).sum(dim=1, dtype=torch.int32)
    data = ((words.unsqueeze(1) >> torch.tensor([0, 8, 16], dtype=torch.int32, device=c.device)) & 0xFF)
    return data.to(torch.uint8).reshape(-1)[:packed_nbytes(n, 3)]


def unpack_codes(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` codes as int64."""
    if bits != 3:
        return unpack_bits(data, bits, count)
    if data.numel() != packed_nbytes(count, 3):
        raise ValueError(f"packed buffer has {data.numel()} bytes, {packed_nbytes(count, 3)} expected "
                         f"for {count} codes of 3 bits")
    d = data.to(torch.int32)
    pad = (-d.numel()) % 3
    if pad:
        d = torch.cat([d, d.new_zeros(pad)])
    shifts = torch.tensor([0, 8, 16], dtype=torch.int32, device=d.device)
    words = (d.view(-1, 3) << shifts).sum(dim=1, dtype=torch.int32)
    codes = (words.unsqueeze(1) >> torch.arange(0, 24, 3, dtype=torch.int32, device=d.device)) & 0b111
    return codes.reshape(-1)[:count].to(torch.int64)


# --------------------------------------------------------------------------------------------------
# Autograd


@dataclass(frozen=True, eq=False)
class _Rule:
    """How one activation runs: exact forward, x → codes, and the derivative value of every code."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor]
    levels: tuple[float, ...]
    bits: int


@functools.cache
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


class _FewBit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: _Rule) -> torch.Tensor:
        ctx.rule, ctx.shape = rule, x.shape
        ctx.save_for_backward(pack_codes(rule.encode(x), rule.bits))
        return rule.forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (packed,) = ctx.saved_tensors
        codes = unpack_codes(packed, ctx.rule.bits, grad.numel()).view(ctx.shape)
        return grad * _constant(ctx.rule.levels, grad.device, grad.dtype)[codes], None


def _bucketizer(borders: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(x, _constant(borders, x.device, x.dtype), out_int32=True)

    return encode


@functools.cache
def _table_rule(name: str, bits: int) -> _Rule:
    step = table(name, bits)
    return _Rule(SMOOTH[name], _bucketizer(step.borders), step.levels, bits)


@functools.cache
def _piecewise_rule(name: str, a: float = 0.0, b: float = 0.0) -> _Rule:
    """Exact 1-bit rules; codes say on which of the derivative's two values x lies, with the same
    convention at the kinks as torch's own backward."""
    if name == "relu":
        return _Rule(F.relu, lambda x: x > 0, (0.0, 1.0), 1)
    if name == "leaky_relu":
        return _Rule(functools.partial(F.leaky_relu, negative_slope=a), lambda x: x > 0, (a, 1.0), 1)
    if name == "hardtanh":
        return _Rule(functools.partial(F.hardtanh, min_val=a, max_val=b), lambda x: (x > a) & (x < b), (0.0, 1.0), 1)
    if name == "relu6":
        return _Rule(F.relu6, lambda x: (x > 0) & (x < 6), (0.0, 1.0), 1)
    if name == "hardsigmoid":
        return _Rule(F.hardsigmoid, lambda x: (x > -3) & (x < 3), (0.0, 1.0 / 6.0), 1)
    if name == "threshold":
        return _Rule(functools.partial(F.threshold, threshold=a, value=b), lambda x: x > a, (0.0, 1.0), 1)
    if name == "hardshrink":
        return _Rule(functools.partial(F.hardshrink, lambd=a), lambda x: (x < -a) | (x > a), (0.0, 1.0), 1)
    if name == "softshrink":
        return _Rule(functools.partial(F.softshrink, lambd=a), lambda x: (x < -a) | (x > a), (0.0, 1.0), 1)
    raise ValueError(f"activation {name!r} is not piecewise linear; choose one of: {', '.join(PIECEWISE_LINEAR)}")


def few_bit(x: torch.Tensor, name: str, bits: int) -> torch.Tensor:
    """f(x) exactly, with a backward from the shipped ``bits``-bit table of smooth activation ``name``."""
    if name not in SMOOTH:
        raise ValueError(f"activation {name!r} has no derivative table; choose one of: {', '.join(SMOOTH)}")
    return _FewBit.apply(x, _table_rule(name, _check_bits(bits, f"few_bit({name!r})")))


# --------------------------------------------------------------------------------------------------
# Modules


class FewBitActivation(nn.Module):
    """Exact forward; the backward keeps ``bits`` bits per element of the input (the shipped table)."""

    function: ClassVar[str]

    def __init__(self, bits: int = 3) -> None:
        super().__init__()
        self.bits = _check_bits(bits, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FewBit.apply(x, _table_rule(self.function, self.bits))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class FewBitGELU(FewBitActivation):
    function = "gelu"

    def __init__(self, bits: int = 3, approximate: str = "none") -> None:
        super().__init__(bits)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate={approximate!r} is invalid for FewBitGELU; choose one of 'none', 'tanh'")
        self.approximate = approximate
        self.function = "gelu" if approximate == "none" else "gelu_tanh"

    def extra_repr(self) -> str:
        return f"bits={self.bits}, approximate={self.approximate!r}"


class FewBitSiLU(FewBitActivation):
    function = "silu"


class FewBitTanh(FewBitActivation):
    function = "tanh"


class FewBitSigmoid(FewBitActivation):
    function = "sigmoid"


class FewBitELU(FewBitActivation):
    """ELU with α = 1 (the table's)."""

    function = "elu"


class FewBitCELU(FewBitActivation):
    """CELU with α = 1 (the table's)."""

    function = "celu"


class FewBitSELU(FewBitActivation):
    function = "selu"


class FewBitSoftplus(FewBitActivation):
    """Softplus with β = 1, threshold 20 (the table's)."""

    function = "softplus"


class FewBitMish(FewBitActivation):
    function = "mish"


class FewBitSoftsign(FewBitActivation):
    function = "softsign"


class FewBitLogSigmoid(FewBitActivation):
    function = "logsigmoid"


class FewBitTanhshrink(FewBitActivation):
    function = "tanhshrink"


class FewBitHardswish(FewBitActivation):
    function = "hardswish"


class _ExactOneBit(nn.Module):
    """Piecewise-linear activation: exact forward and exact gradient from one bit per element."""

    function: ClassVar[str]
    bits: ClassVar[int] = 1

    def _params(self) -> tuple[float, float]:
        return (0.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FewBit.apply(x, _piecewise_rule(self.function, *self._params()))


class FewBitReLU(_ExactOneBit):
    function = "relu"


class FewBitReLU6(_ExactOneBit):
    function = "relu6"


class FewBitHardsigmoid(_ExactOneBit):
    function = "hardsigmoid"


class FewBitLeakyReLU(_ExactOneBit):
    function = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def _params(self) -> tuple[float, float]:
        return (self.negative_slope, 0.0)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class FewBitHardtanh(_ExactOneBit):
    function = "hardtanh"

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0) -> None:
        super().__init__()
        if not min_val < max_val:
            raise ValueError(f"FewBitHardtanh min_val={min_val} must be below max_val={max_val}")
        self.min_val, self.max_val = float(min_val), float(max_val)

    def _params(self) -> tuple[float, float]:
        return (self.min_val, self.max_val)

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"


class FewBitThreshold(_ExactOneBit):
    function = "threshold"

    def __init__(self, threshold: float, value: float) -> None:
        super().__init__()
        self.threshold, self.value = float(threshold), float(value)

    def _params(self) -> tuple[float, float]:
        return (self.threshold, self.value)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, value={self.value}"


class FewBitHardshrink(_ExactOneBit):
    function = "hardshrink"

    def __init__(self, lambd: float = 0.5) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def _params(self) -> tuple[float, float]:
        return (self.lambd, 0.0)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


class FewBitSoftshrink(FewBitHardshrink):
    function = "softshrink"


def _replacement(module: nn.Module, bits: int) -> nn.Module | None:
    """The few-bit drop-in for ``module``, or None when there is none for its type or parameters."""
    kind = type(module)
    smooth: dict[type, type[FewBitActivation]] = {
        nn.SiLU: FewBitSiLU, nn.Tanh: FewBitTanh, nn.Sigmoid: FewBitSigmoid, nn.SELU: FewBitSELU,
        nn.Mish: FewBitMish, nn.Softsign: FewBitSoftsign, nn.LogSigmoid: FewBitLogSigmoid,
        nn.Tanhshrink: FewBitTanhshrink, nn.Hardswish: FewBitHardswish,
    }
    if kind in smooth:
        return smooth[kind](bits)
    if kind is nn.GELU:
        return FewBitGELU(bits, module.approximate)
    if kind is nn.ELU and module.alpha == 1.0:
        return FewBitELU(bits)
    if kind is nn.CELU and module.alpha == 1.0:
        return FewBitCELU(bits)
    if kind is nn.Softplus and module.beta == 1.0 and module.threshold == 20.0:
        return FewBitSoftplus(bits)
    simple: dict[type, Callable[[], nn.Module]] = {
        nn.ReLU: FewBitReLU, nn.ReLU6: FewBitReLU6, nn.Hardsigmoid: FewBitHardsigmoid,
    }
    if kind in simple:
        return simple[kind]()
    if kind is nn.LeakyReLU:
        return FewBitLeakyReLU(module.negative_slope)
    if kind is nn.Hardtanh:
        return FewBitHardtanh(module.min_val, module.max_val)
    if kind is nn.Threshold:
        return FewBitThreshold(module.threshold, module.value)
    if kind is nn.Hardshrink:
        return FewBitHardshrink(module.lambd)
    if kind is nn.Softshrink:
        return FewBitSoftshrink(module.lambd)
    if kind in (nn.ELU, nn.CELU, nn.Softplus):
        log.warning("%r keeps its exact backward: the few-bit tables are for its default parameters", module)
    return None


def swap_activations(model: nn.Module, bits: int | None) -> nn.Module:
    """Replace, in place, every activation module of ``model`` that has a few-bit drop-in (GELU, SiLU,
    Tanh, Sigmoid, ELU, Softplus, Mish, ... at ``bits`` bits; ReLU, LeakyReLU, Hardtanh, ReLU6, ... at
    one exact bit). ``bits`` None or 0 leaves the model exact. Returns ``model`` (or the drop-in when
    ``model`` is itself an activation). Shared modules stay shared."""
    if bits is None or bits == 0:
        return model
    bits = _check_bits(bits, "swap_activations")
    top = _replacement(model, bits)
    if top is not None:
        return top
    made: dict[int, nn.Module | None] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in made:
                made[id(child)] = _replacement(child, bits)
            if made[id(child)] is not None:
                setattr(parent, name, made[id(child)])
    log.info("swap_activations: %d activation modules now keep %d-bit codes (piecewise-linear ones 1 bit)",
             sum(m is not None for m in made.values()), bits)
    return model


# --------------------------------------------------------------------------------------------------
# Memory accounting and a small model


def saved_activation_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of ``model(*inputs)``: every storage a saved tensor
    lives in, counted once, except the model's parameters and buffers (held anyway).

    Works on any device. On CUDA, ``torch.cuda.max_memory_allocated`` around the forward pass (after
    ``torch.cuda.reset_peak_memory_stats``) is the allocator-level cross-check; it also sees transient
    buffers, which this count deliberately leaves out.
    """
    own = {(t.device, t.untyped_storage().data_ptr()) for t in [*model.parameters(), *model.buffers()]}
    seen: dict[tuple[torch.device, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in own:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    del out
    return sum(seen.values())


_MLP_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "elu": nn.ELU, "softplus": nn.Softplus, "mish": nn.Mish,
}


def gelu_mlp(inputs: int = 64, hidden: int = 256, classes: int = 10, activation: str = "gelu", layers: int = 2,
             bits: int | None = None) -> nn.Sequential:
    """An MLP for 8×8 digits (64 inputs, 10 classes): ``layers`` hidden Linear+activation blocks, then a
    Linear head; with ``bits`` its activations are the few-bit drop-ins."""
    if activation not in _MLP_ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is invalid for gelu_mlp; choose one of: "
                         f"{', '.join(_MLP_ACTIVATIONS)}")
    if layers < 1:
        raise ValueError(f"layers={layers} is invalid for gelu_mlp; it must be >= 1")
    blocks: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), _MLP_ACTIVATIONS[activation]()]
        width = hidden
    model = nn.Sequential(*blocks, nn.Linear(width, classes))
    return swap_activations(model, bits)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """``python -m rayq.fewbit [PATH]``: regenerate the shipped tables (silently)."""
    args = sys.argv[1:] if argv is None else argv
    write_tables(Path(args[0]) if args else TABLES_PATH)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
