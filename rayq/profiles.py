"""Simulated node profiles (``clusters/*.yaml``): links, compute speed, churn and stragglers per node.

A profile is validated like the run config (errors name the key path, the value and what is
allowed) and then *sampled* into one :class:`NodeSpec` per worker, reproducibly from a seed::

    name: volunteer-wan
    description: home connections
    defaults:                 # fixed values for every node
      latency: 50ms
    distribution:             # values drawn per node (override defaults)
      down: {dist: lognormal, median: 100Mbit, sigma: 1.0, min: 10Mbit, max: 1Gbit}
      client_mode: {dist: bernoulli, p: 0.2}
    nodes:                    # explicit nodes (override both); repeated when shorter than workers,
                              # truncated when longer (worker i takes entry i mod len)
      - {count: 2, up: 1Gbit, down: 1Gbit}
    server: {up: 10Gbit, down: 10Gbit, latency: 1ms}   # optional, for parameter-server timing

A run config may hold the profile under a top-level ``cluster:`` key (a mapping, or the name of a
shipped profile); :func:`load_profile` accepts both shapes.

Node parameters (units accepted in strings; numbers are SI: bits/s and seconds):

* ``up``, ``down`` — bandwidth > 0: ``100Mbit``, ``1Gbit``, ``10Gbit/s``, ``100Mbps``, ``12.5MB/s``.
* ``latency`` — one-way latency to a typical peer, >= 0: ``20ms``, ``50us``, ``0.5ms``.
* ``speed_factor`` — multiplier on compute time, > 0: 1 = the machine that measured it, 2 = twice
  as slow (throughput ÷ 2). A lognormal throughput gives a lognormal speed factor (negate ``mu``).
* ``client_mode`` — behind NAT / firewall: cannot accept connections, never aggregates a butterfly shard (DeDLOC).
* ``session_mean`` — mean of the exponential online session (``2h``); null = never leaves.
* ``rejoin_delay`` — mean of the exponential offline time before rejoining; null = never rejoins.
* ``join_at`` — simulated time of the node's first arrival (default 0).
* ``straggler_prob`` ∈ [0, 1] — chance per step that the node straggles;
  ``straggler_slowdown`` >= 1 — its compute-time multiplier when it does.

Distributions (``dist:`` and its keys; value keys accept the parameter's units): ``lognormal``
(``mu`` of ln(value in SI units) or ``median``; ``sigma``; optional ``min`` / ``max`` clip),
``uniform`` / ``loguniform`` (``low``, ``high``), ``choice`` (``values``, optional ``weights``),
``bernoulli`` (``p``; only for ``client_mode``).

Sampling uses one generator per parameter seeded by ``(seed, parameter name)``, so node i's values
do not depend on the number of workers (the 4-node sample is the prefix of the 40-node sample).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rayq import resources
from rayq.schema import ConfigError, check, from_dict
from rayq.netsim import Link

CLUSTERS_DIR = resources.directory("clusters")

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BANDWIDTH = re.compile(rf"^\s*(?P<num>{_NUM})\s*(?:(?P<prefix>[kKmMgGtT]?)(?P<unit>bits?/s|bits?|bps|b/s|b|"
                        r"bytes?/s|bytes?|Bps|B/s|B))?\s*$")
_DURATION = re.compile(rf"^\s*(?P<num>{_NUM})\s*(?P<unit>us|µs|μs|ms|s|sec|min|h)?\s*$")
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_SECONDS = {None: (1, 1), "us": (1, 10**6), "µs": (1, 10**6), "μs": (1, 10**6), "ms": (1, 1000), "s": (1, 1),
            "sec": (1, 1), "min": (60, 1), "h": (3600, 1)}  # (multiply, divide): 25us is exactly 25/1e6
_BANDWIDTH_ALLOWED = "a bandwidth > 0 in bits/s: a number or a string like '100Mbit', '1Gbit', '10Gbit/s', '12.5MB/s'"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


# ---------------------------------------------------------------------------------------- scalar parsers


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and re.fullmatch(_NUM, value.strip()):
        return float(value)
    return None


def parse_bandwidth(value: Any, key: str = "bandwidth") -> float:
    """Bits per second from a number or a string with units (decimal prefixes; ``B`` = bytes)."""
    bps = _number(value)
    if bps is None and isinstance(value, str) and (m := _BANDWIDTH.match(value)):
        scale = _PREFIX[(m["prefix"] or "").lower()] * (8.0 if (m["unit"] or "b")[0] == "B" else 1.0)
        bps = float(m["num"]) * scale
    check(bps is not None and math.isfinite(bps) and bps > 0, key, value, _BANDWIDTH_ALLOWED)
    return bps


def parse_duration(value: Any, key: str = "duration", positive: bool = False) -> float:
    """Seconds from a number or a string with units (``us``, ``µs``, ``ms``, ``s``, ``min``, ``h``)."""
    seconds = _number(value)
    if seconds is None and isinstance(value, str) and (m := _DURATION.match(value)):
        mul, div = _SECONDS[m["unit"]]
        seconds = float(m["num"]) * mul / div
    ok = seconds is not None and math.isfinite(seconds) and (seconds > 0 if positive else seconds >= 0)
    check(ok, key, value, f"seconds {'> 0' if positive else '>= 0'}: a number or a string like '20ms', '50us', '2h'")
    return seconds


def _duration_or_never(positive: bool) -> Callable[[Any, str], float | None]:
    def parse(value: Any, key: str) -> float | None:
        if value is None or value == "never":
            return None
        return parse_duration(value, key, positive)
    return parse


def _bounded(low: float, high: float, low_open: bool, allowed: str) -> Callable[[Any, str], float]:
    def parse(value: Any, key: str) -> float:
        x = _number(value)
        ok = x is not None and (x > low if low_open else x >= low) and x <= high
        check(ok, key, value, allowed)
        return x
    return parse


def _bool(value: Any, key: str) -> bool:
    check(isinstance(value, bool), key, value, "true or false")
    return value


@dataclass(frozen=True)
class _Param:
    parse: Callable[[Any, str], Any]
    default: Any
    boolean: bool = False


PARAMS: dict[str, _Param] = {
    "up": _Param(parse_bandwidth, 1e9),
    "down": _Param(parse_bandwidth, 1e9),
    "latency": _Param(parse_duration, 0.0),
    "speed_factor": _Param(_bounded(0.0, math.inf, True, "a compute-time multiplier > 0 (2 = twice as slow)"), 1.0),
    "client_mode": _Param(_bool, False, boolean=True),
    "session_mean": _Param(_duration_or_never(True), None),
    "rejoin_delay": _Param(_duration_or_never(False), None),
    "join_at": _Param(parse_duration, 0.0),
    "straggler_prob": _Param(_bounded(0.0, 1.0, False, "a probability in [0, 1]"), 0.0),
    "straggler_slowdown": _Param(_bounded(1.0, math.inf, False, "a slowdown factor >= 1"), 1.0),
}


# ---------------------------------------------------------------------------------------- distributions


_DIST_KEYS = {
    "lognormal": ("mu", "median", "sigma", "min", "max"),
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "choice": ("values", "weights"),
    "bernoulli": ("p",),
}
_DIST_NEEDS = {
    "lognormal": "mu or median, and sigma (optional: min, max)",
    "uniform": "low, high",
    "loguniform": "low, high",
    "choice": "values (optional: weights)",
    "bernoulli": "p",
}


@dataclass(frozen=True)
class Dist:
    """A per-node distribution of one parameter, with values already in SI units."""

    kind: str
    mu: float = 0.0
    sigma: float = 0.0
    low: float = 0.0
    high: float = 0.0
    min: float | None = None
    max: float | None = None
    values: tuple[Any, ...] = ()
    weights: tuple[float, ...] = ()
    p: float = 0.0

    @classmethod
    def parse(cls, spec: Any, name: str, path: str) -> Dist:
        param = PARAMS[name]
        if not isinstance(spec, dict):
            return cls("choice", values=(param.parse(spec, path),), weights=(1.0,))
        kind = spec.get("dist")
        kinds = ("bernoulli", "choice") if param.boolean else ("lognormal", "uniform", "loguniform", "choice")
        if kind not in kinds:
            raise ConfigError(f"{path}.dist={kind!r} is invalid; choose one of: {', '.join(kinds)}")
        for key in spec:
            if key != "dist" and key not in _DIST_KEYS[kind]:
                raise ConfigError(f"unknown config key '{path}.{key}'; allowed keys for dist {kind}: "
                                  f"dist, {', '.join(_DIST_KEYS[kind])}")

        def need(key: str) -> Any:
            if key not in spec:
                raise ConfigError(f"{path}.{key} is missing; dist {kind} needs: {_DIST_NEEDS[kind]}")
            return spec[key]

        def value(key: str) -> float:
            return param.parse(need(key), f"{path}.{key}")

        if kind == "bernoulli":
            return cls(kind, p=_bounded(0.0, 1.0, False, "a probability in [0, 1]")(need("p"), f"{path}.p"))
        if kind == "choice":
            raw = need("values")
            check(isinstance(raw, list) and len(raw) > 0, f"{path}.values", raw, "a non-empty list")
            values = tuple(param.parse(v, f"{path}.values[{i}]") for i, v in enumerate(raw))
            weights = spec.get("weights", [1.0] * len(values))
            ws = [_number(w) for w in weights] if isinstance(weights, list) else []
            ok = len(ws) == len(values) and all(w is not None and w >= 0 for w in ws) and sum(ws) > 0
            check(ok, f"{path}.weights", weights, f"{len(values)} numbers >= 0 with a positive sum")
            return cls(kind, values=values, weights=tuple(ws))
        if kind in ("uniform", "loguniform"):
            low, high = value("low"), value("high")
            check(high >= low, f"{path}.high", spec["high"], f"a value >= low ({spec['low']!r})")
            if kind == "loguniform":
                check(low > 0, f"{path}.low", spec["low"], "a value > 0 (loguniform)")
            return cls(kind, low=low, high=high)
        if ("mu" in spec) == ("median" in spec):
            raise ConfigError(f"{path}: dist lognormal needs exactly one of mu (of ln value) or median")
        if "median" in spec:
            median = value("median")
            check(median > 0, f"{path}.median", spec["median"], "a value > 0")
            mu = math.log(median)
        else:
            mu = _number(spec["mu"])
            check(mu is not None, f"{path}.mu", spec["mu"], "a number (mean of ln value in SI units)")
        sigma = _number(need("sigma"))
        check(sigma is not None and sigma >= 0, f"{path}.sigma", spec["sigma"], "a number >= 0")
        lo = value("min") if "min" in spec else None
        hi = value("max") if "max" in spec else None
        if lo is not None and hi is not None:
            check(hi >= lo, f"{path}.max", spec["max"], f"a value >= min ({spec['min']!r})")
        for bound, extreme, key in ((lo, 1e-300, "min"), (hi, 1e300, "max")):
            if bound is None:
                try:
                    param.parse(extreme, path)
                except ConfigError as err:
                    raise ConfigError(f"{path}: dist lognormal can draw values {name} does not allow; "
                                      f"set {key} ({str(err).split('expected ', 1)[-1]})") from None
        return cls(kind, mu=mu, sigma=sigma, min=lo, max=hi)

    def sample(self, rng: np.random.Generator, n: int) -> list[Any]:
        """``n`` draws; each uses one uniform or normal variate, so a shorter sample is a prefix."""
        if self.kind == "lognormal":
            x = np.exp(self.mu + self.sigma * rng.standard_normal(n))
            x = np.clip(x, self.min if self.min is not None else -np.inf, self.max if self.max is not None else np.inf)
            return [float(v) for v in x]
        u = rng.random(n)
        if self.kind == "uniform":
            return [float(v) for v in self.low + (self.high - self.low) * u]
        if self.kind == "loguniform":
            lo, hi = math.log(self.low), math.log(self.high)
            return [float(v) for v in np.exp(lo + (hi - lo) * u)]
        if self.kind == "bernoulli":
            return [bool(v) for v in u < self.p]
        cdf = np.cumsum(self.weights) / sum(self.weights)
        idx = np.minimum(np.searchsorted(cdf, u, side="right"), len(self.values) - 1)
        return [self.values[i] for i in idx]


# ---------------------------------------------------------------------------------------- YAML sections


def _parse_values(obj: Any, path: str) -> None:
    for name in PARAMS:
        value = getattr(obj, name)
        if value is not UNSET:
            setattr(obj, name, PARAMS[name].parse(value, f"{path}.{name}" if path else name))


@dataclass
class _NodeParams:
    """The node parameters a profile can set (the keys of ``PARAMS``); unset keys stay ``UNSET``."""

    up: Any = UNSET
    down: Any = UNSET
    latency: Any = UNSET
    speed_factor: Any = UNSET
    client_mode: Any = UNSET
    session_mean: Any = UNSET
    rejoin_delay: Any = UNSET
    join_at: Any = UNSET
    straggler_prob: Any = UNSET
    straggler_slowdown: Any = UNSET


@dataclass
class NodeValues(_NodeParams):
    """Fixed node parameters as written under ``defaults:``."""

    def validate(self, path: str) -> None:
        _parse_values(self, path)

    def given(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PARAMS if getattr(self, k) is not UNSET}


@dataclass
class NodeEntry(NodeValues):
    """One entry of ``nodes:``: fixed parameters for ``count`` consecutive nodes."""

    count: int = 1

    def validate(self, path: str) -> None:
        check(self.count >= 1, f"{path}.count", self.count, "an integer >= 1")
        _parse_values(self, path)


@dataclass
class Distribution(_NodeParams):
    """``distribution:``: one :class:`Dist` spec (``{dist: ..., ...}``) per sampled parameter."""

    def validate(self, path: str) -> None:
        for name in PARAMS:
            spec = getattr(self, name)
            if spec is not UNSET:
                setattr(self, name, Dist.parse(spec, name, f"{path}.{name}" if path else name))

    def given(self) -> dict[str, Dist]:
        return {k: getattr(self, k) for k in PARAMS if getattr(self, k) is not UNSET}


@dataclass
class ServerValues:
    """``server:``: the parameter server's link (used only by ``ps`` timing)."""

    up: Any = UNSET
    down: Any = UNSET
    latency: Any = 0.0

    def validate(self, path: str) -> None:
        for name in ("up", "down"):
            if getattr(self, name) is UNSET:
                raise ConfigError(f"{path}.{name} is missing; a server needs up and down bandwidth")
            setattr(self, name, parse_bandwidth(getattr(self, name), f"{path}.{name}"))
        self.latency = parse_duration(self.latency, f"{path}.latency")

    @property
    def link(self) -> Link:
        return Link(self.up, self.down, self.latency)


