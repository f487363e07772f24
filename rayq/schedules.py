"""What is averaged, and when: one contract for every schedule.

A :class:`Schedule` is handed each step's backward pass (a closure) and the step's faults, runs it,
exchanges what it needs through the compressed group, applies the update with the replica's optimizer,
and returns an :class:`~rayq.replica.Outcome` (the ledger, whether it synced and applied, the loss, the
compute time and the communication the step waited for). The training loop never branches on the kind:

* :class:`EveryStep` — gradients averaged every step (synchronous data-parallel SGD);
* :class:`Periodic` — local SGD: every ``period`` steps the replicas average their *model delta* since
  the last sync (CPSGD; Jiang & Agrawal, SC 2020), optionally through DiLoCo's outer Nesterov step
  (Douillard et al., 2023);
* :class:`Adaptive` — like periodic, with the period rescaled after each sync so the end-of-period
  parameter variance stays near κ·V_ref (ADPSGD's principle; the controller is our reconstruction);
* :class:`~rayq.laq.LAQ` — lazily aggregated quantized gradients (Sun, Chen, Giannakis, Yang, NeurIPS 2019): a
  worker uploads its gradient *innovation* through its codec only when it changed enough; receivers
  keep every worker's last upload.

Every schedule is checkpointable (``state_dict``) and reports its own figures (``metrics``).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Iterator, Protocol

import torch

from compressors.base import mix_seed
from rayq.collective import CompressedGroup, Ledger
from rayq.faults import StepFaults
from rayq.laq import LAQ
from rayq.replica import Backward, Outcome, Replica, run_backward, timed, weights_of


class Schedule(Protocol):
    def step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None = None) -> Outcome:
        """Run ``backward`` (this worker's forward and backward pass; None: the gradients are already in the
        replica's ``p.grad``), exchange, and apply the update. The schedule decides when backward runs: before
        the exchange, beside it (overlap), or twice (an optimizer with a trial point)."""
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


# ---------------------------------------------------------------------------------------- every step


class EveryStep:
    """Synchronous data-parallel SGD: the (weighted) mean of the decoded gradients, every step.

    With ``overlap`` the exchange runs beside the backward pass, as DDP's buckets do: each entry of the
    group's plan (a tensor, or a flat bucket) is exchanged on a communication thread as soon as backward has
    produced all of its gradients, in one fixed order on every worker (the reverse of the model, as
    gradients appear); the step waits only for what backward did not hide (``Outcome.exposed_s``).
    """

    def __init__(self, replica: Replica, group: CompressedGroup, overlap: bool = False) -> None:
        self.replica, self.group, self.overlap = replica, group, overlap
        self.syncs = 0
        self._units: list[_Unit] | None = None

    def step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None = None) -> Outcome:
        if self.replica.needs_closure:
            return self._closure_step(step, faults, measure, backward)
        if self.overlap and backward is not None:
            return self._overlapped(step, faults, measure, backward)
        clock = self.replica.clock
        loss, compute = run_backward(backward, clock)
        started = clock.now()
        grads = self.replica.grads()
        averaged, ledger = self.group.allreduce_mean(grads, step, measure=measure, weights=weights_of(faults))
        self.syncs += 1
        return timed(Outcome(ledger, True, self.replica.apply(averaged, grads, step)), clock, compute, started, loss)

    # -- overlap ----------------------------------------------------------------------------------------------
    def _prepare_units(self) -> list[_Unit]:
        if self._units is None:
            index = {n: i for i, (n, _) in enumerate(self.replica.params)}
            plan = self.group.plan({n: p.detach() for n, p in self.replica.params})
            by_name = dict(self.replica.params)
            self._side = SideStream(self.replica.params[0][1].device)
            units = [_Unit(e, [by_name[m] for m in e.members], self._side) for e in plan]  # members in entry order
            units.sort(key=lambda u: -min(index[m] for m in u.entry.members))  # the order backward completes them
            for u in units:
                for p in u.params:
                    p.register_post_accumulate_grad_hook(u.ready_one)
            self._units = units
        return self._units

    def _overlapped(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward) -> Outcome:
        units = self._prepare_units()
        side = self._side
        side.begin()
        for u in units:
            u.arm()
        results: list[tuple[dict[str, torch.Tensor], Ledger]] = []
        failure: list[BaseException] = []

        def communicate() -> None:
            try:
                with side.active():
                    for u in units:
                        u.done.wait()
                        side.wait(u.event)  # the device too waits for backward's kernels of this unit
                        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                                 for n, p in zip(u.entry.members, u.params)}
                        out, part = self.group.allreduce_entries([u.entry], grads, step, measure,
                                                                 weights_of(faults))
                        side.hand_over(out.values())
                        results.append((out, part))
            except BaseException as err:  # noqa: BLE001 - re-raised on the training thread
                failure.append(err)

        thread = threading.Thread(target=communicate, name="rayq-overlap", daemon=True)
        thread.start()
        clock = self.replica.clock
        t0 = clock.now()
        try:
            loss = backward()
        finally:
            for u in units:  # a parameter that got no gradient never fires its hook: ready after backward
                if not u.done.is_set():
                    u.ready_all()
        compute = (t0, clock.now())
        started = compute[1]
        thread.join()
        side.join()  # the update (on the training stream) waits for the exchange's kernels
        if failure:
            raise failure[0]
        averaged: dict[str, torch.Tensor] = {}
        ledger = Ledger(rank=self.group.rank)
        for out, part in results:
            averaged.update(out)
            ledger.add(part)
        grads = self.replica.grads()
        self.syncs += 1
        return timed(Outcome(ledger, True, self.replica.apply(averaged, grads, step)), clock, compute, started, loss)

    def _closure_step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None) -> Outcome:
        """The optimizer asks for the averaged gradient as often as it needs it (BLAQ: twice); the first
        evaluation uses the gradients the loop computed, later ones recompute them at the new weights."""
        if backward is None:
            raise ValueError(f"optimizer {type(self.replica.optimizer).__name__} evaluates the gradient itself; "
                             "the trainer must pass schedule.step(..., backward=...)")
        clock = self.replica.clock
        loss, compute = run_backward(backward, clock)
        started = clock.now()
        ledger = Ledger(rank=self.group.rank)
        calls = [0]

        def closure() -> torch.Tensor:
            if calls[0]:
                backward()
            calls[0] += 1
            local = {n: g.detach().clone() for n, g in self.replica.grads().items()}
            averaged, part = self.group.allreduce_mean(local, step, measure=measure and calls[0] == 1,
                                                       weights=weights_of(faults))
            ledger.add(part)
            self.replica.finite(averaged, local, step, "averaged gradient")
            for n, p in self.replica.params:
                p.grad = averaged[n].detach().clone()
            return averaged[next(iter(averaged))]

        self.replica.optimizer.step(closure)
        ledger.elements //= max(calls[0], 1)  # the same elements, exchanged once per evaluation
        self.syncs += 1
        return timed(Outcome(ledger, True, True), clock, compute, started, loss)

    def resync(self, faults: StepFaults) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"sync/count": float(self.syncs)}

    def state_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.syncs = int(state.get("syncs", 0))


class _Unit:
    """One entry of the plan in an overlapped exchange: ready once backward has produced all its gradients.
    ``event`` marks that point on the stream that produced them (None on the CPU)."""

    def __init__(self, entry: Any, params: list[torch.nn.Parameter], side: SideStream) -> None:
        self.entry, self.params, self.side = entry, params, side
        self.done = threading.Event()
        self.event: Any = None
        self._left = len(params)
        self._lock = threading.Lock()

    def arm(self) -> None:
        self.done.clear()
        self.event = None
        self._left = len(self.params)

    def ready_one(self, _param: torch.Tensor) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.ready_all()

    def ready_all(self) -> None:
        self.event = self.side.mark()  # on the calling thread's current stream: autograd's, or the training one
        self.done.set()


class SideStream:
    """The CUDA stream an overlapped exchange runs on, beside backward's, as DDP's reducer does.

    On one stream the exchange's encode and decode kernels would queue behind the rest of backward and
    only the collectives (on NCCL's own stream) would overlap it. Here each unit's exchange waits on the
    device for the event marked when its gradients were produced (:meth:`wait`), its results are handed
    to the training stream (:meth:`hand_over`: the caching allocator keeps their memory until that stream
    is done with them), and the training stream waits for the whole exchange before the update
    (:meth:`join`). On the CPU there are no streams and every method does nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.main: Any = None

    def begin(self) -> None:
        """Called on the training thread before backward: its current stream is the one to hand back to."""
        if self.stream is not None:
            self.main = torch.cuda.current_stream(self.device)

    def mark(self) -> Any:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record()  # the current stream of the calling thread (the autograd engine sets it per gradient)
        return event

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the side stream the communication thread's current stream (and its device current)."""
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def wait(self, event: Any) -> None:
        if self.stream is not None and event is not None:
            self.stream.wait_event(event)

    def hand_over(self, tensors: Iterable[torch.Tensor]) -> None:
        if self.stream is not None:
            for t in tensors:
                t.record_stream(self.main)

    def join(self) -> None:
        if self.stream is not None:
            self.main.wait_stream(self.stream)


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
                 outer_momentum: float = 0.0, sketch: int = 1024, seed: int = 0, total_steps: int | None = None) -> None:
        if period < 1:
            raise ValueError(f"sync.period={period} must be >= 1")
        self.replica, self.group, self.period = replica, group, period
        #: The run's last step syncs whatever the period: the final model (evaluated, checkpointed) is the average.
        self.total_steps = total_steps
        self.averager = ModelAverager(replica, group, outer_lr, outer_momentum, sketch, seed)
        self.last_sync = 0
        self.syncs = 0
        self.variance = 0.0

    def should_sync(self, step: int) -> bool:
        return step + 1 - self.last_sync >= self.period or step + 1 == self.total_steps

    def step(self, step: int, faults: StepFaults | None, measure: bool, backward: Backward | None = None) -> Outcome:
        clock = self.replica.clock
        loss, compute = run_backward(backward, clock)
        started = clock.now()
        grads = self.replica.grads()
        applied = self.replica.finite(grads, grads, step, "local gradient")
        if applied:
            self.replica.optimizer.step()
        ledger = Ledger(rank=self.group.rank, elements=self.replica.elements)
        if not self.should_sync(step):
            return timed(Outcome(ledger, False, applied), clock, compute, started, loss)
        ledger, variance, finite = self.averager.sync(step, measure)
        self.observe(step, variance)
        return timed(Outcome(ledger, True, applied and finite), clock, compute, started, loss)

    def observe(self, step: int, variance: float) -> None:
        self.last_sync = step + 1
        self.syncs += 1
        self.variance = variance

    def resync(self, faults: StepFaults) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"sync/count": float(self.syncs), "sync/period": float(self.period), "sync/variance": self.variance}

    def state_dict(self) -> dict[str, Any]:
        """Between syncs every worker has its own model, and always its own inner optimizer state (momentum from
        its own gradients): both are this worker's, beside the run's copy of rank 0's."""
        model = {k: v.detach().cpu().clone() for k, v in self.replica.model.state_dict().items()}
        return {"period": self.period, "last_sync": self.last_sync, "syncs": self.syncs, "variance": self.variance,
                "averager": self.averager.state_dict(),
                "replica": {"model": model, "optimizer": self.replica.optimizer.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.period, self.last_sync, self.syncs = state["period"], state["last_sync"], state["syncs"]
        self.variance = state.get("variance", 0.0)
        self.averager.load_state_dict(state["averager"])
        if "replica" in state:
            self.replica.model.load_state_dict(state["replica"]["model"])
            self.replica.optimizer.load_state_dict(state["replica"]["optimizer"])


class Adaptive(Periodic):
    """ADPSGD's feedback controller (Jiang & Agrawal, SC 2020: keep the parameter variance in check;
    the update rule is our reconstruction).

    During ``warmup`` steps the period stays at p₀ and the end-of-period variances are averaged into
    V_ref. After that, each sync sets p ← clip(round(p·(κ·V_ref / V_end)^ω), p_min, p_max): a high
    variance (early training, large learning rate) shortens the period, a low one lengthens it.
    """

    def __init__(self, replica: Replica, group: CompressedGroup, period: int, p_min: int, p_max: int, kappa: float,
                 omega: float, warmup: int, outer_lr: float = 1.0, outer_momentum: float = 0.0, sketch: int = 1024,
                 seed: int = 0, total_steps: int | None = None) -> None:
        super().__init__(replica, group, period, outer_lr, outer_momentum, sketch, seed, total_steps)
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


# ---------------------------------------------------------------------------------------- factory


def build(cfg: Any, replica: Replica, group: CompressedGroup, steps_per_epoch: int,
          total_steps: int | None = None) -> Schedule:
    """The schedule ``cfg.sync`` names, over ``group``; model averaging also syncs at ``total_steps``' last step."""
    sc = cfg.sync
    if sc.schedule == "every_step":
        return EveryStep(replica, group, overlap=cfg.compression.overlap)
    if sc.schedule == "laq":
        return LAQ(replica, group, memory=sc.memory, xi=sc.xi, max_skips=sc.max_skips, error_weight=sc.error_weight)
    common = dict(outer_lr=sc.outer_lr, outer_momentum=sc.outer_momentum, sketch=sc.variance_sketch, seed=cfg.seed,
                  total_steps=total_steps)
    if sc.schedule == "periodic":
        return Periodic(replica, group, sc.period, **common)
    warmup = sc.warmup_steps or steps_per_epoch
    return Adaptive(replica, group, sc.period, sc.p_min, sc.p_max, sc.kappa, sc.omega, warmup, **common)

