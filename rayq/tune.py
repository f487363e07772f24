"""``rayq tune``: Ray Tune sweeps over any run-config key; Pareto front of accuracy, bits and simulated time.

A *search space* is a YAML file (tune_spaces/README.md has the full grammar)::

    base:      {cluster: volunteer-100m, max_steps: 120}      # run-config keys shared by every trial
    search:                                                   # the run config's shape; leaves may be
      compression:                                            # distributions (grid, choice, uniform,
        codec: {choice: [qsgd, topk]}                         # loguniform, randint)
        params:
          - when: {codec: qsgd}                               # a block applies only when its condition
            levels: {choice: [3, 7, 15]}                      # holds (bare name: nearest section's key)
          - when: {codec: topk}
            density: {loguniform: [0.001, 0.1]}
    tune: {mode: multi, samples: 8}                           # sweep settings (CLI flags override)

The whole space is validated against the run-config schema before Ray starts: every key path, every
distribution, and one concrete trial config per candidate value (bounds for ranges) with that entry
active. A trial is ``launch.prepare`` + ``launch.make_trainer(...).fit()`` inside a Tune function
trainable; its run directory (config.yaml, TensorBoard with hparams, trace) lives under the sweep
directory. Objectives (ALGORITHMS.md §15): final eval accuracy (max), bits uploaded by all workers
``8·comm/bytes_up_total·workers`` (min) and ``sim/time_s`` (min, when a cluster profile is set). Mode
``asha`` stops trials early on the score ``accuracy − bits_weight·log10(bits) − time_weight·log10(time)``;
mode ``multi`` searches the three objectives with Optuna. Both end with the Pareto front of the trials
that ran to the end, a table, a PNG plot and one ``best_<objective>.yaml`` per objective that
``rayq train -c`` runs as is.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from rayq.config import _FLOAT, ConfigError, RunConfig, _check, _parse_set, from_dict, merge
from rayq.pareto import Objective, best_index, format_table, pareto_front, plot_front

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SPACE_KEYS = ("description", "base", "search", "tune")

#: Every trial's defaults, below the space's ``base``, the ``-c`` file and ``--set``: short runs on digits
#: that fit two concurrent trials on two cores (2 workers × 0.5 CPU each), a simulated clock for the time
#: objective, and an evaluation at every report so every rung of ASHA sees a fresh accuracy.
TUNE_BASE: dict[str, Any] = {
    "task": "digits", "workers": 2, "cpus_per_worker": 0.5, "max_steps": 120, "report_every": 20,
    "eval_every": 20, "checkpoint_every": 0, "keep_checkpoints": 1, "cluster": "volunteer-100m",
}

#: The CPU a trial's own process reserves (Tune rejects 0); the Train workers reserve theirs.
TRIAL_CPU = 0.01

#: Metrics each trial adds to its reports (rayq.tune.objective_metrics) and what the front is made of.
ACCURACY = Objective("objective.accuracy", "max", "accuracy")
BITS = Objective("objective.bits", "min", "bits (all workers)", log=True)
SIM_TIME = Objective("objective.sim_time_s", "min", "sim time (s)", log=True)
SCORE = Objective("objective.score", "max", "score")


class SpaceError(ConfigError):
    """A search space is malformed or names something the run config does not allow."""


# ----------------------------------------------------------------------------------------- grammar


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
    grace_period: int | None = None
    reduction_factor: float = 2.0

    def validate(self, path: str) -> None:
        p = f"{path}." if path else ""
        _check(self.samples >= 1, f"{p}samples", self.samples, "an integer >= 1")
        _check(self.max_concurrent >= 1, f"{p}max_concurrent", self.max_concurrent, "an integer >= 1")
        _check(self.bits_weight >= 0, f"{p}bits_weight", self.bits_weight, "a number >= 0")
        _check(self.time_weight >= 0, f"{p}time_weight", self.time_weight, "a number >= 0")
        _check(self.grace_period is None or self.grace_period >= 1, f"{p}grace_period", self.grace_period,
               "steps >= 1 (default: 2 × report_every)")
        _check(self.reduction_factor > 1, f"{p}reduction_factor", self.reduction_factor, "a number > 1")


# --------------------------------------------------------------------------------------- the schema


def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict


def _leaf_hint(path: tuple[str, ...]) -> Any:
    """The annotation at a config path, or None when the path is not a run-config key."""
    hint: Any = RunConfig
    for k in path:
        if typing.get_origin(hint) is dict:
            return Any
        fields = _field_hints(hint) if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__") else None
        if fields is None or k not in fields:
            return None
        hint = fields[k]
    return hint


def _lookup(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for k in path:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


# ---------------------------------------------------------------------------------------- parsing


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.entries: list[Entry] = []

    def fail(self, where: str, message: str) -> SpaceError:
        return SpaceError(f"{self.source}: {where}: {message}")

    def section(self, node: Any, path: tuple[str, ...], hint: Any, where: str, when: tuple[Condition, ...],
                scopes: tuple[tuple[tuple[str, ...], type], ...]) -> None:
        """A section's value: a mapping of keys (optionally with ``when``), or a list of such blocks."""
        if isinstance(node, list):
            if not node:
                self.fail(where, "an empty list of blocks")
            for i, block in enumerate(node):
                if not isinstance(block, dict):
                    raise self.fail(f"{where}[{i}]", f"a block must be a mapping of keys, got {block!r}")
                self.block(block, path, hint, f"{where}[{i}]", when, scopes)
            return
        if not isinstance(node, dict):
            raise self.fail(where, f"{'.'.join(path) or 'search'} is a section: give a mapping of its keys "
                                   f"(or a list of blocks), got {node!r}")
        self.block(node, path, hint, where, when, scopes)

    def block(self, node: dict[str, Any], path: tuple[str, ...], hint: Any, where: str,
              when: tuple[Condition, ...], scopes: tuple[tuple[tuple[str, ...], type], ...]) -> None:
        free = typing.get_origin(hint) is dict
        if not free:
            scopes = scopes + ((path, hint),)
        dists = [k for k in node if k in DISTRIBUTIONS]
        if len(node) == 1 and dists:
            raise self.fail(where, f"{'.'.join(path) or 'search'} is a section, not a value: put the "
                                   f"{dists[0]} on its keys")
        if "when" in node:
            when = when + self.conditions(node["when"], f"{where}.when", scopes)
        fields = {} if free else _field_hints(hint)
        for key, value in node.items():
            if key == "when":
                continue
            if not isinstance(key, str) or not key:
                raise self.fail(where, f"key {key!r} is not a name")
            sub, at = path + (key,), f"{where}.{key}"
            if not free and key not in fields:
                inside = f" in {'.'.join(path)}" if path else ""
                raise self.fail(at, f"unknown config key {'.'.join(sub)!r}; allowed keys{inside}: "
                                    f"{', '.join(fields)}, or when")
            child = Any if free else fields[key]
            if not free and _is_section(child):
                self.section(value, sub, child, at, when, scopes)
            else:
                self.entries.append(Entry(sub, self.leaf(value, sub, child, at), when, at))

    def leaf(self, value: Any, path: tuple[str, ...], hint: Any, where: str) -> Any:
        if isinstance(value, dict) and len(value) == 1:
            (kind, args), = value.items()
            if kind in DISTRIBUTIONS:
                return self.dist(kind, args, where)
            if not _accepts(hint, dict):
                raise self.fail(where, f"{{{kind}: ...}} is not a distribution; choose one of: "
                                       f"{', '.join(DISTRIBUTIONS)}")
        elif isinstance(value, dict) and not _accepts(hint, dict):
            raise self.fail(where, f"{'.'.join(path)} takes a value or one distribution "
                                   f"({', '.join(DISTRIBUTIONS)}), got the mapping {value!r}")
        if isinstance(value, list) and not _accepts(hint, list):
            raise self.fail(where, f"a list is not a value of {'.'.join(path)}; to search these values write "
                                   f"{{choice: {value}}} or {{grid: {value}}}")
        return value

    def dist(self, kind: str, args: Any, where: str) -> Dist:
        at = f"{where}.{kind}"
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise self.fail(at, f"{kind} takes a non-empty list of values, got {args!r}")
            return Dist(kind, tuple(args))
        shape = "[low, high]" + (" (integers, both included)" if kind == "randint" else "")
        if not isinstance(args, list) or len(args) != 2:
            raise self.fail(at, f"{kind} takes {shape}, got {args!r}")
        lo, hi = (_number(a) for a in args)
        if lo is None or hi is None:
            raise self.fail(at, f"{kind} takes {shape} as numbers, got {args!r}")
        if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise self.fail(at, f"randint takes integer bounds, got {args!r}")
        if lo > hi:
            raise self.fail(at, f"low={lo!r} > high={hi!r}; expected low <= high")
        if kind == "loguniform" and lo <= 0:
            raise self.fail(at, f"loguniform needs 0 < low, got low={lo!r}")
        if kind == "randint":
            return Dist(kind, (int(lo), int(hi)))
        return Dist(kind, (float(lo), float(hi)))

    def conditions(self, node: Any, where: str,
                   scopes: tuple[tuple[tuple[str, ...], type], ...]) -> tuple[Condition, ...]:
        if not isinstance(node, dict) or not node:
            raise self.fail(where, f"when takes a mapping of config keys to a value or a list of values, "
                                   f"e.g. when: {{codec: qsgd}}; got {node!r}")
        out = []
        for key, allowed in node.items():
            if not isinstance(key, str) or not key:
                raise self.fail(where, f"key {key!r} is not a name")
            path = self.condition_path(key, where, scopes)
            values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            if not values or any(isinstance(v, (dict, list)) for v in values):
                raise self.fail(f"{where}.{key}", f"a condition takes a value or a list of values, got {allowed!r}")
            out.append(Condition(path, values))
        return tuple(out)

    def condition_path(self, key: str, where: str, scopes: tuple[tuple[tuple[str, ...], type], ...]) -> tuple[str, ...]:
        if "." in key:
            path = tuple(key.split("."))
            hint = _leaf_hint(path)
            if hint is None or _is_section(hint):
                raise self.fail(f"{where}.{key}", f"{key!r} is not a run-config key (a dotted name is a path "
                                                  "from the top, e.g. compression.codec)")
            return path
        for section, hint in reversed(scopes):
            fields = _field_hints(hint)
            if key in fields and not _is_section(fields[key]):
                return section + (key,)
        looked = ", ".join(".".join(s) or "(top level)" for s, _ in reversed(scopes))
        raise self.fail(f"{where}.{key}", f"{key!r} is not a config key of the enclosing sections ({looked}); "
                                          "use a dotted path from the top, e.g. compression.codec")


