"""A Tune search space as data: distributions, conditions, entries, and how one trial's values resolve.

A space is an ordered list of :class:`Entry` (a run-config key set to a constant or a :class:`Dist`,
under zero or more :class:`Condition`) over a base run config. Resolving walks the entries in order;
an entry whose conditions hold sets its key. :mod:`rayq.launch.tune.grammar` builds a space from YAML;
:mod:`rayq.launch.tune.solver` checks it before Ray starts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rayq.config import RunConfig
from rayq.launch.tune.objectives import ACCURACY, BITS, LEAKAGE_METRICS, SIM_TIME, leakage_objective
from rayq.launch.tune.pareto import Objective
from rayq.schema import ConfigError, check, from_dict

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


class SpaceError(ConfigError):
    """A search space is malformed or names something the run config does not allow."""


@dataclass(frozen=True)
class Dist:
    """One distribution of a space: ``{kind: values}`` (grid/choice) or ``{kind: [low, high]}``."""

    kind: str
    values: tuple

    @property
    def ranged(self) -> bool:
        return self.kind in ("uniform", "loguniform", "randint")

    @property
    def categorical(self) -> bool:
        return not self.ranged

    def primitive(self) -> bool:
        return all(v is None or isinstance(v, (bool, int, float, str)) for v in self.values)

    def candidates(self) -> list[Any]:
        """Values a validation probe tries: every grid/choice value, the bounds of a range."""
        if self.kind == "randint":
            return [int(self.values[0]), int(self.values[1])]
        if self.ranged:
            return [float(self.values[0]), float(self.values[1])]
        return list(self.values)

    def admits(self, value: Any) -> bool:
        if self.categorical:
            return value in self.values
        if self.kind == "randint" and (isinstance(value, bool) or not isinstance(value, int)):
            return False
        return isinstance(value, (int, float)) and self.values[0] <= value <= self.values[1]

    def tune_domain(self) -> Any:
        from ray import tune

        lo, hi = self.values[0], self.values[-1]
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        if self.kind == "randint":
            return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive; ours is inclusive
        return tune.choice(list(self.values) if self.primitive() else list(range(len(self.values))))

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw from an Optuna trial (define-by-run); grid acts as choice there."""
        lo, hi = self.values[0], self.values[-1]
        if self.kind == "uniform":
            return trial.suggest_float(name, lo, hi)
        if self.kind == "loguniform":
            return trial.suggest_float(name, lo, hi, log=True)
        if self.kind == "randint":
            return trial.suggest_int(name, lo, hi)
        return trial.suggest_categorical(name, list(self.values) if self.primitive() else list(range(len(self.values))))

    def decode(self, raw: Any) -> Any:
        """The config value for what Tune/Optuna drew (categoricals of lists/mappings travel as indices)."""
        if self.categorical and not self.primitive():
            return self.values[int(raw)]
        if self.kind == "randint":
            return int(raw)
        return float(raw) if self.ranged else raw