# ---------------------------------------------------------------------------------------- sampled profile


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node, in SI units (bits/s, seconds); see the module docstring for meanings."""

    index: int
    up_bps: float
    down_bps: float
    latency_s: float
    speed_factor: float
    client_mode: bool
    session_mean_s: float | None
    rejoin_delay_s: float | None
    join_at_s: float
    straggler_prob: float
    straggler_slowdown: float

    @property
    def link(self) -> Link:
        return Link(self.up_bps, self.down_bps, self.latency_s, self.client_mode)


_NODE_FIELD = {"up": "up_bps", "down": "down_bps", "latency": "latency_s", "session_mean": "session_mean_s",
               "rejoin_delay": "rejoin_delay_s", "join_at": "join_at_s"}


@dataclass(frozen=True)
class ClusterProfile:
    """A profile sampled for ``len(nodes)`` workers with ``seed``: what netsim and faults consume."""

    name: str
    description: str
    seed: int
    nodes: list[NodeSpec]
    server: Link | None = None

    @property
    def workers(self) -> int:
        return len(self.nodes)

    @property
    def links(self) -> list[Link]:
        return [n.link for n in self.nodes]

    @property
    def speed_factors(self) -> list[float]:
        return [n.speed_factor for n in self.nodes]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for saving next to a run's outputs and for logs)."""
        return dataclasses.asdict(self)


