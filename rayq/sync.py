"""What is averaged, and when (DESIGN.md §2: rayq.sync; ALGORITHMS.md §4, §7).

* ``every_step``: gradients are averaged every step (synchronous data-parallel SGD).
* ``periodic``: local SGD; every ``period`` steps the workers average their *model delta* since the last
  sync (CPSGD, §7.1), optionally through an outer Nesterov optimizer (DiLoCo): x ← x_anchor − OuterOpt(−Δ̄).
* ``adaptive``: like periodic, with the period adapted after each sync by the feedback controller of §7.2 (A):
  keep the end-of-period parameter variance V near κ·V_ref.
* ``laq``: lazily aggregated quantized gradients (§4): a worker uploads its quantized gradient innovation
  only when it changed enough, receivers reuse its stale reference otherwise, and an upload is forced
  after ``max_skips`` skips.

Every schedule is checkpointable (``state_dict``) and exposes ``should_sync(step, stats)``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from compressors import Packet, TensorInfo
from compressors.laq import LAQQuantizer
from rayq.collective import CompressedGroup, Ledger, WireRecord


@dataclass
class SyncStats:
    """What a schedule sees at a sync: steps since the last one and the measured parameter variance."""

    step: int
    since_sync: int
    variance: float | None = None


class EveryStep:
    mode = "gradient"

    def should_sync(self, step: int, stats: SyncStats | None = None) -> bool:
        return True

    def observe(self, stats: SyncStats) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Periodic:
    """Constant period p (CPSGD / local SGD): sync after every p local steps."""

    mode = "model"

    def __init__(self, period: int) -> None:
        if period < 1:
            raise ValueError(f"sync.period={period} must be >= 1")
        self.period = period
        self.last_sync = 0
        self.syncs = 0

    def should_sync(self, step: int, stats: SyncStats | None = None) -> bool:
        return step + 1 - self.last_sync >= self.period

    def observe(self, stats: SyncStats) -> None:
        self.last_sync = stats.step + 1
        self.syncs += 1

    def state_dict(self) -> dict[str, Any]:
        return {"period": self.period, "last_sync": self.last_sync, "syncs": self.syncs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.period, self.last_sync, self.syncs = state["period"], state["last_sync"], state["syncs"]


class Adaptive(Periodic):
    """ADPSGD's feedback controller (§7.2 (A), our reconstruction [R]).

    During ``warmup`` steps the period stays at p₀ and the end-of-period variances are averaged into
    V_ref. After that, each sync sets p ← clip(round(p·(κ·V_ref / V_end)^ω), p_min, p_max): a high
    variance (early training, large learning rate) shortens the period, a low one lengthens it.
    """

    def __init__(self, period: int, p_min: int, p_max: int, kappa: float, omega: float, warmup: int) -> None:
        super().__init__(period)
        if not 1 <= p_min <= period <= p_max:
            raise ValueError(f"need 1 <= sync.p_min ({p_min}) <= sync.period ({period}) <= sync.p_max ({p_max})")
        self.p_min, self.p_max, self.kappa, self.omega, self.warmup = p_min, p_max, kappa, omega, warmup
        self.warm_variances: list[float] = []
        self.v_ref: float | None = None
        self.history: list[tuple[int, int, float]] = []

    def observe(self, stats: SyncStats) -> None:
        super().observe(stats)
        v = stats.variance
        if v is None:
            return
        self.history.append((stats.step + 1, self.period, v))
        if stats.step + 1 <= self.warmup:
            self.warm_variances.append(v)
            return
        if self.v_ref is None:
            self.v_ref = sum(self.warm_variances) / len(self.warm_variances) if self.warm_variances else v
        if v <= 0:
            self.period = self.p_max
            return
        target = self.kappa * self.v_ref
        scaled = self.period * (target / v) ** self.omega
        self.period = int(min(self.p_max, max(self.p_min, round(scaled))))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warm": list(self.warm_variances), "v_ref": self.v_ref,
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.warm_variances, self.v_ref, self.history = list(state["warm"]), state["v_ref"], list(state["history"])


class ModelAverager:
    """Averages the model delta since the last sync through the compressed group.

    Exchanging Δᵢ = xᵢ − x_anchor (not xᵢ itself) lets any codec apply: a delta is gradient-like.
    With ``outer_lr`` = 1 and no momentum the result is plain averaging of the replicas; otherwise it is
    DiLoCo's outer step: x_anchor ← x_anchor − lr_out·NesterovMomentum(−Δ̄).
    The end-of-period parameter variance V = mean‖Δᵢ‖² − ‖Δ̄‖² costs one extra scalar all-reduce.
    """

    def __init__(self, group: CompressedGroup, params: list[tuple[str, torch.nn.Parameter]],
                 outer_lr: float = 1.0, outer_momentum: float = 0.0) -> None:
        self.group = group
        self.params = params
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.anchor = {n: p.detach().clone() for n, p in params}
        self.momentum: dict[str, torch.Tensor] = {}

    def reset_anchor(self) -> None:
        self.anchor = {n: p.detach().clone() for n, p in self.params}
        self.momentum.clear()

    def sync(self, step: int) -> tuple[Ledger, float]:
        deltas = {n: p.detach() - self.anchor[n] for n, p in self.params}
        local_sq = sum(float((d.double() ** 2).sum()) for d in deltas.values())
        mean_delta, ledger = self.group.allreduce_mean(deltas, step, measure=True)
        mean_sq = self.group.transport.all_reduce_sum(torch.tensor([local_sq], dtype=torch.float64))
        ledger.wire.append(WireRecord("allreduce", 1, (8,) * self.group.world))
        avg_sq = sum(float((d.double() ** 2).sum()) for d in mean_delta.values())
        variance = max(0.0, float(mean_sq[0]) / self.group.world - avg_sq)
        with torch.no_grad():
            for n, p in self.params:
                update = mean_delta[n]
                if self.outer_momentum > 0 or self.outer_lr != 1.0:
                    g = -update  # the outer "gradient"
                    buf = self.momentum.get(n)
                    buf = g.clone() if buf is None else buf.mul_(self.outer_momentum).add_(g)
                    self.momentum[n] = buf
                    step_dir = g.add(buf, alpha=self.outer_momentum) if self.outer_momentum > 0 else g
                    self.anchor[n].add_(step_dir, alpha=-self.outer_lr)
                else:
                    self.anchor[n].add_(update)
                p.copy_(self.anchor[n])
        return ledger, variance

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": {n: t.cpu().clone() for n, t in self.anchor.items()},
                "momentum": {n: t.cpu().clone() for n, t in self.momentum.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.params[0][1].device
        self.anchor = {n: t.to(device) for n, t in state["anchor"].items()}
        self.momentum = {n: t.to(device) for n, t in state["momentum"].items()}


@dataclass
class LAQState:
    """Per-run LAQ bookkeeping, identical on every worker (it sees every upload)."""

    refs: list[torch.Tensor]                  # Q_m(θ̂_m) for every worker m (the stale references)
    aggregate: torch.Tensor                   # Σ_m Q_m(θ̂_m), maintained incrementally
    own_err_sq: float = 0.0                   # ‖ε̂‖² at this worker's last upload
    skips: int = 0                            # t_m: steps since this worker's last upload
    diffs: deque = field(default_factory=deque)  # ‖θ^{k+1−d} − θ^{k−d}‖², newest first
    uploads: int = 0
    rounds: int = 0


class LAQ:
    """Lazily aggregated quantized gradients (§4) over the group's byte transport.

    Mean convention (§4.5 "sum vs mean"): with ∇ = (1/M)Σ_m Q_m and step lr, the paper's threshold
    1/(α²M²) becomes 1/lr² (the trainer passes lr/(1−β) under momentum β). Worker m skips when
        ‖δQ_m‖² ≤ (1/lr²)·Σ_d ξ_d‖θ^{k+1−d} − θ^{k−d}‖² + c(‖ε_m^k‖² + ‖ε̂_m‖²)   and  t_m < t̄,
    with ξ_d = xi/D and c = error_weight (3 in the paper, 1.5 in SLAQ's code). A skipping worker sends a header-only packet (its bytes are counted).
    """

    mode = "laq"

    def __init__(self, group: CompressedGroup, numels: list[tuple[str, int]], bits: int = 4, memory: int = 10,
                 xi: float = 0.8, max_skips: int = 100, error_weight: float = 3.0,
                 device: torch.device | None = None) -> None:
        self.group = group
        self.segments = numels
        self.quantizer = LAQQuantizer(bits=bits)
        self.memory = memory
        self.xi = xi
        self.max_skips = max_skips
        self.error_weight = error_weight
        d = sum(n for _, n in numels)
        dev = device or torch.device("cpu")
        self.state = LAQState(refs=[torch.zeros(d, device=dev) for _ in range(group.world)],
                              aggregate=torch.zeros(d, device=dev), diffs=deque(maxlen=memory))

    def should_sync(self, step: int, stats: SyncStats | None = None) -> bool:
        return True

    def observe_params(self, diff_sq: float) -> None:
        self.state.diffs.appendleft(diff_sq)

    def threshold(self, lr: float) -> float:
        k = len(self.state.diffs)
        if k == 0:
            return 0.0
        weight = self.xi / self.memory if k >= self.memory else self.xi / k  # ck/k for k ≤ D (reference code)
        return weight * sum(self.state.diffs) / lr**2

    def exchange(self, grads: dict[str, torch.Tensor], step: int, lr: float) -> tuple[dict[str, torch.Tensor], Ledger, bool]:
        s = self.state
        rank, world = self.group.rank, self.group.world
        ledger = Ledger()
        g = torch.cat([grads[n].detach().reshape(-1).to(torch.float32) for n, _ in self.segments])
        ledger.elements = g.numel()
        innovation = g - s.refs[rank]
        packets, deltas = [], []
        offset = 0
        for name, n in self.segments:
            info = TensorInfo(name, (n,), worker=rank, world=world, step=step)
            p = self.quantizer.encode(innovation[offset:offset + n], info)
            packets.append(p)
            deltas.append(self.quantizer.decode(p, info))
            offset += n
        delta = torch.cat(deltas)
        err_sq = float(((s.refs[rank] + delta - g) ** 2).sum())
        change_sq = float((delta**2).sum())
        skip = (change_sq <= self.threshold(lr) + self.error_weight * (err_sq + s.own_err_sq)) and s.skips < self.max_skips
        if skip:
            frame = Packet(self.quantizer.name, g.numel(), ()).to_bytes()
        else:
            frame = b"".join(p.to_bytes() for p in packets)
        ledger.bytes_up = len(frame)
        ledger.packets = 1 if skip else len(packets)
        ledger.rounds = 1
        frames = self.group.transport.all_gather_bytes(frame)
        ledger.bytes_down = sum(len(f) for w, f in enumerate(frames) if w != rank)
        ledger.wire.append(WireRecord("allgather", 1, tuple(len(f) for f in frames)))
        for w, data in enumerate(frames):
            first, pos = Packet.read(data, 0)
            if not first.fields:
                continue
            parts = [first]
            while pos < len(data):
                p, pos = Packet.read(data, pos)
                parts.append(p)
            if len(parts) != len(self.segments):
                raise ValueError(f"LAQ frame from worker {w} holds {len(parts)} packets, expected {len(self.segments)}")
            decoded = torch.cat([self.quantizer.decode(p.to(g.device), TensorInfo(nm, (n,)))
                                 for p, (nm, n) in zip(parts, self.segments)])
            s.refs[w] += decoded
            s.aggregate += decoded
            s.uploads += 1
        s.rounds += 1
        if skip:
            s.skips += 1
        else:
            s.skips = 0
            s.own_err_sq = err_sq
        mean = s.aggregate / world
        out, offset = {}, 0
        for name, n in self.segments:
            out[name] = mean[offset:offset + n].view(grads[name].shape)
            offset += n
        return out, ledger, not skip

    def invariant_error(self) -> float:
        """|Σ_m Q_m(θ̂_m) − ∇| (T9): zero up to float rounding."""
        return float((torch.stack(self.state.refs).sum(0) - self.state.aggregate).abs().max())

    def reset_worker(self, worker: int) -> None:
        """Churn (§4.5, §16): remove a departed worker's stale reference and force its next upload."""
        s = self.state
        s.aggregate -= s.refs[worker]
        s.refs[worker].zero_()
        if worker == self.group.rank:
            s.skips, s.own_err_sq = 0, 0.0

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {"refs": [r.cpu().clone() for r in s.refs], "aggregate": s.aggregate.cpu().clone(),
                "own_err_sq": s.own_err_sq, "skips": s.skips, "diffs": list(s.diffs), "uploads": s.uploads,
                "rounds": s.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.state
        dev = s.aggregate.device
        s.refs = [r.to(dev) for r in state["refs"]]
        s.aggregate = state["aggregate"].to(dev)
        s.own_err_sq, s.skips, s.uploads, s.rounds = state["own_err_sq"], state["skips"], state["uploads"], state["rounds"]
        s.diffs = deque(state["diffs"], maxlen=self.memory)

