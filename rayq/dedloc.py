"""DeDLOC's pure pieces (Diskin et al., NeurIPS 2021): the simulated schedule of a
collaborative round, the progress tracker, each peer's data order, the sample-weighted aggregator, and what
the averaging and a state download cost on the simulated network.

One global step (a *round*) of DeDLOC: every online peer computes micro-batches at its own speed
until the collaboration has accumulated ``target_batch_size`` samples; then the peers average their
gradients **weighted by the samples each contributed** and take the optimizer step. A peer that missed
rounds (a laggard, a late joiner, a restarted peer) downloads the current state first and resets its codec
state (never apply a stale error-feedback residual to a newer model).

No Ray here: the peers and their host actors are :mod:`rayq.swarm`.
"""

from __future__ import annotations

import enum
import heapq
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from compressors import Kind, Packet, PacketError, TensorInfo, unpack_frame
from compressors.base import mix_seed
from compressors.dense import NoCompression
from compressors.policy import Entry, Policy
from rayq.faults import FaultKind
from rayq.netsim import Link, ring_allgather_time, transfer_seconds

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
    joined_at: dict[int, float] = field(default_factory=dict)   # when each contributor's payload is ready

    @property
    def contributors(self) -> list[int]:
        return [p for p, k in self.microbatches.items() if k > 0]


def plan_round(slots: Sequence[PeerSlot], target: int, microbatch: int, grace: float = 0.0) -> RoundPlan | None:
    """Schedule one DeDLOC round on simulated clocks; None when no peer can finish a micro-batch.

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
            plan.joined_at[s.peer] = join
    return plan


class ProgressTracker:
    """hivemind's progress tracker: an EMA (α = 0.1) of each peer's samples per second and the ETA of
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


def peer_indices(seed: int, peer: int, cursor: int, count: int, n: int) -> torch.Tensor:
    """Samples ``cursor .. cursor+count`` of ``peer``'s own endless stream over the data set: each pass is a
    permutation seeded by (seed, peer, pass) — DeDLOC peers shuffle with their own seeds."""
    out, pos = [], cursor
    while pos < cursor + count:
        epoch, offset = divmod(pos, n)
        g = torch.Generator().manual_seed(mix_seed(seed, peer, epoch, 0x7EE7))
        take = min(n - offset, cursor + count - pos)
        out.append(torch.randperm(n, generator=g)[offset:offset + take])
        pos += take
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------------------------- wire and network


@dataclass(frozen=True)
class FrameSize:
    """A payload's bytes by what the averaging can do with them: ``linear`` packets are summed in flight,
    ``gather`` packets must reach every member to be decoded."""

    linear: int = 0
    gather: int = 0

    @property
    def total(self) -> int:
        return self.linear + self.gather


#: The key of a frame's last packet when the model has floating-point buffers: the peer's BatchNorm running
#: statistics after its micro-batches, fp32 and uncompressed, averaged by samples like the gradients.
BUFFERS = "<buffers>"
_BUFFER_CODEC = NoCompression()


