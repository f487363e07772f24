"""Unreliable workers: a seeded, reproducible fault plan and its injectors.

A :class:`FaultPlan` says, for every worker and step (a collective step, or a volunteer round), what goes
wrong. Its sources:

* **explicit events** (``faults.events``): ``{step: 12, worker: 1, kind: crash}``, ...

  - ``crash`` — the worker's process dies (``os._exit`` inside its actor). Collective mode: Ray Train
    restarts the whole group from the last checkpoint (``max_failures``); the crash is recorded in
    ``<run>/faults_fired.jsonl`` first, so the restarted run does not crash again. Volunteer mode: Ray
    restarts the peer's actor (``volunteer.max_restarts``); the peer comes back and downloads the state.
  - ``kill`` — ``ray.kill`` of the peer's actor without restart: the volunteer is gone for good
    (collective mode: a Train worker cannot be killed alone, so it is a crash).
  - ``leave`` for ``duration`` steps (null: for good) — contributes nothing; on rejoin it resets its codec
    state (error feedback) and takes the current model.
  - ``straggle`` by ``factor`` from ``step`` (null: the start) for ``duration`` steps — its compute time
    is multiplied in simulated time; past the deadline its contribution is dropped.
  - ``delay`` — its reply is held back ``seconds`` (real time in collective mode: everyone waits;
    simulated time in volunteer mode: past the round's deadline it is dropped).
  - ``lose`` / ``corrupt`` — its payload of that step is lost, or has a byte flipped (the receiver's
    ``PacketError`` drops it). With a ``duration`` (also for ``delay``) it is a **partition**: the
    worker is cut off for that many steps while it keeps computing, then heals and resynchronises
    (it resets its codec state and takes the current model, as on a rejoin).
* **the node profile** (``faults.from_profile``, ``cluster:``): straggling per step with the node's
  ``straggler_prob`` and ``straggler_slowdown``; in volunteer mode also churn in simulated seconds —
  first arrival at ``join_at``, online sessions ~ Exp(``session_mean``), offline gaps ~
  Exp(``rejoin_delay``; null: never comes back).
* ``faults.packet_loss`` / ``packet_corruption`` — a probability per worker and step.

Every draw comes from a generator seeded by ``(seed, worker, step, purpose)``: the plan is reproducible from
its seed and independent of the order of queries and of the number of workers.
"""

from __future__ import annotations

import bisect
import enum
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rayq.schema import ConfigError

if TYPE_CHECKING:
    from rayq.config import RunConfig
    from rayq.profiles import ClusterProfile, NodeSpec
    from rayq.telemetry import EventLog

#: Crash events that already fired in a run, one JSON line each (read after a group restart).
FIRED_FILE = "faults_fired.jsonl"


class FaultKind(str, enum.Enum):
    CRASH = "crash"
    KILL = "kill"
    LEAVE = "leave"
    STRAGGLE = "straggle"
    DELAY = "delay"
    LOSE = "lose"
    CORRUPT = "corrupt"


# Purposes of the seeded draws (one generator per (seed, worker, step, purpose)).
_STRAGGLE, _LOSS, _CORRUPTION, _CHURN, _FLIP = 1, 2, 3, 4, 5


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, *parts])


@dataclass(frozen=True)
class FaultEvent:
    """One planned fault; ``step`` None (straggle only) means from the first step."""

    kind: FaultKind
    worker: int
    step: int | None = None
    duration: int | None = None
    factor: float = 1.0
    seconds: float = 0.0

    def covers(self, step: int) -> bool:
        """Whether a window event (leave, straggle, a partition) is in force at ``step``."""
        start = self.step or 0
        if self.kind in (FaultKind.LOSE, FaultKind.CORRUPT, FaultKind.DELAY):
            return start <= step < start + (self.duration or 1)
        return start <= step and (self.duration is None or step < start + self.duration)

    @property
    def partition(self) -> bool:
        """A lose / corrupt / delay that lasts a span (its end is a heal: the worker resynchronises)."""
        return self.kind in (FaultKind.LOSE, FaultKind.CORRUPT, FaultKind.DELAY) and self.duration is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "worker": self.worker, "step": self.step}
        if self.kind in (FaultKind.LEAVE, FaultKind.STRAGGLE) or self.partition:
            out["duration"] = self.duration
        if self.kind is FaultKind.STRAGGLE:
            out["factor"] = self.factor
        if self.kind is FaultKind.DELAY:
            out["seconds"] = self.seconds
        return out


