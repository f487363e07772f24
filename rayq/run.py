"""The run harness: everything a collective trainer's loop needs around it, so the loop is only the loop.

One :class:`Run` per Ray Train worker holds the device, the task and its data plan, the model and
optimizer (restored from a checkpoint when there is one), the transport every byte goes through,
the fault plan and the virtual clock, TensorBoard, the trace and the event log, and the report /
evaluate / checkpoint cadence. A trainer builds its exchange (a compressed group and a schedule, or
a DDP hook) on top and calls, per step::

    faults = run.begin(step)      # the fault plan fires; rejoining workers resynchronise
    x, y = run.batch(step)        # this worker's shard of the step's batch
    ...                           # forward, backward, exchange, optimizer step: the trainer's own
    run.end(step, loss, outcome)  # clock, trace, metrics, report, evaluation, checkpoint

Data order and every codec's randomness derive from (seed, step, rank), so a run resumed from any
checkpoint continues bit-exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from compressors.base import mix_seed
from compressors.policy import Override, Policy
from compressors.staging import to_device
from rayq import checkpoint as ckpt
from rayq.collective import CompressedGroup, Ledger
from rayq.config import RunConfig, from_dict
from rayq.faults import CollectiveFaults, FaultPlan, StepFaults
from rayq.netsim import VirtualClock, step_comm_seconds
from rayq.privacy.membership import MembershipProbe
from rayq.profiles import load_profile
from rayq.schedules import Outcome, Replica
from rayq.tasks import Split, get_task
from rayq.telemetry import EventLog, TensorBoardLog
from rayq.transport import Purpose, TorchTransport, Transport

log = logging.getLogger(__name__)


#: Extra figures at an evaluation (``privacy/*``, ...); the argument says whether it is the run's last one.
#: Called on every worker in the same order; one that makes collective calls must make them on every worker.
Evaluator = Callable[[bool], dict[str, float]]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Plan:
    steps_per_epoch: int
    total_steps: int
    batch_size: int


def make_plan(cfg: RunConfig, n_train: int, world: int) -> Plan:
    per_worker = n_train // world
    batch = min(int(cfg.batch_size or 1), per_worker)
    steps_per_epoch = max(1, per_worker // batch)
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil(float(cfg.epochs or 1) * steps_per_epoch)
    return Plan(steps_per_epoch, max(1, total), batch)


def batch_indices(seed: int, epoch: int, step_in_epoch: int, rank: int, world: int, n: int, batch: int) -> torch.Tensor:
    """Shard a per-epoch permutation across workers (like DistributedSampler) and take one batch."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0xDA7A))
    perm = torch.randperm(n, generator=g)[rank::world]
    return perm[step_in_epoch * batch:(step_in_epoch + 1) * batch]


def build_model(cfg: RunConfig, task: Any) -> torch.nn.Module:
    """The task's model, with few-bit activations when ``model.fewbit_bits`` is set."""
    model = task.build_model()
    if cfg.model.fewbit_bits:
        from rayq.fewbit import swap_activations

        model = swap_activations(model, cfg.model.fewbit_bits)
    return model


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name in ("qcmd_adagrad", "qrda_adagrad"):
        from rayq.optimizers import build

        return build(o.name, model.parameters(), **o.kwargs())
    if o.name in ("blaq", "laq_weights"):
        from rayq.blaq import laq_param_groups
        from rayq.optimizers import build

        kw = o.kwargs()
        groups = laq_param_groups(model, kw.pop("projection"), kw.pop("bits"))
        return build(o.name, groups, **kw)
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.sgd_momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.sgd_momentum > 0)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def build_policy(cfg: RunConfig) -> Policy:
    c = cfg.compression
    return Policy(c.codec, c.params, error_feedback=c.error_feedback, min_numel=c.min_numel,
                  bucket_small=c.bucket_small, overrides=[Override(o.pattern, o.codec, o.params) for o in c.overrides],
                  bucket_mb=c.bucket_mb)


def model_sparsity(model: torch.nn.Module) -> float:
    """The fraction of the model's parameters that are exactly zero (ℓ1-regularised optimizers make them)."""
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return zeros / total if total else 0.0


