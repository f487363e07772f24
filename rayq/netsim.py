"""The network the bits cross: seconds of each collective from the bytes that really moved.

Pure functions of byte counts and per-worker :class:`Link` s (bandwidths in bits/s, latency in s), plus a
:class:`VirtualClock` that turns compute and communication into simulated seconds, so that time-to-accuracy
at 100 Mb/s or 1 Gb/s can be measured honestly on one machine.

Link model. Worker ``i`` has an uplink ``up_i`` and a downlink ``down_i``; a hop ``i → j`` carries
``min(up_i, down_j)`` bits/s and costs ``(lat_i + lat_j)/2`` seconds of latency (a node's latency is its
one-way latency to a typical peer). Rings run in worker order ``0 → 1 → … → N−1 → 0``. One worker moves
nothing. A link's bandwidth counts frames, headers included: :func:`payload_links` gives TCP's payload rate.

Collectives (``P_i``: worker i's payload in bytes, ``V`` when all are equal; ``N`` workers; ``R`` rounds):

* ring all-reduce — ``2(N−1)/N·V`` each way; ``2(N−1)/N · 8V/b_min + 2(N−1)·R·L_ring``.
* ring all-gather — receives ``Σ_{j≠i} P_j``, sends ``Σ_j P_j − P_{i+1}``;
  ``Σ_{s<N−1} max_i 8P_{i−s}/b_{i→i+1} + (N−1)·R·L_ring``.
* all-to-all — worker i sends ``up_i``, receives ``down_i``; ``max_i max(8·up_i/u_i, 8·down_i/d_i) + (N−1)·R·L_pair``.
* two-phase reduce — ``(N−1)/N·P_i`` + re-encoded shards ``Σ_{j≠i} S_j`` (≈ ``2(N−1)/N·P``, flat in N): an
  all-to-all of shard packets, then a ring all-gather of the shards (traced as those two records).
* broadcast — gloo's binomial tree, a sender's flows sharing its uplink (:func:`tree_broadcast_time`):
  ``3·8V/b + 2·R·L`` for 4 equal workers (measured on tc-shaped links; a pipelined chain would be ``8V/b``).
* parameter server — worker up ``V_i``, down ``V'_i``; the server carries ``ΣV_i`` and ``ΣV'_i``;
  ``max(max_i 8V_i/up_i, 8ΣV_i/server.down) + max(max_i 8V'_i/down_i, 8ΣV'_i/server.up) + 2R·L``.
* butterfly (DeDLOC, Diskin et al., NeurIPS 2021) — ``V·(1 + (N−2)·w_i)`` each way;
  ``max_i 8V(1+(N−2)w_i)/b_i + 2R·L_pair`` (= ``ξ*·8V`` with optimal shares).

``b_min`` is the ring's slowest hop, ``L_ring`` its largest hop latency, ``L_pair`` the largest latency between
two workers. Ring steps are synchronous; all-to-all phases are bandwidth-bound (all links stream at once).
On tc-shaped links gloo's rings match the ring formulas within 5–10 %; its all-to-all took 1.5× the bound
(a receive is announced in-band and can queue behind bulk data to the same peer).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from rayq.balance import optimize_shares


@dataclass(frozen=True)
class Link:
    """One worker's network attachment: bits/s each way, one-way latency, and whether it is behind NAT.

    A ``client_mode`` peer (behind NAT or a firewall) can open connections but not accept them: in
    the butterfly all-reduce it sends and receives its own data but aggregates no shard (Diskin et al., NeurIPS 2021).
    """

    up_bps: float
    down_bps: float
    latency_s: float = 0.0
    client_mode: bool = False

    def __post_init__(self) -> None:
        for name in ("up_bps", "down_bps"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Link.{name}={value!r} is invalid; expected bits per second > 0")
        if not self.latency_s >= 0:
            raise ValueError(f"Link.latency_s={self.latency_s!r} is invalid; expected seconds >= 0")

    @property
    def bandwidth_bps(self) -> float:
        """The rate this peer sustains in both directions at once (the butterfly's ``b_i``)."""
        return min(self.up_bps, self.down_bps)


@dataclass(frozen=True)
class Traffic:
    """Bytes one worker puts on (``sent``) and takes off (``received``) the wire in one collective."""

    sent: float
    received: float


class Collective(str, enum.Enum):
    """How a collective moves bytes; names as in the config and ``transfer_seconds``."""

    ALLREDUCE = "allreduce"
    ALLGATHER = "allgather"
    ALLTOALL = "alltoall"
    BROADCAST = "broadcast"
    TWO_PHASE = "two_phase"
    PS = "ps"
    BUTTERFLY = "butterfly"


def _kind(kind: Collective | str) -> Collective:
    try:
        return Collective(kind)
    except ValueError:
        allowed = ", ".join(c.value for c in Collective)
        raise ValueError(f"collective kind {kind!r} is unknown; choose one of: {allowed}") from None


# ---------------------------------------------------------------------------------------- hops


def _hop(a: Link, b: Link) -> tuple[float, float]:
    """(bits/s, latency s) of the hop a → b."""
    return min(a.up_bps, b.down_bps), (a.latency_s + b.latency_s) / 2


def _ring(links: Sequence[Link]) -> list[tuple[float, float]]:
    n = len(links)
    return [_hop(links[i], links[(i + 1) % n]) for i in range(n)]


def _pair_latency(links: Sequence[Link]) -> float:
    """Largest latency between two distinct workers: the mean of the two largest node latencies."""
    top = sorted((lk.latency_s for lk in links), reverse=True)[:2]
    return sum(top) / 2 if len(top) == 2 else 0.0


def _check_sizes(values: Sequence[float], links: Sequence[Link], what: str) -> None:
    if len(values) != len(links):
        raise ValueError(f"{what} has {len(values)} entries for {len(links)} links; give one per worker")
    for v in values:
        if not v >= 0:
            raise ValueError(f"{what} holds {v!r}; byte counts must be >= 0")


# ---------------------------------------------------------------------------------------- times


def ring_allreduce_time(nbytes: float, links: Sequence[Link], rounds: int = 1) -> float:
    """Ring all-reduce of a ``nbytes`` buffer: reduce-scatter + all-gather, 2(N−1) steps of V/N bytes,
    ``2(N−1)/N · 8V / b_min + 2(N−1) · R · L_ring``; ``nbytes`` may total ``rounds`` all-reduces (linear in V)."""
    n = len(links)
    if n <= 1:
        return 0.0
    hops = _ring(links)
    bw = min(b for b, _ in hops)
    lat = max(lat for _, lat in hops)
    return 2 * (n - 1) / n * 8 * nbytes / bw + 2 * (n - 1) * rounds * lat


def ring_allgather_time(payloads: Sequence[float], links: Sequence[Link], rounds: int = 1) -> float:
    """Ring all-gather of variable-size payloads (worker i contributes ``payloads[i]`` bytes): N−1 synchronous
    steps; at step s worker i forwards the payload from worker i−s to i+1. Step time = max over hops of
    ``8·P_{i−s} / b_{i→i+1}``; plus ``(N−1)·R·L_ring``. Equal payloads: ``(N−1)·(8P/b + L)``, growing with N."""
    n = len(links)
    _check_sizes(payloads, links, "payloads")
    if n <= 1:
        return 0.0
    hops = _ring(links)
    t = sum(max(8 * payloads[(i - s) % n] / hops[i][0] for i in range(n)) for s in range(n - 1))
    return t + (n - 1) * rounds * max(lat for _, lat in hops)


def _tree(n: int, src: int) -> list[list[int]]:
    """gloo's binomial broadcast tree: each worker's children. Virtual rank ``v = i − src`` receives from
    ``v − 2^⌊log2 v⌋`` and then sends to every ``v + 2^k < N`` with ``2^k > v``, all at once."""
    kids: list[list[int]] = [[] for _ in range(n)]
    for v in range(n):
        kids[(v + src) % n] = [(v + (1 << k) + src) % n for k in range(v.bit_length(), (n - 1).bit_length())
                               if v + (1 << k) < n]
    return kids


def tree_broadcast_time(nbytes: float, links: Sequence[Link], src: int = 0, rounds: int = 1) -> float:
    """gloo's broadcast (a binomial tree, :func:`_tree`): a worker forwards once it has the whole buffer, to all
    its children at once, each flow at ``min(up_i / children, down_j)``, plus the hop's latency × R. Equal links:
    ``N=2`` → ``8V/b``, ``N=4`` → ``3·8V/b`` (the source's two flows end at ``2·8V/b``, then worker 1 feeds
    worker 3), ``N=8`` → ``6·8V/b``. Measured, 4 workers at 100 Mbit/s, 4.4 MB: 1.00–1.02 s (``3·8V/b`` = 1.06 s)."""
    n = len(links)
    if n <= 1:
        return 0.0
    done, kids = {src: 0.0}, _tree(n, src)
    for v in range(n):  # a parent's virtual rank is below its children's
        i = (v + src) % n
        for j in kids[i]:
            rate = min(links[i].up_bps / len(kids[i]), links[j].down_bps)
            done[j] = done[i] + 8 * nbytes / rate + rounds * _hop(links[i], links[j])[1]
    return max(done.values())


def payload_links(links: Sequence[Link], efficiency: float = 1448 / 1514) -> list[Link]:
    """The links at the rate TCP payload crosses them: a shaper (tc) counts whole frames, and with MTU 1500 a
    segment carries 1448 payload bytes in a 1514-byte frame (a NIC's preamble and gap: 1538). Measured: 96.6
    of 100 Mbit/s."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency={efficiency!r} is invalid; expected payload bytes per frame byte in (0, 1]")
    return [replace(lk, up_bps=lk.up_bps * efficiency, down_bps=lk.down_bps * efficiency) for lk in links]


def _shards(payloads: Sequence[float], shard_payloads: Sequence[float] | None) -> list[float]:
    n = len(payloads)
    if shard_payloads is None:
        return [sum(payloads) / n / n] * n
    if len(shard_payloads) != n:
        raise ValueError(f"shard_payloads has {len(shard_payloads)} entries for {n} workers")
    return list(shard_payloads)


def two_phase_time(payloads: Sequence[float], links: Sequence[Link], shard_payloads: Sequence[float] | None = None,
                   rounds: int = 1) -> float:
    """Two-phase re-encoding reduce (DeepSpeed 1-bit, CGX): per-worker volume independent of N.

    Phase 1: worker i's encoded vector (``payloads[i]`` bytes) is cut into N shards; shard j goes to owner j,
    a bandwidth-bound all-to-all (i sends ``(N−1)/N·P_i``, receives ``Σ_{j≠i} P_j/N``) plus ``(N−1)·R·L_pair``.
    Phase 2: owner j's re-encoded shard (``shard_payloads[j]`` bytes, default mean(P)/N) is ring-all-gathered.
    """
    n = len(links)
    _check_sizes(payloads, links, "payloads")
    if n <= 1:
        return 0.0
    shards = _shards(payloads, shard_payloads)
    total = sum(payloads)
    phase1 = max(max(8 * (n - 1) / n * payloads[i] / lk.up_bps, 8 * (total - payloads[i]) / n / lk.down_bps)
                 for i, lk in enumerate(links))
    return phase1 + (n - 1) * rounds * _pair_latency(links) + ring_allgather_time(shards, links, rounds)


def ps_time(up_bytes: Sequence[float], down_bytes: Sequence[float], links: Sequence[Link],
            server: Link | None = None, rounds: int = 1) -> float:
    """Parameter server: every worker pushes ``up_bytes[i]``, then pulls ``down_bytes[i]``.

    push = ``max(max_i 8V_i/up_i, 8ΣV_i/server.down)``; pull = ``max(max_i 8V'_i/down_i, 8ΣV'_i/server.up)``;
    plus ``2·R`` times the largest worker–server hop latency. ``server=None``: a server with unlimited
    bandwidth whose hop latency to worker i is ``lat_i``.
    """
    _check_sizes(up_bytes, links, "up_bytes")
    _check_sizes(down_bytes, links, "down_bytes")
    if not links:
        return 0.0
    push = max(8 * v / lk.up_bps for v, lk in zip(up_bytes, links))
    pull = max(8 * v / lk.down_bps for v, lk in zip(down_bytes, links))
    if server is None:
        lat = max(lk.latency_s for lk in links)
    else:
        push = max(push, 8 * sum(up_bytes) / server.down_bps)
        pull = max(pull, 8 * sum(down_bytes) / server.up_bps)
        lat = max((lk.latency_s + server.latency_s) / 2 for lk in links)
    return push + pull + 2 * rounds * lat


def butterfly_time(nbytes: float, links: Sequence[Link], shares: Sequence[float] | None = None,
                   rounds: int = 1) -> float:
    """DeDLOC butterfly all-reduce (Diskin et al., NeurIPS 2021): peer i aggregates a fraction ``w_i`` of the vector.

    Peer i moves ``V·(1 + (N−2)·w_i)`` bytes each way; time = ``max_i 8V(1+(N−2)w_i)/b_i + 2·R·L_pair``
    with ``b_i = min(up_i, down_i)``. ``shares=None`` uses :func:`optimize_shares` (then the
    bandwidth term is ``ξ*·8V`` over the non-client peers).
    """
    n = len(links)
    if n <= 1:
        return 0.0
    w = _butterfly_shares(links, shares)
    t = max(8 * nbytes * (1 + (n - 2) * wi) / lk.bandwidth_bps for wi, lk in zip(w, links))
    return t + 2 * rounds * _pair_latency(links)


def _butterfly_shares(links: Sequence[Link], shares: Sequence[float] | None) -> list[float]:
    if shares is None:
        return list(optimize_shares([lk.bandwidth_bps for lk in links], [lk.client_mode for lk in links]).weights)
    if len(shares) != len(links):
        raise ValueError(f"shares has {len(shares)} entries for {len(links)} links")
    if any(not w >= 0 for w in shares) or not math.isclose(sum(shares), 1.0, abs_tol=1e-9):
        raise ValueError(f"shares={list(shares)!r} must be >= 0 and sum to 1")
    if any(w > 0 and lk.client_mode for w, lk in zip(shares, links)):
        raise ValueError("a client-mode peer cannot aggregate a shard; give it share 0")
    return list(shares)


def wire_bytes(kind: Collective | str, payloads: Sequence[float], shard_payloads: Sequence[float] | None = None,
               shares: Sequence[float] | None = None, reply_payloads: Sequence[float] | None = None) -> list[Traffic]:
    """Bytes each worker sends and receives under the model of ``kind`` (see the module table).

    ``payloads[i]``: worker i's own encoded contribution. ``allreduce`` and ``butterfly`` use the
    largest payload (all workers reduce the same buffer); ``butterfly`` needs ``shares``; ``ps``
    replies ``reply_payloads`` (default: the same sizes as sent).
    """
    kind = _kind(kind)
    n = len(payloads)
    if n <= 1 and kind is not Collective.PS:
        return [Traffic(0.0, 0.0) for _ in payloads]
    total = sum(payloads)
    if kind is Collective.ALLREDUCE:
        v = 2 * (n - 1) / n * max(payloads)
        return [Traffic(v, v) for _ in payloads]
    if kind is Collective.ALLGATHER:
        return [Traffic(total - payloads[(i + 1) % n], total - payloads[i]) for i in range(n)]
    if kind is Collective.ALLTOALL:
        return [Traffic((n - 1) * payloads[i], total - payloads[i]) for i in range(n)]
    if kind is Collective.BROADCAST:  # payloads: the source's buffer at its index, 0 elsewhere
        v, src = max(payloads), max(range(n), key=lambda i: payloads[i])
        return [Traffic(float(v * len(kids)), 0.0 if i == src else float(v)) for i, kids in enumerate(_tree(n, src))]
    if kind is Collective.TWO_PHASE:
        shards = _shards(payloads, shard_payloads)
        s_total = sum(shards)
        return [Traffic((n - 1) / n * payloads[i] + s_total - shards[(i + 1) % n],
                        (total - payloads[i]) / n + s_total - shards[i]) for i in range(n)]
    if kind is Collective.PS:
        reply = list(payloads if reply_payloads is None else reply_payloads)
        return [Traffic(float(p), float(r)) for p, r in zip(payloads, reply)]
    if shares is None or len(shares) != n:
        raise ValueError("butterfly wire bytes need one share per worker (see optimize_shares)")
    v = max(payloads)
    return [Traffic(v * (1 + (n - 2) * w), v * (1 + (n - 2) * w)) for w in shares]


def transfer_seconds(kind: Collective | str, bytes_up: Sequence[float], bytes_down: Sequence[float],
                     links: Sequence[Link], rounds: int = 1, server: Link | None = None) -> float:
    """Seconds one collective call took, from every worker's ledger bytes (one entry per worker).

    What the :class:`rayq.collective.Ledger` records, per kind: ``allreduce`` — the buffer each worker reduced
    (summed over ``rounds``) → :func:`ring_allreduce_time` of the largest; ``allgather`` — each worker's own
    frame up, the others' down → :func:`ring_allgather_time`; ``alltoall`` — what each worker sent to / received
    from the others, bandwidth-bound (module table); ``broadcast`` — the source's buffer at its index, 0
    elsewhere → :func:`tree_broadcast_time`; ``two_phase`` (older traces) — both phases' bytes,
    ``max_i max(8·up_i/u_i, 8·down_i/d_i) + (N−1)·R·(L_pair + L_ring)``; ``ps`` — pushed and pulled bytes →
    :func:`ps_time`; ``butterfly`` — the vector each peer averages → :func:`butterfly_time`, optimal shares.
    """
    kind = _kind(kind)
    if rounds < 0:
        raise ValueError(f"rounds={rounds!r} must be >= 0")
    _check_sizes(bytes_up, links, "bytes_up")
    _check_sizes(bytes_down, links, "bytes_down")
    n = len(links)
    if kind is Collective.PS:
        return ps_time(bytes_up, bytes_down, links, server, rounds)
    if n <= 1:
        return 0.0
    if kind is Collective.ALLREDUCE:
        return ring_allreduce_time(max(bytes_up), links, rounds)
    if kind is Collective.ALLGATHER:
        return ring_allgather_time(bytes_up, links, rounds)
    if kind is Collective.BUTTERFLY:
        return butterfly_time(max(bytes_up), links, rounds=rounds)
    if kind is Collective.BROADCAST:
        return tree_broadcast_time(max(bytes_up), links, max(range(n), key=lambda i: bytes_up[i]), rounds)
    bw = max(max(8 * u / lk.up_bps, 8 * d / lk.down_bps) for u, d, lk in zip(bytes_up, bytes_down, links))
    if kind is Collective.ALLTOALL:
        return bw + (n - 1) * rounds * _pair_latency(links)
    lat = _pair_latency(links) + max(lat for _, lat in _ring(links))
    return bw + (n - 1) * rounds * lat


class LedgerLike(Protocol):
    bytes_up: int
    bytes_down: int
    rounds: int


def collective_seconds(kind: Collective | str, ledgers: Sequence[LedgerLike], links: Sequence[Link],
                       server: Link | None = None) -> float:
    """:func:`transfer_seconds` from one ledger per worker (``rounds`` = the most any worker ran)."""
    rounds = max((lg.rounds for lg in ledgers), default=0)
    return transfer_seconds(kind, [lg.bytes_up for lg in ledgers], [lg.bytes_down for lg in ledgers], links,
                            rounds=rounds, server=server)


# ---------------------------------------------------------------------------------------- clock


class VirtualClock:
    """Simulated seconds, one clock per worker.

    Synchronous step (collective mode): every worker computes ``compute_s[i] × speed_factors[i]``, waits at
    the barrier for the slowest, then all communicate: ``now += max_i(compute_i × speed_i) + comm``. Volunteer
    mode advances workers independently (:meth:`compute`, :meth:`advance_worker`) and meets at :meth:`barrier`.
    ``speed_factors`` multiply compute time (2.0 = twice as slow). Checkpointed with :meth:`state_dict`.
    """

    def __init__(self, workers: int, speed_factors: Sequence[float] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers!r} must be >= 1")
        speeds = [1.0] * workers if speed_factors is None else [float(s) for s in speed_factors]
        if len(speeds) != workers or any(not s > 0 for s in speeds):
            raise ValueError(f"speed_factors={speeds!r} must hold {workers} numbers > 0")
        self.speed_factors = speeds
        self.times = [0.0] * workers
        self.compute_s = [0.0] * workers
        self.comm_s = 0.0
        self.steps = 0

    @property
    def workers(self) -> int:
        return len(self.times)

    @property
    def now(self) -> float:
        """The simulated time: the latest worker clock."""
        return max(self.times)

    def _mask(self, active: Sequence[bool] | None) -> list[int]:
        if active is None:
            return list(range(self.workers))
        if len(active) != self.workers:
            raise ValueError(f"active has {len(active)} entries for {self.workers} workers")
        return [i for i, a in enumerate(active) if a]

    def step(self, compute_s: float | Sequence[float], comm_s: float = 0.0,
             active: Sequence[bool] | None = None) -> float:
        """One synchronous step of the ``active`` workers (default all); returns the new time."""
        per = [float(compute_s)] * self.workers if isinstance(compute_s, (int, float)) else list(compute_s)
        if len(per) != self.workers:
            raise ValueError(f"compute_s has {len(per)} entries for {self.workers} workers")
        if comm_s < 0 or any(c < 0 for c in per):
            raise ValueError("compute and communication seconds must be >= 0")
        for i in self._mask(active):
            self.compute(i, per[i])
        self.barrier(comm_s, active)
        self.steps += 1
        return self.now

    def compute(self, worker: int, seconds: float) -> float:
        """Worker computes for ``seconds`` of reference time (scaled by its speed factor); its new time."""
        dt = seconds * self.speed_factors[worker]
        self.compute_s[worker] += dt
        self.times[worker] += dt
        return self.times[worker]

    def advance_worker(self, worker: int, dt: float) -> float:
        """Move one worker's clock on by ``dt`` simulated seconds (not scaled); its new time."""
        if dt < 0:
            raise ValueError(f"dt={dt!r} must be >= 0")
        self.times[worker] += dt
        return self.times[worker]

    def barrier(self, comm_s: float = 0.0, active: Sequence[bool] | None = None) -> float:
        """The ``active`` workers wait for the latest of them, then communicate ``comm_s`` together."""
        members = self._mask(active)
        if not members:
            return self.now
        t = max(self.times[i] for i in members) + comm_s
        for i in members:
            self.times[i] = t
        self.comm_s += comm_s
        return t

    def join(self, worker: int) -> float:
        """A worker that (re)joins starts at the current simulated time, not in the past."""
        self.times[worker] = max(self.times[worker], self.now)
        return self.times[worker]

    def abandon(self, worker: int, t: float) -> float:
        """A worker dropped by a deadline gives up its computation at the group's barrier ``t`` and goes on
        from there with the current model: its clock is ``t``, not its own (later) finishing time."""
        self.compute_s[worker] += max(0.0, t - self.times[worker])
        self.times[worker] = t
        return t

    def utilisation(self) -> list[float]:
        """Fraction of the simulated time each worker spent computing."""
        now = self.now
        return [c / now if now > 0 else 0.0 for c in self.compute_s]

    def state_dict(self) -> dict[str, Any]:
        return {"times": list(self.times), "compute_s": list(self.compute_s), "comm_s": self.comm_s,
                "steps": self.steps, "speed_factors": list(self.speed_factors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["times"]) != self.workers:
            raise ValueError(f"clock state holds {len(state['times'])} workers; this clock has {self.workers}")
        self.times = [float(t) for t in state["times"]]
        self.compute_s = [float(c) for c in state["compute_s"]]
        self.comm_s = float(state["comm_s"])
        self.steps = int(state["steps"])
        self.speed_factors = [float(s) for s in state["speed_factors"]]


def time_to_accuracy(points: Iterable[tuple[float, float]], target: float) -> float | None:
    """First simulated time at which accuracy ≥ ``target`` in ``(sim_time, accuracy)`` points; None if never."""
    for t, acc in sorted(points, key=lambda p: p[0]):
        if acc is not None and not math.isnan(acc) and acc >= target:
            return float(t)
    return None


class WireLike(Protocol):
    kind: str
    rounds: int
    bytes_up: Sequence[int]


def step_comm_seconds(wire: Iterable[WireLike], links: Sequence[Link], call_s: float = 0.0) -> float:
    """Seconds of communication in one training step: its collectives run one after another, each also costing
    ``call_s`` (a call's fixed software cost: entering the collective, copies, waking the peers; measured on
    shaped links, ``rayq bench links``). A record's ``bytes_down`` (when it has one) is every worker's bytes
    received; otherwise it is implied: the others' bytes for all-reduce / all-gather, the source's buffer for a
    broadcast, and for ``two_phase`` (symmetric for equal payloads) the worker's own ``bytes_up``."""
    total = 0.0
    for rec in wire:
        up = list(rec.bytes_up)
        down = getattr(rec, "bytes_down", None)
        if down is None:
            everyone, kind = sum(up), _kind(rec.kind)
            if kind is Collective.TWO_PHASE:
                down = up
            elif kind is Collective.BROADCAST:
                down = [everyone if b == 0 else 0 for b in up]
            else:
                down = [everyone - b for b in up]
        total += transfer_seconds(rec.kind, up, list(down), links, rec.rounds) + call_s
    return total


@dataclass(frozen=True)
class TraceStep:
    """One training step as the trainer records it in ``trace.jsonl`` (rank 0)."""

    step: int
    compute_s: float
    #: ``[kind, rounds, bytes_up, bytes_down?, purpose?, padding?]`` per collective (the WireRecord JSON form).
    wire: tuple[tuple, ...]
    #: With faults: each worker's compute slowdown and whether its contribution counted (a deadline drops it).
    slowdown: tuple[float, ...] | None = None
    counted: tuple[bool, ...] | None = None


def replay(steps: Iterable[TraceStep], links: Sequence[Link], speed_factors: Sequence[float] | None = None,
           compute_scale: float = 1.0) -> dict[int, float]:
    """Simulated time after each step of a recorded run on another network: ``{step: seconds}``. Synchronous
    schedules do not depend on the network, so one recorded run gives its time-to-accuracy on every profile.
    ``compute_scale`` rescales the measured compute time (e.g. to a faster device)."""
    clock = VirtualClock(len(links), speed_factors)
    out = {}
    for s in steps:
        comm = step_comm_seconds([_Wire(*w) for w in s.wire], links)
        if s.slowdown is None:
            clock.step(s.compute_s * compute_scale, comm)
        else:  # the barrier of the contributors; a straggler the deadline dropped goes on from there
            counted = list(s.counted) if s.counted is not None else [True] * len(links)
            for w, slow in enumerate(s.slowdown):
                if counted[w]:
                    clock.compute(w, s.compute_s * compute_scale * slow)
            t = clock.barrier(comm, counted)
            for w, c in enumerate(counted):
                if not c:
                    clock.abandon(w, t)
            clock.steps += 1
        out[s.step] = clock.now
    return out


@dataclass(frozen=True)
class _Wire:
    kind: str
    rounds: int
    bytes_up: tuple[int, ...]
    bytes_down: tuple[int, ...] | None = None
    purpose: str = "payload"
    padding: tuple[int, ...] | None = None