class Churn:
    """One peer's online/offline times: online from ``join_at``; sessions ~ Exp(session_mean), offline gaps
    ~ Exp(rejoin_delay). Drawn lazily from the peer's own generator, so a prefix never changes."""

    def __init__(self, join_at: float, session_mean: float | None, rejoin_delay: float | None,
                 rng: np.random.Generator) -> None:
        self.session_mean, self.rejoin_delay, self.rng = session_mean, rejoin_delay, rng
        self.bounds = [float(join_at)]  # even index: goes online; odd index: goes offline
        self.closed = session_mean is None

    def _extend(self, t: float) -> None:
        while not self.closed and self.bounds[-1] <= t:
            mean = self.session_mean if len(self.bounds) % 2 == 1 else self.rejoin_delay
            if mean is None:
                self.closed = True
                break
            self.bounds.append(self.bounds[-1] + float(self.rng.exponential(mean)))

    def online(self, t: float) -> bool:
        self._extend(t)
        i = bisect.bisect_right(self.bounds, t) - 1
        return i >= 0 and i % 2 == 0

    def changes(self, t0: float, t1: float) -> list[tuple[float, bool]]:
        """``(time, online)`` for every change in ``(t0, t1]``."""
        self._extend(t1)
        return [(b, i % 2 == 0) for i, b in enumerate(self.bounds) if t0 < b <= t1]

    def next_offline(self, t: float) -> float:
        """The first time > ``t`` the peer goes offline (inf: never)."""
        while True:
            self._extend(t)
            for i, b in enumerate(self.bounds):
                if b > t and i % 2 == 1:
                    return b
            if self.closed:
                return float("inf")
            t = self.bounds[-1]

    def next_online(self, t: float, horizon: float) -> float | None:
        """The first time >= ``t`` (up to ``horizon``) the peer is online, or None."""
        if self.online(t):
            return t
        for b, up in self.changes(t, horizon):
            if up:
                return b
        return None


