"""LAQ: lazily aggregated quantized gradients (Sun, Chen, Giannakis, Yang, NeurIPS 2019) over the group's codecs.

A worker uploads its gradient *innovation* (gradient minus its last upload) through the codec its policy
assigns only when it changed enough; receivers keep every worker's last upload and apply their sum.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from compressors import Packet, PacketError, TensorInfo, pack_frame, unpack_frame
from compressors.base import all_finite
from rayq.collective import CompressedGroup, Ledger
from rayq.faults import StepFaults
from rayq.replica import Backward, Outcome, Replica, run_backward, timed


#: The frame of a worker that does not upload this round (a header-only packet: its bytes are counted).
SKIP = "skip"


@dataclass
class LAQState:
    """LAQ's bookkeeping, identical on every worker (every worker sees every upload)."""

    refs: torch.Tensor                        # [world, d]: each worker's last upload Q_m(θ̂_m), summed innovations
    aggregate: torch.Tensor                   # Σ_m Q_m(θ̂_m), maintained incrementally
    own_err_sq: float = 0.0                   # ‖ε̂‖² at this worker's last upload
    skips: int = 0                            # t_m: rounds since this worker's last upload
    force: bool = True                        # upload next round regardless of the rule (start, rejoin, heal)
    diffs: deque = field(default_factory=deque)  # ‖θ^{k+1−d} − θ^{k−d}‖², newest first
    uploads: int = 0
    rounds: int = 0


