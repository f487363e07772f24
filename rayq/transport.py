"""Transports: the collectives a compressed group runs on, and a record of every byte they move.

A :class:`Transport` implements four primitives (equal-size all-reduce and all-gather, variable-size
all-to-all, broadcast) and builds the operations the group needs on them, recording each as a
:class:`WireRecord` that holds **every worker's** bytes, so the network model can time it:

* ``all_reduce_sum(t)`` — one all-reduce of ``t`` (the same size on every worker);
* ``all_gather_bytes(frame)`` — variable-size frames: an all-gather of the sizes (control; each size's
  8-byte word also carries a 31-bit tag, which the gather path fills with a digest of its frame's
  layout: ``all_gather_tagged``), then
  either ``padded`` (default): an all-gather of every frame padded to the longest (the padding is
  counted), or ``direct``: an all-to-all in which each worker sends its frame to every other one (no
  padding, but each frame crosses N−1 links from its sender);
* ``all_to_all_bytes(chunks)`` — chunk j to worker j: an all-gather of the size matrix (control,
  so every worker knows every worker's traffic), then one variable-size all-to-all;
* ``broadcast(tensors, src)`` — state sent to a (re)joining worker.

Every record says what the bytes were for (``payload`` from codecs, ``control`` such as sizes, BN
statistics and evaluation sums, ``state`` such as model broadcasts) and how much of each worker's
share was padding. The group moves the records into its :class:`~rayq.collective.Ledger`; whatever a
step leaves behind is collected by the run harness, so each byte is counted exactly once.

:class:`TorchTransport` runs on a torch.distributed process group (gloo, or NCCL with CUDA
tensors); :class:`LocalTransport` runs ``world`` threads of one process meeting at a barrier (tests,
in-process simulations). A worker's outgoing all-gather frame can be tampered with (``tamper``: the
fault injector loses or corrupts it) before it is sent.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compressors.staging import to_device

class Purpose(str, enum.Enum):
    PAYLOAD = "payload"   # codec packets
    CONTROL = "control"   # sizes, skip flags, statistics, evaluation sums
    STATE = "state"       # model / optimizer state sent to (re)joining workers


@dataclass(frozen=True)
class WireRecord:
    """One collective on the wire: how it moves bytes (a network-model kind), its rounds, and per worker
    the bytes it handed to the collective (``bytes_up``) and, where not implied, received (``bytes_down``).

    ``padding[i]`` of ``bytes_up[i]`` were padding. Conventions of the network model: ``allreduce`` and
    ``allgather`` give the buffer each worker contributes; ``alltoall`` gives what each worker sends to
    and receives from the others; ``broadcast`` gives the source's buffer at its index.
    """

    kind: str
    rounds: int
    bytes_up: tuple[int, ...]
    bytes_down: tuple[int, ...] | None = None
    purpose: str = Purpose.PAYLOAD.value
    padding: tuple[int, ...] | None = None

    def up(self, worker: int) -> int:
        return self.bytes_up[worker]

    def down(self, worker: int) -> int:
        if self.bytes_down is not None:
            return self.bytes_down[worker]
        if self.kind == "broadcast":
            return sum(self.bytes_up) if self.bytes_up[worker] == 0 else 0
        return sum(self.bytes_up) - self.bytes_up[worker] if self.kind == "allgather" else self.bytes_up[worker]

    def pad(self, worker: int) -> int:
        return self.padding[worker] if self.padding is not None else 0

    def to_json(self) -> list:
        return [self.kind, self.rounds, list(self.bytes_up), None if self.bytes_down is None else list(self.bytes_down),
                self.purpose, None if self.padding is None else list(self.padding)]

    @classmethod
    def from_json(cls, item: list) -> WireRecord:
        kind, rounds, up, *rest = item
        down = rest[0] if len(rest) > 0 else None
        purpose = rest[1] if len(rest) > 1 else Purpose.PAYLOAD.value
        padding = rest[2] if len(rest) > 2 else None
        return cls(kind, int(rounds), tuple(up), None if down is None else tuple(down), purpose,
                   None if padding is None else tuple(padding))


#: ``tamper(frame) -> frame``: what the fault injector does to this worker's outgoing frame (on its device).
Tamper = Callable[[torch.Tensor], torch.Tensor]

GATHER_MODES = ("padded", "direct")


def _to_uint8(data: bytes, device: torch.device) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes() if t.numel() else b""


class Transport:
    """Accounted collectives over four primitives that subclasses implement."""

    rank: int
    world: int
    device: torch.device

    def __init__(self, gather: str = "padded") -> None:
        if gather not in GATHER_MODES:
            raise ValueError(f"gather mode {gather!r} is unknown; choose one of: {', '.join(GATHER_MODES)}")
        self.gather = gather
        self.records: list[WireRecord] = []
        self.tamper: Tamper | None = None

    # -- primitives ------------------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Equal-size tensors from every worker, in rank order."""
        raise NotImplementedError

    def _all_to_all(self, chunks: list[torch.Tensor], recv_sizes: list[int]) -> list[torch.Tensor]:
        """``chunks[j]`` to worker j; returns what each worker sent to this one (uint8, sizes known)."""
        raise NotImplementedError

    def _broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        raise NotImplementedError

    # -- accounted operations --------------------------------------------------------------------------
    def record(self, rec: WireRecord) -> None:
        self.records.append(rec)

    def take_records(self) -> list[WireRecord]:
        out, self.records = self.records, []
        return out

    def all_reduce_sum(self, tensor: torch.Tensor, purpose: Purpose = Purpose.PAYLOAD) -> torch.Tensor:
        out = self._all_reduce(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        self.record(WireRecord("allreduce", 1, (nbytes,) * self.world, purpose=Purpose(purpose).value))
        return out

    def _gather_ints(self, n: int) -> list[int]:
        """Every worker's ``n`` (8 bytes each), in rank order, as host integers."""
        return [row[0] for row in self._gather_rows([n])]

    def _gather_rows(self, row: list[int]) -> list[list[int]]:
        """Every worker's ``row`` of host integers (the same length on every worker, 8 bytes each), in rank
        order. Subclasses with a host-side group keep them off the device."""
        rows = self._all_gather(to_device(row, torch.int64, self.device))
        return torch.stack(rows).tolist()

    def _sizes(self, n: int, tag: int = 0) -> tuple[list[int], list[int]]:
        """Every worker's frame length and tag, in one 8-byte word each: the tag (31 bits, 0 for none) above
        the length (32 bits); a frame of 4 GiB or more goes as its negated length, without its tag."""
        if not 0 <= tag < 1 << 31:
            raise ValueError(f"a tag has 31 bits, got {tag}")
        words = self._gather_ints(tag << 32 | n if n < 1 << 32 else -n)
        self.record(WireRecord("allgather", 1, (8,) * self.world, purpose=Purpose.CONTROL.value))
        return [-w if w < 0 else w & 0xFFFFFFFF for w in words], [0 if w < 0 else w >> 32 for w in words]

    def all_gather_bytes(self, data: bytes, purpose: Purpose = Purpose.PAYLOAD) -> list[bytes]:
        """Variable-size frames as bytes (see :meth:`all_gather_frames`)."""
        frames = self.all_gather_frames(_to_uint8(data, self.device), purpose)
        return [_to_bytes(f) for f in frames]

    def all_gather_frames(self, frame: torch.Tensor, purpose: Purpose = Purpose.PAYLOAD) -> list[torch.Tensor]:
        """Every worker's variable-size uint8 frame (this one included, in rank order), as tensors on the
        transport's device: no detour through Python bytes. Padded (default) or direct (see the module)."""
        return self.all_gather_tagged(frame, 0, purpose)[0]

    def all_gather_tagged(self, frame: torch.Tensor, tag: int,
                          purpose: Purpose = Purpose.PAYLOAD) -> tuple[list[torch.Tensor], list[int]]:
        """:meth:`all_gather_frames`, and every worker's ``tag`` (31 bits, e.g. a digest of the frame's layout:
        :func:`compressors.layout_tag`), carried in the same control word as the frame's length at no cost."""
        frame = frame.to(self.device)
        if self.tamper is not None and purpose is Purpose.PAYLOAD:  # armed for the whole step by the fault injector
            frame = self.tamper(frame)
        lengths, tags = self._sizes(frame.numel(), tag)
        if self.world == 1:
            return [frame], tags
        if self.gather == "direct":
            empty = frame[:0]
            got = self._all_to_all([frame if j != self.rank else empty for j in range(self.world)],
                                   [n if w != self.rank else 0 for w, n in enumerate(lengths)])
            self.record(WireRecord("alltoall", 1, tuple((self.world - 1) * n for n in lengths),
                                   tuple(sum(lengths) - n for n in lengths), purpose=Purpose(purpose).value))
            return [frame if w == self.rank else t for w, t in enumerate(got)], tags
        longest = max(lengths)
        if frame.numel() == longest:
            buf = frame
        else:
            buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
            buf[:frame.numel()] = frame
        outs = self._all_gather(buf)
        self.record(WireRecord("allgather", 1, (longest,) * self.world, purpose=Purpose(purpose).value,
                               padding=tuple(longest - n for n in lengths)))
        return [o[:n] for o, n in zip(outs, lengths)], tags

    def all_to_all_bytes(self, chunks: list[bytes], purpose: Purpose = Purpose.PAYLOAD) -> list[bytes]:
        """Send ``chunks[j]`` to worker j; return what every worker sent to this one (by source)."""
        if len(chunks) != self.world:
            raise ValueError(f"all_to_all_bytes needs one chunk per worker ({self.world}), got {len(chunks)}")
        return [_to_bytes(t) for t in self.all_to_all_frames([_to_uint8(c, self.device) for c in chunks], purpose)]

    def all_to_all_frames(self, chunks: list[torch.Tensor], purpose: Purpose = Purpose.PAYLOAD) -> list[torch.Tensor]:
        """:meth:`all_to_all_bytes` for uint8 tensors on the transport's device, returned as tensors there."""
        if len(chunks) != self.world:
            raise ValueError(f"all_to_all_frames needs one chunk per worker ({self.world}), got {len(chunks)}")
        matrix = self._gather_rows([c.numel() for c in chunks])  # matrix[src][dst]
        self.record(WireRecord("allgather", 1, (8 * self.world,) * self.world, purpose=Purpose.CONTROL.value))
        recv = [matrix[src][self.rank] for src in range(self.world)]
        got = self._all_to_all([c.to(self.device) for c in chunks], recv)
        sent = tuple(sum(n for dst, n in enumerate(matrix[w]) if dst != w) for w in range(self.world))
        received = tuple(sum(matrix[src][w] for src in range(self.world) if src != w) for w in range(self.world))
        self.record(WireRecord("alltoall", 1, sent, received, purpose=Purpose(purpose).value))
        return got

    def broadcast(self, tensors: list[torch.Tensor], src: int, purpose: Purpose = Purpose.STATE) -> None:
        """Overwrite ``tensors`` on every worker with the source's values (one flat buffer per dtype)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        total = 0
        for dtype, ts in by_dtype.items():
            flat = torch.cat([t.detach().reshape(-1) for t in ts]).to(self.device)
            flat = self._broadcast(flat, src)
            total += flat.numel() * flat.element_size()
            offset = 0
            for t in ts:
                t.data.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.device))
                offset += t.numel()
        up = tuple(total if w == src else 0 for w in range(self.world))
        self.record(WireRecord("broadcast", 1, up, purpose=Purpose(purpose).value))


class TorchTransport(Transport):
    """torch.distributed collectives on a process group (the default one unless ``group`` is given)."""

    def __init__(self, device: torch.device | None = None, group: Any = None, gather: str = "padded",
                 host_control: bool | None = None) -> None:
        import torch.distributed as dist

        super().__init__(gather)
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError("the NCCL backend needs a CUDA device for its collectives")
        #: Frame sizes travel between host memories (a gloo group beside a GPU one, made on first use):
        #: reading them back from the device would make every exchange wait for it.
        self.host_control = self.device.type != "cpu" if host_control is None else host_control
        self._control: Any = None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.device).clone() if t.device != self.device else t.clone()
        self.dist.all_reduce(out, group=self.group)
        return out.to(t.device)

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.to(self.device)
        outs = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(outs, t, group=self.group)
        return outs

    def open_control(self) -> None:
        """Make the host control group now (a collective of this group's members; otherwise it is made at the
        first exchange): before a DDP comm hook runs, say, whose exchanges happen inside autograd."""
        if self.host_control and self._control is None:
            ranks = self.dist.get_process_group_ranks(self.group) if self.group is not None \
                else list(range(self.dist.get_world_size()))
            self._control = self.dist.new_group(ranks, backend="gloo", use_local_synchronization=True)

    def _gather_rows(self, row: list[int]) -> list[list[int]]:
        if not self.host_control:
            return super()._gather_rows(row)
        self.open_control()  # only this group's members meet here, all at their first exchange
        outs = [torch.empty(len(row), dtype=torch.int64) for _ in range(self.world)]
        self.dist.all_gather(outs, torch.tensor(row, dtype=torch.int64), group=self._control)
        return [o.tolist() for o in outs]

    def _all_to_all(self, chunks: list[torch.Tensor], recv_sizes: list[int]) -> list[torch.Tensor]:
        send_sizes = [c.numel() for c in chunks]
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=self.device)
        data = torch.cat(chunks).to(self.device) if chunks else torch.zeros(0, dtype=torch.uint8, device=self.device)
        self.dist.all_to_all_single(out, data, recv_sizes, send_sizes, group=self.group)
        return list(torch.split(out, recv_sizes))

    def _broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        t = t.to(self.device).contiguous()
        self.dist.broadcast(t, src=src, group=self.group)
        return t


class LocalHub:
    """``world`` workers as threads of one process, meeting at a barrier: a real collective, in memory.

    Every worker combines the deposited tensors in rank order, so all of them get bit-identical results.
    ``on_primitive(rank, op, nbytes_sent)`` (optional) is told what each worker hands to each primitive:
    tests count the bytes there, below the transport's own accounting.
    """

    def __init__(self, world: int, timeout_s: float = 60.0,
                 on_primitive: Callable[[int, str, int], None] | None = None) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=timeout_s)
        self.slots: list = [None] * world
        self.on_primitive = on_primitive

    def transport(self, rank: int, gather: str = "padded") -> LocalTransport:
        return LocalTransport(self, rank, gather)

    def exchange(self, rank: int, item: Any) -> list:
        """Every worker's ``item``. CUDA tensors among them are handed across streams as a collective
        would: a reader's stream waits for the writer's (an event), and the memory stays reserved until
        the reader's stream has used it (workers may run on streams of their own, e.g. a side stream)."""
        tensors = [t for t in _leaves(item) if t.is_cuda]
        event = None
        if tensors:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensors[0].device))
        self.slots[rank] = (item, event, tensors)
        self.barrier.wait()
        slots = list(self.slots)
        self.barrier.wait()
        for w, (_, theirs, shared) in enumerate(slots):
            if theirs is not None and w != rank:
                stream = torch.cuda.current_stream(shared[0].device)
                stream.wait_event(theirs)
                for t in shared:
                    t.record_stream(stream)
        return [it for it, _, _ in slots]


