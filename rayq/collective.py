"""Compressed collective groups (DESIGN.md §2: rayq.collective).

``CompressedGroup.allreduce_mean`` averages named tensors across the workers of a group, each tensor
through the codec its policy assigns, and returns a :class:`Ledger` of what really moved. The reduce
strategy (``compression.strategy``) follows the codec's kind:

* ``allreduce`` (``auto`` for ``linear`` codecs): packets' fields are summed by all-reduce, one flat
  buffer per dtype per round (multi-round codecs such as PowerSGD drive the rounds through
  :meth:`Codec.exchange`);
* ``allgather`` (``auto`` for ``gather`` codecs; allowed for linear ones): every worker's packets are
  serialized into one frame, frames are exchanged by a size all-gather plus a padded all-gather, and
  every worker decodes all of them and aggregates;
* ``two_phase``: the two-phase re-encoding reduce (DeepSpeed 1-bit reduce, CGX). Each tensor is cut
  into N shards; shard j of every worker is encoded and sent to worker j (an all-to-all of
  variable-size packets); owner j decodes the N packets, aggregates them and re-encodes the result,
  with its own error-feedback memory when the policy uses error feedback; the re-encoded shards are
  all-gathered and decoded by everyone. Per-worker volume ≈ 2·P·(N−1)/N + P/N: independent of N.

Forbidden pairs (:func:`check_strategy`) raise ``ValueError`` naming codec and strategy: a gather
codec cannot be all-reduced (its packets do not add up), a multi-round linear codec (PowerSGD)
cannot be re-encoded shard by shard.

The ledger's byte counts are the lengths of the packets' serialized bytes (``to_bytes``), never a
formula. The transport is pluggable; :class:`TorchTransport` runs on a torch.distributed process
group (the default one that Ray Train sets up: gloo on CPU, NCCL on GPU), :class:`LocalTransport`
on threads of one process.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from compressors import Codec, Kind, Packet, PacketError, TensorInfo, pack_frame, unpack_frame
from compressors.error_feedback import ErrorFeedback
from compressors.policy import Entry, Policy

#: Values of ``compression.strategy``; ``auto`` picks all-reduce for linear codecs, all-gather otherwise.
STRATEGIES = ("auto", "allreduce", "allgather", "two_phase")


class Transport(Protocol):
    rank: int
    world: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_bytes(self, data: bytes) -> list[bytes]: ...

    def all_to_all_bytes(self, chunks: list[bytes]) -> list[bytes]:
        """Send ``chunks[j]`` to worker j; return what every worker sent to this one (by source)."""
        ...


def _to_uint8(data: bytes, device: torch.device) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


class TorchTransport:
    """torch.distributed collectives on a process group (the default one unless ``group`` is given)."""

    def __init__(self, device: torch.device | None = None, group: Any = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError("the NCCL backend needs a CUDA device for its collectives")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.to(self.device)
        self.dist.all_reduce(t, group=self.group)
        return t.to(tensor.device)

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self.dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        if data:
            buf[: len(data)] = _to_uint8(data, self.device)
        outs = [torch.empty(longest, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        self.dist.all_gather(outs, buf, group=self.group)
        return [o[:n].cpu().numpy().tobytes() for o, n in zip(outs, lengths)]

    def all_to_all_bytes(self, chunks: list[bytes]) -> list[bytes]:
        """Variable-size all-to-all: exchange the sizes (all_to_all_single of one int64 per peer), then
        one ``all_to_all_single`` with per-peer split sizes, so no padding crosses the wire."""
        if len(chunks) != self.world:
            raise ValueError(f"all_to_all_bytes needs one chunk per worker ({self.world}), got {len(chunks)}")
        send_sizes = [len(c) for c in chunks]
        sizes = torch.tensor(send_sizes, dtype=torch.int64, device=self.device)
        recv = torch.empty_like(sizes)
        self.dist.all_to_all_single(recv, sizes, group=self.group)
        recv_sizes = [int(n) for n in recv.cpu().tolist()]
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=self.device)
        self.dist.all_to_all_single(out, _to_uint8(b"".join(chunks), self.device), recv_sizes, send_sizes,
                                    group=self.group)
        data = out.cpu().numpy().tobytes()
        bounds = [0]
        for n in recv_sizes:
            bounds.append(bounds[-1] + n)
        return [data[a:b] for a, b in zip(bounds, bounds[1:])]


class LocalHub:
    """``world`` workers as threads of one process, meeting at a barrier: a real collective, in memory.

    Used to simulate many peers on one machine and to test collective semantics without processes.
    Every worker sums the deposited tensors in rank order, so all of them get bit-identical results.
    """

    def __init__(self, world: int, timeout_s: float = 60.0) -> None:
        import threading

        self.world = world
        self.barrier = threading.Barrier(world, timeout=timeout_s)
        self.slots: list = [None] * world

    def transport(self, rank: int) -> LocalTransport:
        return LocalTransport(self, rank)


class LocalTransport:
    def __init__(self, hub: LocalHub, rank: int) -> None:
        self.hub, self.rank, self.world = hub, rank, hub.world

    def _exchange(self, item):
        self.hub.slots[self.rank] = item
        self.hub.barrier.wait()
        items = list(self.hub.slots)
        self.hub.barrier.wait()
        return items

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        items = self._exchange(tensor.detach().clone())
        out = items[0].clone()
        for t in items[1:]:
            out += t.to(out.device)
        return out.to(tensor.device)

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        return self._exchange(bytes(data))

    def all_to_all_bytes(self, chunks: list[bytes]) -> list[bytes]:
        if len(chunks) != self.world:
            raise ValueError(f"all_to_all_bytes needs one chunk per worker ({self.world}), got {len(chunks)}")
        items = self._exchange([bytes(c) for c in chunks])
        return [items[w][self.rank] for w in range(self.world)]


def run_local(world: int, fn, *args, timeout_s: float = 120.0) -> list:
    """Run ``fn(transport, *args)`` on ``world`` threads joined by a :class:`LocalHub`; return the results."""
    import threading

    hub = LocalHub(world, timeout_s)
    results: list = [None] * world
    errors: list = []

    def work(rank: int) -> None:
        try:
            results[rank] = fn(hub.transport(rank), *args)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            hub.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results


@dataclass(frozen=True)
class WireRecord:
    """One collective on the wire: its kind (a netsim model), rounds, and every worker's bytes sent.

    ``bytes_down`` (every worker's bytes received) is given where it is not implied by ``bytes_up``:
    for ``two_phase`` both are what each worker really sent / received over both phases, ring
    forwarding of the all-gather included (the convention of :func:`rayq.netsim.transfer_seconds`).
    """

    kind: str
    rounds: int
    bytes_up: tuple[int, ...]
    bytes_down: tuple[int, ...] | None = None


@dataclass
class Ledger:
    """What one collective call moved, for this worker (and, in ``wire``, what every worker sent)."""

    elements: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    packets: int = 0
    rounds: int = 0
    encode_s: float = 0.0
    comm_s: float = 0.0
    decode_s: float = 0.0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    packet_bytes: list[int] = field(default_factory=list)
    wire: list[WireRecord] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (worker, why): frames that failed to decode

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.bytes_up / self.elements if self.elements else 0.0

    @property
    def compression_ratio(self) -> float:
        return 32.0 * self.elements / (8.0 * self.bytes_up) if self.bytes_up else 0.0

    @property
    def distortion(self) -> float | None:
        """Relative distortion ‖C(g)−g‖²/‖g‖² of this worker's own contribution (when measured)."""
        return self.err_sq / self.ref_sq if self.ref_sq > 0 else None

    def add(self, other: Ledger) -> None:
        for name in ("elements", "bytes_up", "bytes_down", "packets", "rounds", "encode_s", "comm_s",
                     "decode_s", "err_sq", "ref_sq"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.wire.extend(other.wire)
        self.dropped.extend(other.dropped)


def _inner(codec: Codec) -> Codec:
    """The codec under an error-feedback wrapper (the one whose contract and aggregate rule apply)."""
    return codec.inner if isinstance(codec, ErrorFeedback) else codec


def _single_round(codec: Codec) -> bool:
    """True when the codec uses the default one-round exchange, so its first packet decodes locally."""
    return type(_inner(codec)).exchange is Codec.exchange


def _forbidden(name: str, kind: Kind, multi_round: bool, strategy: str) -> str | None:
    if strategy not in STRATEGIES:
        return f"compression.strategy={strategy!r} is not a strategy; choose one of: {', '.join(STRATEGIES)}"
    if strategy == "allreduce" and kind is Kind.GATHER:
        return (f"codec {name!r} is gather-kind: its packets cannot be summed; strategy 'allreduce' is not "
                "allowed; use auto, allgather or two_phase")
    if strategy == "allgather" and multi_round:
        return (f"codec {name!r} is a multi-round linear codec: each round needs the sum over all workers "
                "(its error feedback and warm start depend on it), so packets decoded one by one would be "
                "wrong; strategy 'allgather' is not allowed; use auto or allreduce")
    if strategy == "two_phase" and multi_round:
        return (f"codec {name!r} is a multi-round linear codec: its rounds need the sum over all workers, "
                "so a shard owner cannot decode and re-encode it; strategy 'two_phase' is not allowed; "
                "use auto, allreduce or allgather")
    return None


def check_strategy(codec_name: str, strategy: str) -> None:
    """Raise ``ValueError`` naming both when the codec contract forbids ``codec_name`` with ``strategy``
    (called by the config's validation, so a bad pair fails before anything starts)."""
    import compressors  # noqa: F401  (registers the built-in codecs)
    from compressors.base import REGISTRY

    cls = REGISTRY.get(codec_name)
    if cls is None:
        raise ValueError(f"compression.codec={codec_name!r} is not a codec; choose one of: {', '.join(REGISTRY)}")
    problem = _forbidden(codec_name, cls.kind, cls.exchange is not Codec.exchange, strategy)
    if problem:
        raise ValueError(problem)


def route(codec: Codec, strategy: str) -> str:
    """The reduce a codec goes through under ``strategy``: ``allreduce``, ``allgather`` or ``two_phase``."""
    problem = _forbidden(codec.name, codec.kind, not _single_round(codec), strategy)
    if problem:
        raise ValueError(problem)
    if strategy == "auto":
        return "allreduce" if codec.kind is Kind.LINEAR else "allgather"
    return strategy


def shard_bounds(numel: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shards ``[lo, hi)`` of a flat tensor, one per worker, sizes differing by at most one."""
    cuts = [j * numel // world for j in range(world + 1)]
    return list(zip(cuts, cuts[1:]))


#: Phase-2 frame header of the two-phase reduce: the owner's phase-1 bytes sent and received, so every
#: worker can record every worker's real traffic (16 bytes, counted like any other byte).
_TWO_PHASE_HEADER = struct.Struct("<QQ")
#: Key of the owners' error-feedback memory in :meth:`CompressedGroup.state_dict`.
OWNER_STATE = "__two_phase_owner__"


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class CompressedGroup:
    def __init__(self, policy: Policy, transport: Transport, seed: int = 0, strategy: str = "auto") -> None:
        for o in policy.overrides:
            check_strategy(o.codec, strategy)
        route(policy.default, strategy)
        route(policy.small, strategy)
        self.policy = policy
        self.transport = transport
        self.seed = seed
        self.strategy = strategy
        #: Two-phase owners' error-feedback memory, per shard ("key#j/N"), fp32.
        self.owner_residuals: dict[str, torch.Tensor] = {}
        self._plan: list[Entry] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._routes: dict[str, str] = {}

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def world(self) -> int:
        return self.transport.world

    def plan(self, tensors: dict[str, torch.Tensor]) -> list[Entry]:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if self._plan is None or shapes != self._shapes:
            plan = self.policy.plan(shapes)
            self._routes = {e.key: route(e.codec, self.strategy) for e in plan}
            self._plan, self._shapes = plan, shapes
        return self._plan

    def _info(self, entry: Entry, step: int, worker: int | None = None) -> TensorInfo:
        return TensorInfo(entry.key, entry.shape, worker=self.rank if worker is None else worker,
                          world=self.world, step=step, seed=self.seed)

    def allreduce_mean(self, tensors: dict[str, torch.Tensor], step: int, measure: bool = False,
                       weights: list[float] | None = None) -> tuple[dict[str, torch.Tensor], Ledger]:
        """Average ``tensors`` over the group; every worker must call this with the same names and shapes.

        ``weights`` (one per worker, the same list on every worker; default all 1) make it a weighted mean
        Σ w_i x_i / Σ w_i (rayq.faults: 0 for a departed or late worker). A worker with weight 0 adds
        nothing: its linear packets are zeroed, and it sends an empty gather frame that nobody decodes. A
        gather frame that fails to decode (``PacketError``: lost or corrupted bytes) is dropped the same
        way on every worker and listed in ``ledger.dropped``. Not with the two-phase strategy.
        """
        return self._reduce(tensors, step, measure, mean=True, weights=weights)

    def allreduce_sum(self, tensors: dict[str, torch.Tensor], step: int,
                      measure: bool = False) -> tuple[dict[str, torch.Tensor], Ledger]:
        """The decoded *sum* over the group (≈ N × the mean; exact for lossless codecs), for callers with
        sum semantics such as ``ray.util.collective.allreduce``."""
        return self._reduce(tensors, step, measure, mean=False)

    def _reduce(self, tensors: dict[str, torch.Tensor], step: int, measure: bool,
                mean: bool, weights: list[float] | None = None) -> tuple[dict[str, torch.Tensor], Ledger]:
        plan = self.plan(tensors)
        ledger = Ledger()
        first = next(iter(tensors.values()))
        clock = _Clock(first.device)
        flats: dict[str, torch.Tensor] = {}
        for e in plan:
            parts = [tensors[m].detach().reshape(-1).to(torch.float32) for m in e.members]
            flats[e.key] = parts[0] if len(parts) == 1 else torch.cat(parts)
            ledger.elements += e.numel
        by_route: dict[str, list[Entry]] = {}
        for e in plan:
            by_route.setdefault(self._routes[e.key], []).append(e)
        averaged: dict[str, torch.Tensor] = {}
        if "allreduce" in by_route:
            averaged.update(self._linear(by_route["allreduce"], flats, step, ledger, clock, measure, mean, weights))
        if "allgather" in by_route:
            averaged.update(self._gather(by_route["allgather"], flats, step, ledger, clock, measure, mean, weights))
        if "two_phase" in by_route and weights is not None:
            raise ValueError("allreduce_mean(weights=...) is not supported by the two_phase strategy")
        if "two_phase" in by_route:
            averaged.update(self._two_phase(by_route["two_phase"], flats, step, ledger, clock, measure, mean))
        out: dict[str, torch.Tensor] = {}
        for e in plan:
            offset = 0
            for name, n in zip(e.members, e.numels):
                t = tensors[name]
                out[name] = averaged[e.key][offset:offset + n].view(t.shape).to(t.dtype)
                offset += n
        return out, ledger

    def _combine(self, codec: Codec, decoded: list[torch.Tensor], mean: bool,
                 weights: list[float] | None = None) -> torch.Tensor:
        """The codec's aggregate (weighted mean, or its own server rule) of every worker's decoded
        contribution; for a sum, the plain sum when the codec keeps the default mean rule."""
        inner = _inner(codec)
        if mean:
            return inner.aggregate(decoded, [1.0] * len(decoded) if weights is None else weights)
        if type(inner).aggregate is Codec.aggregate:
            out = decoded[0].clone()
            for d in decoded[1:]:
                out += d
            return out
        return inner.aggregate(decoded, [1.0] * len(decoded)) * len(decoded)

    # ------------------------------------------------------------------ linear: all-reduce rounds

    def _linear(self, entries: list[Entry], flats: dict[str, torch.Tensor], step: int, ledger: Ledger,
                clock: _Clock, measure: bool, mean: bool = True,
                weights: list[float] | None = None) -> dict[str, torch.Tensor]:
        start_up, start_rounds = ledger.bytes_up, ledger.rounds
        gens: dict[str, Generator[Packet, Packet, torch.Tensor]] = {}
        pending: dict[str, Packet] = {}
        results: dict[str, torch.Tensor] = {}
        t0 = clock.now()
        for e in entries:
            info = self._info(e, step)
            gens[e.key] = e.codec.exchange(flats[e.key], info)
            pending[e.key] = next(gens[e.key])
            if measure and _single_round(e.codec):
                own = e.codec.decode(pending[e.key], info)
                ledger.err_sq += float(((own - flats[e.key]) ** 2).sum())
                ledger.ref_sq += float((flats[e.key] ** 2).sum())
        ledger.encode_s += clock.now() - t0
        while pending:
            ledger.rounds += 1
            keys = list(pending)
            for k in keys:
                ledger.bytes_up += pending[k].nbytes
                ledger.packet_bytes.append(pending[k].nbytes)
                ledger.packets += 1
            t1 = clock.now()
            sent = [pending[k] for k in keys]
            if weights is not None:  # every round's fields are linear in this worker's contribution
                w = float(weights[self.rank])
                sent = [Packet(p.codec, p.numel, tuple(f * w for f in p.fields)) for p in sent]
            reduced = self._sum_fields(sent)
            t2 = clock.now()
            ledger.comm_s += t2 - t1
            nxt: dict[str, Packet] = {}
            for k, packet in zip(keys, reduced):
                ledger.bytes_down += packet.nbytes
                try:
                    nxt[k] = gens[k].send(packet)
                except StopIteration as stop:
                    total = self.world if weights is None else float(sum(weights))
                    results[k] = (stop.value / total if total > 0 else stop.value * 0) if mean else stop.value
            pending = nxt
            ledger.decode_s += clock.now() - t2
        up = ledger.bytes_up - start_up
        ledger.wire.append(WireRecord("allreduce", ledger.rounds - start_rounds, (up,) * self.world))
        return results

    def _sum_fields(self, packets: list[Packet]) -> list[Packet]:
        """All-reduce every field of ``packets`` with one flat buffer per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in packets:
            for f in p.fields:
                if not f.is_floating_point():
                    raise TypeError(f"linear codec {p.codec!r} sent a non-floating field ({f.dtype}); "
                                    "only floating fields can be summed by all-reduce")
                by_dtype.setdefault(f.dtype, []).append(f.reshape(-1))
        summed: dict[torch.dtype, list[torch.Tensor]] = {}
        for dtype, parts in by_dtype.items():
            flat = self.transport.all_reduce_sum(torch.cat(parts))
            summed[dtype] = list(torch.split(flat, [p.numel() for p in parts]))
        out = []
        for p in packets:
            fields = tuple(summed[f.dtype].pop(0).view(f.shape) for f in p.fields)
            out.append(Packet(p.codec, p.numel, fields))
        return out

    # ------------------------------------------------------------------ gather: all-gather of frames

    def _gather(self, entries: list[Entry], flats: dict[str, torch.Tensor], step: int, ledger: Ledger,
                clock: _Clock, measure: bool, mean: bool = True,
                weights: list[float] | None = None) -> dict[str, torch.Tensor]:
        t0 = clock.now()
        packets = []
        for e in entries if weights is None or weights[self.rank] > 0 else ():
            info = self._info(e, step)
            if measure:
                packet, own = e.codec.encode_decode(flats[e.key], info)
                ledger.err_sq += float(((own - flats[e.key]) ** 2).sum())
                ledger.ref_sq += float((flats[e.key] ** 2).sum())
            else:
                packet = e.codec.encode(flats[e.key], info)
            packets.append(packet)
        frame = pack_frame(packets)
        t1 = clock.now()
        ledger.encode_s += t1 - t0
        ledger.packets += len(packets)
        ledger.rounds += 1
        ledger.packet_bytes.extend(p.nbytes for p in packets)
        ledger.bytes_up += len(frame)
        frames = self.transport.all_gather_bytes(frame)
        t2 = clock.now()
        ledger.comm_s += t2 - t1
        ledger.bytes_down += sum(len(f) for w, f in enumerate(frames) if w != self.rank)
        ledger.wire.append(WireRecord("allgather", 1, tuple(len(f) for f in frames)))
        device = flats[entries[0].key].device
        decoded: list[list[torch.Tensor]] = [[] for _ in entries]
        used: list[float] = []
        for w, data in enumerate(frames):
            if weights is not None and weights[w] <= 0:
                continue
            try:
                mine = [e.codec.decode(p.to(device), self._info(e, step, worker=w))
                        for e, p in zip(entries, unpack_frame(data, len(entries)))]
            except PacketError as err:  # lost or corrupted bytes: dropped by every receiver alike
                ledger.dropped.append((w, str(err)))
                continue
            for i, d in enumerate(mine):
                decoded[i].append(d)
            used.append(1.0 if weights is None else float(weights[w]))
        results = {e.key: self._combine(e.codec, decoded[i], mean, used) if used else flats[e.key] * 0
                   for i, e in enumerate(entries)}
        ledger.decode_s += clock.now() - t2
        return results

    # ------------------------------------------------------------------ two-phase re-encoding reduce

    def _shard_info(self, entry: Entry, shard: int, size: int, step: int, worker: int, owner: bool) -> TensorInfo:
        """Shard ``shard`` of ``entry``: its own name (own randomness, own error-feedback residual); the
        owner's re-encoding gets another name, so it never reuses the random stream of a phase-1 packet."""
        name = f"{entry.key}#{shard}/{self.world}" + ("@owner" if owner else "")
        return TensorInfo(name, (size,), worker=worker, world=self.world, step=step, seed=self.seed)

    def _reencode(self, entry: Entry, shard: torch.Tensor, info: TensorInfo) -> Packet:
        """The owner's encoding of its reduced shard: ``u = s + e ; send C(u) ; e ← u − D(C(u))`` when
        the policy uses error feedback (the owner's memory, ALGORITHMS.md §6.1), plain ``C(s)`` otherwise."""
        inner = _inner(entry.codec)
        if not isinstance(entry.codec, ErrorFeedback):
            return inner.encode(shard, info)
        e = self.owner_residuals.get(info.name)
        u = shard if e is None or e.numel() != shard.numel() else shard + e.to(shard.device)
        packet, decoded = inner.encode_decode(u, info)
        self.owner_residuals[info.name] = u - decoded
        return packet

    def _two_phase(self, entries: list[Entry], flats: dict[str, torch.Tensor], step: int, ledger: Ledger,
                   clock: _Clock, measure: bool, mean: bool = True) -> dict[str, torch.Tensor]:
        n, me = self.world, self.rank
        device = flats[entries[0].key].device
        bounds = {e.key: shard_bounds(e.numel, n) for e in entries}

        def owned_by(w: int) -> list[Entry]:  # entries whose shard w is not empty, in plan order
            return [e for e in entries if bounds[e.key][w][1] > bounds[e.key][w][0]]

        # Phase 1: encode shard j of every tensor for its owner j; all-to-all of the frames.
        t0 = clock.now()
        outgoing: list[list[Packet]] = [[] for _ in range(n)]
        for j in range(n):
            for e in owned_by(j):
                lo, hi = bounds[e.key][j]
                x = flats[e.key][lo:hi]
                info = self._shard_info(e, j, hi - lo, step, me, owner=False)
                if measure:
                    packet, own = e.codec.encode_decode(x, info)
                    ledger.err_sq += float(((own - x) ** 2).sum())
                    ledger.ref_sq += float((x ** 2).sum())
                else:
                    packet = e.codec.encode(x, info)
                outgoing[j].append(packet)
        frames = [pack_frame(ps) for ps in outgoing]
        t1 = clock.now()
        received = self.transport.all_to_all_bytes(frames)
        t2 = clock.now()
        sent1 = sum(len(f) for j, f in enumerate(frames) if j != me)
        recv1 = sum(len(f) for w, f in enumerate(received) if w != me)

        # The owner: decode the N packets of its shard, aggregate, re-encode.
        mine = owned_by(me)
        per_source = [unpack_frame(received[w], len(mine)) for w in range(n)]
        reencoded = []
        for i, e in enumerate(mine):
            lo, hi = bounds[e.key][me]
            decoded = [e.codec.decode(per_source[w][i].to(device), self._shard_info(e, me, hi - lo, step, w, False))
                       for w in range(n)]
            reduced = self._combine(e.codec, decoded, mean)
            reencoded.append(self._reencode(e, reduced, self._shard_info(e, me, hi - lo, step, me, owner=True)))
        t3 = clock.now()
        frame2 = _TWO_PHASE_HEADER.pack(sent1, recv1) + pack_frame(reencoded)

        # Phase 2: all-gather of the re-encoded shards; everyone decodes every shard.
        shards_bytes = self.transport.all_gather_bytes(frame2)
        t4 = clock.now()
        pieces: dict[str, list[torch.Tensor]] = {e.key: [] for e in entries}
        up1, down1 = [], []
        for w, data in enumerate(shards_bytes):
            if len(data) < _TWO_PHASE_HEADER.size:
                raise ValueError(f"two-phase frame from worker {w} is truncated ({len(data)} bytes)")
            a, b = _TWO_PHASE_HEADER.unpack_from(data)
            up1.append(a)
            down1.append(b)
            packets = iter(unpack_frame(memoryview(data)[_TWO_PHASE_HEADER.size:], len(owned_by(w))))
            for e in entries:
                lo, hi = bounds[e.key][w]
                if hi == lo:
                    pieces[e.key].append(flats[e.key][:0])
                    continue
                info = self._shard_info(e, w, hi - lo, step, w, owner=True)
                pieces[e.key].append(_inner(e.codec).decode(next(packets).to(device), info))
        results = {k: torch.cat(v) for k, v in pieces.items()}
        t5 = clock.now()

        sizes2 = [len(d) for d in shards_bytes]
        total2 = sum(sizes2)
        ledger.encode_s += (t1 - t0) + (t3 - t2)
        ledger.comm_s += (t2 - t1) + (t4 - t3)
        ledger.decode_s += t5 - t4
        ledger.rounds += 1
        sent_packets = [p for j, ps in enumerate(outgoing) if j != me for p in ps] + reencoded
        ledger.packets += len(sent_packets)
        ledger.packet_bytes.extend(p.nbytes for p in sent_packets)
        ledger.bytes_up += sent1 + len(frame2)
        ledger.bytes_down += recv1 + total2 - len(frame2)
        # Wire: phase 1 as sent; phase 2 as a ring all-gather moves it (worker w forwards every shard but
        # its successor's), the convention of netsim.wire_bytes / transfer_seconds for "two_phase".
        ledger.wire.append(WireRecord(
            "two_phase", 1,
            tuple(up1[w] + total2 - sizes2[(w + 1) % n] for w in range(n)),
            tuple(down1[w] + total2 - sizes2[w] for w in range(n))))
        return results

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = self.policy.state_dict()
        if self.owner_residuals:
            state[OWNER_STATE] = {k: v.detach().cpu().clone() for k, v in self.owner_residuals.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        owner = state.pop(OWNER_STATE, {})
        self.policy.load_state_dict(state)
        self.owner_residuals = {k: v.clone() for k, v in owner.items()}

    def reset(self) -> None:
        """Forget every codec state (a worker joined or left: ALGORITHMS.md §16.1)."""
        self.policy.reset()
        self.owner_residuals.clear()