@dataclass
class Window:
    """The figures accumulated between two reports."""

    ledger: Ledger = field(default_factory=Ledger)
    loss: float = 0.0
    steps: int = 0
    compute_s: float = 0.0
    exposed_s: float = 0.0
    sim_comm_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def metrics_of(done: int, plan: Plan, window: Window, wall_s: float, bytes_total: int, skipped: int,
               loss_mean: float) -> dict[str, Any]:
    """The figures every collective trainer reports for one window (TensorBoard tags)."""
    w, n = window.ledger, max(window.steps, 1)
    m: dict[str, Any] = {
        "step": done, "epoch": done / plan.steps_per_epoch,
        "train/loss": loss_mean,
        "comm/bits_per_element": w.bits_per_element,
        "comm/compression_ratio": w.compression_ratio,
        "comm/bytes_up": w.bytes_up / n,
        "comm/bytes_down": w.bytes_down / n,
        "comm/bytes_up_wire": w.wire_up / n,
        "comm/bytes_down_wire": w.wire_down / n,
        "comm/padding_bytes": w.padding / n,
        "comm/control_bytes": w.purpose_up(Purpose.CONTROL) / n,
        "comm/state_bytes": w.purpose_up(Purpose.STATE) / n,
        "comm/bytes_up_total": bytes_total,
        "comm/packets": w.packets / n,
        "comm/elements": w.elements / n,
        "time/compute_s": window.compute_s / n,
        "time/encode_s": w.encode_s / n,
        "time/comm_s": w.comm_s / n,
        "time/decode_s": w.decode_s / n,
        "time/exposed_comm_s": window.exposed_s / n,
        "time/step_s": (time.perf_counter() - window.started) / n,
        "time/wall_s": wall_s,
        "train/skipped_steps": skipped,
    }
    if w.distortion is not None:
        m["comm/distortion"] = w.distortion
    return m


def forget_nonfinite(tracked: dict[str, Any]) -> list[str]:
    """After a step skipped for NaN/Inf (``on_nonfinite=skip``): every tracked object forgets the state that took
    them in (error-feedback memories, PowerSGD's warm start, LAQ's references), which would otherwise carry them
    into every later step; what was forgotten."""
    return [name for obj in tracked.values() for name in getattr(obj, "drop_nonfinite", list)()]


