"""What is averaged, and when: one contract for every schedule.

A :class:`Schedule` is handed each step's local gradients (in the replica's ``p.grad``) and the step's
faults, exchanges what it needs through the compressed group, applies the update with the replica's
optimizer, and returns an :class:`Outcome` (the ledger, whether it synced, whether it applied). The
training loop never branches on the kind:

* :class:`EveryStep` — gradients averaged every step (synchronous data-parallel SGD);
* :class:`Periodic` — local SGD: every ``period`` steps the replicas average their *model delta* since
  the last sync (CPSGD; Jiang & Agrawal, SC 2020), optionally through DiLoCo's outer Nesterov step
  (Douillard et al., 2023);
* :class:`Adaptive` — like periodic, with the period rescaled after each sync so the end-of-period
  parameter variance stays near κ·V_ref (ADPSGD's principle; the controller is our reconstruction);
* :class:`LAQ` — lazily aggregated quantized gradients (Sun, Chen, Giannakis, Yang, NeurIPS 2019): a
  worker uploads its gradient *innovation* through its codec only when it changed enough; receivers
  keep every worker's last upload.

Every schedule is checkpointable (``state_dict``) and reports its own figures (``metrics``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from compressors import Packet, PacketError, TensorInfo, pack_frame, unpack_frame
from compressors.base import mix_seed
from rayq.collective import CompressedGroup, Ledger
from rayq.errors import NonFiniteGradientError
from rayq.faults import StepFaults
from rayq.transport import Purpose, Transport


@dataclass
class Replica:
    """One worker's copy of the model and what updates it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    on_nonfinite: str = "raise"
    rank: int = 0
    #: The optimizer evaluates the averaged gradient itself, through a closure (BLAQ: at the weights and at a
    #: trial point; each evaluation is a forward, a backward and an exchange).
    needs_closure: bool = False

    def __post_init__(self) -> None:
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def elements(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in self.params}

    def finite(self, tensors: dict[str, torch.Tensor], local: dict[str, torch.Tensor], step: int, what: str) -> bool:
        """NaN/Inf detection with one reduction; ``raise`` names this worker's offending local tensors."""
        if bool(torch.isfinite(torch.stack([t.float().norm() for t in tensors.values()]).sum())):
            return True
        if self.on_nonfinite == "raise":
            bad = [n for n, g in local.items() if not torch.isfinite(g).all()]
            raise NonFiniteGradientError(
                f"step {step}: the {what} is not finite (NaN/Inf); worker {self.rank}'s non-finite local "
                f"gradients: {bad or 'none'}. Lower optimizer.lr, or set on_nonfinite=skip")
        return False

    def apply(self, update: dict[str, torch.Tensor], local: dict[str, torch.Tensor], step: int,
              what: str = "averaged gradient") -> bool:
        """Put ``update`` in the gradients and take one optimizer step; False (skipped) if it is not finite."""
        if not self.finite(update, local, step, what):
            return False
        for n, p in self.params:
            if p.grad is None:
                p.grad = update[n].detach().clone()
            else:
                p.grad.copy_(update[n])
        self.optimizer.step()
        return True

    def average_buffers(self, transport: Transport) -> None:
        """BatchNorm running statistics differ per worker: average them (exact, counted as control)."""
        bufs = [b for b in self.model.buffers() if b.is_floating_point()]
        if not bufs or transport.world == 1:
            return
        flat = transport.all_reduce_sum(torch.cat([b.detach().reshape(-1) for b in bufs]), Purpose.CONTROL)
        flat = flat / transport.world
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


@dataclass
class Outcome:
    """What one step of a schedule did."""

    ledger: Ledger
    synced: bool
    applied: bool


#: Recompute this worker's local gradients at the current weights (zero, forward, backward; returns the loss).
Backward = Callable[[], torch.Tensor]


class Schedule(Protocol):
    def step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None = None) -> Outcome:
        """Exchange and apply this step's update (the local gradients are in the replica's ``p.grad``;
        ``backward`` recomputes them, for optimizers that evaluate the gradient more than once)."""
        ...

    def resync(self, faults: StepFaults) -> None:
        """Membership changed (left, rejoined, healed): drop or reset what depends on it."""
        ...

    def metrics(self) -> dict[str, float]:
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def _weights(faults: StepFaults | None) -> list[float] | None:
    return None if faults is None else faults.weights


