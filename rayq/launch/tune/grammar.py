"""The search-space grammar: read a space YAML file into a validated :class:`~rayq.launch.tune.space.Space`.

A space file (tune_spaces/README.md has the full grammar)::

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

Every key path and distribution is checked against the run-config schema while parsing; then the
solver checks that every entry can apply and gives valid trial configs, all before Ray starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rayq import resources
from rayq.config import RunConfig
from rayq.launch.tune.objectives import SPLIT_LEAKAGE
from rayq.launch.tune.solver import check_conflicts, check_grid, order, probe
from rayq.launch.tune.space import DISTRIBUTIONS, Condition, Dist, Entry, Space, SpaceError, SweepSettings
from rayq.schema import FLOAT, ConfigError, apply_set, field_hints, from_dict, merge, read_mapping

SPACE_KEYS = ("description", "base", "search", "tune")

#: Every trial's defaults, below the space's ``base``, the ``-c`` file and ``--set``: short runs on digits
#: that fit two concurrent trials on two cores (2 workers × 0.5 CPU each), a simulated clock for the time
#: objective, and an evaluation at every report so every rung of ASHA sees a fresh accuracy.
TUNE_BASE: dict[str, Any] = {
    "task": "digits", "workers": 2, "cpus_per_worker": 0.5, "max_steps": 120, "report_every": 20,
    "eval_every": 20, "checkpoint_every": 0, "keep_checkpoints": 1, "cluster": "volunteer-100m",
}


# --------------------------------------------------------------------------------------- the schema


def _field_hints(cls: type) -> dict[str, Any]:
    """A config section's fields and their annotations, in declaration order."""
    hints = field_hints(cls)
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


# ---------------------------------------------------------------------------------------- parsing


class Parser:
    """Turns a space's ``search:`` mapping into entries, checking every key path against the run config."""

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
                raise self.fail(where, "an empty list of blocks")
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
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(hint))
    return (origin or hint) is kind


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str) and FLOAT.fullmatch(v.strip()):
        return float(v)  # YAML 1.1 reads 1e-3 as a string
    return None


# ------------------------------------------------------------------------------------------ loading


def load_space(path: str | Path, config: str | Path | None = None, sets: Iterable[str] = (),
               settings: dict[str, Any] | None = None) -> Space:
    """Read, parse and validate a space file (errors name the file and the key path) before Ray starts."""
    p = find_space(path)
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
        apply_set(base, item)
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

    parser = Parser(source)
    parser.section(data["search"], (), RunConfig, "search", (), ())
    if not parser.entries:
        raise SpaceError(f"{source}: search: nothing to search")
    space = Space(name=p.stem, source=source, path=str(p.resolve()), description=str(data.get("description") or ""), base=base,
                  entries=order(parser.entries, source), settings=sweep, base_full=base_cfg.to_dict())
    check_conflicts(space)
    check_grid(space)
    probe(space)
    if sweep.mode == "multi":
        try:
            import optuna  # noqa: F401
        except ImportError as err:
            raise SpaceError(f"{source}: tune.mode=multi needs optuna (pip install optuna)") from err
    max_steps = space.base_full["max_steps"]
    if sweep.mode == "asha" and sweep.grace_period and max_steps and sweep.grace_period >= max_steps:
        raise SpaceError(f"{source}: tune.grace_period={sweep.grace_period} is invalid; expected fewer steps than "
                         f"max_steps ({max_steps}): ASHA compares trials at rungs before the end")
    check_leakage(space, source)
    if sweep.time_weight > 0 and not space.has_clock():
        raise SpaceError(f"{source}: tune.time_weight={sweep.time_weight} needs sim/time_s: set cluster: in the base "
                         "(e.g. cluster: volunteer-100m)")
    return space


def check_leakage(space: Space, source: str) -> None:
    """A leakage objective needs the runs to report it: membership on, or the split trainer for the decoder."""
    leakage = space.settings.leakage
    if leakage == "none":
        return
    trainers = {space.base_full["trainer"]} | {e.value for e in space.entries if e.path == ("trainer",)
                                                and not e.dist}
    trainers |= {v for e in space.entries if e.path == ("trainer",) and e.dist for v in e.dist.candidates()}
    if leakage in SPLIT_LEAKAGE and trainers != {"split"}:
        raise SpaceError(f"{source}: tune.leakage={leakage!r} is reported by trainer split only, and trials of this "
                         f"space use trainer {', '.join(sorted(map(str, trainers)))}; set trainer: split in the base, "
                         "or choose tune.leakage membership_auc")
    if leakage not in SPLIT_LEAKAGE and not space.base_full["privacy"]["membership"]:
        raise SpaceError(f"{source}: tune.leakage={leakage!r} needs the membership figures, and the base sets "
                         "privacy.membership=false")


def find_space(space: str | Path) -> Path:
    """A space file by path, or a shipped space by name (``rate_thresholds`` → tune_spaces/rate_thresholds.yaml)."""
    p = Path(space)
    if p.is_file() or len(p.parts) != 1:
        return p
    name = p.stem if p.suffix in (".yaml", ".yml") else p.name
    found = resources.find("tune_spaces", name)
    if found is not None:
        return found
    shipped = resources.names("tune_spaces")
    raise SpaceError(f"search space {str(space)!r} is neither a file nor a shipped space; choose one of: "
                     f"{', '.join(shipped) or '(none shipped)'}, or give the path of a YAML file")


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        return read_mapping(path, what)
    except ConfigError as err:
        raise SpaceError(str(err)) from None
