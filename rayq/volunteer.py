"""Volunteer mode building blocks (ALGORITHMS.md §8 DeDLOC, §16): peers on long-lived Ray actors, the
simulated schedule of a collaborative round, and the sample-weighted aggregator.

One global step (a *round*) of DeDLOC (§8.1): every online peer computes micro-batches at its own speed
until the collaboration has accumulated ``target_batch_size`` samples; then the peers average their
gradients **weighted by the samples each contributed** and take the optimizer step. A peer that missed
rounds (a laggard, a late joiner, a restarted peer) downloads the current state first and resets its codec
state (§16: never apply a stale error-feedback residual to a newer model).

Here the *timing* of a round is simulated (:func:`plan_round`, on the peers' virtual clocks: profile speed
factor × straggling × seconds per sample) and the *work* is real: the host actors compute the planned
micro-batches on real data, encode the gradients with the peers' codecs, and send the packets' bytes
through the object store to the aggregator in the driver, which decodes them (``PacketError`` → dropped)
and averages them by samples (:class:`Aggregator`).
"""

from __future__ import annotations

import heapq
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from compressors import Kind, PacketError, TensorInfo, pack_frame, unpack_frame
from compressors.base import Codec, mix_seed
from compressors.policy import Entry, Policy

# ---------------------------------------------------------------------------------------- round schedule


@dataclass(frozen=True)
class PeerSlot:
    """One peer as a round sees it: when it starts computing, seconds per micro-batch, when it goes offline."""

    peer: int
    start: float
    microbatch_s: float
    leaves_at: float = math.inf


@dataclass
class RoundPlan:
    """The simulated schedule of one round (:func:`plan_round`)."""

    close: float                                              # the collaboration reached the target batch
    deadline: float                                           # close + matchmaking grace
    averaging_at: float                                       # the last contributing peer joined
    microbatches: dict[int, int] = field(default_factory=dict)  # whole micro-batches each peer contributes
    reported: int = 0                                         # samples the progress tracker counted at close
    wasted_s: dict[int, float] = field(default_factory=dict)    # compute seconds abandoned (per peer)
    left: list[int] = field(default_factory=list)             # went offline before averaging: contribution lost

    @property
    def contributors(self) -> list[int]:
        return [p for p, k in self.microbatches.items() if k > 0]


def plan_round(slots: Sequence[PeerSlot], target: int, microbatch: int, grace: float = 0.0) -> RoundPlan | None:
    """Schedule one DeDLOC round (§8.1–8.2) on simulated clocks; None when no peer can finish a micro-batch.

    Peers compute micro-batches back to back from ``start``; a micro-batch counts once finished (and only
    while its peer is online). The round *closes* at the first finish that brings the collaboration's total
    to ``target`` samples (or at the last possible finish, if it never gets there). A peer whose running
    micro-batch finishes within ``grace`` after the close (hivemind's matchmaking time) includes it and
    joins then; otherwise it abandons it (wasted compute) and joins at the close. A peer that goes offline
    before it joins loses its whole contribution, although the tracker had counted its samples.
    """
    heap = [(s.start + s.microbatch_s, s.peer) for s in slots if s.start + s.microbatch_s <= s.leaves_at]
    heapq.heapify(heap)
    by_peer = {s.peer: s for s in slots}
    done = dict.fromkeys(by_peer, 0)
    total, close = 0, None
    while heap:
        t, p = heapq.heappop(heap)
        done[p] += 1
        total += microbatch
        close = t
        if total >= target:
            break
        s = by_peer[p]
        nxt = s.start + (done[p] + 1) * s.microbatch_s
        if nxt <= s.leaves_at:
            heapq.heappush(heap, (nxt, p))
    if close is None:
        return None
    deadline = close + grace
    plan = RoundPlan(close=close, deadline=deadline, averaging_at=close, reported=total)
    for s in slots:
        k = done[s.peer]
        finish = s.start + (k + 1) * s.microbatch_s
        if finish <= deadline and finish <= s.leaves_at:
            k, join = k + 1, finish
        else:
            join = max(close, s.start)
        if s.leaves_at < join:
            plan.left.append(s.peer)
            plan.microbatches[s.peer] = 0
            plan.wasted_s[s.peer] = max(0.0, s.leaves_at - s.start)
            continue
        plan.microbatches[s.peer] = k
        plan.wasted_s[s.peer] = max(0.0, join - s.start - k * s.microbatch_s)
        if k > 0:
            plan.averaging_at = max(plan.averaging_at, join)
    return plan