class FaultPlan:
    """What goes wrong for every worker at every step (and, with churn, at every simulated second)."""

    def __init__(self, workers: int, seed: int, events: Sequence[FaultEvent] = (),
                 nodes: Sequence[NodeSpec] | None = None, packet_loss: float = 0.0, packet_corruption: float = 0.0,
                 churn: bool = False) -> None:
        self.workers, self.seed = workers, seed
        self.events = list(events)
        for e in self.events:
            if not 0 <= e.worker < workers:
                raise ConfigError(f"fault event {e.to_dict()} names worker {e.worker}; expected a worker index < {workers}")
        self.nodes = list(nodes) if nodes is not None else None
        self.packet_loss, self.packet_corruption = packet_loss, packet_corruption
        self.churn: list[Churn | None] = [None] * workers
        if churn and self.nodes is not None:
            for i, n in enumerate(self.nodes):
                if n.session_mean_s is not None or n.join_at_s > 0:
                    self.churn[i] = Churn(n.join_at_s, n.session_mean_s, n.rejoin_delay_s, _rng(seed, i, 0, _CHURN))

    @classmethod
    def from_config(cls, cfg: RunConfig, profile: ClusterProfile | None = None, churn: bool = False) -> FaultPlan:
        f = cfg.faults
        events = [FaultEvent(FaultKind(e.kind), e.worker, e.step, e.duration,  # type: ignore[arg-type]
                             e.factor if e.factor is not None else 1.0, e.seconds or 0.0) for e in f.events]
        nodes = profile.nodes if profile is not None and f.from_profile else None
        return cls(cfg.workers, f.seed if f.seed is not None else cfg.seed, events, nodes, f.packet_loss,
                   f.packet_corruption, churn)

    @property
    def empty(self) -> bool:
        """No fault can ever happen (the trainers then skip the injector entirely)."""
        stragglers = self.nodes is not None and any(n.straggler_prob > 0 and n.straggler_slowdown > 1 for n in self.nodes)
        return not (self.events or stragglers or self.packet_loss or self.packet_corruption or any(self.churn))

    @property
    def damages_payloads(self) -> bool:
        """Some payload may be lost or corrupted (the collective then sends whole contributions in frames)."""
        return bool(self.packet_loss or self.packet_corruption or
                    any(e.kind in (FaultKind.LOSE, FaultKind.CORRUPT) for e in self.events))

    def at(self, step: int) -> list[FaultEvent]:
        """Explicit events that fire (or start) at ``step``, in config order."""
        return [e for e in self.events if (e.step or 0) == step]

    def away(self, worker: int, step: int) -> bool:
        """Whether an explicit ``leave`` keeps ``worker`` away at ``step``."""
        return any(e.kind is FaultKind.LEAVE and e.worker == worker and e.covers(step) for e in self.events)

    def slowdown(self, worker: int, step: int) -> float:
        """Compute-time multiplier of ``worker`` at ``step``: the largest of explicit and profile straggling."""
        factor = max([e.factor for e in self.events
                      if e.kind is FaultKind.STRAGGLE and e.worker == worker and e.covers(step)], default=1.0)
        if self.nodes is not None:
            n = self.nodes[worker]
            if n.straggler_prob > 0 and _rng(self.seed, worker, step, _STRAGGLE).random() < n.straggler_prob:
                factor = max(factor, n.straggler_slowdown)
        return factor

    def profile_straggles(self, worker: int, step: int) -> bool:
        """Whether the profile's draw makes ``worker`` straggle at ``step`` (for logging)."""
        if self.nodes is None or self.nodes[worker].straggler_prob <= 0:
            return False
        return bool(_rng(self.seed, worker, step, _STRAGGLE).random() < self.nodes[worker].straggler_prob)

    def packet_fault(self, worker: int, step: int) -> FaultKind | None:
        """``lose`` or ``corrupt`` when ``worker``'s payload of ``step`` is lost or damaged, else None."""
        for e in self.events:
            if e.worker == worker and e.kind in (FaultKind.LOSE, FaultKind.CORRUPT) and e.covers(step):
                return e.kind
        if self.packet_loss and _rng(self.seed, worker, step, _LOSS).random() < self.packet_loss:
            return FaultKind.LOSE
        if self.packet_corruption and _rng(self.seed, worker, step, _CORRUPTION).random() < self.packet_corruption:
            return FaultKind.CORRUPT
        return None

    def delay_s(self, worker: int, step: int) -> float:
        """Seconds ``worker``'s reply of ``step`` is held back (0: none)."""
        return max([e.seconds for e in self.events if e.kind is FaultKind.DELAY and e.worker == worker
                    and e.covers(step)], default=0.0)

    def heals(self, worker: int, step: int) -> bool:
        """A partition of ``worker`` ended just before ``step``: it resynchronises now."""
        return any(e.partition and e.worker == worker and (e.step or 0) + (e.duration or 0) == step
                   for e in self.events)

    def online(self, worker: int, t: float) -> bool:
        """Churn: whether ``worker`` is online at simulated time ``t`` (always, without churn)."""
        c = self.churn[worker]
        return True if c is None else c.online(t)

    def next_offline(self, worker: int, t: float) -> float:
        c = self.churn[worker]
        return float("inf") if c is None else c.next_offline(t)

    def next_online(self, worker: int, t: float, horizon: float) -> float | None:
        c = self.churn[worker]
        return t if c is None else c.next_online(t, horizon)

    def churn_changes(self, worker: int, t0: float, t1: float) -> list[tuple[float, bool]]:
        c = self.churn[worker]
        return [] if c is None else c.changes(t0, t1)

    def timeline(self, steps: int, horizon_s: float = 0.0) -> list[dict[str, Any]]:
        """The plan written out: every fault in steps ``[0, steps)`` and every churn change in ``[0, horizon_s]``."""
        out = [{**e.to_dict(), "source": "config"} for e in sorted(self.events, key=lambda e: (e.step or 0, e.worker))]
        for s in range(steps):
            for w in range(self.workers):
                if self.profile_straggles(w, s):
                    out.append({"kind": "straggle", "worker": w, "step": s, "factor": self.nodes[w].straggler_slowdown,
                                "source": "profile"})
                if self.packet_loss or self.packet_corruption:
                    explicit = any(e.worker == w and e.kind in (FaultKind.LOSE, FaultKind.CORRUPT) for e in self.at(s))
                    fault = None if explicit else self.packet_fault(w, s)
                    if fault is not None:
                        out.append({"kind": fault.value, "worker": w, "step": s, "source": "probability"})
        for w, c in enumerate(self.churn):
            if c is not None:
                for t, up in [(c.bounds[0], True)] + c.changes(c.bounds[0], horizon_s):
                    if t <= horizon_s:
                        out.append({"kind": "join" if up else "leave", "worker": w, "time_s": round(t, 6),
                                    "source": "churn"})
        return out


