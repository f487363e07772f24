"""Compressed collective groups: average named tensors through their codecs, and say what moved.

``CompressedGroup.allreduce_mean`` averages named tensors across the workers of a group, each tensor
through the codec its policy assigns, and returns a :class:`Ledger`. The reduce strategy
(``compression.strategy``) follows the codec's kind:

* ``allreduce`` (``auto`` for ``linear`` codecs): packets' fields are summed by all-reduce, one flat
  buffer per dtype per round (multi-round codecs such as PowerSGD drive the rounds through
  :meth:`Codec.exchange`);
* ``allgather`` (``auto`` for ``gather`` codecs; allowed for single-round linear ones): every worker's
  packets form one frame, frames are all-gathered, and every worker decodes and aggregates them;
* ``two_phase``: the two-phase re-encoding reduce (DeepSpeed's 1-bit reduce; CGX). Each tensor is cut
  into N shards; shard j of every worker is encoded and sent to worker j (an all-to-all); owner j
  decodes its N packets, aggregates and re-encodes the result with codecs of its own (their own error
  feedback memory), and the re-encoded shards are all-gathered. Per-worker volume ≈ 3P(N−1)/N: flat in N.

Weights (one per worker, the same on every worker: 0 for one that left or is late) make it a weighted
mean Σ w_i x_i / Σ w_i. Every path follows one rule for stateful codecs: after the exchange each
worker calls ``codec.settle(info, applied)`` for the contributions it offered, so a memory is consumed
only when its contribution was actually applied. A gather frame that fails to decode (lost or
corrupted bytes) is dropped the same way by every worker and listed in ``ledger.dropped``.

Frames on a GPU stay there. Each packet's CRC-32 is computed with tensor operations on the device. Each
frame's length travels with a digest of its headers (:func:`compressors.layout_tag`, in the same control
word); when every worker's frame has this worker's length and digest, receivers check and slice the
gathered frames on the device too (:func:`compressors.read_frames`): at every step for codecs with a fixed
layout (:attr:`Codec.fixed_layout`: int8, laq, qsgd, terngrad, topk, vqsgd, with or without error
feedback), and in every step whose layouts agree for the others (sign when no worker has exact zeros).
A frame that fails the check gets weight 0 in the aggregate and its sender's memory is kept, all decided on
the device; the host learns which frames were dropped at the end of the step (:meth:`Ledger.resolve`),
when the training loop reads the loss anyway. Frames whose layouts differ are parsed on the host.

Forbidden pairs (:func:`check_strategy`) raise ``ValueError`` naming codec and strategy. The ledger's
bytes come from the packets' serialized lengths and from the transport's records of what it moved —
padding and control traffic included, never a formula.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from compressors import (Codec, FrameLayout, Kind, Packet, PacketError, TensorInfo, frame_tensor, layout_tag, make_codec,
                         read_frames, to_host, unpack_tensor)
from compressors.policy import Entry, Policy
from compressors.staging import to_device
from rayq.ledger import Clock, Ledger
from rayq.transport import Purpose, Transport

#: Values of ``compression.strategy``; ``auto`` picks all-reduce for linear codecs, all-gather otherwise.
STRATEGIES = ("auto", "allreduce", "allgather", "two_phase")


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
                "use auto or allreduce")
    return None


def check_strategy(codec_name: str, strategy: str) -> None:
    """Raise ``ValueError`` naming both when the codec contract forbids ``codec_name`` with ``strategy``."""
    codec = make_codec(codec_name)
    problem = _forbidden(codec_name, codec.kind, codec.multi_round, strategy)
    if problem:
        raise ValueError(problem)


def route(codec: Codec, strategy: str, lossy: bool = False) -> str:
    """The reduce a codec goes through under ``strategy``: ``allreduce``, ``allgather`` or ``two_phase``.

    ``lossy``: payloads can be lost or corrupted (fault injection). Then ``auto`` sends every single-round
    codec in the all-gathered frame, so a worker's whole contribution is dropped together, never half."""
    problem = _forbidden(codec.name, codec.kind, codec.multi_round, strategy)
    if problem:
        raise ValueError(problem)
    if strategy == "auto":
        return "allreduce" if codec.kind is Kind.LINEAR and not (lossy and not codec.multi_round) else "allgather"
    return strategy