@dataclass(frozen=True)
class Condition:
    """``when: {path: value or [values]}``: the config value at ``path`` is one of ``allowed``."""

    path: tuple[str, ...]
    allowed: tuple

    def holds(self, value: Any) -> bool:
        return any(_same(value, a) for a in self.allowed)

    def excludes(self, other: Condition) -> bool:
        """No value can satisfy both: the same key, disjoint values."""
        return self.path == other.path and not any(other.holds(v) for v in self.allowed)

    def __str__(self) -> str:
        shown = self.allowed[0] if len(self.allowed) == 1 else list(self.allowed)
        return f"{'.'.join(self.path)}={shown}"


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps booleans apart from 0 and 1."""
    return a is b if isinstance(a, bool) or isinstance(b, bool) else a == b


@dataclass(frozen=True)
class Entry:
    """One leaf of the space: the config key it sets, a constant or a :class:`Dist`, and its conditions."""

    path: tuple[str, ...]
    value: Any
    when: tuple[Condition, ...]
    where: str                      # its position in the file, for errors: search.compression.params[0].levels

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def dist(self) -> Dist | None:
        return self.value if isinstance(self.value, Dist) else None

    @property
    def name(self) -> str:
        """A unique, Tune-safe parameter name ('/' is Tune's nesting separator)."""
        cond = ",".join(f"{'.'.join(c.path)}={'+'.join(map(str, c.allowed))}" for c in self.when)
        return (self.key + (f"|{cond}" if cond else "")).replace("/", ":")


@dataclass
class SweepSettings:
    """The ``tune:`` section of a space (and the CLI flags that override it)."""

    mode: Literal["asha", "multi"] = "asha"
    samples: int = 8
    max_concurrent: int = 2
    seed: int = 0
    bits_weight: float = 0.02
    time_weight: float = 0.0
    #: A fourth objective, what the trial leaks (min): none, or a name of ``LEAKAGE_METRICS``.
    leakage: str = "none"
    leak_weight: float = 0.0
    grace_period: int | None = None
    reduction_factor: float = 2.0

    def validate(self, path: str) -> None:
        p = f"{path}." if path else ""
        check(self.samples >= 1, f"{p}samples", self.samples, "an integer >= 1")
        check(self.max_concurrent >= 1, f"{p}max_concurrent", self.max_concurrent, "an integer >= 1")
        check(self.bits_weight >= 0, f"{p}bits_weight", self.bits_weight, "a number >= 0")
        check(self.time_weight >= 0, f"{p}time_weight", self.time_weight, "a number >= 0")
        check(self.leakage == "none" or self.leakage in LEAKAGE_METRICS, f"{p}leakage", self.leakage,
              f"one of: none, {', '.join(LEAKAGE_METRICS)}")
        check(self.leak_weight >= 0, f"{p}leak_weight", self.leak_weight, "a number >= 0")
        check(self.grace_period is None or self.grace_period >= 1, f"{p}grace_period", self.grace_period,
              "steps >= 1 (default: 2 × report_every)")
        check(self.reduction_factor > 1, f"{p}reduction_factor", self.reduction_factor, "a number > 1")


@dataclass
class Space:
    """A validated search space: the trials' base config, the ordered entries, the sweep settings."""

    name: str
    source: str                          # the file name errors start with
    path: str                            # the file itself
    description: str
    base: dict[str, Any]                 # the run-config mapping every trial starts from
    entries: list[Entry]                 # in resolution order: an entry after those its conditions read
    settings: SweepSettings
    base_full: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- resolution
    def base_value(self, path: tuple[str, ...]) -> Any:
        """The trials' base config value at ``path`` (None where the path holds nothing)."""
        node: Any = self.base_full
        for k in path:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    def writers(self, path: tuple[str, ...]) -> list[Entry]:
        """The entries that set the key at ``path``."""
        return [e for e in self.entries if e.path == path]

    def resolve(self, pick: Callable[[Entry], Any]) -> tuple[dict[tuple[str, ...], Any], list[Entry]]:
        """Walk the entries in order; each one whose conditions hold sets its key (``pick`` draws dims)."""
        values: dict[tuple[str, ...], Any] = {}
        active = []
        for e in self.entries:
            if all(c.holds(values[c.path] if c.path in values else self.base_value(c.path)) for c in e.when):
                values[e.path] = pick(e) if e.dist else e.value
                active.append(e)
        return values, active

    def trial_dict(self, values: dict[tuple[str, ...], Any]) -> dict[str, Any]:
        """The base mapping with the resolved values; a changed codec drops the base's codec parameters."""
        data = copy.deepcopy(self.base)
        codec = values.get(("compression", "codec"))
        if codec is not None and codec != self.base_full["compression"]["codec"]:
            data.setdefault("compression", {})["params"] = {}
        for path, v in values.items():
            node = data
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = v
        return data

    def config_from(self, raw: dict[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
        """A trial's validated config and its searched values (short label → value) from Tune's config."""
        variants = self.grid_variants()
        chosen = variants[int(raw["grid"])] if "grid" in raw else {}

        def pick(e: Entry) -> Any:
            if e.name in chosen:
                return chosen[e.name]
            return e.dist.decode(raw[e.name])  # type: ignore[union-attr]

        values, active = self.resolve(pick)
        labels = self.labels()
        params = {labels[e.name]: values[e.path] for e in active if e.dist}
        return from_dict(RunConfig, self.trial_dict(values)), params

    # ----------------------------------------------------------------- Tune / Optuna views
    def dims(self) -> list[Entry]:
        return [e for e in self.entries if e.dist]

    def grid_entries(self) -> list[Entry]:
        return [e for e in self.dims() if e.dist.kind == "grid"]  # type: ignore[union-attr]

    def grid_variants(self) -> list[dict[str, Any]]:
        """Every combination of the grid entries, a conditional grid counted only where it applies."""
        variants: list[dict[str, Any]] = [{}]
        for g in self.grid_entries():
            out = []
            for v in variants:
                _, active = self.resolve(lambda e, v=v: v.get(e.name, e.dist.candidates()[0]))  # type: ignore[union-attr]
                if g in active:
                    out += [{**v, g.name: x} for x in g.dist.values]  # type: ignore[union-attr]
                else:
                    out.append(v)
            variants = out
        return variants

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space for random/grid search: one domain per random dim, one grid of variants."""
        from ray import tune

        space: dict[str, Any] = {e.name: e.dist.tune_domain() for e in self.dims() if e.dist.kind != "grid"}  # type: ignore[union-attr]
        if self.grid_entries():
            space["grid"] = tune.grid_search(list(range(len(self.grid_variants()))))
        return space

    def define_by_run(self, trial: Any) -> None:
        """Optuna's define-by-run view: only the entries whose conditions hold are suggested."""
        self.resolve(lambda e: e.dist.suggest(trial, e.name))  # type: ignore[union-attr]

    def labels(self) -> dict[str, str]:
        """Short names for tables: the last key, or the last two where the last is ambiguous."""
        dims = self.dims()
        last = [p[-1] for p in {e.path for e in dims}]
        return {e.name: e.path[-1] if last.count(e.path[-1]) == 1 else ".".join(e.path[-2:]) for e in dims}

    def has_clock(self) -> bool:
        return self.base_full.get("cluster") is not None or any(e.path == ("cluster",) for e in self.entries)

    def objectives(self) -> list[Objective]:
        leakage = [leakage_objective(self.settings.leakage)] if self.settings.leakage != "none" else []
        return [ACCURACY, BITS] + ([SIM_TIME] if self.has_clock() else []) + leakage

    def trial_count(self) -> int:
        return self.settings.samples * (len(self.grid_variants()) if self.settings.mode == "asha" else 1)