class ProgressTracker:
    """hivemind's progress tracker (§8.2): an EMA (α = 0.1) of each peer's samples per second and the ETA of
    the next global step, ``max(0, target − accumulated) / Σ samples_per_second``."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.rate: dict[int, float] = {}

    def report(self, peer: int, samples: float, seconds: float) -> None:
        if seconds <= 0:
            return
        r = samples / seconds
        self.rate[peer] = r if peer not in self.rate else (1 - self.alpha) * self.rate[peer] + self.alpha * r

    def throughput(self, peers: Sequence[int] | None = None) -> float:
        return sum(self.rate.get(p, 0.0) for p in (self.rate if peers is None else peers))

    def eta(self, target: float, accumulated: float = 0.0, peers: Sequence[int] | None = None) -> float:
        rate = self.throughput(peers)
        return math.inf if rate <= 0 else max(0.0, target - accumulated) / rate


# ---------------------------------------------------------------------------------------- peers on actors


@dataclass(frozen=True)
class Job:
    """What a host computes for one hosted peer in one round."""

    peer: int
    round: int
    microbatches: int
    cursor: int                # samples this peer has drawn from its own data stream so far
    reset: bool = False        # drop the peer's codec state first (it downloaded the state: §16)
    fault: str | None = None   # "crash" (os._exit), "lose" (payload never arrives), "corrupt" (a byte flipped)
    delay_s: float = 0.0       # real seconds the reply is held back


@dataclass(frozen=True)
class Payload:
    """One peer's contribution to a round, as it arrives at the aggregator."""

    peer: int
    round: int
    samples: int
    frame: bytes | None        # the packets' bytes (None: lost on the way)
    loss: float                # mean training loss over its samples
    compute_s: float           # real seconds of forward and backward
    encode_s: float
    ef_norm: float = 0.0


def peer_indices(seed: int, peer: int, cursor: int, count: int, n: int) -> torch.Tensor:
    """Samples ``cursor .. cursor+count`` of ``peer``'s own endless stream over the data set: each pass is a
    permutation seeded by (seed, peer, pass) — DeDLOC peers shuffle with their own seeds (§8.5)."""
    out, pos = [], cursor
    while pos < cursor + count:
        epoch, offset = divmod(pos, n)
        g = torch.Generator().manual_seed(mix_seed(seed, peer, epoch, 0x7EE7))
        take = min(n - offset, cursor + count - pos)
        out.append(torch.randperm(n, generator=g)[offset:offset + take])
        pos += take
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def build_policy(cfg: Any) -> Policy:
    from compressors.policy import Override

    c = cfg.compression
    return Policy(c.codec, c.params, error_feedback=c.error_feedback, min_numel=c.min_numel, bucket_small=c.bucket_small,
                  overrides=[Override(o.pattern, o.codec, o.params) for o in c.overrides])