def _accepts(hint: Any, kind: type) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_accepts(a, kind) for a in typing.get_args(hint))
    return (origin or hint) is kind


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str) and _FLOAT.fullmatch(v.strip()):
        return float(v)  # YAML 1.1 reads 1e-3 as a string
    return None


# ------------------------------------------------------------------------------------------ spaces


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
    def resolve(self, pick: Callable[[Entry], Any]) -> tuple[dict[tuple[str, ...], Any], list[Entry]]:
        """Walk the entries in order; each one whose conditions hold sets its key (``pick`` draws dims)."""
        values: dict[tuple[str, ...], Any] = {}
        active = []
        for e in self.entries:
            if all(c.holds(values[c.path] if c.path in values else _lookup(self.base_full, c.path)) for c in e.when):
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
        return [ACCURACY, BITS] + ([SIM_TIME] if self.has_clock() else [])

    def trial_count(self) -> int:
        return self.settings.samples * (len(self.grid_variants()) if self.settings.mode == "asha" else 1)


def load_space(path: str | Path, config: str | Path | None = None, sets: Iterable[str] = (),
               settings: dict[str, Any] | None = None) -> Space:
    """Read, parse and validate a space file (errors name the file and the key path) before Ray starts."""
    p = Path(path)
    data = _read_mapping(p, "search space")
    source = p.name
    unknown = [k for k in data if k not in SPACE_KEYS]
    if unknown:
        raise SpaceError(f"{source}: unknown top-level key {unknown[0]!r}; allowed: {', '.join(SPACE_KEYS)}")
    if "search" not in data:
        raise SpaceError(f"{source}: no 'search:' section; it holds the keys to search (see tune_spaces/README.md)")

    # The trials' base: TUNE_BASE < the space's base < the -c file < --set.
    space_base = data.get("base") or {}
    if not isinstance(space_base, dict):
        raise SpaceError(f"{source}: base: expected a mapping of run-config keys, got {space_base!r}")
    base = merge(TUNE_BASE, space_base)
    if config is not None:
        base = merge(base, _read_mapping(Path(config), "config file"))
    for item in sets:
        keys, value = _parse_set(item)
        node = base
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    try:
        base_cfg = from_dict(RunConfig, base)
    except ConfigError as err:
        raise SpaceError(f"{source}: the trials' base config (space base < -c file < --set) is invalid: {err}") from err

    tune_data = dict(data.get("tune") or {})
    tune_data.update({k: v for k, v in (settings or {}).items() if v is not None})
    try:
        sweep = from_dict(SweepSettings, tune_data, "tune")
    except ConfigError as err:
        raise SpaceError(f"{source}: {err}") from err

    parser = _Parser(source)
    parser.section(data["search"], (), RunConfig, "search", (), ())
    if not parser.entries:
        raise SpaceError(f"{source}: search: nothing to search")
    space = Space(name=p.stem, source=source, path=str(p.resolve()), description=str(data.get("description") or ""), base=base,
                  entries=_order(parser.entries, source), settings=sweep, base_full=base_cfg.to_dict())
    _check_conflicts(space)
    _check_grid(space)
    _probe(space)
    if sweep.mode == "multi":
        try:
            import optuna  # noqa: F401
        except ImportError as err:
            raise SpaceError(f"{source}: tune.mode=multi needs optuna (pip install optuna)") from err
    max_steps = space.base_full["max_steps"]
    if sweep.mode == "asha" and sweep.grace_period and max_steps and sweep.grace_period >= max_steps:
        raise SpaceError(f"{source}: tune.grace_period={sweep.grace_period} is invalid; expected fewer steps than "
                         f"max_steps ({max_steps}): ASHA compares trials at rungs before the end")
    if sweep.time_weight > 0 and not space.has_clock():
        raise SpaceError(f"{source}: tune.time_weight={sweep.time_weight} needs sim/time_s: set cluster: in the base "
                         "(e.g. cluster: volunteer-100m)")
    return space


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SpaceError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpaceError(f"{what} {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SpaceError(f"{what} {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def _order(entries: list[Entry], source: str) -> list[Entry]:
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
    for ca in a.when:
        for cb in b.when:
            if ca.path == cb.path and not any(_same(x, y) for x in ca.allowed for y in cb.allowed):
                return True
    return False


def _check_conflicts(space: Space) -> None:
    for i, a in enumerate(space.entries):
        for b in space.entries[i + 1:]:
            if a.path == b.path and not _exclusive(a, b):
                first, second = sorted((a, b), key=lambda e: e.where)
                raise SpaceError(f"{space.source}: {first.key} is set twice, at {first.where} and {second.where}, "
                                 "and their when-conditions do not exclude each other (give them different "
                                 "values of the same key)")


def _writers(space: Space, path: tuple[str, ...]) -> list[Entry]:
    return [e for e in space.entries if e.path == path]


def _check_grid(space: Space) -> None:
    """A grid entry's conditions may read only grid and constant entries: grids are expanded before sampling."""
    for g in space.grid_entries():
        stack, seen = list(g.when), set()
        while stack:
            c = stack.pop()
            for w in _writers(space, c.path):
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
        for w in _writers(space, c.path):
            options = ([v for v in w.dist.candidates() + list(c.allowed) if w.dist.admits(v) and c.holds(v)]
                       if w.dist else ([w.value] if c.holds(w.value) else []))
            for v in dict.fromkeys(map(repr, options)):
                value = next(o for o in options if repr(o) == v)
                got = solve(list(w.when) + rest, {**fixed, c.path: value},
                            {**picks, w.name: value} if w.dist else picks, depth + 1)
                if got is not None:
                    return got
        if c.holds(_lookup(space.base_full, c.path)) and not any(not w.when for w in _writers(space, c.path)):
            return solve(rest, {**fixed, c.path: _lookup(space.base_full, c.path)}, picks, depth + 1)
        return None

    return solve(list(target.when), {}, {}, 0)


def _probe(space: Space) -> None:
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


# ------------------------------------------------------------------------------------------ trials


def objective_metrics(metrics: dict[str, Any], workers: int, bits_weight: float, time_weight: float) -> dict[str, float]:
    """The objectives of one report: accuracy, bits uploaded by all workers, simulated time, the score."""
    acc = float(metrics.get("eval/accuracy", math.nan))
    bits = 8.0 * float(metrics.get("comm/bytes_up_total", 0)) * workers
    sim = float(metrics.get("sim/time_s", math.nan))
    score = acc - bits_weight * math.log10(max(bits, 1.0))
    if time_weight:
        score -= time_weight * math.log10(sim) if sim > 0 else math.nan
    return {ACCURACY.key: acc, BITS.key: bits, SIM_TIME.key: sim, SCORE.key: score}


def _objective_callback(workers: int, bits_weight: float, time_weight: float):
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        """Tune's bridge from Train reports, adding the sweep's objective metrics to each."""

        def after_report(self, run_context, metrics, checkpoint):
            first = {**metrics[0], **objective_metrics(metrics[0], workers, bits_weight, time_weight)}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ObjectiveReport()


class PlacementGroupReaper:
    """Removes the Train worker groups' placement groups of trials that ended (a Ray actor, one per sweep).

    A placement group lives as long as the job, not as long as the actor that created it. When Tune stops a
    trial (ASHA), the trial's Train controller dies without removing its workers' group; Ray Train's own
    cleaner needs the state API (a dashboard, and a single Ray instance on the machine) to notice. Without
    it the group's CPUs stay reserved and later trials wait for them forever. So each trial registers its
    groups here, and the sweep releases them as soon as Tune reports the trial complete or failed.
    """

    def __init__(self) -> None:
        self.groups: dict[str, list[Any]] = {}

    def register(self, trial_id: str, group: Any) -> None:
        self.groups.setdefault(trial_id, []).append(group)

    def release(self, trial_id: str) -> int:
        """Remove the trial's groups that are still there; return how many were removed."""
        from ray.util import placement_group_table, remove_placement_group

        removed = 0
        for group in self.groups.pop(trial_id, []):
            try:
                if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
                    remove_placement_group(group)
                    removed += 1
            except Exception:  # noqa: BLE001 - already gone
                pass
        return removed

    def release_all(self) -> int:
        return sum(self.release(t) for t in list(self.groups))


def _register_callback(reaper: str, namespace: str, trial_id: str) -> Any:
    """A Train worker-group callback that hands the group's placement group to the sweep's reaper."""
    import ray
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RegisterWorkerGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            ray.get(ray.get_actor(reaper, namespace=namespace).register.remote(trial_id, group))

    return RegisterWorkerGroup()


def _reaper_callback(reaper: Any) -> Any:
    """The Tune callback that releases a trial's worker groups once the trial has ended."""
    import ray
    from ray.tune import Callback

    class ReleaseWorkerGroups(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            ray.get(reaper.release.remote(trial.trial_id))

        def on_trial_error(self, iteration, trials, trial, **info):
            ray.get(reaper.release.remote(trial.trial_id))

    return ReleaseWorkerGroups()


@dataclass(frozen=True)
class TrialPlan:
    """What every trial needs besides its sampled values."""

    space: Space
    trials_dir: str
    reaper: str                            # the name of the sweep's PlacementGroupReaper actor
    namespace: str


def run_trial(raw: dict[str, Any], plan: TrialPlan) -> None:
    """One Tune trial: resolve the config, run it as a rayq run under the sweep directory.

    A TorchTrainer trainer reports through Train's callback; a driver-run trainer (``volunteer``) runs
    right here, in the trial, and its progress items are reported to Tune directly.
    """
    import ray.tune

    from rayq.launch import DriverResult, TrainingError, describe_failure, find_runner, make_trainer, prepare, summarize

    cfg, _ = plan.space.config_from(raw)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = replace(cfg, name=f"{trial_id}-{cfg.compression.codec}", output_dir=plan.trials_dir, resume=None)
    cfg, run_dir = prepare(cfg)
    s = plan.space.settings
    started = time.perf_counter()
    runner = find_runner(cfg.trainer)
    if runner is not None:
        def report(item: dict[str, Any]) -> None:
            if "event" in item:  # a fault or recovery event, not metrics
                return
            numbers = {k: v for k, v in item.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            ray.tune.report({**numbers, **objective_metrics(numbers, cfg.workers, s.bits_weight, s.time_weight)})

        final = runner(cfg, run_dir, report)
        summarize(cfg, run_dir, DriverResult(final, final.pop("checkpoint", None)), time.perf_counter() - started)
        return
    callbacks = [_objective_callback(cfg.workers, s.bits_weight, s.time_weight),
                 _register_callback(plan.reaper, plan.namespace, trial_id)]
    try:
        result = make_trainer(cfg, run_dir, callbacks=callbacks).fit()
    except Exception as err:  # noqa: BLE001 - Tune records the trial as failed with the worker's message
        raise TrainingError(describe_failure(err)) from err
    summarize(cfg, run_dir, result, time.perf_counter() - started)


def actor_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """The actors a driver-run trainer creates inside its trial, one bundle each (empty for TorchTrainers).

    Ray Train places a TorchTrainer's workers itself, outside the trial's placement group. A driver-run
    trainer (``volunteer``: ``volunteer.actors`` peer hosts of ``volunteer.cpus_per_actor``; any other:
    ``workers × cpus_per_worker``) creates plain actors, which Tune captures into the trial's group: the
    group reserves them up front, so concurrent trials never each hold half of what they need (deadlock).
    """
    from rayq.launch import find_runner

    if find_runner(cfg.trainer) is None:
        return []
    if cfg.trainer == "volunteer":
        return [{"CPU": cfg.volunteer.cpus_per_actor}] * (cfg.volunteer.actors or cfg.workers)
    return [{"CPU": cfg.cpus_per_worker}] * cfg.workers


def trial_resources(raw: dict[str, Any], space: Space) -> Any:
    """Tune's reservation for a trial: a driver bundle, plus one bundle per actor the trial creates itself."""
    from ray.tune import PlacementGroupFactory

    cfg, _ = space.config_from(raw)
    return PlacementGroupFactory([{"CPU": TRIAL_CPU}] + actor_bundles(cfg))


# ------------------------------------------------------------------------------------------- sweeps


@dataclass
class TrialOutcome:
    number: int
    trial_id: str
    status: Literal["done", "stopped", "error"]
    step: int
    metrics: dict[str, float]
    params: dict[str, Any]                 # searched values in force (short label → value)
    run_dir: Path | None
    last: dict[str, float] = field(default_factory=dict)   # the last report, all numeric metrics
    error: str | None = None
    trace: Path | None = None              # Tune's error.txt of a failed trial


@dataclass
class SweepResult:
    name: str
    sweep_dir: Path
    mode: str
    objectives: list[Objective]
    trials: list[TrialOutcome]
    front: list[int]                       # indices into trials (finished trials only)
    best: dict[str, Path]                  # objective label → best_<objective>.yaml
    table: str
    plot: Path | None
    wall_s: float


def _asha_steps(space: Space) -> tuple[int, int]:
    """ASHA's max_t and grace period in steps; max_t just below max_steps keeps every rung before the end."""
    max_steps = space.base_full["max_steps"]
    max_t = max(max_steps - 1, 1) if max_steps else 10**9
    grace = space.settings.grace_period or 2 * max(int(space.base_full["report_every"]), 1)
    return max_t, min(grace, max_t)


def _ray_cpus_needed(space: Space) -> float:
    """Logical CPUs for ``max_concurrent`` trials of the base config (a local Ray gets at least that many)."""
    cfg = from_dict(RunConfig, space.base)
    per_trial = TRIAL_CPU + (sum(b["CPU"] for b in actor_bundles(cfg)) or cfg.workers * cfg.cpus_per_worker)
    return space.settings.max_concurrent * per_trial


def run_sweep(space: Space, output_dir: str | Path = "runs/sweeps", name: str | None = None,
              address: str | None = None, on_event: Callable[[str], None] | None = None) -> SweepResult:
    """Run the sweep on Ray Tune (starting or joining Ray), then compute and write the Pareto outputs."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from rayq.launch import find_runner, find_trainer, init_ray
    from rayq.tasks import check_available

    s = space.settings
    base_cfg = from_dict(RunConfig, space.base)
    if find_runner(base_cfg.trainer) is None:
        find_trainer(base_cfg.trainer)
    check_available(base_cfg.task, base_cfg.data_dir)
    name = name or f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
    sweep_dir = Path(output_dir).expanduser().resolve() / name
    if sweep_dir.exists():
        raise SpaceError(f"sweep directory {sweep_dir} already exists; choose another --name")
    trials_dir = sweep_dir / "trials"
    trials_dir.mkdir(parents=True)
    (sweep_dir / "base.yaml").write_text(yaml.safe_dump(space.base, sort_keys=False))
    (sweep_dir / "space.yaml").write_text(Path(space.path).read_text())

    init_ray(address, num_cpus=None if address else max(float(os.cpu_count() or 1), math.ceil(_ray_cpus_needed(space))))
    reaper = ray.remote(num_cpus=0)(PlacementGroupReaper).options(name=f"rayq-reaper-{name}").remote()
    plan = TrialPlan(space, str(trials_dir), f"rayq-reaper-{name}", ray.get_runtime_context().namespace)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                                    lambda raw: trial_resources(raw, space))
    objectives = space.objectives()
    if s.mode == "multi":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(space=space.define_by_run, metric=[o.key for o in objectives],
                              mode=[o.mode for o in objectives], seed=s.seed)
        scheduler: Any = FIFOScheduler()
        param_space: dict[str, Any] = {}
        if space.grid_entries() and on_event:
            on_event("note: tune.mode=multi draws grid entries like choice (Optuna samples, it does not enumerate)")
    else:
        search = BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)  # it ignores Tune's limit
        # Rungs are in steps, all before the last one: a trial that reaches its end finishes on its own.
        max_t, grace = _asha_steps(space)
        scheduler = ASHAScheduler(time_attr="step", metric=SCORE.key, mode="max", max_t=max_t, grace_period=grace,
                                  reduction_factor=s.reduction_factor, stop_last_trials=False)
        param_space = space.param_space()
    callbacks = [_reaper_callback(reaper)] + ([_progress_callback(on_event, space)] if on_event else [])
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=s.samples,
                                    max_concurrent_trials=s.max_concurrent if s.mode == "multi" else None,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=str(sweep_dir.parent), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=callbacks),
    )
    started = time.perf_counter()
    legacy = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new engine prints its banner even at verbose=0
    try:
        grid = tuner.fit()
    finally:
        ray.get(reaper.release_all.remote())
        ray.kill(reaper)
        if legacy is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = legacy
    wall = time.perf_counter() - started
    trials = sorted((_outcome(r, space, trials_dir) for r in grid), key=lambda t: t.number)
    for i, t in enumerate(trials):  # Tune counts from 0 or 1 depending on the searcher: number them 0..n-1
        t.number = i
    return _report(space, name, sweep_dir, trials, objectives, wall)


def _trial_dirname(trial: Any) -> str:
    """Tune's per-trial directory: ``<creation counter>-<trial id>`` (the counter orders the table)."""
    return f"{trial.experiment_tag.split('_', 1)[0]}-{trial.trial_id}"


def _outcome(result: Any, space: Space, trials_dir: Path) -> TrialOutcome:
    counter, _, dir_id = Path(result.path).name.partition("-")
    trial_id = str(result.metrics.get("trial_id") or dir_id)
    number = int(counter) if counter.isdigit() else 0
    run_dirs = sorted(trials_dir.glob(f"{trial_id}-*"))
    run_dir = run_dirs[0] if run_dirs else None
    try:
        _, params = space.config_from(result.config)
    except (ConfigError, KeyError, IndexError):
        params = {}
    last = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics = {k: v for k, v in last.items() if k.startswith("objective.")}
    step = int(last.get("step", 0))
    if result.error is not None:
        text = [line for line in str(result.error).strip().splitlines() if line.strip()]
        message = re.sub(r"^[\w.]+(Error|Exception): ", "", text[-1]) if text else "failed"
        trace = Path(result.path) / "error.txt"
        return TrialOutcome(number, trial_id, "error", step, metrics, params, run_dir, last, message,
                            trace if trace.is_file() else None)
    total = None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        total = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("max_steps")
    done = step >= total if total else run_dir is not None and (run_dir / "summary.json").is_file()
    return TrialOutcome(number, trial_id, "done" if done else "stopped", step, metrics, params, run_dir, last)


def _report(space: Space, name: str, sweep_dir: Path, trials: list[TrialOutcome], objectives: list[Objective],
            wall: float) -> SweepResult:
    """Pareto front over the finished trials, the table, plot, best YAMLs, results.csv and missing hparams."""
    done = [t for t in trials if t.status == "done"]
    points = [t.metrics for t in done]
    front_local = pareto_front(points, objectives)
    front = [trials.index(done[i]) for i in front_local]
    ranked = objectives + ([SCORE] if space.settings.mode == "asha" else [])
    best: dict[str, Path] = {}
    for o in ranked:
        i = best_index(points, o, objectives)
        if i is not None and done[i].run_dir is not None:
            best[o.name] = write_best(done[i], o, objectives, sweep_dir, name)
    table = sweep_table(trials, objectives, set(front), space.settings.mode == "asha")
    plot = None
    if done:
        plot = plot_front(points, objectives, front_local, sweep_dir / "pareto.png",
                          labels=[f"#{t.number}" for t in done],
                          extra=[t.metrics for t in trials if t.status == "stopped"],
                          title=f"{name}: {len(done)} finished trials, Pareto front in red")
    (sweep_dir / "pareto.txt").write_text(table + "\n")
    log.info("sweep %s: %d trials, %d finished, front %s", name, len(trials), len(done), [trials[i].number for i in front])
    _write_csv(sweep_dir / "results.csv", trials, set(front))
    for t in trials:
        if t.run_dir is not None and not (t.run_dir / "summary.json").is_file():
            _write_hparams(t)  # stopped or failed before the trainer's own hparams call
    return SweepResult(name, sweep_dir, space.settings.mode, objectives, trials, front, best, table, plot, wall)


def sweep_table(trials: list[TrialOutcome], objectives: list[Objective], front: set[int], score: bool) -> str:
    """One row per trial: front marker, status, objectives, the searched values; front first, then accuracy."""
    order = sorted(range(len(trials)), key=lambda i: (i not in front, trials[i].status != "done",
                                                      -_num(trials[i].metrics.get(ACCURACY.key))))
    cols = objectives + ([SCORE] if score else [])
    header = ["#", "trial", "front", "status", "step"] + [o.name for o in cols] + ["searched values"]
    rows = []
    for i in order:
        t = trials[i]
        params = "  ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        status = t.status if t.status != "error" else "failed"
        rows.append([t.number, t.trial_id, "*" if i in front else "", status, t.step]
                    + [t.metrics.get(o.key) for o in cols] + [params])
    return format_table(rows, header, title=f"Pareto front over {', '.join(o.name for o in objectives)} "
                                            "(* = on the front; only trials that ran to the end count)")


def _num(v: Any) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_best(t: TrialOutcome, objective: Objective, objectives: list[Objective], sweep_dir: Path, sweep: str) -> Path:
    """The trial's full resolved run config, with name and output_dir left to ``rayq train``'s defaults."""
    assert t.run_dir is not None
    cfg = yaml.safe_load((t.run_dir / "config.yaml").read_text())
    for key in ("name", "output_dir", "resume"):
        cfg.pop(key, None)
    slug = objective.key.split(".", 1)[-1]
    path = sweep_dir / f"best_{slug}.yaml"
    figures = ", ".join(f"{o.name} {t.metrics.get(o.key, math.nan):.6g}" for o in objectives)
    header = (f"# rayq tune: best {objective.name} of sweep {sweep} (trial #{t.number}, {t.trial_id})\n"
              f"# {figures}\n# trial run: {t.run_dir}\n# reproduce: rayq train -c {path}\n")
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return path


def _write_csv(path: Path, trials: list[TrialOutcome], front: set[int]) -> None:
    keys = sorted({k for t in trials for k in t.metrics})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "trial_id", "status", "step", "front", *keys, "params", "run_dir", "error"])
        for i, t in enumerate(trials):
            w.writerow([t.number, t.trial_id, t.status, t.step, i in front, *[t.metrics.get(k) for k in keys],
                        json.dumps(t.params), t.run_dir or "", t.error or ""])


def _write_hparams(t: TrialOutcome) -> None:
    """Trials stopped early never reach the trainer's own hparams call: write them from Tune's last report."""
    from rayq.telemetry import TensorBoardLog

    assert t.run_dir is not None
    config_file = t.run_dir / "config.yaml"
    if not config_file.is_file():
        return
    tb = TensorBoardLog(t.run_dir / "tensorboard")
    tb.text("run/events", f"{t.status} at step {t.step}" + (f": {t.error}" if t.error else ""), t.step)
    final = {k: v for k, v in t.last.items() if k.startswith(("eval/", "comm/bits", "comm/comp"))}  # as the trainer
    tb.hparams(yaml.safe_load(config_file.read_text()), final)
    tb.close()


def _progress_callback(on_event: Callable[[str], None], space: Space) -> Any:
    """A Tune callback turning trial events into one line each (the CLI prints them)."""
    from ray.tune import Callback

    objectives = space.objectives()

    class Progress(Callback):
        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.last: dict[str, dict] = {}

        def say(self, text: str) -> None:
            on_event(f"[{time.perf_counter() - self.started:6.1f}s] {text}")

        def on_trial_start(self, iteration, trials, trial, **info):
            try:
                params = space.config_from(trial.config)[1]
            except (ConfigError, KeyError, IndexError):
                params = {}
            self.say(f"trial {trial.trial_id} started: "
                     + ("  ".join(f"{k}={_short(v)}" for k, v in params.items()) or "(base config)"))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last[trial.trial_id] = result

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = self.last.get(trial.trial_id, {})
            figures = "  ".join(f"{o.name} {_short(float(r.get(o.key, math.nan)))}" for o in objectives)
            self.say(f"trial {trial.trial_id} ended at step {r.get('step', 0)}: {figures}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.say(f"trial {trial.trial_id} failed (its error is in the table below)")

    return Progress()


# --------------------------------------------------------------------------------------------- CLI


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "tune", help="Ray Tune sweep over run-config keys; Pareto front of accuracy, bits and simulated time",
        description="Sweep a search space (tune_spaces/*.yaml, grammar in tune_spaces/README.md) on Ray Tune, "
                    "then print the Pareto front and write pareto.png and best_<objective>.yaml "
                    "(each runs as is with `rayq train -c`).")
    p.add_argument("-s", "--space", required=True, help="search space YAML, e.g. tune_spaces/rate_thresholds.yaml")
    p.add_argument("-c", "--config", help="base run config YAML for every trial (over the space's base:)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one base config key for every trial (repeatable)")
    p.add_argument("--samples", type=int, help="Tune num_samples (default: the space's tune.samples, else 8); "
                                               "with grid entries each sample repeats the whole grid")
    p.add_argument("--mode", choices=("asha", "multi"),
                   help="asha: random/grid search with ASHA early stopping on the score; "
                        "multi: Optuna multi-objective (accuracy, bits, sim time). Default: the space's tune.mode")
    p.add_argument("--max-concurrent", type=int, help="trials at a time (default 2)")
    p.add_argument("--seed", type=int, help="seed of the search (random/Optuna sampling); trials keep the config's seed")
    p.add_argument("--output-dir", default="runs/sweeps", help="where sweep directories go (default: runs/sweeps)")
    p.add_argument("--name", help="sweep name (default: <space>-<timestamp>)")
    p.add_argument("--address", help="Ray cluster address to drive (default: start a local Ray)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-trial lines, only the results")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from rayq.launch import TrainingError
    from rayq.tasks import DataError

    settings = {"samples": args.samples, "mode": args.mode, "max_concurrent": args.max_concurrent, "seed": args.seed}
    try:
        space = load_space(args.space, args.config, args.sets, settings)
    except ConfigError as err:
        print(f"rayq: search space error: {err}", file=sys.stderr)
        return 2
    s = space.settings
    print(f"rayq: sweep {space.name}: {space.trial_count()} trials ({s.mode}, {s.max_concurrent} at a time) "
          f"of {space.base_full['task']}, objectives: {', '.join(o.name for o in space.objectives())} "
          "(starting Ray...)", flush=True)
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # failed trials are listed with their error below
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        result = run_sweep(space, args.output_dir, args.name, args.address,
                           on_event=None if args.quiet else (lambda line: print(line, flush=True)))
    except (ConfigError, DataError) as err:
        print(f"rayq: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"rayq: sweep failed: {err}", file=sys.stderr)
        return 1
    print(result.table)
    counts = {k: sum(t.status == k for t in result.trials) for k in ("done", "stopped", "error")}
    print(f"{len(result.trials)} trials in {result.wall_s:.0f} s: {counts['done']} finished, "
          f"{counts['stopped']} stopped early by ASHA, {counts['error']} failed")
    for t in result.trials:
        if t.status == "error":
            print(f"trial #{t.number} failed: {t.error}" + (f"\n  full trace: {t.trace}" if t.trace else ""))
    print(f"sweep directory: {result.sweep_dir}")
    if result.plot:
        print(f"Pareto plot:     {result.plot}")
    for label, path in result.best.items():
        print(f"best {label + ':':<20} rayq train -c {path}")
    print(f"tensorboard:     tensorboard --logdir {result.sweep_dir / 'trials'}  (HParams tab compares trials)")
    if not counts["done"]:
        print("rayq: no trial ran to the end: no Pareto front, no best configs", file=sys.stderr)
        return 1
    return 0
