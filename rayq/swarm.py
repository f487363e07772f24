"""Volunteer peers, the Ray actors that host them, and their supervision (trainer ``volunteer``; DeDLOC,
Diskin et al., NeurIPS 2021).

Peers are simulated volunteers, each with its own clock, speed, links, codec state and data order;
``volunteer.actors`` long-lived :class:`~rayq.peer_host.PeerHost` actors host them and do the real work. A
:class:`Swarm` is the driver's view of them, and a round goes through it in five calls:

    begin     the round's planned events fire, crashed hosts that are due come back, churn, heals
              → a PeerSlot for every online peer on an idle host (a laggard's state download first)
    jobs      per host, what its peers compute (their micro-batches in the plan, their faults, and whether
              their previous payload was applied, so the host settles its error feedback)
    exchange  send the jobs to the host actors and collect every reply
    receive   judge every payload on the simulated clock: lost, late (past close + matchmaking), damaged
              (``PacketError``) or accepted
    finish    who was applied, the peers' clocks, the laggards who download the state next time

Every decision that changes the numbers is taken on the simulated clock, so a run is reproducible for a
fixed ``sample_time_s`` however loaded the machine is. Real time only guards against a hung host
(``volunteer.round_timeout_s``: its payloads are late and it gets no work until it answers) and waits for
Ray to restart a crashed host when simulated time says it is back (``faults.restart_s`` after the crash).
The actors sit behind :class:`HostPool` (:class:`~rayq.peer_host.RayHosts` on Ray), so everything here
runs, and is tested, without Ray.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch

from rayq.dedloc import (Aggregator, Job, Payload, PeerSlot, ProgressTracker, RoundPlan, RoundResult, Verdict,
                         download_seconds, judge)
from rayq.errors import TrainingError
from rayq.faults import FaultKind, FaultPlan
from rayq.netsim import Link
from rayq.peer_host import Reply, ReplyStatus, host_layout
from rayq.profiles import load_profile

if TYPE_CHECKING:
    from rayq.config import RunConfig
    from rayq.telemetry import EventLog


class HostPool(Protocol):
    """The host actors as the swarm drives them, by host index."""

    pids: list[int]

    def run(self, jobs: dict[int, list[Job]], state: dict[str, torch.Tensor]) -> dict[int, Reply]: ...

    def poll(self, host: int) -> Reply | None: ...

    def crash(self, host: int) -> None: ...

    def kill(self, host: int) -> None: ...

    def restart(self, host: int) -> tuple[int | None, str]: ...


class PeerState(enum.Enum):
    ONLINE = "online"    # takes part in rounds
    OFFLINE = "offline"  # not joined yet, left (churn, a leave event), or restarted and not back yet
    DOWN = "down"        # its host crashed; Ray restarts it
    GONE = "gone"        # killed, or its host could not be restarted


class HostState(enum.Enum):
    IDLE = "idle"  # takes jobs
    BUSY = "busy"  # hung: no reply within round_timeout_s; no work until it answers
    DOWN = "down"  # crashed; Ray restarts it
    GONE = "gone"  # killed, or out of restarts


@dataclass
class Peer:
    """The aggregator's view of one volunteer (simulated times in seconds)."""

    index: int
    host: int
    state: PeerState = PeerState.OFFLINE
    clock: float = 0.0               # when it is free to compute
    synced: int = 0                  # the round whose state it holds
    needs_state: bool = False        # downloads the state (and resets its codec state) before computing
    cursor: int = 0                  # samples drawn from its own data stream
    away_until: int | None = None    # explicit leave: back at this round
    away_for_good: bool = False
    joined: bool = False             # has been online before (a later arrival is a rejoin)
    down_since: float = 0.0          # its host crashed at this simulated time
    back_at: float = 0.0             # a restarted peer is back at this simulated time
    online_since: float | None = None
    online_s: float = 0.0
    useful_s: float = 0.0
    applied: bool | None = None      # whether its last payload was applied, until its host is told

    @property
    def away(self) -> bool:
        return self.away_until is not None or self.away_for_good

    def go_online(self, t: float, needs_state: bool = True) -> None:
        self.state, self.needs_state, self.joined = PeerState.ONLINE, needs_state, True
        self.clock = max(self.clock, t)
        self.online_since = t

    def go_offline(self, t: float, state: PeerState = PeerState.OFFLINE) -> None:
        if self.online_since is not None:
            self.online_s += max(0.0, t - self.online_since)
            self.online_since = None
        self.state = state

    def online_time(self, now: float) -> float:
        return self.online_s + (now - self.online_since if self.online_since is not None else 0.0)


