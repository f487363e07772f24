"""One typed, validated run configuration: defaults < YAML file < ``--set key=value`` overrides.

Every key and value is checked before Ray starts. Errors name the key, the value seen and what is
allowed: ``compression.codec='qsdg' is not a codec; choose one of: none, fp16, ...``. The resolved
config (task defaults filled in) is saved next to the run's outputs.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config key or value is invalid; raised before anything starts."""


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False

    def validate(self, path: str) -> None:
        _check(self.lr is None or self.lr > 0, f"{path}.lr", self.lr, "a positive number")
        _check(0 <= self.momentum < 1, f"{path}.momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")


@dataclass
class OverrideConfig:
    pattern: str = "*"
    codec: str = "none"
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        from compressors import CodecError, make_codec

        try:
            make_codec(self.codec, self.params)
        except CodecError as err:
            raise ConfigError(f"{path}: {err}") from err


@dataclass
class CompressionConfig:
    codec: str = "qsgd"
    params: dict[str, Any] = field(default_factory=dict)
    strategy: Literal["auto", "allreduce", "allgather", "two_phase"] = "auto"
    error_feedback: bool = False
    min_numel: int = 256
    bucket_small: bool = True
    overrides: list[OverrideConfig] = field(default_factory=list)

    def validate(self, path: str) -> None:
        from compressors import CodecError, make_codec

        try:
            make_codec(self.codec, self.params)
        except CodecError as err:
            raise ConfigError(str(err)) from err
        from rayq.collective import check_strategy

        for codec in [self.codec] + [o.codec for o in self.overrides]:
            try:
                check_strategy(codec, self.strategy)
            except ValueError as err:
                raise ConfigError(f"{path}: {err}") from err
        _check(self.min_numel >= 0, f"{path}.min_numel", self.min_numel, "an integer >= 0")


@dataclass
class SyncConfig:
    """When and what the workers average (rayq.sync; ALGORITHMS.md §4, §7)."""

    schedule: Literal["every_step", "periodic", "adaptive", "laq"] = "every_step"
    period: int = 4
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    p_min: int = 1
    p_max: int = 64
    kappa: float = 1.0
    omega: float = 0.5
    warmup_steps: int = 0
    bits: int = 4
    memory: int = 10
    xi: float = 0.8
    max_skips: int = 100
    error_weight: float = 3.0

    def validate(self, path: str) -> None:
        _check(self.period >= 1, f"{path}.period", self.period, "an integer >= 1")
        _check(1 <= self.p_min <= self.period <= self.p_max, f"{path}.p_min/period/p_max",
               (self.p_min, self.period, self.p_max), "1 <= p_min <= period <= p_max")
        _check(self.outer_lr > 0, f"{path}.outer_lr", self.outer_lr, "a number > 0")
        _check(0 <= self.outer_momentum < 1, f"{path}.outer_momentum", self.outer_momentum, "a number in [0, 1)")
        _check(self.kappa > 0, f"{path}.kappa", self.kappa, "a number > 0")
        _check(0 < self.omega <= 2, f"{path}.omega", self.omega, "a number in (0, 2]")
        _check(self.warmup_steps >= 0, f"{path}.warmup_steps", self.warmup_steps, "an integer >= 0 (0 = one epoch)")
        _check(1 <= self.bits <= 16, f"{path}.bits", self.bits, "an integer in 1..16")
        _check(self.memory >= 1, f"{path}.memory", self.memory, "an integer >= 1")
        _check(self.xi >= 0, f"{path}.xi", self.xi, "a number >= 0")
        _check(self.max_skips >= 0, f"{path}.max_skips", self.max_skips, "an integer >= 0")
        _check(self.error_weight >= 0, f"{path}.error_weight", self.error_weight, "a number >= 0")


#: Fault kinds (rayq.faults) and the event fields each one uses besides ``kind``, ``worker`` and ``step``.
FAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "crash": (), "kill": (), "leave": ("duration",), "straggle": ("duration", "factor"),
    "delay": ("seconds",), "lose": (), "corrupt": (),
}