def shard_bounds(numel: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shards ``[lo, hi)`` of a flat tensor, one per worker, sizes differing by at most one."""
    cuts = [j * numel // world for j in range(world + 1)]
    return list(zip(cuts, cuts[1:]))


class CompressedGroup:
    def __init__(self, policy: Policy, transport: Transport, seed: int = 0, strategy: str = "auto",
                 lossy: bool = False, device_frames: bool | None = None) -> None:
        """``device_frames``: check and slice gathered frames with tensor operations (default: when the
        transport's device is not the CPU, where zlib and a host parse are faster)."""
        for o in policy.overrides:
            check_strategy(o.codec, strategy)
        route(policy.default, strategy)
        route(policy.small, strategy)
        self.policy = policy
        self.transport = transport
        self.seed = seed
        self.strategy = strategy
        self.lossy = lossy
        self.device_frames = transport.device.type != "cpu" if device_frames is None else device_frames
        self._plan: list[Entry] | None = None
        self._key: tuple | None = None
        self._routes: dict[str, str] = {}

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def world(self) -> int:
        return self.transport.world

    def plan(self, tensors: dict[str, torch.Tensor]) -> list[Entry]:
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in tensors.items())
        if self._plan is None or key != self._key:
            plan = self.policy.plan({k: tuple(v.shape) for k, v in tensors.items()},
                                    {k: v.dtype for k, v in tensors.items()})
            self._routes = {e.key: route(e.codec, self.strategy, self.lossy) for e in plan}
            self._plan, self._key = plan, key
        return self._plan

    def _info(self, entry: Entry, step: int, worker: int | None = None,
              weights: list[float] | None = None) -> TensorInfo:
        w = self.rank if worker is None else worker
        return TensorInfo(entry.key, entry.shape, worker=w, world=self.world, step=step, seed=self.seed,
                          weight=1.0 if weights is None else float(weights[w]),
                          weight_sum=None if weights is None else float(sum(weights)))

    # ------------------------------------------------------------------ public calls

    def allreduce_mean(self, tensors: dict[str, torch.Tensor], step: int, measure: bool = False,
                       weights: list[float] | None = None) -> tuple[dict[str, torch.Tensor], Ledger]:
        """Average ``tensors`` over the group; every worker calls this with the same names and shapes.

        ``weights`` (one per worker, the same list on every worker; default all 1) make it a weighted mean
        Σ w_i x_i / Σ w_i. A worker with weight 0 offers nothing: its linear packets are zeroed, its gather
        frame is empty, and its codec state is untouched.
        """
        return self._reduce(tensors, step, measure, True, weights)

    def allreduce_sum(self, tensors: dict[str, torch.Tensor], step: int,
                      measure: bool = False) -> tuple[dict[str, torch.Tensor], Ledger]:
        """The decoded *sum* over the group (≈ N × the mean; exact for lossless codecs), for callers with
        sum semantics such as ``ray.util.collective.allreduce``."""
        return self._reduce(tensors, step, measure, False, None)

    def control_allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """A dense, exact all-reduce (sum) of small control data (statistics, counts), counted as control."""
        return self.transport.all_reduce_sum(tensor, Purpose.CONTROL)

    def drain(self, ledger: Ledger) -> Ledger:
        """Move the transport's records into ``ledger`` (every byte lands in exactly one ledger)."""
        ledger.wire.extend(self.transport.take_records())
        return ledger

    def allreduce_entries(self, entries: list[Entry], tensors: dict[str, torch.Tensor], step: int,
                          measure: bool = False, weights: list[float] | None = None
                          ) -> tuple[dict[str, torch.Tensor], Ledger]:
        """Average only ``entries`` of this group's plan (``tensors`` holds at least their members): one
        bucket of an exchange that overlaps the backward pass. Every worker calls it with the same entries."""
        return self._reduce(tensors, step, measure, True, weights, entries)

    def _reduce(self, tensors: dict[str, torch.Tensor], step: int, measure: bool, mean: bool,
                weights: list[float] | None, entries: list[Entry] | None = None
                ) -> tuple[dict[str, torch.Tensor], Ledger]:
        if weights is not None and len(weights) != self.world:
            raise ValueError(f"weights has {len(weights)} entries for a group of {self.world} workers")
        plan = self.plan(tensors) if entries is None else entries
        ledger = Ledger(rank=self.rank)
        clock = Clock(next(iter(tensors.values())).device)
        flats: dict[str, torch.Tensor] = {}
        for e in plan:
            parts = [tensors[m].detach().reshape(-1).to(e.dtype) for m in e.members]
            flats[e.key] = parts[0] if len(parts) == 1 else torch.cat(parts)
            ledger.elements += e.numel
        by_route: dict[str, list[Entry]] = {}
        for e in plan:
            by_route.setdefault(self._routes[e.key], []).append(e)
        averaged: dict[str, torch.Tensor] = {}
        reducers = {"allreduce": self._linear, "allgather": self._gather, "two_phase": self._two_phase}
        for name, entries in by_route.items():
            averaged.update(reducers[name](entries, flats, step, ledger, clock, measure, mean, weights))
        self.drain(ledger)
        out: dict[str, torch.Tensor] = {}
        for e in plan:
            offset = 0
            for name, n in zip(e.members, e.numels):
                t = tensors[name]
                out[name] = averaged[e.key][offset:offset + n].view(t.shape).to(t.dtype)
                offset += n
        return out, ledger

    def _combine(self, codec: Codec, decoded: list[torch.Tensor], mean: bool,
                 weights: list[float] | torch.Tensor) -> torch.Tensor:
        """The codec's aggregate (weighted mean, or its own server rule) of the decoded contributions that
        were used; for a sum, the plain sum when the codec keeps the default mean rule. ``weights`` on the
        device (every worker's contribution, 0 for a frame dropped there) also mask a sum."""
        if mean:
            return codec.aggregate(decoded, weights)
        on_device = isinstance(weights, torch.Tensor)
        if codec.averages:
            out = decoded[0] * weights[0] if on_device else decoded[0].clone()
            for i, d in enumerate(decoded[1:], 1):
                out += d * weights[i] if on_device else d
            return out
        if on_device:
            return codec.aggregate(decoded, weights) * weights.sum()
        return codec.aggregate(decoded, [1.0] * len(decoded)) * len(decoded)

    def _measure(self, ledger: Ledger, own: torch.Tensor, x: torch.Tensor) -> None:
        ledger.err_sq += float(((own.to(torch.float32) - x.to(torch.float32)) ** 2).sum())
        ledger.ref_sq += float((x.to(torch.float32) ** 2).sum())

    # ------------------------------------------------------------------ linear: all-reduce rounds

    def _linear(self, entries: list[Entry], flats: dict[str, torch.Tensor], step: int, ledger: Ledger,
                clock: Clock, measure: bool, mean: bool, weights: list[float] | None) -> dict[str, torch.Tensor]:
        w = 1.0 if weights is None else float(weights[self.rank])
        total = float(self.world) if weights is None else float(sum(weights))
        gens: dict[str, Generator[Packet, Packet, torch.Tensor]] = {}
        pending: dict[str, Packet] = {}
        results: dict[str, torch.Tensor] = {}
        infos = {e.key: self._info(e, step, weights=weights) for e in entries}
        t0 = clock.now()
        for e in entries:
            gens[e.key] = e.codec.exchange(flats[e.key], infos[e.key])
            pending[e.key] = next(gens[e.key])
            if measure and not e.codec.multi_round:
                self._measure(ledger, e.codec.decode(pending[e.key], infos[e.key]), flats[e.key])
        clock.charge(ledger, "encode_s", t0)
        while pending:
            ledger.rounds += 1
            keys = list(pending)
            sent = [pending[k] for k in keys]
            for p in sent:
                ledger.bytes_up += p.nbytes
                ledger.packet_bytes.append(p.nbytes)
                ledger.packets += 1
            if w != 1.0:  # every round's fields are linear in this worker's contribution
                sent = [Packet(p.codec, p.numel, tuple(f * w for f in p.fields)) for p in sent]
            t1 = clock.now()
            reduced = self._sum_fields(sent)
            t2 = clock.now()
            clock.charge(ledger, "comm_s", t1, t2)
            nxt: dict[str, Packet] = {}
            for k, packet in zip(keys, reduced):
                ledger.bytes_down += packet.nbytes
                try:
                    nxt[k] = gens[k].send(packet)
                except StopIteration as stop:
                    results[k] = (stop.value / total if total > 0 else stop.value * 0) if mean else stop.value
            pending = nxt
            clock.charge(ledger, "decode_s", t2)
        if w > 0:
            for e in entries:
                e.codec.settle(infos[e.key], True)
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
                clock: Clock, measure: bool, mean: bool, weights: list[float] | None) -> dict[str, torch.Tensor]:
        offers = weights is None or weights[self.rank] > 0
        t0 = clock.now()
        packets = []
        for e in entries if offers else ():
            info = self._info(e, step, weights=weights)
            if measure:
                packet, own = e.codec.encode_decode(flats[e.key], info)
                self._measure(ledger, own, flats[e.key])
            else:
                packet = e.codec.encode(flats[e.key], info)
            packets.append(packet)
        frame = frame_tensor(packets, self.transport.device, device_crc=self.device_frames or None)
        t1 = clock.now()
        clock.charge(ledger, "encode_s", t0, t1)
        ledger.packets += len(packets)
        ledger.rounds += 1
        ledger.packet_bytes.extend(p.nbytes for p in packets)
        ledger.bytes_up += frame.numel()
        tag = layout_tag(packets) if self.device_frames and packets else 0
        frames, tags = self.transport.all_gather_tagged(frame, tag)
        t2 = clock.now()
        clock.charge(ledger, "comm_s", t1, t2)
        ledger.bytes_down += sum(f.numel() for w, f in enumerate(frames) if w != self.rank)
        device = flats[entries[0].key].device
        if tag and all(t == tag for t in tags) and all(f.numel() == frame.numel() for f in frames):
            results = self._gather_on_device(entries, packets, frame, frames, step, ledger, mean, weights, device)
            clock.charge(ledger, "decode_s", t2)
            return results
        decoded: list[list[torch.Tensor]] = [[] for _ in entries]
        used: list[float] = []
        mine_applied = False
        for w, data in enumerate(to_host(frames)):  # from a GPU: one copy back for all frames
            if weights is not None and weights[w] <= 0:
                continue
            try:
                parts = [e.codec.decode(p.to(device), self._info(e, step, worker=w, weights=weights))
                         for e, p in zip(entries, unpack_tensor(data, len(entries)))]
            except PacketError as err:  # lost or corrupted bytes: dropped by every receiver alike
                ledger.dropped.append((w, str(err)))
                continue
            for i, d in enumerate(parts):
                decoded[i].append(d)
            used.append(1.0 if weights is None else float(weights[w]))
            mine_applied = mine_applied or w == self.rank
        results = {e.key: self._combine(e.codec, decoded[i], mean, used) if used else flats[e.key] * 0
                   for i, e in enumerate(entries)}
        if offers:
            for e in entries:
                e.codec.settle(self._info(e, step, weights=weights), mine_applied)
        clock.charge(ledger, "decode_s", t2)
        return results

    def _gather_on_device(self, entries: list[Entry], packets: list[Packet], frame: torch.Tensor,
                          frames: list[torch.Tensor], step: int, ledger: Ledger, mean: bool,
                          weights: list[float] | None, device: torch.device) -> dict[str, torch.Tensor]:
        """The gather path's decode with nothing read back to the host: every frame has this worker's
        layout, so all are checked and sliced at once on the device; one that fails gets weight 0."""
        ok, per_worker = read_frames(torch.stack(frames), frame, FrameLayout.of(packets))
        ledger.unchecked.append(ok)
        used = ok.to(torch.float32)
        if weights is not None:  # every worker offered (a frame of this length), with these weights
            used = used * to_device(weights, torch.float32, used.device)
        results = {}
        for i, e in enumerate(entries):
            decoded = [e.codec.decode(per_worker[w][i].to(device), self._info(e, step, worker=w, weights=weights))
                       for w in range(self.world)]
            results[e.key] = self._combine(e.codec, decoded, mean, used)
        for e in entries:
            e.codec.settle(self._info(e, step, weights=weights), ok[self.rank])
        return results

    # ------------------------------------------------------------------ two-phase re-encoding reduce

    def _shard_info(self, entry: Entry, shard: int, size: int, step: int, worker: int, owner: bool,
                    weights: list[float] | None = None) -> TensorInfo:
        """Shard ``shard`` of ``entry``: its own name (own randomness, own error-feedback memory); the
        owner's re-encoding gets another name, so it never reuses the random stream of a phase-1 packet."""
        name = f"{entry.key}#{shard}/{self.world}" + ("@owner" if owner else "")
        return TensorInfo(name, (size,), worker=worker, world=self.world, step=step, seed=self.seed,
                          weight=1.0 if weights is None or owner else float(weights[worker]),
                          weight_sum=None if weights is None or owner else float(sum(weights)))

    def _two_phase(self, entries: list[Entry], flats: dict[str, torch.Tensor], step: int, ledger: Ledger,
                   clock: Clock, measure: bool, mean: bool, weights: list[float] | None) -> dict[str, torch.Tensor]:
        n, me = self.world, self.rank
        offers = weights is None or weights[me] > 0
        device = flats[entries[0].key].device
        bounds = {e.key: shard_bounds(e.numel, n) for e in entries}

        def owned_by(w: int) -> list[Entry]:  # entries whose shard w is not empty, in plan order
            return [e for e in entries if bounds[e.key][w][1] > bounds[e.key][w][0]]

        # Phase 1: encode shard j of every tensor for its owner j; all-to-all of the frames.
        t0 = clock.now()
        outgoing: list[list[Packet]] = [[] for _ in range(n)]
        sent_infos = []
        for j in range(n) if offers else ():
            for e in owned_by(j):
                lo, hi = bounds[e.key][j]
                x = flats[e.key][lo:hi]
                info = self._shard_info(e, j, hi - lo, step, me, owner=False, weights=weights)
                if measure:
                    packet, own = e.codec.encode_decode(x, info)
                    self._measure(ledger, own, x)
                else:
                    packet = e.codec.encode(x, info)
                outgoing[j].append(packet)
                sent_infos.append((e.codec, info))
        frames = [frame_tensor(ps, self.transport.device, device_crc=self.device_frames or None) for ps in outgoing]
        t1 = clock.now()
        received = self.transport.all_to_all_frames(frames)
        t2 = clock.now()

        # The owner: decode the packets of its shard, aggregate, re-encode with its own codec.
        mine = owned_by(me)
        contributors = [w for w in range(n) if weights is None or weights[w] > 0]
        on_host = to_host(received)  # from a GPU: one copy back for all frames
        per_source = {w: unpack_tensor(on_host[w], len(mine)) for w in contributors}
        reencoded, owner_infos = [], []
        for i, e in enumerate(mine):
            lo, hi = bounds[e.key][me]
            decoded = [e.codec.decode(per_source[w][i].to(device),
                                      self._shard_info(e, me, hi - lo, step, w, False, weights)) for w in contributors]
            used = [1.0 if weights is None else float(weights[w]) for w in contributors]
            reduced = self._combine(e.codec, decoded, mean, used)
            owner = self.policy.owner_codec(e.codec)
            info = self._shard_info(e, me, hi - lo, step, me, owner=True)
            reencoded.append(owner.encode(reduced.to(torch.float32), info))
            owner_infos.append((owner, info))
        frame2 = frame_tensor(reencoded, self.transport.device, device_crc=self.device_frames or None)
        t3 = clock.now()

        # Phase 2: all-gather of the re-encoded shards; everyone decodes every shard.
        shards = self.transport.all_gather_frames(frame2)
        t4 = clock.now()
        pieces: dict[str, list[torch.Tensor]] = {e.key: [] for e in entries}
        for w, data in enumerate(to_host(shards)):
            packets = iter(unpack_tensor(data, len(owned_by(w))))
            for e in entries:
                lo, hi = bounds[e.key][w]
                if hi == lo:
                    pieces[e.key].append(flats[e.key][:0])
                    continue
                info = self._shard_info(e, w, hi - lo, step, w, owner=True)
                pieces[e.key].append(e.codec.decode(next(packets).to(device), info))
        results = {k: torch.cat(v) for k, v in pieces.items()}
        for codec, info in sent_infos:
            codec.settle(info, True)
        for owner, info in owner_infos:
            owner.settle(info, True)
        t5 = clock.now()

        for name, start, end in (("encode_s", t0, t1), ("comm_s", t1, t2), ("encode_s", t2, t3), ("comm_s", t3, t4),
                                 ("decode_s", t4, t5)):
            clock.charge(ledger, name, start, end)
        ledger.rounds += 1
        sent_packets = [p for j, ps in enumerate(outgoing) if j != me for p in ps] + reencoded
        ledger.packets += len(sent_packets)
        ledger.packet_bytes.extend(p.nbytes for p in sent_packets)
        ledger.bytes_up += sum(f.numel() for j, f in enumerate(frames) if j != me) + frame2.numel()
        ledger.bytes_down += sum(f.numel() for w, f in enumerate(received) if w != me) + \
            sum(d.numel() for w, d in enumerate(shards) if w != me)
        return results

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return self.policy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state)

    def reset(self) -> None:
        """Forget every codec state (this worker joined or rejoined)."""
        self.policy.reset()

    def drop_nonfinite(self) -> list[str]:
        """After a skipped non-finite step: forget the codec memories that took in NaN/Inf."""
        return self.policy.drop_nonfinite()

    def residual_norm(self) -> float:
        return self.policy.residual_norm()