def _flip(seed: int, worker: int, step: int, n: int) -> tuple[int, int]:
    """The seeded damage to an ``n``-byte frame: which byte, and the non-zero value it is XOR-ed with."""
    rng = _rng(seed, worker, step, _FLIP)
    return int(rng.integers(n)), int(rng.integers(1, 256))


def corrupt_bytes(data: bytes, seed: int, worker: int, step: int) -> bytes:
    """``data`` with one byte XOR-ed with a non-zero value at a seeded position (CRC-32 always catches it)."""
    if not data:
        return data
    pos, value = _flip(seed, worker, step, len(data))
    buf = bytearray(data)
    buf[pos] ^= value
    return bytes(buf)


def corrupt_frame(frame: torch.Tensor, seed: int, worker: int, step: int) -> torch.Tensor:
    """:func:`corrupt_bytes` on a uint8 tensor, where it lies (the same byte, the same value)."""
    if not frame.numel():
        return frame
    pos, value = _flip(seed, worker, step, frame.numel())
    out = frame.clone()
    out[pos] ^= value
    return out


# ---------------------------------------------------------------------------------------- collective mode


@dataclass
class StepFaults:
    """What the plan does to one step of the collective trainer; identical on every worker."""

    step: int
    present: list[bool]     # not away (leave)
    weights: list[float]    # 1 = contributes; 0 = away, or late past the deadline
    slowdown: list[float]   # compute-time multipliers (straggling)
    left: list[int] = field(default_factory=list)      # went away at this step
    rejoined: list[int] = field(default_factory=list)  # back at this step
    late: list[int] = field(default_factory=list)      # straggled past the deadline: contribution dropped
    damaged: dict[int, str] = field(default_factory=dict)  # worker -> "lose" / "corrupt": its payload this step
    healed: list[int] = field(default_factory=list)    # a partition ended: resynchronises now

    @property
    def resync(self) -> list[int]:
        """Workers that reset their codec state and take the current model at this step."""
        return sorted(set(self.rejoined) | set(self.healed))

    @property
    def source(self) -> int | None:
        """The worker the resynchronising ones take the model from: the lowest present one that holds it."""
        return next((w for w in range(len(self.present)) if self.present[w] and w not in self.resync), None)


def tamper(kind: FaultKind, seed: int, worker: int, step: int):
    """What the transport does to ``worker``'s outgoing frame of ``step`` (a uint8 tensor, on its device):
    send nothing, or flip a byte."""
    def apply(frame: torch.Tensor) -> torch.Tensor:
        return frame[:0] if kind is FaultKind.LOSE else corrupt_frame(frame, seed, worker, step)
    return apply