@dataclass
class FaultEventConfig:
    """One planned fault: ``{step: 12, worker: 1, kind: crash}`` (rayq.faults has the meanings).

    ``step`` is the step (collective mode) or round (volunteer mode) it fires at; ``duration`` the steps a
    ``leave`` or ``straggle`` lasts (null = to the end); ``factor`` a straggler's slowdown; ``seconds``
    the real time a ``delay`` holds a worker's reply back.
    """

    kind: str | None = None
    worker: int | None = None
    step: int | None = None
    duration: int | None = None
    factor: float | None = None
    seconds: float | None = None

    def validate(self, path: str) -> None:
        kinds = ", ".join(FAULT_FIELDS)
        _check(self.kind in FAULT_FIELDS, f"{path}.kind", self.kind, f"one of: {kinds}")
        _check(self.worker is not None and self.worker >= 0, f"{path}.worker", self.worker, "a worker index >= 0")
        if self.kind == "straggle":
            _check(self.step is None or self.step >= 0, f"{path}.step", self.step, "a step >= 0, or null (from the start)")
        else:
            _check(self.step is not None and self.step >= 0, f"{path}.step", self.step, "a step >= 0")
        for name in ("duration", "factor", "seconds"):
            if getattr(self, name) is not None and name not in FAULT_FIELDS[self.kind]:  # type: ignore[index]
                users = [k for k, fields in FAULT_FIELDS.items() if name in fields]
                raise ConfigError(f"{path}.{name}={getattr(self, name)!r} is invalid for kind {self.kind!r}; "
                                  f"{name} belongs to kind {' / '.join(users)}")
        _check(self.duration is None or self.duration >= 1, f"{path}.duration", self.duration,
               "a number of steps >= 1, or null (to the end)")
        if self.kind == "straggle":
            _check(self.factor is not None and self.factor >= 1, f"{path}.factor", self.factor, "a slowdown factor >= 1")
        if self.kind == "delay":
            _check(self.seconds is not None and self.seconds > 0, f"{path}.seconds", self.seconds, "real seconds > 0")


@dataclass
class FaultsConfig:
    """Unreliable workers (rayq.faults): planned events plus what the cluster profile draws, from a seed."""

    events: list[FaultEventConfig] = field(default_factory=list)
    from_profile: bool = True
    seed: int | None = None
    packet_loss: float = 0.0
    packet_corruption: float = 0.0
    deadline: float = 0.0
    restart_s: float = 30.0

    def validate(self, path: str) -> None:
        for key in ("packet_loss", "packet_corruption"):
            _check(0 <= getattr(self, key) <= 1, f"{path}.{key}", getattr(self, key), "a probability in [0, 1]")
        _check(self.deadline == 0 or self.deadline >= 1, f"{path}.deadline", self.deadline,
               "0 (no deadline) or a multiple >= 1 of the median worker's step time")
        _check(self.restart_s >= 0, f"{path}.restart_s", self.restart_s, "simulated seconds >= 0")
        _check(self.seed is None or self.seed >= 0, f"{path}.seed", self.seed, "an integer >= 0, or null (the run seed)")


@dataclass
class VolunteerConfig:
    """Volunteer mode (``trainer: volunteer``; ALGORITHMS.md §8 DeDLOC): peers accumulate samples at their own
    speed until the collaboration reaches ``target_batch_size``, then average weighted by samples."""

    target_batch_size: int = 128
    microbatch: int | None = None
    actors: int | None = None
    cpus_per_actor: float = 0.25
    sample_time_s: float | None = None
    matchmaking_s: float = 0.5
    round_timeout_s: float = 10.0
    max_restarts: int = -1
    target_accuracy: float | None = None
    stop_at_target: bool = False

    def validate(self, path: str) -> None:
        _check(self.target_batch_size >= 1, f"{path}.target_batch_size", self.target_batch_size, "an integer >= 1")
        _check(self.microbatch is None or self.microbatch >= 1, f"{path}.microbatch", self.microbatch,
               "an integer >= 1, or null (batch_size)")
        _check(self.actors is None or self.actors >= 1, f"{path}.actors", self.actors, "an integer >= 1, or null (one per peer)")
        _check(self.cpus_per_actor > 0, f"{path}.cpus_per_actor", self.cpus_per_actor, "a number > 0")
        _check(self.sample_time_s is None or self.sample_time_s > 0, f"{path}.sample_time_s", self.sample_time_s,
               "simulated seconds > 0, or null (measured)")
        _check(self.matchmaking_s >= 0, f"{path}.matchmaking_s", self.matchmaking_s, "simulated seconds >= 0")
        _check(self.round_timeout_s > 0, f"{path}.round_timeout_s", self.round_timeout_s, "real seconds > 0")
        _check(self.max_restarts >= -1, f"{path}.max_restarts", self.max_restarts, "an integer >= -1 (-1 = unlimited)")
        _check(self.target_accuracy is None or 0 < self.target_accuracy <= 1, f"{path}.target_accuracy",
               self.target_accuracy, "an accuracy in (0, 1], or null")
        _check(not self.stop_at_target or self.target_accuracy is not None, f"{path}.stop_at_target",
               self.stop_at_target, "false unless target_accuracy is set")


