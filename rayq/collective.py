"""Compressed collective groups (DESIGN.md §2: rayq.collective).

``CompressedGroup.allreduce_mean`` averages named tensors across the workers of a group, each tensor
through the codec its policy assigns, and returns a :class:`Ledger` of what really moved:

* ``linear`` codecs: their packets' fields are summed by all-reduce, one flat buffer per dtype per
  round (multi-round codecs such as PowerSGD drive the rounds through :meth:`Codec.exchange`);
* ``gather`` codecs: every worker's packets are serialized into one frame, frames are exchanged by a
  size all-gather plus a padded all-gather, and every worker decodes all of them and aggregates.

The ledger's byte counts are the lengths of the packets' serialized bytes (``to_bytes``), never a
formula. The transport is pluggable; :class:`TorchTransport` runs on the torch.distributed process
group that Ray Train sets up (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from compressors import Codec, Kind, Packet, TensorInfo, pack_frame, unpack_frame
from compressors.policy import Entry, Policy


class Transport(Protocol):
    rank: int
    world: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_bytes(self, data: bytes) -> list[bytes]: ...


class TorchTransport:
    """torch.distributed collectives on the default process group."""

    def __init__(self, device: torch.device | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        backend = dist.get_backend()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError("the NCCL backend needs a CUDA device for its collectives")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.to(self.device)
        self.dist.all_reduce(t)
        return t.to(tensor.device)

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self.dist.all_gather(sizes, size)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        outs = [torch.empty(longest, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        self.dist.all_gather(outs, buf)
        return [o[:n].cpu().numpy().tobytes() for o, n in zip(outs, lengths)]


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
    """One collective on the wire: its kind (a netsim model), rounds, and every worker's bytes sent."""

    kind: str
    rounds: int
    bytes_up: tuple[int, ...]


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


def _single_round(codec: Codec) -> bool:
    """True when the codec uses the default one-round exchange, so its first packet decodes locally."""
    inner = getattr(codec, "inner", codec)
    return type(inner).exchange is Codec.exchange


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class CompressedGroup:
    def __init__(self, policy: Policy, transport: Transport, seed: int = 0, strategy: str = "auto") -> None:
        self.policy = policy
        self.transport = transport
        self.seed = seed
        self.strategy = strategy
        self._plan: list[Entry] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def world(self) -> int:
        return self.transport.world

    def plan(self, tensors: dict[str, torch.Tensor]) -> list[Entry]:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if self._plan is None or shapes != self._shapes:
            self._plan, self._shapes = self.policy.plan(shapes), shapes
        return self._plan

    def _info(self, entry: Entry, step: int, worker: int | None = None) -> TensorInfo:
        return TensorInfo(entry.key, entry.shape, worker=self.rank if worker is None else worker,
                          world=self.world, step=step, seed=self.seed)

    def allreduce_mean(self, tensors: dict[str, torch.Tensor], step: int,
                       measure: bool = False) -> tuple[dict[str, torch.Tensor], Ledger]:
        """Average ``tensors`` over the group; every worker must call this with the same names and shapes."""
        plan = self.plan(tensors)
        ledger = Ledger()
        first = next(iter(tensors.values()))
        clock = _Clock(first.device)
        flats: dict[str, torch.Tensor] = {}
        for e in plan:
            parts = [tensors[m].detach().reshape(-1).to(torch.float32) for m in e.members]
            flats[e.key] = parts[0] if len(parts) == 1 else torch.cat(parts)
            ledger.elements += e.numel
        linear = [e for e in plan if e.codec.kind is Kind.LINEAR]
        gather = [e for e in plan if e.codec.kind is Kind.GATHER]
        averaged: dict[str, torch.Tensor] = {}
        if linear:
            averaged.update(self._linear(linear, flats, step, ledger, clock, measure))
        if gather:
            averaged.update(self._gather(gather, flats, step, ledger, clock, measure))
        out: dict[str, torch.Tensor] = {}
        for e in plan:
            offset = 0
            for name, n in zip(e.members, e.numels):
                t = tensors[name]
                out[name] = averaged[e.key][offset:offset + n].view(t.shape).to(t.dtype)
                offset += n
        return out, ledger

    # ------------------------------------------------------------------ linear: all-reduce rounds

    def _linear(self, entries: list[Entry], flats: dict[str, torch.Tensor], step: int, ledger: Ledger,
                clock: _Clock, measure: bool) -> dict[str, torch.Tensor]:
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
            reduced = self._sum_fields([pending[k] for k in keys])
            t2 = clock.now()
            ledger.comm_s += t2 - t1
            nxt: dict[str, Packet] = {}
            for k, packet in zip(keys, reduced):
                ledger.bytes_down += packet.nbytes
                try:
                    nxt[k] = gens[k].send(packet)
                except StopIteration as stop:
                    results[k] = stop.value / self.world
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
                clock: _Clock, measure: bool) -> dict[str, torch.Tensor]:
        t0 = clock.now()
        packets = []
        for e in entries:
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
        for w, data in enumerate(frames):
            for i, (e, p) in enumerate(zip(entries, unpack_frame(data, len(entries)))):
                decoded[i].append(e.codec.decode(p.to(device), self._info(e, step, worker=w)))
        weights = [1.0] * self.world
        results = {e.key: e.codec.aggregate(decoded[i], weights) for i, e in enumerate(entries)}
        ledger.decode_s += clock.now() - t2
        return results

    def state_dict(self) -> dict:
        return self.policy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state)