# ---------------------------------------------------------------------------------------- every step


class EveryStep:
    """Synchronous data-parallel SGD: the (weighted) mean of the decoded gradients, every step."""

    def __init__(self, replica: Replica, group: CompressedGroup) -> None:
        self.replica, self.group = replica, group
        self.syncs = 0

    def step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None = None) -> Outcome:
        if self.replica.needs_closure:
            return self._closure_step(step, faults, measure, backward)
        grads = self.replica.grads()
        averaged, ledger = self.group.allreduce_mean(grads, step, measure=measure, weights=_weights(faults))
        self.syncs += 1
        return Outcome(ledger, True, self.replica.apply(averaged, grads, step))

    def _closure_step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None) -> Outcome:
        """The optimizer asks for the averaged gradient as often as it needs it (BLAQ: twice); the first
        evaluation uses the gradients the loop computed, later ones recompute them at the new weights."""
        if backward is None:
            raise ValueError(f"optimizer {type(self.replica.optimizer).__name__} evaluates the gradient itself; "
                             "the trainer must pass schedule.step(..., backward=...)")
        ledger = Ledger(rank=self.group.rank)
        calls = [0]

        def closure() -> torch.Tensor:
            if calls[0]:
                backward()
            calls[0] += 1
            local = {n: g.detach().clone() for n, g in self.replica.grads().items()}
            averaged, part = self.group.allreduce_mean(local, step, measure=measure and calls[0] == 1,
                                                       weights=_weights(faults))
            ledger.add(part)
            self.replica.finite(averaged, local, step, "averaged gradient")
            for n, p in self.replica.params:
                p.grad = averaged[n].detach().clone()
            return averaged[next(iter(averaged))]

        self.replica.optimizer.step(closure)
        ledger.elements //= max(calls[0], 1)  # the same elements, exchanged once per evaluation
        self.syncs += 1
        return Outcome(ledger, True, True)

    def resync(self, faults: StepFaults) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"sync/count": float(self.syncs)}

    def state_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.syncs = int(state.get("syncs", 0))


# ---------------------------------------------------------------------------------------- model averaging


def count_sketch(vector: torch.Tensor, buckets: int, seed: int) -> torch.Tensor:
    """CountSketch (Charikar, Chen, Farach-Colton, 2002) of ``vector`` into ``buckets`` float64 sums.

    Coordinate i goes to bucket h(i) with sign s(i), both from a generator seeded by ``seed`` (the same on
    every worker). Linear, and E‖CS(v)‖² = ‖v‖² with Var ≤ 2‖v‖⁴/buckets. When the vector has no more
    coordinates than buckets it is returned as is (the estimate is then exact)."""
    v = vector.reshape(-1).to(torch.float64)
    if v.numel() <= buckets:
        return v
    g = torch.Generator(device=v.device).manual_seed(seed)
    h = torch.randint(buckets, (v.numel(),), generator=g, device=v.device)
    s = torch.randint(2, (v.numel(),), generator=g, device=v.device).to(torch.float64).mul_(2).sub_(1)
    return torch.zeros(buckets, dtype=torch.float64, device=v.device).index_add_(0, h, s * v)


