"""Trainer ``volunteer``: DeDLOC-style collaborative training over unreliable volunteer peers (ALGORITHMS.md §8).

It runs in the driver: ``rayq.launch.train`` calls :func:`run` instead of fitting a TorchTrainer. The peers
live on long-lived Ray actors (:class:`rayq.volunteer.PeerHost`; ``volunteer.actors`` of them, each hosting
``workers / actors`` peers), the aggregator is this loop. One round (a global step):

    faults of the round (crash, kill, leave, churn, stragglers)       rayq.faults.FaultPlan
    → schedule the round on the peers' simulated clocks                rayq.volunteer.plan_round
    → each idle host computes its peers' planned micro-batches, encodes them with the peers' codecs and
      replies with the packets' bytes through the object store
    → wait until the real deadline (ray.wait): a late host is left alone until it answers and its payloads
      are dropped; a dead one is restarted by Ray and its peers rejoin by downloading the state
    → decode (PacketError → dropped) → average weighted by samples → optimizer step
    → metrics, evaluation, TensorBoard, events

The run never restarts because a peer died.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rayq import checkpoint as ckpt
from rayq.config import ConfigError, RunConfig
from rayq.errors import TrainingError
from rayq.faults import FaultKind, FaultPlan
from rayq.netsim import Link, ring_allgather_time, transfer_seconds
from rayq.profiles import load_profile
from rayq.tasks import Split, get_task
from rayq.telemetry import EventLog, TensorBoardLog
from rayq.volunteer import (Aggregator, Job, PeerHost, PeerSlot, ProgressTracker, build_policy, multi_round_codecs,
                            plan_round)
from rayq.run import build_optimizer


@dataclass
class Peer:
    """The aggregator's view of one volunteer (simulated times in seconds)."""

    index: int
    host: int
    status: str = "offline"          # online | offline (left, or not yet joined) | down (host crashed) | gone
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


@dataclass
class Host:
    index: int
    actor: Any
    peers: list[int]
    pid: int | None = None
    state: str = "idle"              # idle | busy (a late reply outstanding) | down | gone
    pending: Any = None              # busy: the late reply; down: the ping that says it is back
    down_wall: float = 0.0


@dataclass
class Totals:
    used_samples: int = 0
    wasted_samples: float = 0.0
    bytes_up: int = 0
    payloads: int = 0
    download_s: float = 0.0
    restart_s: float = 0.0
    real_restart_s: float = 0.0
    downloads: int = 0
    staleness: list[int] = field(default_factory=list)
    alive: list[int] = field(default_factory=list)