def _leaves(item: Any) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, (list, tuple)):
        return [t for x in item for t in _leaves(x)]
    return []


class LocalTransport(Transport):
    def __init__(self, hub: LocalHub, rank: int, gather: str = "padded") -> None:
        super().__init__(gather)
        self.hub, self.rank, self.world = hub, rank, hub.world
        self.device = torch.device("cpu")

    def _count(self, op: str, nbytes: int) -> None:
        if self.hub.on_primitive is not None:
            self.hub.on_primitive(self.rank, op, nbytes)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._count("all_reduce", t.numel() * t.element_size())
        items = self.hub.exchange(self.rank, t.detach().clone())
        out = items[0].clone()
        for x in items[1:]:
            out += x.to(out.device)
        return out.to(t.device)

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        self._count("all_gather", t.numel() * t.element_size())
        return [x.clone() for x in self.hub.exchange(self.rank, t.detach().clone())]

    def _gather_rows(self, row: list[int]) -> list[list[int]]:
        self._count("all_gather", 8 * len(row))
        return [list(r) for r in self.hub.exchange(self.rank, [int(v) for v in row])]

    def _all_to_all(self, chunks: list[torch.Tensor], recv_sizes: list[int]) -> list[torch.Tensor]:
        self._count("all_to_all", sum(c.numel() for j, c in enumerate(chunks) if j != self.rank))
        items = self.hub.exchange(self.rank, [c.detach().clone() for c in chunks])
        return [items[w][self.rank] for w in range(self.world)]

    def _broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._count("broadcast", t.numel() * t.element_size() if self.rank == src else 0)
        items = self.hub.exchange(self.rank, t.detach().clone() if self.rank == src else None)
        return items[src].clone()


def run_local(world: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0,
              hub: LocalHub | None = None, gather: str = "padded") -> list:
    """Run ``fn(transport, *args)`` on ``world`` threads joined by a :class:`LocalHub`; return the results."""
    hub = hub or LocalHub(world, timeout_s)
    results: list = [None] * world
    errors: list = []

    def work(rank: int) -> None:
        try:
            results[rank] = fn(hub.transport(rank, gather), *args)
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
