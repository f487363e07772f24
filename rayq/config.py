"""The run configuration: defaults < YAML file < ``--set key=value`` overrides, validated before Ray starts.

Errors name the key, the value seen and what is allowed: ``compression.codec='qsdg' is not a codec;
choose one of: none, fp16, ...``. Each section checks its own values; combinations of sections that
cannot work (a codec with a schedule, a fault with a strategy) are refused by :mod:`rayq.compat`.
The resolved config (task defaults filled in) is saved next to the run's outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rayq.schema import ConfigError, apply_set, check, from_dict, merge, read_mapping

__all__ = ["ConfigError", "RunConfig", "config_from", "from_dict", "load_config", "merge"]

#: Keys that moved, with what replaces them (a clearer error than "unknown key").
MOVED = {
    ("sync", "bits"): "sync.bits was replaced by compression.params.bits: LAQ quantises its innovations with "
                      "compression.codec, and codec laq is LAQ's own b-bit quantiser "
                      "(--set compression.codec=laq --set compression.params.bits=4)",
}


#: Optimizer options and the optimizers they belong to (anything else given is an error, not ignored).
OPTIMIZER_OPTIONS: dict[str, tuple[str, ...]] = {
    "momentum": ("sgd",), "nesterov": ("sgd",), "weight_decay": ("sgd", "adam", "adamw"),
    "l1": ("qcmd_adagrad", "qrda_adagrad"), "delta": ("qcmd_adagrad", "qrda_adagrad"),
    "beta": ("blaq",), "projection": ("blaq", "laq_weights"), "weight_bits": ("blaq", "laq_weights"),
}


@dataclass
class OptimizerConfig:
    """``sgd``, ``adam``, ``adamw``; QCMD / QRDA AdaGrad with an ℓ1 term (Xu et al., 2022: sparse models from
    quantised gradients); BLAQ (Ma et al., AAAI 2024) and its LAQ-weights baseline (Hou & Kwok, ICLR 2018):
    loss-aware quantised weights, binary / ternary / m-bit."""

    name: Literal["sgd", "adam", "adamw", "qcmd_adagrad", "qrda_adagrad", "blaq", "laq_weights"] = "sgd"
    lr: float | None = None
    #: SGD's momentum (null: 0.9); other optimizers have none.
    momentum: float | None = None
    weight_decay: float = 0.0
    nesterov: bool = False
    #: QCMD / QRDA: the ℓ1 weight λ (0) and AdaGrad's δ (1e-10).
    l1: float | None = None
    delta: float | None = None
    #: BLAQ: the weight of the trial gradient β (0.5; 0 is LAQ-weights).
    beta: float | None = None
    #: BLAQ / LAQ-weights: how weight matrices are quantised (binary), and the bits of ``mbit`` (2).
    projection: Literal["binary", "ternary", "mbit"] | None = None
    weight_bits: int | None = None

    @property
    def sgd_momentum(self) -> float:
        return 0.9 if self.momentum is None else self.momentum

    @property
    def needs_closure(self) -> bool:
        """BLAQ evaluates the (averaged) gradient twice per step, at the weights and at a trial point."""
        return self.name in ("blaq", "laq_weights")

    def kwargs(self) -> dict[str, Any]:
        """The constructor options of the new optimizers (defaults filled in)."""
        if self.name in ("qcmd_adagrad", "qrda_adagrad"):
            return {"lr": self.lr, "l1": self.l1 or 0.0, "delta": 1e-10 if self.delta is None else self.delta}
        if self.name in ("blaq", "laq_weights"):
            out = {"lr": self.lr, "projection": self.projection or "binary", "bits": self.weight_bits or 2}
            if self.name == "blaq":
                out["beta"] = 0.5 if self.beta is None else self.beta
            return out
        return {}

    def validate(self, path: str) -> None:
        check(self.lr is None or self.lr > 0, f"{path}.lr", self.lr, "a positive number")
        check(self.momentum is None or 0 <= self.momentum < 1, f"{path}.momentum", self.momentum,
              "a number in [0, 1), or null (0.9 for sgd)")
        check(self.l1 is None or self.l1 >= 0, f"{path}.l1", self.l1, "a number >= 0")
        check(self.delta is None or self.delta > 0, f"{path}.delta", self.delta, "a number > 0")
        check(self.beta is None or 0 <= self.beta <= 1, f"{path}.beta", self.beta, "a number in [0, 1] (0: LAQ-weights)")
        check(self.weight_bits is None or 2 <= self.weight_bits <= 8, f"{path}.weight_bits", self.weight_bits,
              "an integer in 2..8 (with projection mbit)")
        defaults = {"momentum": None, "nesterov": False, "weight_decay": 0.0, "l1": None, "delta": None, "beta": None,
                    "projection": None, "weight_bits": None}
        for key, owners in OPTIMIZER_OPTIONS.items():
            value = getattr(self, key)
            if value != defaults[key] and self.name not in owners:
                raise ConfigError(f"{path}.{key}={value!r} is invalid with {path}.name={self.name!r}: it is an option of "
                                  f"{' / '.join(owners)}; leave it unset")
        check(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")
        if self.nesterov and self.name == "sgd" and self.sgd_momentum == 0:
            raise ConfigError(f"{path}.nesterov=True is invalid with {path}.momentum=0: Nesterov's look-ahead needs "
                              f"momentum; set {path}.momentum in (0, 1) or nesterov=false")
        if self.weight_bits is not None and (self.projection or "binary") != "mbit":
            raise ConfigError(f"{path}.weight_bits={self.weight_bits!r} is invalid with {path}.projection="
                              f"{self.projection or 'binary'!r}: bits set the weight levels of projection mbit only; "
                              f"set {path}.projection=mbit or leave weight_bits unset")


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
    #: How variable-size frames (gather codecs, LAQ, two-phase shards) cross: ``padded`` = one all-gather of
    #: frames padded to the longest; ``direct`` = an all-to-all that sends each frame unpadded to every peer.
    gather: Literal["padded", "direct"] = "padded"
    error_feedback: bool = False
    min_numel: int = 256
    bucket_small: bool = True
    #: Lay gradients end to end into flat buckets of up to this many MB, one packet each (null: per tensor).
    bucket_mb: float | None = None
    #: Exchange each tensor or bucket as soon as backward has produced it, beside the rest of backward.
    overlap: bool = False
    overrides: list[OverrideConfig] = field(default_factory=list)

    def validate(self, path: str) -> None:
        from compressors import CodecError, make_codec

        try:
            make_codec(self.codec, self.params)
        except CodecError as err:
            raise ConfigError(str(err)) from err
        from rayq.compat import strategy_problem

        for name, params in [(self.codec, self.params)] + [(o.codec, o.params) for o in self.overrides]:
            problem = strategy_problem(make_codec(name, params), self.strategy)
            if problem:
                raise ConfigError(f"{path}: {problem}")
        check(self.min_numel >= 0, f"{path}.min_numel", self.min_numel, "an integer >= 0")
        check(self.bucket_mb is None or self.bucket_mb > 0, f"{path}.bucket_mb", self.bucket_mb,
              "megabytes > 0 (e.g. 25, as DDP), or null (one packet per tensor)")


@dataclass
class SyncConfig:
    """When and what the workers average (:mod:`rayq.schedules`)."""

    schedule: Literal["every_step", "periodic", "adaptive", "laq"] = "every_step"
    period: int = 4
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    p_min: int = 1
    p_max: int = 64
    kappa: float = 1.0
    omega: float = 0.5
    warmup_steps: int = 0
    #: ADPSGD's variance is estimated from a CountSketch of each worker's model delta with this many buckets.
    variance_sketch: int = 1024
    memory: int = 10
    xi: float = 0.8
    max_skips: int = 100
    error_weight: float = 3.0

    def validate(self, path: str) -> None:
        check(self.period >= 1, f"{path}.period", self.period, "an integer >= 1")
        if self.schedule == "adaptive":  # its bounds; other schedules take any period
            check(1 <= self.p_min <= self.period <= self.p_max, f"{path}.p_min/period/p_max",
                  (self.p_min, self.period, self.p_max), "1 <= p_min <= period <= p_max with schedule adaptive")
        check(self.outer_lr > 0, f"{path}.outer_lr", self.outer_lr, "a number > 0")
        check(0 <= self.outer_momentum < 1, f"{path}.outer_momentum", self.outer_momentum, "a number in [0, 1)")
        check(self.kappa > 0, f"{path}.kappa", self.kappa, "a number > 0")
        check(0 < self.omega <= 2, f"{path}.omega", self.omega, "a number in (0, 2]")
        check(self.warmup_steps >= 0, f"{path}.warmup_steps", self.warmup_steps, "an integer >= 0 (0 = one epoch)")
        check(self.variance_sketch >= 16, f"{path}.variance_sketch", self.variance_sketch, "an integer >= 16")
        check(self.memory >= 1, f"{path}.memory", self.memory, "an integer >= 1")
        check(self.xi >= 0, f"{path}.xi", self.xi, "a number >= 0")
        check(self.max_skips >= 0, f"{path}.max_skips", self.max_skips, "an integer >= 0")
        check(self.error_weight >= 0, f"{path}.error_weight", self.error_weight, "a number >= 0")


#: Fault kinds (rayq.faults) and the event fields each one uses besides ``kind``, ``worker`` and ``step``.
FAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "crash": (), "kill": (), "leave": ("duration",), "straggle": ("duration", "factor"),
    "delay": ("seconds", "duration"), "lose": ("duration",), "corrupt": ("duration",),
}


@dataclass
class FaultEventConfig:
    """One planned fault: ``{step: 12, worker: 1, kind: crash}`` (rayq.faults has the meanings).

    ``step`` is the step (collective mode) or round (volunteer mode) it fires at; ``duration`` the steps a
    ``leave`` or ``straggle`` lasts (null = to the end), or how long a ``lose`` / ``corrupt`` / ``delay``
    partition lasts (null = that one step); ``factor`` a straggler's slowdown; ``seconds`` how long a
    ``delay`` holds a worker's reply back (real seconds in collective mode, simulated in volunteer mode).
    """

    kind: str | None = None
    worker: int | None = None
    step: int | None = None
    duration: int | None = None
    factor: float | None = None
    seconds: float | None = None

    def validate(self, path: str) -> None:
        kinds = ", ".join(FAULT_FIELDS)
        check(self.kind in FAULT_FIELDS, f"{path}.kind", self.kind, f"one of: {kinds}")
        check(self.worker is not None and self.worker >= 0, f"{path}.worker", self.worker, "a worker index >= 0")
        if self.kind == "straggle":
            check(self.step is None or self.step >= 0, f"{path}.step", self.step, "a step >= 0, or null (from the start)")
        else:
            check(self.step is not None and self.step >= 0, f"{path}.step", self.step, "a step >= 0")
        for name in ("duration", "factor", "seconds"):
            if getattr(self, name) is not None and name not in FAULT_FIELDS[self.kind]:  # type: ignore[index]
                users = [k for k, fields in FAULT_FIELDS.items() if name in fields]
                raise ConfigError(f"{path}.{name}={getattr(self, name)!r} is invalid for kind {self.kind!r}; "
                                  f"{name} belongs to kind {' / '.join(users)}")
        check(self.duration is None or self.duration >= 1, f"{path}.duration", self.duration,
               "a number of steps >= 1, or null (to the end)")
        if self.kind == "straggle":
            check(self.factor is not None and self.factor >= 1, f"{path}.factor", self.factor, "a slowdown factor >= 1")
        if self.kind == "delay":
            check(self.seconds is not None and self.seconds > 0, f"{path}.seconds", self.seconds, "real seconds > 0")


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
            check(0 <= getattr(self, key) <= 1, f"{path}.{key}", getattr(self, key), "a probability in [0, 1]")
        check(self.deadline == 0 or self.deadline >= 1, f"{path}.deadline", self.deadline,
               "0 (no deadline) or a multiple >= 1 of the median worker's step time")
        check(self.restart_s >= 0, f"{path}.restart_s", self.restart_s, "simulated seconds >= 0")
        check(self.seed is None or self.seed >= 0, f"{path}.seed", self.seed, "an integer >= 0, or null (the run seed)")


@dataclass
class VolunteerConfig:
    """Volunteer mode (``trainer: volunteer``; DeDLOC, Diskin et al., NeurIPS 2021): peers accumulate samples at
    their own speed until the collaboration reaches ``target_batch_size``, then average weighted by samples.

    Everything that decides a round happens on the simulated clock, so a run is reproducible for a fixed
    ``sample_time_s``; ``round_timeout_s`` is only a real-time guard against a hung host actor."""

    target_batch_size: int = 128
    microbatch: int | None = None
    actors: int | None = None
    cpus_per_actor: float = 0.25
    sample_time_s: float | None = None
    matchmaking_s: float = 0.5
    round_timeout_s: float = 120.0
    max_restarts: int = -1
    target_accuracy: float | None = None
    stop_at_target: bool = False

    def validate(self, path: str) -> None:
        check(self.target_batch_size >= 1, f"{path}.target_batch_size", self.target_batch_size, "an integer >= 1")
        check(self.microbatch is None or self.microbatch >= 1, f"{path}.microbatch", self.microbatch,
               "an integer >= 1, or null (batch_size)")
        check(self.actors is None or self.actors >= 1, f"{path}.actors", self.actors, "an integer >= 1, or null (one per peer)")
        check(self.cpus_per_actor > 0, f"{path}.cpus_per_actor", self.cpus_per_actor, "a number > 0")
        check(self.sample_time_s is None or self.sample_time_s > 0, f"{path}.sample_time_s", self.sample_time_s,
               "simulated seconds > 0, or null (measured)")
        check(self.matchmaking_s >= 0, f"{path}.matchmaking_s", self.matchmaking_s, "simulated seconds >= 0")
        check(self.round_timeout_s > 0, f"{path}.round_timeout_s", self.round_timeout_s,
              "real seconds > 0 (a guard against hung host actors)")
        check(self.max_restarts >= -1, f"{path}.max_restarts", self.max_restarts, "an integer >= -1 (-1 = unlimited)")
        check(self.target_accuracy is None or 0 < self.target_accuracy <= 1, f"{path}.target_accuracy",
               self.target_accuracy, "an accuracy in (0, 1], or null")
        check(not self.stop_at_target or self.target_accuracy is not None, f"{path}.stop_at_target",
               self.stop_at_target, "false unless target_accuracy is set")


@dataclass
class DDPConfig:
    """Trainer ``ddp``: which DistributedDataParallel communication hook averages the gradients.

    ``rayq`` = rayq's compressed group (``compression.*``), ``powersgd`` = PyTorch's own
    ``powerSGD_hook`` (the reference peer), ``allreduce`` = PyTorch's dense ``allreduce_hook``.
    """

    hook: Literal["rayq", "powersgd", "allreduce"] = "rayq"
    #: PyTorch's hooks: true = as DDP schedules them, overlapped with backward (communication time is then not
    #: measured, only bytes); false = each all-reduce is waited for on the spot and timed.
    native_overlap: bool = False
    powersgd_rank: int = 2
    start_powersgd_iter: int = 10

    def validate(self, path: str) -> None:
        check(self.powersgd_rank >= 1, f"{path}.powersgd_rank", self.powersgd_rank, "an integer >= 1")
        check(self.start_powersgd_iter >= 2, f"{path}.start_powersgd_iter", self.start_powersgd_iter,
               "an integer >= 2 (PyTorch's hook needs two plain iterations for error feedback and warm start)")




@dataclass
class ModelConfig:
    """What the task's model looks like beyond its own definition."""

    #: Few-Bit Backward (Novikov et al., 2022): activations keep b-bit codes of their input for the backward
    #: pass instead of the input (null: exact activations); 1 bit is exact for ReLU-like ones.
    fewbit_bits: int | None = None

    def validate(self, path: str) -> None:
        check(self.fewbit_bits is None or 1 <= self.fewbit_bits <= 4, f"{path}.fewbit_bits", self.fewbit_bits,
              "1, 2, 3 or 4 bits, or null (exact activations)")