def multi_round_codecs(policy: Policy, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Codecs of the plan that need a multi-round all-reduce (PowerSGD): the aggregator cannot decode them alone."""
    out = []
    for e in policy.plan(shapes):
        inner = getattr(e.codec, "inner", e.codec)
        if e.codec.kind is Kind.LINEAR and type(inner).exchange is not Codec.exchange:
            out.append(e.codec.name)
    return sorted(set(out))


class PeerHost:
    """A Ray actor hosting one or more volunteer peers: one model replica, and per peer its own codec state
    (a :class:`Policy` with error-feedback residuals) and data order. Crashes take all its peers along."""

    def __init__(self, config: dict[str, Any], peers: list[int]) -> None:
        from rayq.config import RunConfig, from_dict
        from rayq.tasks import get_task

        torch.set_num_threads(1)
        self.cfg = from_dict(RunConfig, config)
        self.peers = list(peers)
        task = get_task(self.cfg.task)
        self.train, _ = task.load(self.cfg.data_dir)
        torch.manual_seed(self.cfg.seed)
        self.model = task.build_model()
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.policies = {p: build_policy(self.cfg) for p in self.peers}

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "peers": self.peers}

    def crash(self) -> None:
        os._exit(1)

    def run(self, round_id: int, state: dict[str, torch.Tensor], jobs: list[Job]) -> tuple[int, list[Payload]]:
        """Compute, encode and return every job's payload (the reply is a list of bytes frames).

        A job with ``fault="crash"`` kills the process first (``os._exit``): a hard crash mid-round."""
        if any(j.fault == "crash" for j in jobs):
            os._exit(1)
        self.model.load_state_dict(state)
        out = [self._job(j) for j in jobs]
        delay = max((j.delay_s for j in jobs), default=0.0)
        if delay > 0:
            time.sleep(delay)
        return os.getpid(), out

    def _job(self, job: Job) -> Payload:
        from rayq.faults import corrupt_bytes

        policy = self.policies[job.peer]
        if job.reset:
            policy.reset()
        micro = self.cfg.volunteer.microbatch or self.cfg.batch_size
        samples = job.microbatches * micro
        t0 = time.perf_counter()
        idx = peer_indices(self.cfg.seed, job.peer, job.cursor, samples, len(self.train))
        self.model.zero_grad(set_to_none=False)
        loss = 0.0
        for j in range(job.microbatches):  # accumulate the mean gradient over the peer's micro-batches
            part = idx[j * micro:(j + 1) * micro]
            mb = F.cross_entropy(self.model(self.train.x[part]), self.train.y[part]) / job.microbatches
            mb.backward()
            loss += float(mb)
        t1 = time.perf_counter()
        grads = {n: p.grad for n, p in self.params}
        packets = []
        for e in policy.plan({n: tuple(g.shape) for n, g in grads.items()}):
            flat = torch.cat([grads[m].reshape(-1).to(torch.float32) for m in e.members])
            packets.append(e.codec.encode(flat, _info(e, job.peer, job.round, self.cfg)))
        frame: bytes | None = pack_frame(packets)
        if job.fault == "corrupt":
            frame = corrupt_bytes(frame, self.cfg.seed, job.peer, job.round)  # type: ignore[arg-type]
        elif job.fault == "lose":
            frame = None
        ef = policy.residual_norm()
        return Payload(job.peer, job.round, samples, frame, loss, t1 - t0, time.perf_counter() - t1, ef)


def _info(e: Entry, peer: int, round_id: int, cfg: Any) -> TensorInfo:
    return TensorInfo(e.key, e.shape, worker=peer, world=cfg.workers, step=round_id, seed=cfg.seed)


# ---------------------------------------------------------------------------------------- aggregator


class Aggregator:
    """Decodes peers' frames and averages them weighted by samples (§8.1 step 4, §16.4):
    ``ḡ = Σ_p n_p·g_p / Σ_p n_p`` with ``g_p`` peer p's mean gradient over its ``n_p`` samples — exactly the
    mean gradient over every sample of the round. Gather codecs with their own server rule (signSGD's
    majority vote) use it, with the sample counts as weights."""

    def __init__(self, policy: Policy, shapes: dict[str, tuple[int, ...]], seed: int, world: int) -> None:
        self.policy, self.shapes, self.seed, self.world = policy, dict(shapes), seed, world
        self.entries = policy.plan(self.shapes)

    def decode(self, frame: bytes, peer: int, round_id: int) -> dict[str, torch.Tensor]:
        """``{entry key: flat tensor}``; raises ``PacketError`` for lost, truncated or corrupted bytes."""
        if not frame:
            raise PacketError("empty payload")
        packets = unpack_frame(frame, len(self.entries))
        out = {}
        for e, p in zip(self.entries, packets):
            info = TensorInfo(e.key, e.shape, worker=peer, world=self.world, step=round_id, seed=self.seed)
            out[e.key] = e.codec.decode(p, info)
        return out

    def average(self, decoded: Sequence[dict[str, torch.Tensor]], samples: Sequence[int]) -> dict[str, torch.Tensor]:
        """The sample-weighted mean, per parameter name (shapes restored)."""
        if not decoded or len(decoded) != len(samples) or sum(samples) <= 0:
            raise ValueError(f"average needs one sample count > 0 per decoded payload; got {list(samples)}")
        weights = [float(n) for n in samples]
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            codec = getattr(e.codec, "inner", e.codec)
            flat = codec.aggregate([d[e.key] for d in decoded], weights)
            offset = 0
            for name, n in zip(e.members, e.numels):
                out[name] = flat[offset:offset + n].view(self.shapes[name])
                offset += n
        return out