@dataclass
class DDPConfig:
    """Trainer ``ddp``: which DistributedDataParallel communication hook averages the gradients.

    ``rayq`` = rayq's compressed group (``compression.*``), ``powersgd`` = PyTorch's own
    ``powerSGD_hook`` (the reference peer), ``allreduce`` = PyTorch's dense ``allreduce_hook``.
    """

    hook: Literal["rayq", "powersgd", "allreduce"] = "rayq"
    powersgd_rank: int = 2
    start_powersgd_iter: int = 10

    def validate(self, path: str) -> None:
        _check(self.powersgd_rank >= 1, f"{path}.powersgd_rank", self.powersgd_rank, "an integer >= 1")
        _check(self.start_powersgd_iter >= 2, f"{path}.start_powersgd_iter", self.start_powersgd_iter,
               "an integer >= 2 (PyTorch's hook needs two plain iterations for error feedback and warm start)")




@dataclass
class RunConfig:
    name: str | None = None
    task: Literal["digits", "digits-wide", "fashion-mnist", "mnist", "cifar10"] = "digits"
    data_dir: str | None = None
    trainer: str = "sync"
    seed: int = 0
    workers: int = 4
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    cluster: str | dict[str, Any] | None = None
    eval_every: int = 50
    report_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    resume: str | None = None
    output_dir: str = "runs"
    collective_timeout_s: float = 60.0
    max_failures: int = 0
    on_nonfinite: Literal["raise", "skip"] = "raise"
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    volunteer: VolunteerConfig = field(default_factory=VolunteerConfig)

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        _check(self.workers >= 1, f"{p}workers", self.workers, "an integer >= 1")
        _check(0 < self.gpus_per_worker <= 1 or float(self.gpus_per_worker).is_integer(), f"{p}gpus_per_worker",
               self.gpus_per_worker, "a fraction in (0, 1] or a whole number")
        _check(self.cpus_per_worker > 0, f"{p}cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _check(self.epochs is None or self.epochs > 0, f"{p}epochs", self.epochs, "a number > 0")
        _check(self.max_steps is None or self.max_steps >= 1, f"{p}max_steps", self.max_steps, "an integer >= 1")
        _check(self.batch_size is None or self.batch_size >= 1, f"{p}batch_size", self.batch_size, "an integer >= 1")
        for key in ("eval_every", "report_every", "checkpoint_every"):
            _check(getattr(self, key) >= 0, f"{p}{key}", getattr(self, key), "an integer >= 0 (0 = only at the end)")
        _check(self.keep_checkpoints >= 1, f"{p}keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _check(self.collective_timeout_s > 0, f"{p}collective_timeout_s", self.collective_timeout_s, "seconds > 0")
        _check(self.max_failures >= -1, f"{p}max_failures", self.max_failures, "an integer >= -1 (-1 = unlimited)")
        if self.name is not None:
            _check(bool(self.name) and "/" not in self.name, f"{p}name", self.name, "a non-empty name without '/'")
        if self.cluster is not None:
            from rayq.profiles import parse_profile

            try:
                parse_profile(self.cluster)
            except ConfigError as err:
                raise ConfigError(f"{p}cluster: {err}") from err
        if self.resume is not None:
            _check(Path(self.resume).is_dir(), f"{p}resume", self.resume, "an existing checkpoint directory")
        from rayq.faults import check_config

        check_config(self, p)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; expected {allowed}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of: " + ", ".join(map(repr, typing.get_args(hint)))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _convert(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; build nested dataclasses."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is invalid; choose one of: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}={value!r} is invalid; expected {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid; expected a mapping of {_keys(hint)}")
        return from_dict(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is invalid; expected a list")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid; expected a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid; expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is invalid; expected an integer")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string; a user means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is invalid; expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is invalid; expected a string")
        return value
    return value


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown config key {where!r}; allowed keys{' in ' + path if path else ''}: {_keys(cls)}")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    obj = cls(**kwargs)
    obj.validate(path)
    return obj


def _parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like key=value (e.g. compression.codec=none)")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"--set {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    return key.split("."), value


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, sets: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> RunConfig:
    """Resolve defaults < YAML file < ``extra`` < ``--set`` items into a validated :class:`RunConfig`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    if extra:
        data = merge(data, extra)
    for item in sets or []:
        keys, value = _parse_set(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return from_dict(RunConfig, data)