def float_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers that training changes and averaging combines (BatchNorm's running mean and variance)."""
    return [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def buffers_packet(model: torch.nn.Module) -> Packet | None:
    bufs = float_buffers(model)
    if not bufs:
        return None
    flat = torch.cat([b.detach().reshape(-1).to(torch.float32) for _, b in bufs])
    return _BUFFER_CODEC.encode(flat, TensorInfo(BUFFERS, (flat.numel(),)))


def load_buffers(model: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for _, b in float_buffers(model):
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def pack_payload(entries: Sequence[Entry], packets: Sequence[Packet],
                 buffers: Packet | None = None) -> tuple[bytes, FrameSize]:
    """The frame (``pack_frame``'s bytes, the buffers' packet last) and its size split by codec kind (the
    buffers are averaged like a linear codec's packets)."""
    parts = [p.to_bytes() for p in packets]
    linear = sum(len(b) for e, b in zip(entries, parts) if e.codec.kind is Kind.LINEAR)
    if buffers is not None:
        parts.append(buffers.to_bytes())
        linear += len(parts[-1])
    frame = b"".join(parts)
    return frame, FrameSize(linear, len(frame) - linear)


def averaging_seconds(frames: Mapping[int, FrameSize], links: Sequence[Link]) -> float:
    """Simulated seconds for the averaging group (``{peer: its frame's size}``) to combine its frames.

    Linear packets are summed in flight: DeDLOC's butterfly all-reduce (a ring all-gather when every
    member is behind NAT and none can aggregate). Gather packets (QSGD, top-k, int8, RC-FED, ...) must be
    decoded before they are summed, so every member needs every other member's packets: a ring all-gather
    of the real sizes — what the aggregator does with them. A policy that mixes both runs both, one after
    the other."""
    members = sorted(frames)
    if len(members) < 2:
        return 0.0
    sub = [links[p] for p in members]
    linear = [float(frames[p].linear) for p in members]
    gather = [float(frames[p].gather) for p in members]
    t = 0.0
    if any(linear):
        try:
            t += transfer_seconds("butterfly", linear, linear, sub)
        except ValueError:  # every member in client mode: nobody can aggregate a shard
            t += ring_allgather_time(linear, sub)
    if any(gather):
        t += ring_allgather_time(gather, sub)
    return t


def state_nbytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state a laggard downloads (parameters and optimizer state), serialized for real."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buf)
    return buf.getbuffer().nbytes


def download_seconds(nbytes: int, link: Link) -> float:
    return 8 * nbytes / link.down_bps + link.latency_s


# ---------------------------------------------------------------------------------------- aggregator


def multi_round_codecs(policy: Policy, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Codecs of the plan that need a multi-round all-reduce (PowerSGD): the aggregator cannot decode them alone."""
    return sorted({e.codec.name for e in policy.plan(shapes) if e.codec.multi_round})


class Aggregator:
    """Decodes peers' frames and averages them weighted by samples:
    ``ḡ = Σ_p n_p·g_p / Σ_p n_p`` with ``g_p`` peer p's mean gradient over its ``n_p`` samples — exactly the
    mean gradient over every sample of the round. Gather codecs with their own server rule (signSGD's
    majority vote) use it, with the sample counts as weights."""

    def __init__(self, policy: Policy, shapes: dict[str, tuple[int, ...]], seed: int, world: int,
                 buffers: int = 0) -> None:
        self.policy, self.shapes, self.seed, self.world = policy, dict(shapes), seed, world
        self.entries = policy.plan(self.shapes)
        self.buffers = buffers  # elements of the model's float buffers (0: frames carry none)

    def decode(self, frame: bytes, peer: int, round_id: int) -> dict[str, torch.Tensor]:
        """``{entry key: flat tensor}`` (and :data:`BUFFERS`); raises ``PacketError`` for lost, truncated or
        corrupted bytes."""
        if not frame:
            raise PacketError("empty payload")
        packets = unpack_frame(frame, len(self.entries) + bool(self.buffers))
        out = {}
        for e, p in zip(self.entries, packets):
            info = TensorInfo(e.key, e.shape, worker=peer, world=self.world, step=round_id, seed=self.seed)
            out[e.key] = e.codec.decode(p, info)
        if self.buffers:
            out[BUFFERS] = _BUFFER_CODEC.decode(packets[-1], TensorInfo(BUFFERS, (self.buffers,)))
            if out[BUFFERS].numel() != self.buffers:
                raise PacketError(f"buffers: {out[BUFFERS].numel()} elements, the model has {self.buffers}")
        return out

    def average_buffers(self, decoded: Sequence[dict[str, torch.Tensor]], samples: Sequence[int]) -> torch.Tensor:
        """The sample-weighted mean of the peers' buffers (BatchNorm statistics: "average them", DeDLOC's rule
        for local statistics under averaging)."""
        total = float(sum(samples))
        return sum(d[BUFFERS] * (n / total) for d, n in zip(decoded, samples))  # type: ignore[return-value]

    def average(self, decoded: Sequence[dict[str, torch.Tensor]], samples: Sequence[int]) -> dict[str, torch.Tensor]:
        """The sample-weighted mean, per parameter name (shapes restored)."""
        if not decoded or len(decoded) != len(samples) or sum(samples) <= 0:
            raise ValueError(f"average needs one sample count > 0 per decoded payload; got {list(samples)}")
        weights = [float(n) for n in samples]
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            flat = e.codec.aggregate([d[e.key] for d in decoded], weights)
            offset = 0
            for name, n in zip(e.members, e.numels):
                out[name] = flat[offset:offset + n].view(self.shapes[name])
                offset += n
        return out


# ---------------------------------------------------------------------------------------- a round's payloads


@dataclass(frozen=True)
class Job:
    """What a host computes for one hosted peer in one round."""

    peer: int
    round: int
    microbatches: int
    cursor: int                     # samples this peer has drawn from its own data stream so far
    reset: bool = False             # the peer downloaded the state: drop its codec state first
    applied: bool | None = None     # whether its previous payload was applied (None: it has none to settle)
    fault: FaultKind | None = None  # CRASH (os._exit), LOSE (the payload never arrives), CORRUPT (a byte flipped)


@dataclass(frozen=True)
class Payload:
    """One peer's contribution to a round, as it leaves its host."""

    peer: int
    round: int
    samples: int
    frame: bytes | None  # the packets' bytes (None: lost on the way)
    size: FrameSize      # the frame's bytes as sent, by codec kind
    loss: float          # mean training loss over its samples
    compute_s: float     # real seconds of forward and backward
    encode_s: float


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    LOST = "lost"        # never arrived
    LATE = "late"        # arrived after the round's deadline (simulated)
    DAMAGED = "damaged"  # arrived in time, failed to decode (PacketError)
    NONFINITE = "nonfinite"  # arrived in time and decoded, but holds NaN or Inf


@dataclass
class RoundResult:
    """What reached the aggregator in a round, judged on the simulated clock (:func:`judge`)."""

    verdicts: dict[int, Verdict] = field(default_factory=dict)
    accepted: list[tuple[Payload, dict[str, torch.Tensor]]] = field(default_factory=list)
    frames: dict[int, FrameSize] = field(default_factory=dict)  # arrived in time (damaged ones too)
    bytes_up: int = 0
    averaging_at: float = 0.0  # every frame that counts has arrived
    notes: dict[int, str] = field(default_factory=dict)  # why a payload was late or damaged

    @property
    def samples(self) -> list[int]:
        return [pl.samples for pl, _ in self.accepted]


def judge(r: int, plan: RoundPlan, payloads: Sequence[Payload], delays: Mapping[int, float],
          aggregator: Aggregator) -> RoundResult:
    """Which payloads of round ``r`` count. A payload is ready when its peer joins the averaging
    (``plan.joined_at``) and reaches the aggregator ``delays[peer]`` simulated seconds later; past the round's
    deadline (close + matchmaking) it is late. A lost one never arrives; a damaged one arrives (its bytes
    crossed the wire, its peer is in the averaging group) but fails to decode (``PacketError``). One that decodes
    to NaN or Inf (a diverged peer, a codec's overflow) is ``NONFINITE``: it would poison the mean of all."""
    out = RoundResult(averaging_at=plan.averaging_at)
    for pl in payloads:
        arrives = plan.joined_at.get(pl.peer, plan.close) + delays.get(pl.peer, 0.0)
        if pl.frame is None:
            out.verdicts[pl.peer] = Verdict.LOST
            continue
        if arrives > plan.deadline:
            out.verdicts[pl.peer] = Verdict.LATE
            out.notes[pl.peer] = (f"its reply arrives at {arrives:.2f} s (simulated), after the round's deadline "
                                  f"{plan.deadline:.2f} s")
            continue
        out.frames[pl.peer] = pl.size
        out.bytes_up += len(pl.frame)
        out.averaging_at = max(out.averaging_at, arrives)
        try:
            decoded = aggregator.decode(pl.frame, pl.peer, r)
        except Exception as err:  # noqa: BLE001 - PacketError, or a codec refusing damaged fields
            out.verdicts[pl.peer] = Verdict.DAMAGED
            out.notes[pl.peer] = f"{type(err).__name__}: {err}"
            continue
        bad = [k for k, t in decoded.items() if t.numel() and not bool(torch.isfinite(t).all())]
        if bad:
            out.verdicts[pl.peer] = Verdict.NONFINITE
            out.notes[pl.peer] = f"NaN/Inf in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
            continue
        out.accepted.append((pl, decoded))
        out.verdicts[pl.peer] = Verdict.ACCEPTED
    return out