@dataclass
class Host:
    """One host actor and the peers it carries."""

    index: int
    peers: list[int]
    pid: int | None = None
    state: HostState = HostState.IDLE
    down_wall: float = 0.0  # real time of its crash


@dataclass
class Totals:
    used_samples: int = 0
    wasted_samples: float = 0.0
    downloads: int = 0
    state_bytes: int = 0
    download_s: float = 0.0
    restart_s: float = 0.0
    real_restart_s: float = 0.0
    stragglers: int = 0
    staleness: list[int] = field(default_factory=list)
    alive: list[int] = field(default_factory=list)


class Swarm:
    """The peers of a volunteer run and their hosts (``pool``), on one simulated clock (``now``)."""

    def __init__(self, cfg: RunConfig, events: EventLog, pool: HostPool) -> None:
        self.cfg, self.events, self.pool = cfg, events, pool
        self.micro = cfg.volunteer.microbatch or cfg.batch_size
        self.restart_s = cfg.faults.restart_s
        profile = load_profile(cfg.cluster, cfg.workers, cfg.seed) if cfg.cluster is not None else None
        self.links: list[Link] = profile.links if profile else [Link(1e9, 1e9)] * cfg.workers
        self.speed: list[float] = profile.speed_factors if profile else [1.0] * cfg.workers
        self.plan = FaultPlan.from_config(cfg, profile, churn=True)
        self.hosts = [Host(h, peers, pid) for h, (peers, pid) in
                      enumerate(zip(host_layout(cfg.workers, cfg.volunteer.actors), pool.pids))]
        self.peers = [Peer(p, h.index) for h in self.hosts for p in h.peers]
        self.peers.sort(key=lambda p: p.index)
        self.now = 0.0
        self.totals, self.tracker = Totals(), ProgressTracker()
        self._fired, self._crashes = -1, set[int]()
        self._downloads: dict[int, tuple[float, int]] = {}
        for p in self.peers:  # the first peers start from the common initialisation; late joiners download it
            if self.plan.online(p.index, 0.0):
                p.go_online(0.0, needs_state=False)

    # -- a round ---------------------------------------------------------------------------------------
    def begin(self, r: int, sample_s: float, state_nbytes: Callable[[], int]) -> list[PeerSlot]:
        """Fire round ``r``'s events and bring peers on and off line; return the slots of the peers that can
        compute (online, on an idle host). A peer that needs the state starts after downloading its
        ``state_nbytes()`` bytes."""
        if self._fired < r:  # a round's planned events fire once, even if the round has to wait for peers
            self._fired, self._crashes = r, self._planned_events(r)
        self._poll_hung_hosts(r)
        self._restart_due_hosts(r)
        self.churn(r)
        self.totals.alive.append(sum(p.state is PeerState.ONLINE for p in self.peers))
        slots, nbytes, self._downloads = [], None, {}
        for p in self.peers:
            if p.state is not PeerState.ONLINE or self.hosts[p.host].state is not HostState.IDLE:
                continue
            download = 0.0
            if p.needs_state:
                nbytes = state_nbytes() if nbytes is None else nbytes
                download = download_seconds(nbytes, self.links[p.index])
                self._downloads[p.index] = (download, nbytes)
            compute = self.micro * sample_s * self.speed[p.index] * self.plan.slowdown(p.index, r)
            slots.append(PeerSlot(p.index, max(self.now, p.clock) + download, compute,
                                  self.plan.next_offline(p.index, self.now)))
        return slots

    def jobs(self, r: int, slots: list[PeerSlot], plan: RoundPlan) -> dict[int, list[Job]]:
        """Per host, the jobs of its peers that compute in round ``r``, with the faults injected into them."""
        jobs: dict[int, list[Job]] = {}
        for s in slots:
            p, k = self.peers[s.peer], plan.microbatches[s.peer]
            if self.plan.profile_straggles(s.peer, r):  # routine: a count on the console's progress line
                self.totals.stragglers += 1
                self.events.log(r, "straggle", s.peer, f"profile draw: compute x{self.plan.slowdown(s.peer, r):g}",
                                quiet=True, time_s=self.now)
            if k == 0:
                continue
            fault = FaultKind.CRASH if s.peer in self._crashes else self.plan.packet_fault(s.peer, r)
            if fault in (FaultKind.LOSE, FaultKind.CORRUPT) and not any(
                    e.worker == s.peer and e.kind is fault and e.covers(r) for e in self.plan.events):
                self.events.log(r, fault.value, s.peer, "drawn with faults.packet_loss/packet_corruption",
                                time_s=self.now)
            if p.needs_state:
                download, nbytes = self._downloads[s.peer]
                self.totals.downloads += 1
                self.totals.download_s += download
                self.totals.state_bytes += nbytes
                self.totals.staleness.append(r - p.synced)
            jobs.setdefault(p.host, []).append(Job(s.peer, r, k, p.cursor, p.needs_state, p.applied, fault))
            p.cursor += k * self.micro
            p.applied = None
        for peer in self._crashes:  # a crashing peer that computes nothing this round still takes its host down
            js = jobs.get(self.peers[peer].host, [])
            if js and not any(j.fault is FaultKind.CRASH for j in js):
                js[0] = replace(js[0], fault=FaultKind.CRASH)
        return jobs

    def exchange(self, r: int, jobs: dict[int, list[Job]], state: dict[str, torch.Tensor]) -> list[Payload]:
        """Send the jobs and collect every host's reply; return the payloads. A host that crashed is down (a
        crashing peer with no job this round still takes its host down); one that hung (no answer within the
        real guard ``round_timeout_s``) is busy: its payloads are late and it gets no work until it answers."""
        for peer in sorted(self._crashes):
            h = self.hosts[self.peers[peer].host]
            if h.index not in jobs and h.state in (HostState.IDLE, HostState.BUSY):
                self.pool.crash(h.index)
                self._host_down(h, r, f"os._exit in its actor (peer {peer} crashed)")
        self._crashes = set()
        payloads: list[Payload] = []
        for h, reply in (self.pool.run(jobs, state) if jobs else {}).items():
            host = self.hosts[h]
            if reply.status is ReplyStatus.HUNG:
                host.state = HostState.BUSY
                for j in jobs[h]:
                    self.events.log(r, "late", j.peer, f"host {h} hung ({reply.error}, real): dropped; the host gets "
                                    "no work until it answers", time_s=self.now)
            elif reply.status is ReplyStatus.DIED:
                self._host_down(host, r, f"its actor died during the round ({reply.error})")
            else:
                if host.pid is not None and reply.pid != host.pid:
                    self.events.log(r, "restart", None, f"host {h} came back as a new process: its peers' codec "
                                    "state is new")
                    for q in host.peers:
                        self.peers[q].needs_state = True
                host.pid = reply.pid
                payloads += reply.payloads
        return payloads

    def receive(self, r: int, plan: RoundPlan, payloads: list[Payload], aggregator: Aggregator) -> RoundResult:
        """Judge the payloads on the simulated clock (:func:`~rayq.dedloc.judge`, each delayed by its peer's
        ``delay`` fault) and log the dropped ones."""
        result = judge(r, plan, payloads, {pl.peer: self.plan.delay_s(pl.peer, r) for pl in payloads}, aggregator)
        for peer, verdict in result.verdicts.items():
            if verdict is Verdict.LOST:
                self.events.log(r, "lost", peer, "payload lost on the way: dropped", time_s=self.now)
            elif verdict is Verdict.LATE:
                self.events.log(r, "late", peer, result.notes[peer], time_s=self.now)
                self.events.log(r, "dropped", peer, f"payload of round {r} missed the deadline", time_s=self.now)
            elif verdict is Verdict.DAMAGED:
                self.events.log(r, "dropped", peer, f"payload failed to decode ({result.notes[peer]})", time_s=self.now)
            elif verdict is Verdict.NONFINITE:
                self.events.log(r, "nonfinite", peer, f"payload not finite ({result.notes[peer]}): dropped; the peer "
                                "downloads the state and resets its codec state", time_s=self.now)
        return result

    def finish(self, r: int, slots: list[PeerSlot], plan: RoundPlan, result: RoundResult, applied: bool,
               end: float) -> None:
        """Close round ``r`` at simulated time ``end``: account each peer's compute as used or wasted, remember
        whether its payload was applied (``applied``: the optimizer stepped), and move its clock. A peer in the
        averaging group holds the new state; one that missed it, or sent NaN/Inf, downloads the state before computing
        again, except while a partition cuts it off (it downloads when the partition heals)."""
        used = {pl.peer for pl, _ in result.accepted} if applied else set()
        for s in slots:
            p, k = self.peers[s.peer], plan.microbatches[s.peer]
            wasted = plan.wasted_s[s.peer] / s.microbatch_s * self.micro
            if s.peer in used:
                p.useful_s += k * s.microbatch_s
                self.totals.used_samples += k * self.micro
                self.tracker.report(s.peer, k * self.micro, k * s.microbatch_s + plan.wasted_s[s.peer])
            elif k > 0:
                wasted += k * self.micro
            self.totals.wasted_samples += wasted
            if s.peer in result.verdicts:
                p.applied = s.peer in used
            if p.state is not PeerState.ONLINE or s.peer in plan.left:
                continue
            p.clock = end
            if self.partitioned(s.peer, r):
                continue
            if s.peer in result.frames and result.verdicts[s.peer] is not Verdict.NONFINITE:
                p.synced, p.needs_state = r + 1, False
            else:  # missed the averaging, or diverged (its error-feedback memory would carry the NaN/Inf on)
                p.needs_state = True
        self.now = end

    def wait(self, r: int) -> None:
        """No peer can compute: move the clock to the next arrival (a churn session, the end of a leave, a
        restart that is due), or wait (real time) for a hung host; fail when nobody can come back."""
        arrivals = [p.back_at for p in self.peers if p.state is PeerState.OFFLINE]
        arrivals += [p.down_since + self.restart_s for p in self.peers if p.state is PeerState.DOWN]
        for p in self.peers:
            if p.state is PeerState.OFFLINE and not p.away:
                arrivals.append(self.plan.next_online(p.index, self.now + 1e-9, self.now + 1e7) or self.now)
            elif p.state is PeerState.ONLINE and self.hosts[p.host].state is HostState.IDLE:  # leaves too soon
                arrivals.append(self.plan.next_offline(p.index, self.now))
        arrivals = [t for t in arrivals if self.now < t < float("inf")]
        if arrivals:
            self.now = min(arrivals)
        elif any(h.state is HostState.BUSY for h in self.hosts):
            time.sleep(0.2)
        elif any(p.away_until is not None for p in self.peers):
            raise TrainingError(f"round {r}: no peer can contribute: every remaining peer is away (leave events "
                                "count rounds, and no round can run)")
        else:
            raise TrainingError(f"round {r}: no peer can contribute: every peer is gone")

    def partitioned(self, peer: int, r: int) -> bool:
        """Whether a partition (lose / corrupt / delay with a duration) cuts ``peer`` off in round ``r``."""
        return any(e.partition and e.worker == peer and e.covers(r) for e in self.plan.events)

    # -- peers coming and going ---------------------------------------------------------------------------
    def churn(self, r: int) -> None:
        """Bring peers on or off line: churn sessions, explicit leaves that end, restarted peers that are back."""
        for p in self.peers:
            if p.state in (PeerState.GONE, PeerState.DOWN):
                continue
            if p.away_until is not None and r >= p.away_until:
                p.away_until = None
            churn_on = self.plan.online(p.index, self.now)
            if p.state is PeerState.ONLINE and not churn_on:
                t = max([c for c, up in self.plan.churn_changes(p.index, p.online_since or 0.0, self.now) if not up],
                        default=self.now)
                p.go_offline(t)
                self.events.log(r, "leave", p.index, "session ended (churn)", time_s=t)
            elif (p.state is PeerState.OFFLINE and churn_on and not p.away and self.now >= p.back_at
                  and self.hosts[p.host].state is not HostState.GONE):
                self.events.log(r, "rejoin" if p.joined else "join", p.index,  # arrivals take part from this round
                                "downloads the current state and resets its codec state", time_s=self.now)
                p.go_online(self.now)

    def _planned_events(self, r: int) -> set[int]:
        """Fire the round's explicit events and heal the partitions that end; return the peers that crash
        while computing this round."""
        crashes = set()
        for e in self.plan.at(r):
            p, kind, now = self.peers[e.worker], e.kind, self.now
            if kind is FaultKind.CRASH:
                self.events.log(r, "crash", e.worker, f"os._exit in its host actor {p.host}; Ray restarts it", time_s=now)
                crashes.add(e.worker)
            elif kind is FaultKind.KILL:
                self.events.log(r, "kill", e.worker, f"ray.kill of its host actor {p.host} (no restart): gone for good",
                                time_s=now)
                self._host_gone(self.hosts[p.host], r, f"went down with host {p.host}", kill=True, but=e.worker)
            elif kind is FaultKind.LEAVE:
                if p.state is PeerState.GONE:
                    continue
                p.away_until = None if e.duration is None else r + e.duration
                p.away_for_good = e.duration is None
                self.events.log(r, "leave", e.worker, "away " + ("for good" if e.duration is None else
                                                                 f"for {e.duration} rounds"), time_s=now)
                if p.state is PeerState.ONLINE:
                    p.go_offline(now)
            elif kind is FaultKind.STRAGGLE:
                self.events.log(r, "straggle", e.worker, f"compute x{e.factor:g} for {e.duration or 'all'} rounds",
                                time_s=now)
            else:
                what = {FaultKind.DELAY: f"its reply is held back {e.seconds:g} s (simulated)",
                        FaultKind.LOSE: "its payload is lost", FaultKind.CORRUPT: "its payload has a byte flipped"}[kind]
                span = (f"; a partition for {e.duration} rounds: it keeps computing, takes no new state, and "
                        "downloads the state when it heals") if e.partition else ""
                self.events.log(r, kind.value, e.worker, f"planned: {what}{span}", time_s=now)
        for p in self.peers:
            if self.plan.heals(p.index, r) and p.state is not PeerState.GONE:
                self.events.log(r, "heal", p.index, "partition over: downloads the state and resets its codec state",
                                time_s=self.now)
                p.needs_state = True
        return crashes

    # -- hosts ---------------------------------------------------------------------------------------------
    def _host_down(self, host: Host, r: int, why: str) -> None:
        host.state, host.down_wall = HostState.DOWN, time.perf_counter()
        for q in host.peers:
            p = self.peers[q]
            if p.state is not PeerState.GONE:
                p.go_offline(self.now, PeerState.DOWN)
                p.down_since = self.now
                self.events.log(r, "down", q, f"host {host.index}: {why}", time_s=self.now)

    def _host_gone(self, host: Host, r: int, why: str, kill: bool = False, but: int | None = None) -> None:
        if kill and host.state is not HostState.GONE:
            self.pool.kill(host.index)
        host.state = HostState.GONE
        for q in host.peers:
            if self.peers[q].state is not PeerState.GONE:
                self.peers[q].go_offline(self.now, PeerState.GONE)
                if q != but:
                    self.events.log(r, "gone", q, why, time_s=self.now)

    def _poll_hung_hosts(self, r: int) -> None:
        """A hung host that has answered since (its payloads are dropped: their round is over) takes jobs again."""
        for h in self.hosts:
            reply = self.pool.poll(h.index) if h.state is HostState.BUSY else None
            if reply is None:
                continue
            if reply.status is ReplyStatus.DIED:
                self._host_down(h, r, f"its actor died ({reply.error})")
                continue
            for pl in reply.payloads:
                self.events.log(r, "dropped", pl.peer, f"late payload of round {pl.round} arrived in round {r}",
                                time_s=self.now)
            h.state = HostState.IDLE

    def _restart_due_hosts(self, r: int) -> None:
        """A crashed host is back ``restart_s`` simulated seconds after the crash: then wait (real time) for Ray
        to have restarted its actor, so when it is back never depends on how loaded this machine is."""
        for h in self.hosts:
            due = [self.peers[q] for q in h.peers if self.peers[q].state is PeerState.DOWN
                   and self.peers[q].down_since + self.restart_s <= self.now]
            if h.state is not HostState.DOWN or not due:
                continue
            pid, why = self.pool.restart(h.index)
            if pid is None:
                self._host_gone(h, r, f"host {h.index} was not restarted: {why}")
                continue
            real = time.perf_counter() - h.down_wall
            self.totals.real_restart_s += real
            h.state, h.pid = HostState.IDLE, pid
            for p in due:
                p.back_at = p.down_since + self.restart_s
                self.totals.restart_s += self.restart_s
                p.state = PeerState.OFFLINE
                self.events.log(r, "restart", p.index, f"host {h.index} restarted by Ray after {real:.1f} s (real); "
                                f"the peer is back at simulated {p.back_at:.1f} s", time_s=self.now)

    # -- figures -------------------------------------------------------------------------------------------
    def figures(self) -> dict[str, float]:
        """The volunteer and recovery figures of the run so far."""
        t, now = self.totals, self.now
        online_s = sum(p.online_time(now) for p in self.peers)
        samples = t.used_samples + t.wasted_samples
        v = self.cfg.volunteer
        return {
            "volunteer/peers": len(self.peers),
            "volunteer/alive": sum(p.state is PeerState.ONLINE for p in self.peers),
            "volunteer/alive_min": min(t.alive, default=0),
            "volunteer/alive_mean": sum(t.alive) / max(len(t.alive), 1),
            "volunteer/samples_per_s": t.used_samples / now if now > 0 else 0.0,
            "volunteer/utilisation": sum(p.useful_s for p in self.peers) / online_s if online_s > 0 else 0.0,
            "volunteer/wasted_samples": t.wasted_samples,
            "volunteer/wasted_fraction": t.wasted_samples / samples if samples else 0.0,
            "volunteer/used_samples": t.used_samples,
            "volunteer/state_downloads": t.downloads,
            "volunteer/staleness_mean": sum(t.staleness) / len(t.staleness) if t.staleness else 0.0,
            "volunteer/staleness_max": max(t.staleness, default=0),
            "volunteer/eta_s": self.tracker.eta(v.target_batch_size),
            "volunteer/target_batch_size": v.target_batch_size,
            "comm/state_bytes": float(t.state_bytes),
            "recovery/download_s": t.download_s,
            "recovery/restart_s": t.restart_s,
            "recovery/lost_s": t.download_s + t.restart_s,
            "recovery/real_restart_s": t.real_restart_s,
        }