def run(cfg: RunConfig, run_dir: Path, on_progress=None) -> dict[str, Any]:
    """Train ``cfg`` in volunteer mode; return the final metrics (the launcher writes summary.json)."""
    import ray

    torch.set_num_threads(1)
    v, world = cfg.volunteer, cfg.workers
    micro = v.microbatch or cfg.batch_size
    task = get_task(cfg.task)
    train, test = task.load(cfg.data_dir)
    rounds = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / v.target_batch_size))  # type: ignore[operator]
    profile = load_profile(cfg.cluster, world, cfg.seed) if cfg.cluster is not None else None
    links = profile.links if profile else [Link(1e9, 1e9)] * world
    speed = profile.speed_factors if profile else [1.0] * world
    plan = FaultPlan.from_config(cfg, profile, churn=True)

    torch.manual_seed(cfg.seed)
    model = task.build_model()
    optimizer = build_optimizer(cfg, model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = {n: tuple(p.shape) for n, p in params}
    policy = build_policy(cfg)
    if multi := multi_round_codecs(policy, shapes):
        raise ConfigError(f"compression.codec={multi[0]!r} needs a multi-round all-reduce; volunteer mode decodes each "
                          "peer's payload on its own: choose a single-round codec")
    aggregator = Aggregator(policy, shapes, cfg.seed, world)
    elements = sum(p.numel() for _, p in params)
    state_bytes = 4 * elements * (2 if cfg.optimizer.sgd_momentum > 0 or cfg.optimizer.name != "sgd" else 1)
    sample_s = v.sample_time_s or _measure_sample_time(model, train, micro)

    tb = TensorBoardLog(run_dir / "tensorboard")
    events = EventLog(run_dir, tb, on_progress)
    rounds_log = open(run_dir / "rounds.jsonl", "a")  # one line per round: who contributed how many samples
    actors = v.actors or world
    remote = ray.remote(PeerHost).options(num_cpus=v.cpus_per_actor, max_restarts=v.max_restarts, max_task_retries=0)
    hosts = [Host(h, remote.remote(cfg.to_dict(), list(range(h, world, actors))), list(range(h, world, actors)))
             for h in range(actors)]
    peers = [Peer(p, p % actors) for p in range(world)]
    try:
        for h, info in zip(hosts, ray.get([h.actor.info.remote() for h in hosts], timeout=600)):
            h.pid = info["pid"]
        for p in peers:  # the first peers start from the common initialisation; late joiners download the state
            if plan.online(p.index, 0.0):
                _go_online(p, 0.0, needs_state=False)
                p.joined = True
        tracker, totals = ProgressTracker(), Totals()
        now, r, fired, crashes = 0.0, 0, -1, set()
        window = _Window()
        last: dict[str, Any] = {}
        last_eval: dict[str, float] = {}
        tta: tuple[float, int] | None = None
        wall0 = time.perf_counter()

        while r < rounds:
            round_wall = time.perf_counter()
            if fired < r:  # the round's planned events fire once, even if the round has to wait for peers
                fired = r
                crashes = _planned_events(plan, r, now, peers, hosts, events, ray)
            _churn(plan, r, now, peers, hosts, events)
            _check_hosts(r, now, peers, hosts, events, totals, cfg.faults.restart_s, ray)
            totals.alive.append(sum(p.status == "online" for p in peers))

            slots, downloads = [], {}  # ---- the round on the simulated clocks
            for p in peers:
                if p.status != "online" or hosts[p.host].state != "idle":
                    continue
                download = 8 * state_bytes / links[p.index].down_bps + links[p.index].latency_s if p.needs_state else 0.0
                downloads[p.index] = download
                slowdown = plan.slowdown(p.index, r)
                slots.append(PeerSlot(p.index, max(now, p.clock) + download, micro * sample_s * speed[p.index] * slowdown,
                                      plan.next_offline(p.index, now)))
            schedule = plan_round(slots, v.target_batch_size, micro, v.matchmaking_s)
            if schedule is None:
                now = _wait_for_peers(plan, r, now, peers, hosts)
                continue
            window.stragglers += _log_stragglers(plan, r, now, [s.peer for s in slots], events)

            # ---- real work: each idle host computes its peers' planned micro-batches, until the real deadline
            jobs = _jobs(plan, r, now, slots, schedule.microbatches, peers, crashes, micro, events)
            for s in slots:
                p = peers[s.peer]
                if schedule.microbatches[s.peer] and p.needs_state:
                    totals.downloads += 1
                    totals.download_s += downloads[s.peer]
                    totals.staleness.append(r - p.synced)
            for peer in crashes:  # a crashing peer that computes nothing this round still takes its host down
                h = hosts[peers[peer].host]
                if h.index in jobs and not any(j.fault == "crash" for j in jobs[h.index]):
                    jobs[h.index][0] = replace(jobs[h.index][0], fault="crash")
                elif h.index not in jobs and h.state in ("idle", "busy"):
                    h.actor.crash.remote()
                    _host_down(h, r, now, peers, events, f"os._exit in its actor (peer {peer} crashed)")
            state_ref = ray.put(model.state_dict()) if jobs else None
            refs = {h: hosts[h].actor.run.remote(r, state_ref, js) for h, js in jobs.items()}
            arrived, accepted = _collect(refs, jobs, r, now, v.round_timeout_s, peers, hosts, aggregator, events, ray)
            totals.bytes_up += sum(arrived.values())  # every frame that crossed the wire, damaged ones included
            window.bytes_up += sum(arrived.values())
            totals.payloads += len(arrived)
            window.payloads += len(arrived)
            for pl, _ in accepted:
                if v.sample_time_s is None and pl.samples:  # measured compute time per sample (EMA)
                    sample_s = 0.9 * sample_s + 0.1 * pl.compute_s / pl.samples

            # ---- DeDLOC step: the sample-weighted mean of the accepted contributions
            if accepted:
                mean = aggregator.average([d for _, d in accepted], [pl.samples for pl, _ in accepted])
                if all(bool(torch.isfinite(g).all()) for g in mean.values()):
                    for n, prm in params:
                        prm.grad = mean[n].clone()
                    optimizer.step()
                else:
                    events.log(r, "nonfinite", None, "the averaged gradient is not finite: step skipped")

            # ---- simulated time: the contributors average (butterfly, §8.3) and everyone who missed it lags
            comm = _comm_seconds(arrived, links)
            end = schedule.averaging_at + comm
            used = {pl.peer for pl, _ in accepted}
            for s in slots:
                p, k = peers[s.peer], schedule.microbatches[s.peer]
                done = k * s.microbatch_s
                wasted = schedule.wasted_s[s.peer] / s.microbatch_s * micro
                if s.peer in used:
                    p.useful_s += done
                    totals.used_samples += k * micro
                    window.samples += k * micro
                    tracker.report(s.peer, k * micro, done + schedule.wasted_s[s.peer])
                elif k > 0:
                    wasted += k * micro
                totals.wasted_samples += wasted
                if p.status != "online" or s.peer in schedule.left:
                    continue
                p.clock = end
                if s.peer in arrived:  # in the averaging group (even if its payload was damaged): holds the new state
                    p.synced, p.needs_state = r + 1, False
                else:  # missed the round (too slow, late, lost): a laggard downloads the state before computing again
                    p.needs_state = True
            rounds_log.write(json.dumps({
                "round": r, "start_s": now, "close_s": schedule.close, "end_s": end, "comm_s": comm,
                "alive": totals.alive[-1], "samples": {pl.peer: pl.samples for pl, _ in accepted},
                "scheduled": {s.peer: schedule.microbatches[s.peer] * micro for s in slots},
                "slowdown": {s.peer: plan.slowdown(s.peer, r) for s in slots if plan.slowdown(s.peer, r) != 1.0},
            }) + "\n")
            window.loss += sum(pl.loss * pl.samples for pl, _ in accepted)
            window.rounds += 1
            window.wall += time.perf_counter() - round_wall
            now = end
            r += 1

            report = r % max(cfg.report_every, 1) == 0 or r == rounds
            evaluate_now = r == rounds or (cfg.eval_every and r % cfg.eval_every == 0)
            if evaluate_now:
                acc, loss = _evaluate(model, test)
                last_eval = {"eval/accuracy": acc, "eval/loss": loss}
                if v.target_accuracy is not None and tta is None and acc >= v.target_accuracy:
                    tta = (now, r)
                    events.log(r, "target", None, f"accuracy {acc:.4f} >= {v.target_accuracy} at simulated "
                               f"{now:.1f} s (wall {time.perf_counter() - wall0:.1f} s)", time_s=now)
            if report or evaluate_now:
                last = _metrics(r, rounds, len(train), now, peers, totals, window, tracker, elements, world, v,
                                time.perf_counter() - wall0, last_eval, tta, events)
                tb.scalars(last, r)
                if report and on_progress is not None:
                    on_progress({**last, "total_steps": rounds})
                window = _Window()
            if tta is not None and v.stop_at_target:
                break

        for p in peers:
            _go_offline(p, now)
        loss = last.get("train/loss", float("nan"))
        last = _metrics(r, rounds, len(train), now, peers, totals, _Window(), tracker, elements, world, v,
                        time.perf_counter() - wall0, last_eval, tta, events)
        last["train/loss"] = loss
        final_dir = run_dir / "checkpoint_final"
        ckpt.save(final_dir, 0, model_state={"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "rng": torch.get_rng_state()},
                  codec_state={}, meta={"step": r, "world": world, "task": cfg.task, "codec": cfg.compression.codec,
                                        "sim_time_s": now})
        if totals.staleness:
            tb.writer.add_histogram("volunteer/staleness", torch.tensor(totals.staleness, dtype=torch.float32), r)
        tb.hparams(cfg.to_dict(), {k: val for k, val in last.items() if k.startswith(("eval/", "sim/", "volunteer/u"))})
        events.close()
        rounds_log.close()
        tb.close()
        return {**last, "steps_total": rounds, "checkpoint": str(final_dir)}
    finally:
        for h in hosts:
            try:
                ray.kill(h.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


# ---------------------------------------------------------------------------------------- a round's work


def _jobs(plan: FaultPlan, r: int, now: float, slots: list[PeerSlot], microbatches: dict[int, int], peers: list[Peer],
          crashes: set[int], micro: int, events: EventLog) -> dict[int, list[Job]]:
    """Per host, the jobs of its peers that compute this round, with the faults injected into them."""
    jobs: dict[int, list[Job]] = {}
    for s in slots:
        p, k = peers[s.peer], microbatches[s.peer]
        if k == 0:
            continue
        fault = "crash" if s.peer in crashes else None
        packet = plan.packet_fault(s.peer, r)
        if fault is None and packet is not None:
            fault = packet.value
            if not any(e.worker == s.peer and e.kind is packet for e in plan.at(r)):
                events.log(r, packet.value, s.peer, "drawn with faults.packet_loss/packet_corruption", time_s=now)
        delay = max([e.seconds for e in plan.at(r) if e.kind is FaultKind.DELAY and e.worker == s.peer], default=0.0)
        jobs.setdefault(p.host, []).append(Job(s.peer, r, k, p.cursor, p.needs_state, fault, delay))
        p.cursor += k * micro
    return jobs


def _collect(refs: dict[int, Any], jobs: dict[int, list[Job]], r: int, now: float, timeout: float, peers: list[Peer],
             hosts: list[Host], aggregator: Aggregator, events: EventLog, ray: Any) -> tuple[dict[int, int], list]:
    """Wait for the hosts' replies until the real deadline; return the frames that arrived ``{peer: bytes}`` and the
    payloads that decoded ``[(payload, decoded)]``. A late host is left alone until it answers (RAY_NOTES: never
    enqueue work on a busy actor); a dead one is down; lost, damaged and mismatched payloads are dropped."""
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout) if refs else ([], [])
    arrived: dict[int, int] = {}
    accepted: list = []
    for h, ref in refs.items():
        host = hosts[h]
        if ref not in ready:
            host.state, host.pending = "busy", ref
            for j in jobs[h]:
                events.log(r, "late", j.peer, f"no payload within the real deadline ({timeout:g} s): dropped; its host "
                           "gets no work until it answers", time_s=now)
            continue
        try:
            pid, payloads = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            _host_down(host, r, now, peers, events, f"its actor died during the round ({type(err).__name__})")
            continue
        if host.pid is not None and pid != host.pid:
            events.log(r, "restart", None, f"host {h} came back as a new process: its peers' codec state is new")
            for q in host.peers:
                peers[q].needs_state = True
        host.pid = pid
        for pl in payloads:
            if pl.round != r:
                events.log(r, "dropped", pl.peer, f"payload of round {pl.round} arrived in round {r}", time_s=now)
            elif pl.frame is None:
                events.log(r, "lost", pl.peer, "payload lost on the way: dropped", time_s=now)
            else:
                arrived[pl.peer] = len(pl.frame)
                try:
                    accepted.append((pl, aggregator.decode(pl.frame, pl.peer, r)))
                except Exception as err:  # noqa: BLE001 - PacketError, or a codec refusing damaged fields
                    events.log(r, "dropped", pl.peer, f"payload failed to decode ({type(err).__name__}: {err})",
                               time_s=now)
    return arrived, accepted


# ---------------------------------------------------------------------------------------- faults and churn


def _go_online(p: Peer, t: float, needs_state: bool = True) -> None:
    p.status, p.needs_state = "online", needs_state
    p.clock = max(p.clock, t)
    p.online_since = t


def _go_offline(p: Peer, t: float, status: str | None = None) -> None:
    if p.online_since is not None:
        p.online_s += max(0.0, t - p.online_since)
        p.online_since = None
    if status is not None:
        p.status = status


def _planned_events(plan: FaultPlan, r: int, now: float, peers: list[Peer], hosts: list[Host], events: EventLog,
                    ray: Any) -> set[int]:
    """Fire the round's explicit events; return the peers that crash while computing this round."""
    crashes = set()
    for e in plan.at(r):
        p = peers[e.worker]
        if e.kind is FaultKind.CRASH:
            events.log(r, "crash", e.worker, f"os._exit in its host actor {p.host}; Ray restarts it", time_s=now)
            crashes.add(e.worker)
        elif e.kind is FaultKind.KILL:
            host = hosts[p.host]
            events.log(r, "kill", e.worker, f"ray.kill of its host actor {p.host} (no restart): gone for good", time_s=now)
            if host.state != "gone":
                ray.kill(host.actor, no_restart=True)
                host.state, host.pending = "gone", None
            for q in host.peers:
                _go_offline(peers[q], now, "gone")
                if q != e.worker:
                    events.log(r, "gone", q, f"went down with host {p.host}", time_s=now)
        elif e.kind is FaultKind.LEAVE:
            if p.status == "gone":
                continue
            p.away_until = None if e.duration is None else r + e.duration
            p.away_for_good = e.duration is None
            events.log(r, "leave", e.worker, f"away {'for good' if e.duration is None else f'for {e.duration} rounds'}",
                       time_s=now)
            if p.status == "online":
                _go_offline(p, now, "offline")
        elif e.kind is FaultKind.STRAGGLE:
            events.log(r, "straggle", e.worker, f"compute x{e.factor:g} for {e.duration or 'all'} rounds", time_s=now)
        elif e.kind is FaultKind.DELAY:
            events.log(r, "delay", e.worker, f"its reply is held back {e.seconds:g} s (real)", time_s=now)
        else:
            events.log(r, e.kind.value, e.worker, "planned: its payload of this round", time_s=now)
    return crashes


def _churn(plan: FaultPlan, r: int, now: float, peers: list[Peer], hosts: list[Host], events: EventLog) -> None:
    """Bring peers on or off line: churn sessions, explicit leaves that end, restarted peers that are back."""
    for p in peers:
        if p.status in ("gone", "down"):
            continue
        if p.away_until is not None and r >= p.away_until:
            p.away_until = None
        away = p.away_until is not None or p.away_for_good
        churn_on = plan.online(p.index, now)
        if p.status == "online" and not churn_on:
            t = max([c for c, up in plan.churn_changes(p.index, p.online_since or 0.0, now) if not up], default=now)
            _go_offline(p, t, "offline")
            events.log(r, "leave", p.index, "session ended (churn)", time_s=t)
        elif p.status == "offline" and churn_on and not away and now >= p.back_at and hosts[p.host].state != "gone":
            events.log(r, "rejoin" if p.joined else "join", p.index,  # arrivals take part from the next round
                       "downloads the current state and resets its codec state", time_s=now)
            _go_online(p, now)
            p.joined = True


def _host_down(host: Host, r: int, now: float, peers: list[Peer], events: EventLog, why: str) -> None:
    host.state, host.pending, host.down_wall = "down", None, time.perf_counter()
    for q in host.peers:
        if peers[q].status != "gone":
            _go_offline(peers[q], now, "down")
            peers[q].down_since = now
            events.log(r, "down", q, f"host {host.index}: {why}", time_s=now)


def _check_hosts(r: int, now: float, peers: list[Peer], hosts: list[Host], events: EventLog, totals: Totals,
                 restart_s: float, ray: Any) -> None:
    """Late replies that arrived (dropped: their round is over) and crashed hosts that Ray brought back."""
    for h in hosts:
        if h.state == "busy":
            ready, _ = ray.wait([h.pending], timeout=0)
            if not ready:
                continue
            try:
                _, payloads = ray.get(h.pending)
                for pl in payloads:
                    events.log(r, "dropped", pl.peer, f"late payload of round {pl.round} arrived in round {r}: "
                               "mismatched round id", time_s=now)
                h.state, h.pending = "idle", None
            except ray.exceptions.RayActorError as err:
                _host_down(h, r, now, peers, events, f"its actor died ({type(err).__name__})")
        if h.state == "down":
            # Simulated time decides when a restarted peer is back (restart_s after the crash); when that time has
            # come and Ray is still restarting the actor, wait for it (real time), so the simulation does not
            # depend on how loaded this machine is.
            due = any(peers[q].status == "down" and peers[q].down_since + restart_s <= now for q in h.peers)
            until = time.perf_counter() + (RESTART_WAIT_S if due else 0.0)
            back = False
            while not back:
                if h.pending is None:
                    h.pending = h.actor.info.remote()
                ready, _ = ray.wait([h.pending], timeout=max(0.0, until - time.perf_counter()))
                if not ready:
                    break
                try:
                    h.pid, back = ray.get(h.pending)["pid"], True
                except ray.exceptions.ActorUnavailableError:  # still restarting: ask again
                    h.pending = None
                    if time.perf_counter() >= until:
                        break
                    time.sleep(0.1)
                except ray.exceptions.RayActorError:
                    h.state, h.pending = "gone", None
                    for q in h.peers:
                        _go_offline(peers[q], now, "gone")
                        events.log(r, "gone", q, f"host {h.index} cannot be restarted (volunteer.max_restarts)",
                                   time_s=now)
                    break
            if not back:
                continue
            real = time.perf_counter() - h.down_wall
            totals.real_restart_s += real
            h.state, h.pending = "idle", None
            for q in h.peers:
                p = peers[q]
                if p.status != "down":
                    continue
                p.back_at = max(now, p.down_since + restart_s)
                totals.restart_s += p.back_at - p.down_since
                p.status = "offline"
                events.log(r, "restart", q, f"host {h.index} restarted by Ray after {real:.1f} s (real); the peer is back "
                           f"at simulated {p.back_at:.1f} s", time_s=now)


#: Longest real wait for Ray to restart a crashed host actor whose peers are due back.
RESTART_WAIT_S = 300.0


def _wait_for_peers(plan: FaultPlan, r: int, now: float, peers: list[Peer], hosts: list[Host]) -> float:
    """No peer can contribute: move simulated time to the next arrival, or wait (real time) for hosts."""
    waiting = [h for h in hosts if h.state in ("busy", "down")]
    arrivals = [p.back_at for p in peers if p.status == "offline" and p.back_at > now]
    for p in peers:
        if p.status == "offline" and p.away_until is None and not p.away_for_good:
            t = plan.next_online(p.index, now + 1e-9, now + 1e7)
            if t is not None:
                arrivals.append(t)
    if arrivals:
        return max(now, min(arrivals))
    if waiting:
        time.sleep(0.2)
        return now
    if any(p.away_until is not None for p in peers):
        raise _no_peers(r, "every remaining peer is away (leave events count rounds, and no round can run)")
    raise _no_peers(r, "every peer is gone")


def _no_peers(r: int, why: str) -> Exception:
    return TrainingError(f"round {r}: no peer can contribute: {why}")


def _log_stragglers(plan: FaultPlan, r: int, now: float, scheduled: list[int], events: EventLog) -> int:
    """Profile-drawn stragglers: one event each in the log and TensorBoard; the console gets their count on the
    progress line (they are routine: a few every round)."""
    drawn = [p for p in scheduled if plan.profile_straggles(p, r)]
    for p in drawn:
        events.log(r, "straggle", p, f"profile draw: compute x{plan.slowdown(p, r):g}", quiet=True, time_s=now)
    return len(drawn)


# ---------------------------------------------------------------------------------------- figures


@dataclass
class _Window:
    rounds: int = 0
    samples: int = 0
    loss: float = 0.0
    bytes_up: int = 0
    payloads: int = 0
    wall: float = 0.0
    stragglers: int = 0


def _comm_seconds(arrived: dict[int, int], links: list[Link]) -> float:
    """Butterfly all-reduce of the contributors (§8.3); all-gather when all of them are behind NAT."""
    if len(arrived) < 2:
        return 0.0
    members = sorted(arrived)
    sizes = [float(arrived[p]) for p in members]
    sub = [links[p] for p in members]
    try:
        return transfer_seconds("butterfly", sizes, sizes, sub)
    except ValueError:
        return ring_allgather_time(sizes, sub)


def _metrics(r: int, rounds: int, n_train: int, now: float, peers: list[Peer], totals: Totals, window: _Window,
             tracker: ProgressTracker, elements: int, world: int, v: Any, wall: float, last_eval: dict[str, float],
             tta: tuple[float, int] | None, events: EventLog) -> dict[str, Any]:
    online_s = sum(p.online_s + (now - p.online_since if p.online_since is not None else 0.0) for p in peers)
    useful = sum(p.useful_s for p in peers)
    total_samples = totals.used_samples + totals.wasted_samples
    m: dict[str, Any] = {
        "step": r, "epoch": totals.used_samples / n_train,
        "train/loss": window.loss / window.samples if window.samples else float("nan"),
        "comm/bits_per_element": 8.0 * totals.bytes_up / (elements * totals.payloads) if totals.payloads else 0.0,
        "comm/bytes_up": window.bytes_up / max(window.rounds, 1),
        "comm/bytes_up_total": totals.bytes_up / world,
        "comm/bytes_up_all": float(totals.bytes_up),
        "time/step_s": window.wall / max(window.rounds, 1),
        "time/wall_s": wall,
        "sim/time_s": now,
        "volunteer/peers": world,
        "volunteer/alive": sum(p.status == "online" for p in peers),
        "volunteer/alive_min": min(totals.alive, default=0),
        "volunteer/alive_mean": sum(totals.alive) / max(len(totals.alive), 1),
        "volunteer/samples_per_s": totals.used_samples / now if now > 0 else 0.0,
        "volunteer/utilisation": useful / online_s if online_s > 0 else 0.0,
        "volunteer/wasted_samples": totals.wasted_samples,
        "volunteer/wasted_fraction": totals.wasted_samples / total_samples if total_samples else 0.0,
        "volunteer/used_samples": totals.used_samples,
        "volunteer/state_downloads": totals.downloads,
        "volunteer/staleness_mean": sum(totals.staleness) / len(totals.staleness) if totals.staleness else 0.0,
        "volunteer/staleness_max": max(totals.staleness, default=0),
        "volunteer/eta_s": tracker.eta(v.target_batch_size),
        "volunteer/target_batch_size": v.target_batch_size,
        "recovery/download_s": totals.download_s,
        "recovery/restart_s": totals.restart_s,
        "recovery/lost_s": totals.download_s + totals.restart_s,
        "recovery/real_restart_s": totals.real_restart_s,
        "faults/events": sum(events.counts.values()),
        "faults/stragglers": window.stragglers,
    }
    m["comm/compression_ratio"] = 32.0 / m["comm/bits_per_element"] if m["comm/bits_per_element"] else 0.0
    if v.target_accuracy is not None:
        m["volunteer/target_accuracy"] = v.target_accuracy
        m["sim/time_to_accuracy_s"] = tta[0] if tta else None
        m["volunteer/rounds_to_accuracy"] = tta[1] if tta else None
    m.update(last_eval)
    return m


def _evaluate(model: torch.nn.Module, test: Split) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(test.x)
        acc = float((out.argmax(1) == test.y).float().mean())
        loss = float(F.cross_entropy(out, test.y))
    model.train()
    return acc, loss


def _measure_sample_time(model: torch.nn.Module, train: Split, micro: int) -> float:
    """Seconds per sample of forward + backward on this machine (the reference, speed factor 1)."""
    x, y = train.x[:micro], train.y[:micro]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad()
    return sorted(times)[len(times) // 2] / micro
