"""Which combinations of codec, error feedback, schedule, strategy, trainer and faults work.

Every rule here is a reason, not a taste: a combination that cannot give a correct result is refused
before anything starts, with a message that names both halves and what is allowed. The rules read
the codecs' own contract (kind, multi-round, carries scale, built-in error feedback), so a new codec
is placed in the matrix by what it declares; :mod:`rayq.matrix` applies them to every cell of
codec × error feedback × schedule × strategy × fault, for ``rayq codecs --matrix`` and the
conformance tests.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compressors import Codec, CodecError, Kind, make_codec

if TYPE_CHECKING:
    from rayq.config import RunConfig

STRATEGIES = ("auto", "allreduce", "allgather", "two_phase")
SCHEDULES = ("every_step", "periodic", "adaptive", "laq")
#: Faults that change who contributes to a step, or what arrives.
IN_BAND = ("leave", "deadline", "lose", "corrupt")


def strategy_problem(codec: Codec, strategy: str) -> str | None:
    """Why ``codec`` cannot be reduced with ``strategy`` (None when it can)."""
    name = codec.name
    if strategy not in STRATEGIES:
        return f"compression.strategy={strategy!r} is not a strategy; choose one of: {', '.join(STRATEGIES)}"
    if strategy == "allreduce" and codec.kind is Kind.GATHER:
        return (f"codec {name!r} is gather-kind: its packets cannot be summed; strategy 'allreduce' is not "
                "allowed; use auto, allgather or two_phase")
    if strategy == "allgather" and codec.multi_round:
        return (f"codec {name!r} is a multi-round linear codec: each round needs the sum over all workers "
                "(its error feedback and warm start depend on it), so packets decoded one by one would be "
                "wrong; strategy 'allgather' is not allowed; use auto or allreduce")
    if strategy == "two_phase" and codec.multi_round:
        return (f"codec {name!r} is a multi-round linear codec: its rounds need the sum over all workers, "
                "so a shard owner cannot decode and re-encode it; strategy 'two_phase' is not allowed; "
                "use auto or allreduce")
    return None


def gather_route(codec: Codec, strategy: str) -> bool:
    """Whether ``codec`` travels in all-gathered frames (where a frame can be lost or dropped)."""
    return strategy == "allgather" or (strategy == "auto" and codec.kind is Kind.GATHER)


def frames_gathered(codec: Codec, strategy: str) -> bool:
    """Whether any of ``codec``'s frames are all-gathered: on the gather route, or as two-phase's re-encoded
    shards (what ``compression.gather`` acts on)."""
    return strategy == "two_phase" or gather_route(codec, strategy)


@dataclass(frozen=True)
class Setup:
    """The parts of a run config that decide compatibility."""

    trainer: str
    codecs: tuple[tuple[str, Codec], ...]      # (config key, codec) for the default and each override
    error_feedback: bool
    schedule: str
    strategy: str
    faults: frozenset[str]                     # fault kinds in force
    fault_keys: dict[str, str]                 # fault kind -> the config key that brings it in
    optimizer: str
    momentum: float | None
    nesterov: bool
    use_gpu: bool

    @classmethod
    def of(cls, cfg: RunConfig, p: str = "") -> Setup:
        c = cfg.compression
        codecs = [(f"{p}compression.codec", make_codec(c.codec, c.params))]
        codecs += [(f"{p}compression.overrides[{i}].codec", make_codec(o.codec, o.params))
                   for i, o in enumerate(c.overrides)]
        kinds: dict[str, str] = {}
        for i, e in enumerate(cfg.faults.events):
            kinds.setdefault(str(e.kind), f"{p}faults.events[{i}]")
        if cfg.faults.deadline > 0:
            kinds.setdefault("deadline", f"{p}faults.deadline={cfg.faults.deadline:g}")
        if cfg.faults.packet_loss:
            kinds.setdefault("lose", f"{p}faults.packet_loss={cfg.faults.packet_loss:g}")
        if cfg.faults.packet_corruption:
            kinds.setdefault("corrupt", f"{p}faults.packet_corruption={cfg.faults.packet_corruption:g}")
        o = cfg.optimizer
        return cls(cfg.trainer, tuple(codecs), c.error_feedback, cfg.sync.schedule, c.strategy, frozenset(kinds),
                   kinds, o.name, o.momentum, o.nesterov, cfg.use_gpu)


def problems(cfg: RunConfig, p: str = "") -> list[str]:
    """Every reason ``cfg`` cannot run correctly (empty when it can), each naming both halves."""
    try:
        s = Setup.of(cfg, p)
    except CodecError:
        return []  # the codec's own validation reports it
    out: list[str] = []
    out += _codec_rules(s, cfg, p)
    out += _schedule_rules(s, p)
    out += _fault_rules(s, cfg, p)
    out += _trainer_rules(s, cfg, p)
    out += _optimizer_rules(s, cfg, p)
    out += _split_rules(s, cfg, p)
    return out


def _codec_rules(s: Setup, cfg: RunConfig, p: str) -> list[str]:
    out = []
    if cfg.compression.overlap and (s.schedule != "every_step" or s.trainer != "sync" or cfg.optimizer.needs_closure):
        why = (f"sync.schedule={s.schedule!r} exchanges after its local steps" if s.schedule != "every_step" else
               f"trainer={s.trainer!r} runs its own exchange" if s.trainer != "sync" else
               f"optimizer.name={cfg.optimizer.name!r} evaluates the gradient twice per step")
        out.append(f"{p}compression.overlap=true is invalid here: it overlaps the gradient exchange with backward, and "
                   f"{p}{why}; use sync.schedule every_step with the sync trainer and a one-evaluation optimizer")
    if cfg.compression.gather == "direct":
        out += _gather_rules(s, cfg, p)
    if cfg.compression.bucket_mb is not None and s.codecs[0][1].multi_round:
        out.append(f"{p}compression.bucket_mb={cfg.compression.bucket_mb:g} is invalid with compression.codec="
                   f"{s.codecs[0][1].name!r}: it approximates each weight matrix by its own shape, which a flat bucket "
                   "loses; leave bucket_mb unset (null) for this codec")
    for key, codec in s.codecs:  # (codec × strategy is the compression section's own check)
        if s.error_feedback and codec.builtin_error_feedback:
            out.append(f"{p}compression.error_feedback=true is invalid with {key}={codec.name!r}: it compensates "
                       "its own error (built-in error feedback), so a second memory would count the error twice; "
                       "set compression.error_feedback=false")
        if s.error_feedback and not codec.carries_scale:
            out.append(f"{p}compression.error_feedback=true is invalid with {key}={codec.name!r}: the decoded value "
                       "is a bare sign vote without the input's scale, so the residual u - D(C(u)) is meaningless; "
                       "use codec ef_sign (the scaled sign) with error feedback, or sign without it")
        elif s.error_feedback and not codec.multi_round and not codec.builtin_error_feedback:
            lost = codec.gaussian_distortion()
            if lost >= 1.0:
                out.append(f"{p}compression.error_feedback=true is invalid with {key}={codec.name!r}: error feedback "
                           f"needs a contractive codec, and {codec.spec} leaves {lost:.2f}x a Gaussian input's energy as "
                           "error, so the memory grows instead of shrinking; keep more of the input (e.g. qsgd "
                           "levels >= 15, randomk rescale=false) or train without error feedback (this codec is "
                           "unbiased and needs none)" if codec.unbiased else
                           f"{p}compression.error_feedback=true is invalid with {key}={codec.name!r}: error feedback "
                           f"needs a contractive codec, and {codec.spec} leaves {lost:.2f}x a Gaussian input's energy "
                           "as error; keep more of the input, or train without error feedback")
    return out


def _gather_rules(s: Setup, cfg: RunConfig, p: str) -> list[str]:
    """``compression.gather=direct`` changes how all-gathered frames cross; refuse it where none are."""
    key = f"{p}compression.gather='direct'"
    if s.trainer in ("volunteer", "split"):
        return [f"{key} is invalid with {p}trainer={s.trainer!r}: it sets how the collective trainers all-gather "
                "their frames, and this trainer exchanges its own way; leave compression.gather=padded"]
    if s.trainer == "ddp" and cfg.ddp.hook != "rayq":
        return [f"{key} is invalid with {p}ddp.hook={cfg.ddp.hook!r}: PyTorch's hook all-reduces dense or low-rank "
                "buffers and gathers no frames; use ddp.hook=rayq, or leave compression.gather=padded"]
    if s.schedule == "laq" or any(frames_gathered(c, s.strategy) for _, c in s.codecs):
        return []
    names = ", ".join(f"{k}={c.name!r}" for k, c in s.codecs)
    return [f"{key} is invalid with {names} under {p}compression.strategy={s.strategy!r}: these packets are summed "
            "in an all-reduce, so no frame is all-gathered and the setting would do nothing; choose a gather codec, "
            "compression.strategy allgather or two_phase, or leave compression.gather=padded"]


def _schedule_rules(s: Setup, p: str) -> list[str]:
    out = []
    if s.schedule in ("periodic", "adaptive"):
        for key, codec in s.codecs:
            if not codec.carries_scale:
                out.append(f"{p}sync.schedule={s.schedule!r} is invalid with {key}={codec.name!r}: model-delta "
                           "averaging applies the decoded average as the update, and this codec decodes to ±1 "
                           "without the delta's scale; choose a codec that carries scale (e.g. ef_sign, qsgd, int8)")
    if s.schedule == "laq":
        if s.error_feedback:
            out.append(f"{p}sync.schedule='laq' is invalid with compression.error_feedback=true: LAQ's innovations "
                       "(gradient minus the last upload) already carry the quantisation error forward, so error "
                       "feedback would count it twice; set compression.error_feedback=false")
        if s.strategy not in ("auto", "allgather"):
            out.append(f"{p}sync.schedule='laq' is invalid with compression.strategy={s.strategy!r}: every receiver "
                       "keeps each worker's last upload, so every packet must be decoded as sent; choose auto or "
                       "allgather")
        for key, codec in s.codecs:
            if codec.multi_round:
                out.append(f"{p}sync.schedule='laq' is invalid with {key}={codec.name!r}: LAQ uploads each worker's "
                           "innovation on its own, and this codec's rounds need the sum over all workers; choose a "
                           "single-round codec (laq is LAQ's own quantiser)")
            elif not codec.carries_scale:
                out.append(f"{p}sync.schedule='laq' is invalid with {key}={codec.name!r}: the innovation's decoded "
                           "value must approximate it, and this codec decodes to ±1 without scale; choose e.g. laq")
    return out


def _fault_rules(s: Setup, cfg: RunConfig, p: str) -> list[str]:
    out = []
    if s.trainer == "volunteer":
        return out
    if {"crash", "kill"} & s.faults and cfg.max_failures == 0:
        key = s.fault_keys.get("crash") or s.fault_keys["kill"]
        out.append(f"{key} crashes a worker but {p}max_failures=0, so the run would fail; set max_failures >= 1 "
                   "(each crash restarts the group from its checkpoint)")
    for kind in ("leave", "deadline"):
        if kind not in s.faults:
            continue
        key = s.fault_keys[kind]
        what = "a worker that leaves" if kind == "leave" else "a worker the deadline drops"
        if s.schedule in ("periodic", "adaptive"):
            out.append(f"{key} is invalid with {p}sync.schedule={s.schedule!r}: {what} is handled by weighting its "
                       "contribution to a step's gradient average, and local SGD averages models only every few "
                       "steps without a per-step barrier; choose sync.schedule every_step or laq")
        if s.strategy == "two_phase":
            out.append(f"{key} is invalid with {p}compression.strategy='two_phase': every worker owns a shard that "
                       f"the others wait for, so {what} would still hold up the group; choose auto or allgather")
    for kind in ("lose", "corrupt"):
        if kind not in s.faults:
            continue
        key = s.fault_keys[kind]
        for ckey, codec in s.codecs:
            if s.schedule != "laq" and not gather_route(codec, s.strategy):
                out.append(f"{key} ({kind}) is invalid with {ckey}={codec.name!r} under {p}compression.strategy="
                           f"{s.strategy!r}: lost or corrupted payloads are injected into all-gathered frames, which "
                           "receivers drop; this codec's packets are summed in flight (or re-encoded by shard "
                           "owners), where one lost packet would poison the sum; choose a gather codec with "
                           "strategy auto, or compression.strategy=allgather")
    return out


def _trainer_rules(s: Setup, cfg: RunConfig, p: str) -> list[str]:
    out = []
    if s.trainer == "ddp":
        if s.schedule != "every_step":
            out.append(f"{p}trainer='ddp' is invalid with {p}sync.schedule={s.schedule!r}: DDP averages gradients "
                       "inside every backward pass; choose trainer sync for other schedules")
        if s.faults:
            key = next(iter(sorted(s.fault_keys.values())))
            out.append(f"{key} is invalid with {p}trainer='ddp': PyTorch's DDP hooks have no fault injection; "
                       "choose trainer sync (or volunteer)")
        if cfg.ddp.hook != "rayq":
            default = type(cfg.compression)()
            for f in dataclasses.fields(cfg.compression):
                value = getattr(cfg.compression, f.name)
                if f.name != "gather" and value != getattr(default, f.name):  # gather: its own rule, below
                    out.append(f"{p}compression.{f.name}={value!r} is invalid with {p}ddp.hook={cfg.ddp.hook!r}: "
                               "PyTorch's hook does its own (dense or low-rank) reduction and reads no compression.* "
                               "setting; use ddp.hook=rayq, or leave compression.* at its defaults")
                    break
    if s.trainer == "volunteer":
        if s.schedule != "every_step":
            out.append(f"{p}trainer='volunteer' is invalid with {p}sync.schedule={s.schedule!r}: a DeDLOC round "
                       "averages the peers' gradients once per global step; choose sync.schedule every_step")
        if s.strategy != "auto":
            out.append(f"{p}trainer='volunteer' is invalid with {p}compression.strategy={s.strategy!r}: volunteer "
                       "rounds decode each peer's payload (gather codecs) or average them (linear ones) by their "
                       "kind; leave compression.strategy=auto")
        for key, codec in s.codecs:
            if codec.multi_round:
                out.append(f"{p}trainer='volunteer' is invalid with {key}={codec.name!r}: its rounds need an "
                           "all-reduce over a fixed group, and volunteer payloads are decoded one peer at a time; "
                           "choose a single-round codec")
        if "deadline" in s.faults:
            out.append(f"{s.fault_keys['deadline']} is invalid with {p}trainer='volunteer': volunteer rounds close "
                       "on the simulated clock (volunteer.target_batch_size, matchmaking_s); faults.deadline is "
                       "for the collective trainers")
        v = cfg.volunteer
        if v.actors is not None and v.actors > cfg.workers:
            out.append(f"{p}volunteer.actors={v.actors!r} is invalid; expected 1..workers ({cfg.workers}) host "
                       "actors for the peers")
        if s.use_gpu:
            out.append(f"{p}use_gpu=True is invalid with trainer volunteer; its peers run on CPU")
        if cfg.resume is not None:
            out.append(f"{p}resume={cfg.resume!r} is invalid with {p}trainer='volunteer': a volunteer run lives in one "
                       "driver process (a peer's crash never restarts it) and writes only checkpoint_final, the "
                       "driver's model and optimizer, not the swarm's state; start a new run (trainers sync, ddp and "
                       "split resume bit-exactly)")
    for i, e in enumerate(cfg.faults.events):
        if e.worker is not None and e.worker >= cfg.workers:
            out.append(f"{p}faults.events[{i}].worker={e.worker!r} is invalid; expected a worker index "
                       f"< workers ({cfg.workers})")
    return out


def _optimizer_rules(s: Setup, cfg: RunConfig, p: str) -> list[str]:
    out = []
    if s.optimizer in ("qcmd_adagrad", "qrda_adagrad", "blaq", "laq_weights") and s.schedule != "every_step":
        out.append(f"{p}optimizer.name={s.optimizer!r} is invalid with {p}sync.schedule={s.schedule!r}: its state "
                   "(AdaGrad statistics and dual average, or BLAQ's shadow weights) must be built from the same averaged "
                   "gradient on every replica, every step; choose sync.schedule every_step")
    if s.optimizer in ("blaq", "laq_weights") and s.trainer != "sync":
        out.append(f"{p}optimizer.name={s.optimizer!r} is invalid with {p}trainer={s.trainer!r}: it evaluates the "
                   "averaged gradient at a trial point inside its step, which the sync trainer provides")
    if s.optimizer in ("blaq", "laq_weights") and cfg.on_nonfinite == "skip":
        out.append(f"{p}optimizer.name={s.optimizer!r} is invalid with {p}on_nonfinite='skip': a non-finite gradient "
                   "inside its two-evaluation step cannot be skipped half-way; use on_nonfinite=raise")
    return out


def _split_rules(s: Setup, cfg: RunConfig, p: str) -> list[str]:
    out: list[str] = []
    if s.trainer != "split":
        if cfg.split != type(cfg.split)():
            out.append(f"{p}split.* is set but {p}trainer={s.trainer!r}: the split section configures trainer split "
                       "(split learning); set trainer=split, or leave split.* at its defaults")
        return out
    if s.schedule != "every_step":
        out.append(f"{p}trainer='split' is invalid with {p}sync.schedule={s.schedule!r}: the server needs every "
                   "client's activations at every step; choose sync.schedule every_step")
    if s.faults:
        key = next(iter(sorted(s.fault_keys.values())))
        out.append(f"{key} is invalid with {p}trainer='split': the server waits for every client's activations and "
                   "has no fault handling; choose trainer sync (or volunteer) for fault injection")
    if s.error_feedback:
        out.append(f"{p}compression.error_feedback=true is invalid with {p}trainer='split': activations and their "
                   "gradients belong to one batch, so a residual carried to the next batch would be added to other "
                   "samples' activations; set compression.error_feedback=false")
    for key, codec in s.codecs:
        if codec.multi_round:
            out.append(f"{p}trainer='split' is invalid with {key}={codec.name!r}: its rounds need a sum over all "
                       "workers, and activations travel from each client to the server alone; choose a "
                       "single-round codec")
        elif not codec.carries_scale:
            out.append(f"{p}trainer='split' is invalid with {key}={codec.name!r}: activations and their gradients "
                       "must keep their scale, and this codec decodes to ±1; choose e.g. int8, qsgd or fp16")
    from rayq.privacy.leak import IMAGE_FORMATS
    from rayq.smashed import cut_problem
    from rayq.tasks import get_task

    problem = cut_problem(get_task(cfg.task).build_model(), cfg.split.cut)
    if problem:
        out.append(f"{p}split.cut={cfg.split.cut!r} is invalid with {p}task={cfg.task!r}: {problem}")
    if cfg.split.decoder_attack and cfg.task not in IMAGE_FORMATS:
        out.append(f"{p}split.decoder_attack=true is invalid with {p}task={cfg.task!r}: the decoder attack rebuilds "
                   f"images, and this task has none; choose one of {', '.join(IMAGE_FORMATS)}, or set "
                   "split.decoder_attack=false")
    return out