@dataclass
class ProfileSpec:
    """A validated, not yet sampled profile; :meth:`sample` turns it into a :class:`ClusterProfile`."""

    name: str | None = None
    description: str = ""
    defaults: NodeValues = field(default_factory=NodeValues)
    distribution: Distribution = field(default_factory=Distribution)
    nodes: list[NodeEntry] = field(default_factory=list)
    server: ServerValues | None = None

    def validate(self, path: str) -> None:
        self._path = path  # the sections validated themselves as they were built; keep where this one sits

    def sample(self, workers: int, seed: int) -> ClusterProfile:
        """One :class:`NodeSpec` per worker: node entry > distribution > defaults > built-in default.

        An explicit ``nodes:`` list (after expanding ``count``) is repeated when it is shorter than
        ``workers`` (worker i takes entry ``i mod len``) and truncated when longer.
        """
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers={workers!r} is invalid; expected an integer >= 1")
        entries = [e for e in self.nodes for _ in range(e.count)]
        draws = {name: dist.sample(np.random.default_rng([seed % 2**64, zlib.crc32(name.encode())]), workers)
                 for name, dist in self.distribution.given().items()}
        where = getattr(self, "_path", "")
        prefix = f"{where}.distribution." if where else "distribution."
        for name, values in draws.items():
            for i, v in enumerate(values):
                PARAMS[name].parse(v, f"{prefix}{name} (sampled for node {i})")
        fixed = self.defaults.given()
        nodes = []
        for i in range(workers):
            values = {name: p.default for name, p in PARAMS.items()}
            values.update(fixed)
            values.update({name: v[i] for name, v in draws.items()})
            if entries:
                values.update(entries[i % len(entries)].given())
            nodes.append(NodeSpec(index=i, **{_NODE_FIELD.get(k, k): v for k, v in values.items()}))
        return ClusterProfile(self.name or "custom", self.description, seed, nodes,
                              self.server.link if self.server is not None else None)