class LAQ:
    """Lazily aggregated quantized gradients over the group's codecs.

    Worker m's innovation δ_m = g_m − Q_m(θ̂_m) goes through the codec its policy assigns (codec ``laq`` is
    the paper's b-bit quantiser; others work too). Mean convention (a sum over workers divided by M, step
    lr): the paper's threshold 1/(α²M²) becomes 1/lr² (lr/(1−β) under momentum β). Worker m skips when
        ‖δQ_m‖² ≤ (1/lr²)·Σ_d ξ_d‖θ^{k+1−d} − θ^{k−d}‖² + c(‖ε_m^k‖² + ‖ε̂_m‖²)   and  t_m < t̄,
    with ξ_d = xi/D and c = error_weight. A skip is a header-only frame (counted). A worker that is late
    (deadline), away, or whose frame was lost or corrupted does not upload: every receiver, the sender
    included, keeps its last upload, so the references never diverge. The applied gradient is
    Σ_m Q_m / (workers present).
    """

    def __init__(self, replica: Replica, group: CompressedGroup, memory: int = 10, xi: float = 0.8,
                 max_skips: int = 100, error_weight: float = 3.0) -> None:
        self.replica, self.group = replica, group
        self.memory, self.xi, self.max_skips, self.error_weight = memory, xi, max_skips, error_weight
        d = replica.elements
        dev = replica.params[0][1].device
        self.state = LAQState(refs=torch.zeros(group.world, d, device=dev), aggregate=torch.zeros(d, device=dev),
                              diffs=deque(maxlen=memory))

    def threshold(self, lr: float) -> float:
        k = len(self.state.diffs)
        if k == 0:
            return 0.0
        weight = self.xi / self.memory if k >= self.memory else self.xi / k  # ξ/k for k ≤ D (reference code)
        return weight * sum(self.state.diffs) / lr**2

    def _lr(self) -> float:
        g0 = self.replica.optimizer.param_groups[0]
        return g0["lr"] / (1.0 - g0["momentum"]) if g0.get("momentum") else g0["lr"]

    def step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None = None) -> Outcome:
        clock = self.replica.clock
        loss, compute = run_backward(backward, clock)
        started = clock.now()
        s, group, rank, world = self.state, self.group, self.group.rank, self.group.world
        grads = self.replica.grads()
        entries = group.plan(grads)
        ledger = Ledger(rank=rank, elements=self.replica.elements)
        g = torch.cat([torch.cat([grads[m].detach().reshape(-1) for m in e.members]).to(torch.float32)
                       for e in entries])
        offsets = [0]
        for e in entries:
            offsets.append(offsets[-1] + e.numel)
        innovation = g - s.refs[rank]
        packets, deltas = [], []
        for i, e in enumerate(entries):
            info = TensorInfo(e.key, e.shape, worker=rank, world=world, step=step, seed=group.seed)
            packet, decoded = e.codec.encode_decode(innovation[offsets[i]:offsets[i + 1]], info)
            packets.append(packet)
            deltas.append(decoded.to(torch.float32))
        delta = torch.cat(deltas)
        err_sq = float(((s.refs[rank] + delta - g) ** 2).sum())
        if measure:
            ledger.err_sq += float(((delta - innovation) ** 2).sum())
            ledger.ref_sq += float((innovation ** 2).sum())
        can = faults is None or faults.weights[rank] > 0
        lazy = float((delta ** 2).sum()) <= self.threshold(self._lr()) + self.error_weight * (err_sq + s.own_err_sq)
        upload = can and (s.force or s.skips >= self.max_skips or not lazy)
        frame = pack_frame(packets) if upload else Packet(SKIP, g.numel(), ()).to_bytes()
        ledger.bytes_up, ledger.packets, ledger.rounds = len(frame), len(packets) if upload else 1, 1
        frames = group.transport.all_gather_bytes(frame)
        ledger.bytes_down = sum(len(f) for w, f in enumerate(frames) if w != rank)
        uploaded = set()
        for w, data in enumerate(frames):
            try:
                first, _ = Packet.read(data, 0)
                if first.codec == SKIP:
                    continue
                decoded = torch.cat([e.codec.decode(p.to(g.device), TensorInfo(e.key, e.shape, worker=w, world=world,
                                                                                step=step, seed=group.seed))
                                     for e, p in zip(entries, unpack_frame(data, len(entries)))]).to(torch.float32)
            except PacketError as err:  # lost or corrupted: nobody (the sender included) counts the upload
                ledger.dropped.append((w, str(err)))
                continue
            s.refs[w] += decoded
            s.aggregate += decoded
            s.uploads += 1
            uploaded.add(w)
        s.rounds += 1
        if rank in uploaded:
            s.skips, s.own_err_sq, s.force = 0, err_sq, False
        else:
            s.skips += 1
        present = world if faults is None else max(1, sum(faults.present))
        mean = s.aggregate / present
        update = {}
        for i, e in enumerate(entries):
            flat, offset = mean[offsets[i]:offsets[i + 1]], 0
            for name, n in zip(e.members, e.numels):
                update[name] = flat[offset:offset + n].view(grads[name].shape).to(grads[name].dtype)
                offset += n
        before = torch.cat([p.detach().reshape(-1) for _, p in self.replica.params]).clone()
        applied = self.replica.apply(update, grads, step)
        after = torch.cat([p.detach().reshape(-1) for _, p in self.replica.params])
        s.diffs.appendleft(float(((after - before) ** 2).sum()))
        return timed(Outcome(group.drain(ledger), bool(uploaded), applied), clock, compute, started, loss)

    def resync(self, faults: StepFaults) -> None:
        """A departed worker's last upload leaves the aggregate (its gradient is no longer current); a worker
        that rejoins or heals uploads in full next round."""
        s = self.state
        for w in faults.left:
            s.aggregate -= s.refs[w]
            s.refs[w].zero_()
        if self.group.rank in faults.resync:
            s.force, s.own_err_sq = True, 0.0

    def drop_nonfinite(self) -> list[str]:
        """After a skipped non-finite step: a worker's reference that took in NaN/Inf is zeroed (the same on every
        worker: each holds every reference), the aggregate rebuilt from the references, and a worker whose own
        reference was poisoned uploads in full next round."""
        s = self.state
        bad = [w for w in range(s.refs.shape[0]) if not bool(torch.isfinite(s.refs[w]).all())]
        if not bad and all_finite(s.aggregate) and math.isfinite(s.own_err_sq):
            return []
        for w in bad:
            s.refs[w].zero_()
        s.aggregate = s.refs.sum(0)
        if self.group.rank in bad or not math.isfinite(s.own_err_sq):
            s.force, s.own_err_sq = True, 0.0
        return [f"laq reference of worker {w}" for w in bad] or ["laq aggregate"]

    def invariant_error(self) -> float:
        """|Σ_m Q_m(θ̂_m) − ∇|: zero up to float rounding."""
        return float((self.state.refs.sum(0) - self.state.aggregate).abs().max())

    def metrics(self) -> dict[str, float]:
        s = self.state
        return {"sync/uploads": float(s.uploads),
                "sync/upload_fraction": s.uploads / (s.rounds * self.group.world) if s.rounds else math.nan}

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {"refs": s.refs.cpu().clone(), "aggregate": s.aggregate.cpu().clone(), "own_err_sq": s.own_err_sq,
                "skips": s.skips, "force": s.force, "diffs": list(s.diffs), "uploads": s.uploads, "rounds": s.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.state
        dev = s.aggregate.device
        s.refs, s.aggregate = state["refs"].to(dev), state["aggregate"].to(dev)
        s.own_err_sq, s.skips, s.force = state["own_err_sq"], state["skips"], state["force"]
        s.uploads, s.rounds = state["uploads"], state["rounds"]
        s.diffs = deque(state["diffs"], maxlen=self.memory)