@dataclass
class PrivacyConfig:
    """What every run measures about privacy at each evaluation (rank 0, no collective calls)."""

    #: Membership inference on a balanced set: ``membership_samples`` training samples (a fixed seeded subset)
    #: against as many test samples: train/test gap, the correctness attack, the loss attack's AUC and TPR at 1% FPR.
    membership: bool = True
    membership_samples: int = 256

    def validate(self, path: str) -> None:
        check(self.membership_samples >= 10, f"{path}.membership_samples", self.membership_samples,
              "an integer >= 10 (members, and as many non-members)")


@dataclass
class SplitConfig:
    """Trainer ``split``: split learning (clients run the model up to ``cut``, the server the rest) with NoPeek.

    ``cut`` indexes the task model's layers (an ``nn.Sequential``): the clients run layers ``[0, cut)``; null:
    after the first activation (and the pooling right after it). ``nopeek_alpha`` weighs dCor(X, Z) in the
    clients' loss. At the end, a decoder Z → X is trained on half of the test split (the attacker's public
    data) and scored on the other half."""

    cut: int | None = None
    nopeek_alpha: float = 0.0
    decoder_attack: bool = True
    decoder_epochs: int = 200
    decoder_hidden: int = 256

    def validate(self, path: str) -> None:
        check(self.cut is None or self.cut >= 1, f"{path}.cut", self.cut, "a layer index >= 1, or null")
        check(self.nopeek_alpha >= 0, f"{path}.nopeek_alpha", self.nopeek_alpha, "a number >= 0")
        check(self.decoder_epochs >= 1, f"{path}.decoder_epochs", self.decoder_epochs, "an integer >= 1")
        check(self.decoder_hidden >= 1, f"{path}.decoder_hidden", self.decoder_hidden, "an integer >= 1")


