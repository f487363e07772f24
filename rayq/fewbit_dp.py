"""The optimal piecewise-constant derivative behind Few-Bit Backward, and its shipped tables.

Novikov, Bershatsky, Gusak, Shonenkov, Dimitrov, Oseledets, "Few-Bit Backward" (arXiv 2202.00441, 2022):
f′ is replaced by q with 2^b pieces minimising ∫(f′ − q)² w dx. :func:`solve_dp` finds the global
optimum over borders on a grid by dynamic programming (segment cost c(i,j) = ∫f′²w − (∫f′w)²/∫w,
dp_k(j) = min_i dp_{k−1}(i) + c(i,j)); :func:`solve_lloyd` is the alternating local method (levels =
interval means, borders where f′ meets the mean of the adjacent levels), kept as a baseline. The
tables of the smooth activations are solved once (w ≡ 1 on [−100, 100], as the authors' shipped
tables) and shipped as ``rayq/data/fewbit_tables.json``; ``python -m rayq.fewbit_dp`` rewrites them.
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

import numpy as np
import torch
import torch.nn.functional as F

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


def activation_function(fn: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(fn):
        return fn
    if fn not in SMOOTH:
        raise ValueError(f"activation {fn!r} has no derivative table; choose one of: {', '.join(SMOOTH)}")
    return SMOOTH[fn]


def check_bits(bits: int, owner: str) -> int:
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
    bits = check_bits(bits, "solve_dp")
    pieces = 2 ** bits
    prefix = _prefix(grid.points(), derivative(activation_function(fn)), weight, grid.nodes)
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
    bits = check_bits(bits, "solve_lloyd")
    pieces = 2 ** bits
    prefix = _prefix(grid.points(), derivative(activation_function(fn)), weight, grid.nodes)
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
    prefix = _prefix(points, derivative(activation_function(fn)), weight, grid.nodes)
    mid = (points[:-1] + points[1:]) / 2
    level = step(mid)
    return float(prefix.error(torch.arange(mid.numel()), torch.arange(1, points.numel()), level).sum())


# --------------------------------------------------------------------------------------------------
# Shipped tables

#: The grid of the shipped tables: 1/128 steps on [−8, 8], unit steps out to ±100, w ≡ 1.
TABLE_GRID = Grid(lo=-8.0, hi=8.0, cells=2048, reach=100.0, tail_cells=92, nodes=8)

#: Where ``python -m rayq.fewbit_dp`` writes the tables (the source tree).
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
                 "Regenerate with: python -m rayq.fewbit_dp",
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
                         f"{_TABLES_FORMAT} (regenerate them with python -m rayq.fewbit_dp)")
    return {name: {int(b): StepFunction(tuple(s["borders"]), tuple(s["levels"]), float(s["error"]))
                   for b, s in per_bits.items()}
            for name, per_bits in document["tables"].items()}


def table(name: str, bits: int) -> StepFunction:
    """The shipped b-bit table of activation ``name``."""
    bits = check_bits(bits, f"the {name} table")
    tables = load_tables()
    if name not in tables:
        raise ValueError(f"activation {name!r} has no derivative table; choose one of: {', '.join(tables)}")
    return tables[name][bits]


def main(argv: list[str] | None = None) -> int:
    """``python -m rayq.fewbit_dp [PATH]``: regenerate the shipped tables (silently)."""
    args = sys.argv[1:] if argv is None else argv
    write_tables(Path(args[0]) if args else TABLES_PATH)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