class ModelAverager:
    """Averages the model delta since the last sync through the compressed group.

    Exchanging Δᵢ = xᵢ − x_anchor (not xᵢ itself) lets any scale-carrying codec apply: a delta is
    gradient-like. With ``outer_lr`` = 1 and no momentum the result is plain averaging of the replicas;
    otherwise it is DiLoCo's outer step x_anchor ← x_anchor − lr_out·Nesterov(−Δ̄).

    The end-of-period parameter variance V = (1/N)Σᵢ‖Δᵢ − Δ̄‖² must not come from the *compressed* mean
    (a lossy codec makes it 0 or 100× too large). It is estimated from a CountSketch of every worker's
    exact delta: one dense all-reduce of ``sketch`` + 1 floats, V̂ = mean‖CS(Δᵢ)‖² − ‖mean CS(Δᵢ)‖², unbiased
    (exact when the model has at most ``sketch`` parameters), the same for every codec.
    """

    def __init__(self, replica: Replica, group: CompressedGroup, outer_lr: float = 1.0, outer_momentum: float = 0.0,
                 sketch: int = 1024, seed: int = 0) -> None:
        self.replica, self.group = replica, group
        self.outer_lr, self.outer_momentum, self.sketch, self.seed = outer_lr, outer_momentum, sketch, seed
        self.anchor = {n: p.detach().clone() for n, p in replica.params}
        self.momentum: dict[str, torch.Tensor] = {}

    def reset_anchor(self) -> None:
        self.anchor = {n: p.detach().clone() for n, p in self.replica.params}
        self.momentum.clear()

    def variance(self, deltas: dict[str, torch.Tensor], step: int) -> float:
        flat = torch.cat([d.reshape(-1) for d in deltas.values()])
        sk = count_sketch(flat, self.sketch, mix_seed(self.seed, step, 0x5EC7))
        both = torch.cat([sk, (sk * sk).sum().reshape(1)])
        total = self.group.control_allreduce(both) / self.group.world
        return max(0.0, float(total[-1]) - float((total[:-1] ** 2).sum()))

    def sync(self, step: int, measure: bool) -> tuple[Ledger, float, bool]:
        """Average the deltas; returns the ledger, the variance V̂ and whether the update was applied."""
        deltas = {n: p.detach() - self.anchor[n] for n, p in self.replica.params}
        mean_delta, ledger = self.group.allreduce_mean(deltas, step, measure=measure)
        variance = self.variance(deltas, step)
        finite = self.replica.finite(mean_delta, deltas, step, "averaged model delta")
        with torch.no_grad():
            for n, p in self.replica.params:
                if finite:
                    update = mean_delta[n]
                    if self.outer_momentum > 0 or self.outer_lr != 1.0:
                        g = -update  # the outer "gradient"
                        buf = self.momentum.get(n)
                        buf = g.clone() if buf is None else buf.mul_(self.outer_momentum).add_(g)
                        self.momentum[n] = buf
                        direction = g.add(buf, alpha=self.outer_momentum) if self.outer_momentum > 0 else g
                        self.anchor[n].add_(direction, alpha=-self.outer_lr)
                    else:
                        self.anchor[n].add_(update)
                p.copy_(self.anchor[n])
        self.replica.average_buffers(self.group.transport)
        return self.group.drain(ledger), variance, finite

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": {n: t.cpu().clone() for n, t in self.anchor.items()},
                "momentum": {n: t.cpu().clone() for n, t in self.momentum.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.replica.params[0][1].device
        self.anchor = {n: t.to(device) for n, t in state["anchor"].items()}
        self.momentum = {n: t.to(device) for n, t in state["momentum"].items()}


class Periodic:
    """Constant period p (CPSGD / local SGD): local optimizer steps, the model delta averaged every p steps."""

    def __init__(self, replica: Replica, group: CompressedGroup, period: int, outer_lr: float = 1.0,
                 outer_momentum: float = 0.0, sketch: int = 1024, seed: int = 0) -> None:
        if period < 1:
            raise ValueError(f"sync.period={period} must be >= 1")
        self.replica, self.group, self.period = replica, group, period
        self.averager = ModelAverager(replica, group, outer_lr, outer_momentum, sketch, seed)
        self.last_sync = 0
        self.syncs = 0
        self.variance = 0.0

    def should_sync(self, step: int) -> bool:
        return step + 1 - self.last_sync >= self.period

    def step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None = None) -> Outcome:
        grads = self.replica.grads()
        applied = self.replica.finite(grads, grads, step, "local gradient")
        if applied:
            self.replica.optimizer.step()
        ledger = Ledger(rank=self.group.rank, elements=self.replica.elements)
        if not self.should_sync(step):
            return Outcome(ledger, False, applied)
        ledger, variance, finite = self.averager.sync(step, measure)
        self.observe(step, variance)
        return Outcome(ledger, True, applied and finite)

    def observe(self, step: int, variance: float) -> None:
        self.last_sync = step + 1
        self.syncs += 1
        self.variance = variance

    def resync(self, faults: StepFaults) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"sync/count": float(self.syncs), "sync/period": float(self.period), "sync/variance": self.variance}

    def state_dict(self) -> dict[str, Any]:
        return {"period": self.period, "last_sync": self.last_sync, "syncs": self.syncs, "variance": self.variance,
                "averager": self.averager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.period, self.last_sync, self.syncs = state["period"], state["last_sync"], state["syncs"]
        self.variance = state.get("variance", 0.0)
        self.averager.load_state_dict(state["averager"])


class Adaptive(Periodic):
    """ADPSGD's feedback controller (Jiang & Agrawal, SC 2020: keep the parameter variance in check;
    the update rule is our reconstruction).

    During ``warmup`` steps the period stays at p₀ and the end-of-period variances are averaged into
    V_ref. After that, each sync sets p ← clip(round(p·(κ·V_ref / V_end)^ω), p_min, p_max): a high
    variance (early training, large learning rate) shortens the period, a low one lengthens it.
    """

    def __init__(self, replica: Replica, group: CompressedGroup, period: int, p_min: int, p_max: int, kappa: float,
                 omega: float, warmup: int, outer_lr: float = 1.0, outer_momentum: float = 0.0, sketch: int = 1024,
                 seed: int = 0) -> None:
        super().__init__(replica, group, period, outer_lr, outer_momentum, sketch, seed)
        if not 1 <= p_min <= period <= p_max:
            raise ValueError(f"need 1 <= sync.p_min ({p_min}) <= sync.period ({period}) <= sync.p_max ({p_max})")
        self.p_min, self.p_max, self.kappa, self.omega, self.warmup = p_min, p_max, kappa, omega, warmup
        self.warm_variances: list[float] = []
        self.v_ref: float | None = None
        self.history: list[tuple[int, int, float]] = []

    def observe(self, step: int, variance: float) -> None:
        super().observe(step, variance)
        self.history.append((step + 1, self.period, variance))
        if step + 1 <= self.warmup:
            self.warm_variances.append(variance)
            return
        if self.v_ref is None:
            self.v_ref = sum(self.warm_variances) / len(self.warm_variances) if self.warm_variances else variance
        if variance <= 0:
            self.period = self.p_max
            return
        scaled = self.period * (self.kappa * self.v_ref / variance) ** self.omega
        self.period = int(min(self.p_max, max(self.p_min, round(scaled))))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warm": list(self.warm_variances), "v_ref": self.v_ref,
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.warm_variances, self.v_ref, self.history = list(state["warm"]), state["v_ref"], list(state["history"])


# ---------------------------------------------------------------------------------------- LAQ


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
        return Outcome(group.drain(ledger), bool(uploaded), applied)

    def resync(self, faults: StepFaults) -> None:
        """A departed worker's last upload leaves the aggregate (its gradient is no longer current); a worker
        that rejoins or heals uploads in full next round."""
        s = self.state
        for w in faults.left:
            s.aggregate -= s.refs[w]
            s.refs[w].zero_()
        if self.group.rank in faults.resync:
            s.force, s.own_err_sq = True, 0.0

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


# ---------------------------------------------------------------------------------------- factory


def build(cfg: Any, replica: Replica, group: CompressedGroup, steps_per_epoch: int) -> Schedule:
    """The schedule ``cfg.sync`` names, over ``group``."""
    sc = cfg.sync
    if sc.schedule == "every_step":
        return EveryStep(replica, group)
    if sc.schedule == "laq":
        return LAQ(replica, group, memory=sc.memory, xi=sc.xi, max_skips=sc.max_skips, error_weight=sc.error_weight)
    common = dict(outer_lr=sc.outer_lr, outer_momentum=sc.outer_momentum, sketch=sc.variance_sketch, seed=cfg.seed)
    if sc.schedule == "periodic":
        return Periodic(replica, group, sc.period, **common)
    warmup = sc.warmup_steps or steps_per_epoch
    return Adaptive(replica, group, sc.period, sc.p_min, sc.p_max, sc.kappa, sc.omega, warmup, **common)