class CollectiveFaults:
    """The fault plan as one worker of the collective (Ray Train) trainer applies it.

    Every worker evaluates the same plan, so all agree without communicating on who is away, late, or about
    to crash; rank 0 logs every event (``log``). A crash first appends to ``<run>/faults_fired.jsonl`` so the
    group that Ray Train restarts from a checkpoint (possibly an older one) does not crash again.
    """

    def __init__(self, plan: FaultPlan, rank: int, world: int, run_dir: Path, start_step: int,
                 speed_factors: Sequence[float] | None = None, deadline: float = 0.0, restart_s: float = 0.0,
                 log: EventLog | None = None) -> None:
        self.plan, self.rank, self.world, self.run_dir = plan, rank, world, Path(run_dir)
        self.speed = list(speed_factors) if speed_factors is not None else [1.0] * world
        self.deadline, self.restart_s, self.log = deadline, restart_s, log
        self.start_step = start_step
        self.fired = read_fired(self.run_dir)
        self.dropped = 0
        self.recovery_s = 0.0
        self.sim_recovery_s = 0.0
        self._pending_recovery: dict[str, Any] | None = None

    def resumed(self, source: str | None, clock: Any = None, ef_norm: float | None = None) -> None:
        """After a restart: log what the crash cost and charge it to the simulated clock."""
        crashes = [f for f in self.fired if f["step"] >= self.start_step]
        if source != "restart" or not crashes:
            return
        crash = crashes[-1]
        self._pending_recovery = crash
        if clock is not None and crash.get("sim_time_s") is not None:
            offset = max(0.0, crash["sim_time_s"] - clock.now) + self.restart_s
            for w in range(clock.workers):
                clock.advance_worker(w, offset)
            self.sim_recovery_s += offset
        if self.log is not None:
            detail = (f"group restarted from the checkpoint at step {self.start_step} after worker {crash['worker']} "
                      f"crashed at step {crash['step']}; {crash['step'] - self.start_step} steps to recompute")
            self.log.log(self.start_step, "restart", crash["worker"], detail, crash_step=crash["step"],
                         restart_wall_s=time.time() - crash["wall_time"], ef_residual_norm=ef_norm)

    def begin(self, step: int, sim_time: float | None = None, transport: Any = None) -> StepFaults:
        """Apply the plan at the start of ``step``: crash or delay this worker, arm ``transport`` to lose or
        corrupt this worker's payload, and say who contributes."""
        if self._pending_recovery is not None and step >= self._pending_recovery["step"]:
            lost = time.time() - self._pending_recovery["wall_time"]
            self.recovery_s += lost
            if self.log is not None:
                self.log.log(step, "recovered", self._pending_recovery["worker"],
                             f"back at step {step} {lost:.1f} s after the crash", recovery_s=lost)
            self._pending_recovery = None
        for e in self.plan.at(step):
            if e.kind in (FaultKind.CRASH, FaultKind.KILL):
                if self._has_fired(e):
                    continue
                if self.log is not None:
                    self.log.log(step, e.kind.value, e.worker, "os._exit in the Train worker: Ray Train restarts the "
                                 "group from the last checkpoint", time_s=sim_time)
                if e.worker == self.rank:
                    self._crash(e, step, sim_time)
            elif e.kind is FaultKind.DELAY and self.log is not None:
                span = f" for {e.duration} steps" if e.duration else ""
                self.log.log(step, "delay", e.worker, f"reply held back {e.seconds:g} s{span} (everyone waits)")
            elif self.log is not None and e.kind is not FaultKind.LEAVE:
                extra = f" x{e.factor:g} for {e.duration or 'all'} steps" if e.kind is FaultKind.STRAGGLE else ""
                extra += f": partition for {e.duration} steps" if e.partition else ""
                self.log.log(step, e.kind.value, e.worker, f"planned{extra}", time_s=sim_time)
        wait = self.plan.delay_s(self.rank, step)
        if wait > 0:
            time.sleep(wait)
        view = self.view(step)
        if self.log is not None:
            for w in view.left:
                back = next((f"for {e.duration} steps" for e in self.plan.at(step)
                             if e.kind is FaultKind.LEAVE and e.worker == w and e.duration), "for good")
                self.log.log(step, "leave", w, f"away {back}; its contribution is weighted zero", time_s=sim_time)
            for w in view.rejoined:
                self.log.log(step, "rejoin", w, "reset its codec state and took the current model", time_s=sim_time)
            for w in view.healed:
                self.log.log(step, "heal", w, "partition over: reset its codec state and took the current model",
                             time_s=sim_time)
            for w in view.late:
                self.log.log(step, "late", w, f"straggling x{view.slowdown[w]:g} past the deadline "
                             f"({self.deadline:g} x median): contribution dropped", time_s=sim_time)
            stragglers = [w for w in range(self.world) if self.plan.profile_straggles(w, step)]
            for w in stragglers:
                self.log.log(step, "straggle", w, f"profile draw x{view.slowdown[w]:g}", quiet=True, time_s=sim_time)
        fault = view.damaged.get(self.rank)
        if transport is not None:
            transport.tamper = tamper(FaultKind(fault), self.plan.seed, self.rank, step) if fault else None
        return view

    def view(self, step: int) -> StepFaults:
        """Who contributes to ``step`` and how (no side effects: the plan is the same on every worker)."""
        present = [not self.plan.away(w, step) for w in range(self.world)]
        before = [not self.plan.away(w, step - 1) if step > 0 else True for w in range(self.world)]
        slow = [self.plan.slowdown(w, step) for w in range(self.world)]
        times = [self.speed[w] * slow[w] for w in range(self.world)]
        active = [times[w] for w in range(self.world) if present[w]]
        median = statistics.median(active) if active else 0.0
        late = [w for w in range(self.world)
                if present[w] and self.deadline > 0 and times[w] > self.deadline * median * (1 + 1e-12)]
        weights = [1.0 if present[w] and w not in late else 0.0 for w in range(self.world)]
        damaged = {}
        for w in range(self.world):
            fault = self.plan.packet_fault(w, step) if weights[w] > 0 else None
            if fault is not None:
                damaged[w] = fault.value
        return StepFaults(step, present, weights, slow,
                          left=[w for w in range(self.world) if before[w] and not present[w]],
                          rejoined=[w for w in range(self.world) if present[w] and not before[w]], late=late,
                          damaged=damaged,
                          healed=[w for w in range(self.world) if present[w] and self.plan.heals(w, step)])

    def advance_clock(self, clock: Any, view: StepFaults, compute_s: float, comm_s: float) -> None:
        """Simulated time of the step. The group's time is the barrier of the workers whose contributions
        count; a straggler the deadline drops abandons its computation there and goes on from the barrier
        with the current model (so a deadline does save time); the absent do not move."""
        for w in view.resync:
            clock.join(w)
        for w in range(self.world):
            if view.present[w] and w not in view.late:
                clock.compute(w, compute_s * view.slowdown[w])
        t = clock.barrier(comm_s, [wt > 0 for wt in view.weights])
        for w in view.late:
            clock.abandon(w, t)
        clock.steps += 1

    def after_exchange(self, step: int, ledger: Any) -> None:
        """Log the frames the receivers dropped (``PacketError``)."""
        self.dropped += len(ledger.dropped)
        if self.log is not None:
            for w, why in ledger.dropped:
                self.log.log(step, "dropped", w, f"payload dropped by the receivers: {why}")

    def metrics(self, view: StepFaults | None) -> dict[str, float]:
        out = {"faults/dropped_payloads": float(self.dropped), "recovery/lost_s": self.recovery_s}
        if view is not None:
            out["faults/alive"] = float(sum(view.present))
        if self.sim_recovery_s:
            out["recovery/sim_lost_s"] = self.sim_recovery_s
        if self.log is not None:
            out["faults/events"] = float(sum(self.log.counts.values()))
        return out

    def _has_fired(self, e: FaultEvent) -> bool:
        return (e.step or 0) < self.start_step or any(
            f["step"] == e.step and f["worker"] == e.worker and f["kind"] == e.kind.value for f in self.fired)

    def _crash(self, e: FaultEvent, step: int, sim_time: float | None) -> None:
        record = {"step": step, "worker": e.worker, "kind": e.kind.value, "wall_time": time.time(), "sim_time_s": sim_time}
        path = self.run_dir / FIRED_FILE
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.log is not None:
            self.log.close()
        os._exit(1)


def read_fired(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / FIRED_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

