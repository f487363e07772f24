"""Pareto fronts of sweep results: which trials no other trial beats on every objective at once.

A point ``a`` *dominates* ``b`` when it is at least as good on every objective and strictly better on
one (better = higher for ``max``, lower for ``min``). The front is the set of points nothing dominates;
equal points do not dominate each other, so duplicates are all on the front. Points with a missing or
non-finite objective cannot be compared and are left out. Also here: the best point per objective, and
the table and PNG plot the ``rayq tune`` command shows (matplotlib, Agg backend).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class Objective:
    key: str                       # the metric's name in each point
    mode: Literal["max", "min"]
    label: str = ""                # how tables and plots name it
    log: bool = False              # plot on a log axis (bits, time)

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"objective {self.key!r}: mode={self.mode!r}; expected 'max' or 'min'")

    @property
    def name(self) -> str:
        return self.label or self.key

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


def comparable(point: Mapping[str, Any], objectives: Sequence[Objective]) -> bool:
    """Whether every objective of ``point`` is a finite number."""
    for o in objectives:
        v = point.get(o.key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
    return True


def dominates(a: Mapping[str, float], b: Mapping[str, float], objectives: Sequence[Objective]) -> bool:
    """``a`` is no worse than ``b`` on every objective and strictly better on at least one."""
    strictly = False
    for o in objectives:
        if o.better(b[o.key], a[o.key]):
            return False
        strictly = strictly or o.better(a[o.key], b[o.key])
    return strictly


def pareto_front(points: Sequence[Mapping[str, Any]], objectives: Sequence[Objective]) -> list[int]:
    """Indices (in input order) of the comparable points that no other comparable point dominates."""
    if not objectives:
        raise ValueError("pareto_front needs at least one objective")
    idx = [i for i, p in enumerate(points) if comparable(p, objectives)]
    return [i for i in idx if not any(dominates(points[j], points[i], objectives) for j in idx if j != i)]


def best_index(points: Sequence[Mapping[str, Any]], objective: Objective,
               objectives: Sequence[Objective] = ()) -> int | None:
    """The point best on ``objective``; ties go to the point the other ``objectives`` rank first (in order).

    Returns None when no point is comparable.
    """
    ranking = [objective] + [o for o in objectives if o.key != objective.key]
    idx = [i for i, p in enumerate(points) if comparable(p, ranking)]
    if not idx:
        return None

    def key(i: int) -> tuple[float, ...]:
        return tuple(-points[i][o.key] if o.mode == "max" else points[i][o.key] for o in ranking)

    return min(idx, key=key)


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str], title: str = "") -> str:
    """A plain-text grid table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in r] for r in rows]
    numeric = [all(isinstance(r[c], (int, float)) for r in rows) if rows else False for c in range(len(header))]
    widths = [max(len(r[c]) for r in cells) for c in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(r: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if numeric[c] else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))) + " |"

    out = [title] if title else []
    out += [line, fmt(cells[0]), line] + [fmt(r) for r in cells[1:]] + [line]
    return "\n".join(out)


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.4g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def plot_front(points: Sequence[Mapping[str, Any]], objectives: Sequence[Objective], front: Sequence[int],
               path: Path, labels: Sequence[str] | None = None, extra: Sequence[Mapping[str, Any]] = (),
               title: str = "") -> Path:
    """Scatter the first objective against each other one; the front in colour, labelled.

    ``points`` are the trials that count (finished); ``extra`` are drawn faintly (e.g. stopped early). Each
    panel also draws that pair's own two-objective front as a staircase.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    y, others = objectives[0], list(objectives[1:]) or [objectives[0]]
    fig, axes = plt.subplots(1, len(others), figsize=(5.2 * len(others), 4.2), squeeze=False)
    on_front = set(front)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(points))]
    for ax, x in zip(axes[0], others):
        pair = [x, y]
        usable = [i for i, p in enumerate(points) if comparable(p, pair)]
        faint = [p for p in extra if comparable(p, pair)]
        if faint:
            ax.scatter([p[x.key] for p in faint], [p[y.key] for p in faint], marker="x", color="0.75",
                       label="stopped early")
        rest = [i for i in usable if i not in on_front]
        if rest:
            ax.scatter([points[i][x.key] for i in rest], [points[i][y.key] for i in rest], color="0.55",
                       label="dominated")
        best = [i for i in usable if i in on_front]
        if best:
            ax.scatter([points[i][x.key] for i in best], [points[i][y.key] for i in best], color="tab:red",
                       zorder=3, label=f"Pareto front ({len(objectives)} objectives)")
        for i in usable:
            ax.annotate(labels[i], (points[i][x.key], points[i][y.key]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        sub = [points[i] for i in usable]
        stair = sorted((sub[j] for j in pareto_front(sub, pair)), key=lambda p: p[x.key])
        if len(stair) > 1:  # the best y reachable at each x: from the left when x is minimised
            ax.step([p[x.key] for p in stair], [p[y.key] for p in stair],
                    where="post" if x.mode == "min" else "pre", color="tab:red", alpha=0.4, linewidth=1)
        ax.set_xlabel(f"{x.name} ({'lower' if x.mode == 'min' else 'higher'} is better)")
        ax.set_ylabel(f"{y.name} ({'lower' if y.mode == 'min' else 'higher'} is better)")
        for o, axis, scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
            values = [p[o.key] for p in [*points, *extra] if comparable(p, [o]) and p[o.key] > 0]
            if o.log and values and max(values) >= 10 * min(values):  # a log axis only across a decade or more
                scale("log")
                axis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