@dataclass
class RunConfig:
    name: str | None = None
    task: Literal["digits", "digits-wide", "digits-gelu", "sparse-logistic", "fashion-mnist", "mnist", "cifar10"] = "digits"
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
    model: ModelConfig = field(default_factory=ModelConfig)
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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        check(self.workers >= 1, f"{p}workers", self.workers, "an integer >= 1")
        check(0 < self.gpus_per_worker <= 1 or float(self.gpus_per_worker).is_integer(), f"{p}gpus_per_worker",
               self.gpus_per_worker, "a fraction in (0, 1] or a whole number")
        check(self.cpus_per_worker > 0, f"{p}cpus_per_worker", self.cpus_per_worker, "a number > 0")
        check(self.epochs is None or self.epochs > 0, f"{p}epochs", self.epochs, "a number > 0")
        check(self.max_steps is None or self.max_steps >= 1, f"{p}max_steps", self.max_steps, "an integer >= 1")
        check(self.batch_size is None or self.batch_size >= 1, f"{p}batch_size", self.batch_size, "an integer >= 1")
        for key in ("eval_every", "report_every", "checkpoint_every"):
            check(getattr(self, key) >= 0, f"{p}{key}", getattr(self, key), "an integer >= 0 (0 = only at the end)")
        check(self.keep_checkpoints >= 1, f"{p}keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        check(self.collective_timeout_s > 0, f"{p}collective_timeout_s", self.collective_timeout_s, "seconds > 0")
        check(self.max_failures >= -1, f"{p}max_failures", self.max_failures, "an integer >= -1 (-1 = unlimited)")
        if self.name is not None:
            check(bool(self.name) and "/" not in self.name, f"{p}name", self.name, "a non-empty name without '/'")
        if self.cluster is not None:
            from rayq.profiles import parse_profile

            try:
                parse_profile(self.cluster)
            except ConfigError as err:
                raise ConfigError(f"{p}cluster: {err}") from err
        if self.resume is not None:
            check(Path(self.resume).is_dir(), f"{p}resume", self.resume, "an existing checkpoint directory")
        from rayq.compat import problems

        found = problems(self, p)
        if found:
            more = len(found) - 1
            raise ConfigError(found[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | Path | None = None, sets: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> RunConfig:
    """Resolve defaults < YAML file < ``extra`` < ``--set`` items into a validated :class:`RunConfig`."""
    data: dict[str, Any] = read_mapping(path) if path is not None else {}
    if extra:
        data = merge(data, extra)
    for item in sets or []:
        apply_set(data, item)
    return config_from(data)


def config_from(data: dict[str, Any]) -> RunConfig:
    """A validated :class:`RunConfig` from a mapping (a moved key gets a message that says where it went)."""
    for (section, key), message in MOVED.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(message)
    return from_dict(RunConfig, data)