# ---------------------------------------------------------------------------------------- loading


_TOP_KEYS = tuple(f.name for f in dataclasses.fields(ProfileSpec))


def profile_names() -> list[str]:
    """Names of the profiles shipped in ``clusters/`` (bare or run-config shaped)."""
    names: list[str] = []
    if CLUSTERS_DIR is None:
        return names
    for p in sorted(CLUSTERS_DIR.glob("*.y*ml")):
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and (isinstance(data.get("cluster"), dict) or (data and set(data) <= set(_TOP_KEYS))):
            names.append(p.stem)
    return names


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"cluster profile {str(path)!r} is not valid YAML: {err}") from err


def _resolve(source: str | Path) -> Path:
    p = Path(source)
    if p.is_file():
        return p
    if isinstance(source, str) and re.fullmatch(r"[\w.-]+", source) and CLUSTERS_DIR is not None:
        for ext in (".yaml", ".yml"):
            if (CLUSTERS_DIR / f"{source}{ext}").is_file():
                return CLUSTERS_DIR / f"{source}{ext}"
    raise ConfigError(f"cluster profile {str(source)!r} is neither a file nor a shipped profile; "
                      f"choose one of: {', '.join(profile_names())}, or give a path to a YAML file")


def _from_mapping(data: dict[str, Any], default_name: str | None, depth: int = 0) -> ProfileSpec:
    path = ""
    if "cluster" in data:
        data, path = data["cluster"], "cluster"
        if isinstance(data, (str, Path)) and depth == 0:
            return _parse(data, depth=1)
        if not isinstance(data, dict):
            raise ConfigError(f"cluster={data!r} is invalid; expected a profile mapping or a shipped profile name")
    else:
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(_TOP_KEYS)} "
                              "(a run config holds its profile under a top-level 'cluster:' key)")
    spec = from_dict(ProfileSpec, data, path)
    if spec.name is None:
        spec.name = default_name
    return spec


def parse_profile(source: str | Path | dict[str, Any]) -> ProfileSpec:
    """Validate a profile without sampling it: a shipped name, a YAML path, or a mapping.

    A mapping or file may be a bare profile or a run config holding it under ``cluster:`` (a mapping,
    or the name / path of a profile). Raises :class:`ConfigError` naming the key, value and allowed.
    """
    return _parse(source, depth=0)


def _parse(source: str | Path | dict[str, Any], depth: int) -> ProfileSpec:
    if isinstance(source, dict):
        return _from_mapping(source, None, depth)
    path = _resolve(source)
    data = _read(path)
    if not isinstance(data, dict):
        raise ConfigError(f"cluster profile {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    try:
        return _from_mapping(data, path.stem, depth)
    except ConfigError as err:
        raise ConfigError(f"cluster profile {str(path)!r}: {err}") from err


def load_profile(source: str | Path | dict[str, Any], workers: int, seed: int) -> ClusterProfile:
    """Parse and sample a profile for ``workers`` nodes: ``load_profile("volunteer-wan", 8, seed=0)``."""
    return parse_profile(source).sample(workers, seed)
