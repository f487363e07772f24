"""Checks of a parsed search space, before Ray starts: entry order, conflicts, grids, and one probe per value.

The probe needs, for each entry, values of the other dimensions under which that entry applies: a small
backtracking search over the entries that write the keys its conditions read (:func:`_activation`).
"""

from __future__ import annotations

from typing import Any

from rayq.config import RunConfig
from rayq.launch.tune.space import Condition, Entry, Space, SpaceError
from rayq.schema import ConfigError, from_dict


def order(entries: list[Entry], source: str) -> list[Entry]:
    """Topological order, stable in file order: an entry comes after every entry that may set a key it reads."""
    remaining = list(entries)
    out: list[Entry] = []
    while remaining:
        for e in remaining:
            reads = {c.path for c in e.when}
            if not any(o is not e and o.path in reads for o in remaining):
                out.append(e)
                remaining.remove(e)
                break
        else:
            cycle = ", ".join(f"{e.where} (when {', '.join(map(str, e.when))})" for e in remaining)
            raise SpaceError(f"{source}: the when-conditions depend on each other in a cycle: {cycle}")
    return out


def _exclusive(a: Entry, b: Entry) -> bool:
    """Two entries can never apply together: they need disjoint values of one key."""
    return any(ca.excludes(cb) for ca in a.when for cb in b.when)


def check_conflicts(space: Space) -> None:
    """No key is set by two entries that can apply together."""
    for i, a in enumerate(space.entries):
        for b in space.entries[i + 1:]:
            if a.path == b.path and not _exclusive(a, b):
                first, second = sorted((a, b), key=lambda e: e.where)
                raise SpaceError(f"{space.source}: {first.key} is set twice, at {first.where} and {second.where}, "
                                 "and their when-conditions do not exclude each other (give them different "
                                 "values of the same key)")


def check_grid(space: Space) -> None:
    """A grid entry's conditions may read only grid and constant entries: grids are expanded before sampling."""
    for g in space.grid_entries():
        stack, seen = list(g.when), set()
        while stack:
            c = stack.pop()
            for w in space.writers(c.path):
                if w.dist and w.dist.kind != "grid":
                    raise SpaceError(
                        f"{space.source}: {g.where}: a grid under a condition on {c} cannot be expanded, because "
                        f"{w.where} draws {w.key} at random ({w.dist.kind}); make that one a grid too, or use choice here")
                if id(w) not in seen:
                    seen.add(id(w))
                    stack.extend(w.when)


def _activation(space: Space, target: Entry) -> dict[str, Any] | None:
    """Values for other dims that make ``target`` apply (None: its conditions can never hold)."""

    def solve(goals: list[Condition], fixed: dict[tuple[str, ...], Any], picks: dict[str, Any],
              depth: int) -> dict[str, Any] | None:
        if not goals:
            return picks
        if depth > 50:
            return None
        c, rest = goals[0], goals[1:]
        if c.path in fixed:
            return solve(rest, fixed, picks, depth + 1) if c.holds(fixed[c.path]) else None
        for w in space.writers(c.path):
            options = ([v for v in w.dist.candidates() + list(c.allowed) if w.dist.admits(v) and c.holds(v)]
                       if w.dist else ([w.value] if c.holds(w.value) else []))
            for v in dict.fromkeys(map(repr, options)):
                value = next(o for o in options if repr(o) == v)
                got = solve(list(w.when) + rest, {**fixed, c.path: value},
                            {**picks, w.name: value} if w.dist else picks, depth + 1)
                if got is not None:
                    return got
        if c.holds(space.base_value(c.path)) and not any(not w.when for w in space.writers(c.path)):
            return solve(rest, {**fixed, c.path: space.base_value(c.path)}, picks, depth + 1)
        return None

    return solve(list(target.when), {}, {}, 0)


def probe(space: Space) -> None:
    """Build and validate one trial config per entry and candidate value, with that entry in force."""
    for target in space.entries:
        picks = _activation(space, target)
        if picks is None:
            raise SpaceError(f"{space.source}: {target.where}: never applies: it needs "
                             f"{' and '.join(map(str, target.when))}, which neither the base nor the search can give")
        values = target.dist.candidates() if target.dist else [target.value]
        for value in values:
            chosen = {**picks, target.name: value}
            resolved, active = space.resolve(lambda e: chosen[e.name] if e.name in chosen else e.dist.candidates()[0])  # type: ignore[union-attr]
            if target not in active:
                raise SpaceError(f"{space.source}: {target.where}: never applies: it needs "
                                 f"{' and '.join(map(str, target.when))}")
            try:
                from_dict(RunConfig, space.trial_dict(resolved))
            except ConfigError as err:
                culprit = _culprit(str(err), active) or target
                what = ("value" if not culprit.dist else "bound" if culprit.dist.ranged else f"{culprit.dist.kind} value")
                where = f" (when {', '.join(map(str, culprit.when))})" if culprit.when else ""
                hint = ("; draw integers with randint" if culprit.dist and culprit.dist.kind in ("uniform", "loguniform")
                        and "expected an integer" in str(err) else "")
                raise SpaceError(f"{space.source}: {culprit.where}: {what} {resolved[culprit.path]!r}{where} "
                                 f"gives an invalid run config: {err}{hint}") from err


def _culprit(message: str, active: list[Entry]) -> Entry | None:
    hits = [e for e in active if e.key in message]
    return max(hits, key=lambda e: len(e.key)) if hits else None