class Run:
    """One worker's run: setup, restore, per-step bookkeeping and reporting (see the module docstring)."""

    def __init__(self, loop_config: dict[str, Any], transport: Transport | None = None) -> None:
        import ray.train

        self.cfg: RunConfig = from_dict(RunConfig, loop_config["config"])
        self.run_dir = Path(loop_config["run_dir"])
        self.progress = loop_config.get("progress")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(1)
        cfg = self.cfg
        if cfg.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        self.task = get_task(cfg.task)
        self.train, self.test = self.task.load(cfg.data_dir)
        #: On a GPU the training set (up to 2 GiB) is also copied there once, and batches are taken on the
        #: device: a copy from pageable host memory at every step would make the host wait for the device.
        self._on_device = None
        if self.device.type == "cuda" and self.train.x.numel() * self.train.x.element_size() <= 2 << 30:
            self._on_device = (self.train.x.to(self.device), self.train.y.to(self.device))
        self.plan = make_plan(cfg, len(self.train), self.world)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.task).to(self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.replica = Replica(self.model, self.optimizer, cfg.on_nonfinite, self.rank, cfg.optimizer.needs_closure)
        if transport is None:
            import torch.distributed as dist

            transport = TorchTransport(self.device if dist.get_backend() == "nccl" else torch.device("cpu"),
                                       gather=cfg.compression.gather)
        self.transport = transport
        self.tracked: dict[str, Stateful] = {}
        self.start_step, self.bytes_total, self.skipped, wall_offset = 0, 0, 0, 0.0
        self.saved: dict[str, Any] | None = None
        meta: dict[str, Any] = {}
        restored = None if loop_config.get("fresh") else ray.train.get_checkpoint()
        self.source = "restart" if restored else ("resume" if cfg.resume else None)
        if restored is not None:
            with restored.as_directory() as d:
                meta = self._load(Path(d))
        elif cfg.resume:
            meta = self._load(Path(cfg.resume))
        elif self.world > 1:  # identical replicas even if a task's initialisation is not seeded
            self.transport.broadcast([p.data for p in self.model.parameters()], src=0)
        wall_offset = meta.get("wall_s", 0.0)
        self.clock, self.links, profile = None, None, None
        if cfg.cluster is not None:
            profile = load_profile(cfg.cluster, self.world, cfg.seed)
            self.clock, self.links = VirtualClock(self.world, profile.speed_factors), profile.links
            if meta.get("clock"):
                self.clock.load_state_dict(meta["clock"])
        self.trace = open(self.run_dir / "trace.jsonl", "a") if self.rank == 0 else None
        self.tb = TensorBoardLog(self.run_dir / "tensorboard") if self.rank == 0 else None
        if self.tb is not None and self.source:
            self.tb.text("run/events", f"{self.source} from step {self.start_step}", self.start_step)
        self.faults: CollectiveFaults | None = None
        fault_plan = FaultPlan.from_config(cfg, profile)
        if not fault_plan.empty:  # every worker applies the same plan; rank 0 logs its events
            emit = self.progress.put_nowait if self.progress is not None else None
            events = EventLog(self.run_dir, self.tb, emit) if self.rank == 0 else None
            self.faults = CollectiveFaults(fault_plan, self.rank, self.world, self.run_dir, self.start_step,
                                           profile.speed_factors if profile else None, cfg.faults.deadline,
                                           cfg.faults.restart_s, events)
        self.window = Window(ledger=Ledger(rank=self.rank))
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, float] = {}
        self.evaluators: list[Evaluator] = []
        if cfg.privacy.membership and self.rank == 0:  # rank 0 only, no collective calls
            probe = MembershipProbe.sample((self.train.x, self.train.y), (self.test.x, self.test.y),
                                           cfg.privacy.membership_samples, cfg.seed)
            self.evaluators.append(lambda final: probe.metrics(self.model, self.device))
        self.wall_start = time.perf_counter() - wall_offset
        self._last_end = time.perf_counter()
        self.model.train()

    # -- what a trainer builds on ----------------------------------------------------------------------
    def group(self) -> CompressedGroup:
        """The compressed group of ``compression.*`` over this run's transport."""
        return CompressedGroup(build_policy(self.cfg), self.transport, seed=self.cfg.seed,
                               strategy=self.cfg.compression.strategy,
                               lossy=self.faults is not None and self.faults.plan.damages_payloads)

    def track(self, **objects: Stateful) -> None:
        """Checkpoint these objects with the run, and restore their saved state now if there is one."""
        for name, obj in objects.items():
            self.tracked[name] = obj
            if self.saved is not None and name in self.saved:
                obj.load_state_dict(self.saved[name])

    def steps(self) -> range:
        return range(self.start_step, self.plan.total_steps)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.plan.steps_per_epoch)
        idx = batch_indices(self.cfg.seed, epoch, i, self.rank, self.world, len(self.train), self.plan.batch_size)
        if self._on_device is not None:
            idx = to_device(idx, torch.int64, self.device)
            return self._on_device[0][idx], self._on_device[1][idx]
        return self.train.x[idx].to(self.device), self.train.y[idx].to(self.device)

    def measuring(self, step: int) -> bool:
        """Whether this step measures distortion (it costs a decode): the steps that report."""
        return self._reports(step)

    # -- per step --------------------------------------------------------------------------------------
    def begin(self, step: int) -> StepFaults | None:
        """Fire the fault plan at ``step`` (it may crash or delay this worker and arm its transport); a worker
        that rejoins or heals resets its codec state and takes the current model (a broadcast, counted)."""
        if self.faults is None:
            return None
        if step == self.start_step:  # after a restart: log what the crash cost, with the restored EF memory
            self.faults.resumed(self.source, self.clock, self._residual_norm())
        view = self.faults.begin(step, self.clock.now if self.clock is not None else None, self.transport)
        for obj in self.tracked.values():
            resync = getattr(obj, "resync", None)
            if resync is not None:
                resync(view)
        if view.resync:
            if self.rank in view.resync:
                for obj in self.tracked.values():
                    reset = getattr(obj, "reset", None)
                    if reset is not None:
                        reset()
            if view.source is not None:
                tensors = list(self.model.parameters()) + [b for b in self.model.buffers() if b.is_floating_point()]
                self.transport.broadcast([t.data for t in tensors], src=view.source)
        return view

    def end(self, step: int, loss: torch.Tensor, outcome: Outcome, faults: StepFaults | None = None) -> None:
        """Book one step: the simulated clock, the trace, the window; report, evaluate and checkpoint on cadence."""
        ledger = outcome.ledger
        ledger.rank = self.rank
        if not outcome.applied:  # skipped for NaN/Inf: no memory may carry them into the next steps
            self.skipped += 1
            dropped = forget_nonfinite(self.tracked)
            if dropped:
                log.warning("step %d skipped (non-finite); rank %d forgets the state that took in NaN/Inf: %s", step,
                            self.rank, ", ".join(dropped))
        self.bytes_total += ledger.bytes_up
        self.window.loss += float(loss.detach())
        outcome.resolve()  # the loss read has waited for the device: its frame checks and times are ready too
        compute_s = outcome.compute_s
        self.window.steps += 1
        self.window.compute_s += compute_s
        self.window.exposed_s += outcome.exposed_s
        done = step + 1
        report = self._reports(step)
        extra: dict[str, Any] = {}
        if report:
            loss_mean = float(self._control(torch.tensor([self.window.loss / self.window.steps],
                                                         dtype=torch.float64))[0]) / self.world
            if self._due(done, self.cfg.eval_every) or done == self.plan.total_steps:
                self.replica.average_buffers(self.transport)
                acc, eval_loss = self.evaluate()
                self.last_eval = {"eval/accuracy": acc, "eval/loss": eval_loss}
                for evaluator in self.evaluators:
                    self.last_eval.update(evaluator(done == self.plan.total_steps))
                if self.trace is not None:
                    self.trace.write(json.dumps({"eval_step": done, **self.last_eval}) + "\n")
                    self.trace.flush()
            extra["train/loss"] = loss_mean
        ledger.wire.extend(self.transport.take_records())  # what else moved this step: resync, reports, evaluation
        if self.clock is not None:
            comm = step_comm_seconds(ledger.wire, self.links)
            if faults is not None and self.faults is not None:
                self.faults.advance_clock(self.clock, faults, compute_s, comm)
            else:
                self.clock.step(compute_s, comm)
            self.window.sim_comm_s += comm
        now = time.perf_counter()
        if self.trace is not None:  # wall_s: this step's wall time, end to end (the first one includes start-up)
            self.trace.write(json.dumps({"step": done, "compute_s": compute_s, "wall_s": now - self._last_end,
                                         "exposed_s": outcome.exposed_s, "encode_s": ledger.encode_s,
                                         "decode_s": ledger.decode_s, "comm_s": ledger.comm_s,
                                         "wire": [w.to_json() for w in ledger.wire], **self._fault_trace(faults)}) + "\n")
        self._last_end = now
        if faults is not None and self.faults is not None:
            self.faults.after_exchange(step, ledger)
        self.window.ledger.add(ledger)
        if report:
            self._report(done, extra["train/loss"], faults)

    def _report(self, done: int, loss_mean: float, faults: StepFaults | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        m = metrics_of(done, self.plan, self.window, time.perf_counter() - self.wall_start, self.bytes_total,
                       self.skipped, loss_mean)
        if self.clock is not None:
            m["sim/time_s"] = self.clock.now
            m["sim/comm_s"] = self.window.sim_comm_s / max(self.window.steps, 1)
        for obj in self.tracked.values():
            for k, v in getattr(obj, "metrics", dict)().items():
                m[k] = v
        m["model/sparsity"] = model_sparsity(self.model)
        zigzag = getattr(self.optimizer, "zigzag", None)
        if zigzag is not None:
            m.update(zigzag().metrics())
        norm = self._residual_norm()
        if norm:
            m["comm/ef_residual_norm"] = norm
        if self.faults is not None:
            m.update(self.faults.metrics(faults))
        m.update(self.last_eval)
        if self.tb is not None:
            self.tb.scalars(m, done)
        if self.progress is not None and self.rank == 0:
            self.progress.put_nowait({**m, "total_steps": self.plan.total_steps})
        if self._due(done, self.cfg.checkpoint_every) or done == self.plan.total_steps:
            with tempfile.TemporaryDirectory() as tmp:
                self._save(Path(tmp), done, m)
                ray.train.report(m, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(m)
        self.last = m
        self.window = Window(ledger=Ledger(rank=self.rank))

    def finish(self) -> dict[str, Any]:
        """Close the files; the final metrics for the driver's summary."""
        if self.trace is not None:
            self.trace.close()
        if self.faults is not None and self.faults.log is not None:
            self.faults.log.close()
        if self.tb is not None:
            kept = ("eval/", "comm/bits", "comm/comp", "privacy/")
            final = {k: v for k, v in self.last.items() if k.startswith(kept)}
            self.tb.hparams(self.cfg.to_dict(), final)
            self.tb.close()
        return {**self.last, "steps_total": self.plan.total_steps, "start_step": self.start_step}

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluate(self) -> tuple[float, float]:
        """Each worker scores its shard of the held-out split; counts are summed over the group (control)."""
        self.model.eval()
        x, y = self.test.x[self.rank::self.world], self.test.y[self.rank::self.world]
        correct, loss_sum = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, len(y), 1024):
                xb, yb = x[i:i + 1024].to(self.device), y[i:i + 1024].to(self.device)
                out = self.model(xb)
                loss_sum += F.cross_entropy(out, yb, reduction="sum").double().cpu()
                correct += (out.argmax(1) == yb).sum().double().cpu()
        totals = self._control(torch.stack([correct, loss_sum, torch.tensor(float(len(y)), dtype=torch.float64)]))
        self.model.train()
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])

    # -- checkpoints -----------------------------------------------------------------------------------
    def _save(self, directory: Path, done: int, m: dict[str, Any]) -> None:
        model_state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "rng": torch.get_rng_state()} if self.rank == 0 else None
        meta = {"step": done, "world": self.world, "wall_s": m["time/wall_s"], "skipped": self.skipped,
                "clock": self.clock.state_dict() if self.clock is not None else None,
                "bytes_up_total": self.bytes_total, "task": self.cfg.task, "codec": self.cfg.compression.codec,
                "trainer": self.cfg.trainer}
        ckpt.save(directory, self.rank, model_state=model_state,
                  worker_state={k: v.state_dict() for k, v in self.tracked.items()}, meta=meta)

    def _load(self, directory: Path) -> dict[str, Any]:
        state, worker = ckpt.load(directory, self.rank)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        meta = state["meta"]
        self.start_step, self.bytes_total = meta["step"], meta.get("bytes_up_total", 0)
        self.skipped = meta.get("skipped", 0)
        self.saved = worker
        return meta

    # -- helpers ---------------------------------------------------------------------------------------
    def _reports(self, step: int) -> bool:
        return (step + 1) % max(self.cfg.report_every, 1) == 0 or step + 1 == self.plan.total_steps

    def _due(self, done: int, every: int) -> bool:
        steps = self.window.steps
        return bool(every) and (done // every) > ((done - steps) // every)

    def _control(self, t: torch.Tensor) -> torch.Tensor:
        return self.transport.all_reduce_sum(t, Purpose.CONTROL) if self.world > 1 else t

    @staticmethod
    def _fault_trace(faults: StepFaults | None) -> dict[str, Any]:
        """What a replay needs of a step's faults: compute slowdowns and whose contribution counted (the
        absent neither compute nor count)."""
        if faults is None:
            return {}
        return {"slowdown": [s if p else 0.0 for s, p in zip(faults.slowdown, faults.present)],
                "counted": [w > 0 for w in faults.weights]}

    def _residual_norm(self) -> float:
        return sum(getattr(o, "residual_norm", lambda: 0.0)() for o in self.tracked.values())
