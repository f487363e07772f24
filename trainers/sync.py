"""Trainer ``sync``: synchronous data-parallel SGD with compressed gradient averaging.

Runs inside every Ray Train worker. One loop a reader can hold in their head:

    batch → forward → backward → compressed all-reduce of gradients (rayq.collective) → optimizer step
    every report_every steps: metrics to Ray Train (+ TensorBoard and progress on rank 0)
    every checkpoint_every steps: model, optimizer, codec state, step (resumable from any checkpoint)

Data order and every codec's randomness derive from (seed, epoch/step, rank), so a run resumed from a
checkpoint continues bit-exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressors.base import mix_seed
from compressors.error_feedback import ErrorFeedback
from compressors.policy import Override, Policy
from rayq import checkpoint as ckpt
from rayq.collective import CompressedGroup, Ledger, TorchTransport
from rayq.config import RunConfig, from_dict
from rayq.faults import CollectiveFaults, FaultPlan
from rayq.netsim import VirtualClock, step_comm_seconds
from rayq.profiles import load_profile
from rayq.sync import LAQ, Adaptive, EveryStep, ModelAverager, Periodic, SyncStats
from rayq.tasks import Split, get_task
from rayq.telemetry import EventLog, TensorBoardLog


class NonFiniteGradientError(FloatingPointError):
    pass


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    batch_size: int


def make_plan(cfg: RunConfig, n_train: int, world: int) -> Plan:
    per_worker = n_train // world
    batch = min(cfg.batch_size, per_worker)  # type: ignore[type-var]
    steps_per_epoch = max(1, per_worker // batch)
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.epochs * steps_per_epoch)  # type: ignore[operator]
    return Plan(steps_per_epoch, max(1, total), batch)


def batch_indices(seed: int, epoch: int, step_in_epoch: int, rank: int, world: int, n: int, batch: int) -> torch.Tensor:
    """Shard a per-epoch permutation across workers (like DistributedSampler) and take one batch."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0xDA7A))
    perm = torch.randperm(n, generator=g)[rank::world]
    return perm[step_in_epoch * batch:(step_in_epoch + 1) * batch]


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def build_policy(cfg: RunConfig) -> Policy:
    c = cfg.compression
    return Policy(c.codec, c.params, error_feedback=c.error_feedback, min_numel=c.min_numel,
                  bucket_small=c.bucket_small,
                  overrides=[Override(o.pattern, o.codec, o.params) for o in c.overrides])


def window_metrics(done: int, plan: Plan, window: Ledger, loss_sum: float, steps: int, compute_s: float,
                   window_start: float, wall_start: float, bytes_total: int, skipped: int, syncs: int,
                   device: torch.device) -> dict[str, Any]:
    """The figures every trainer reports for one window of ``steps`` steps (TensorBoard tags)."""
    return {
        "step": done, "epoch": done / plan.steps_per_epoch,
        "train/loss": _mean_over_workers(loss_sum / steps, device),
        "comm/bits_per_element": window.bits_per_element,
        "comm/compression_ratio": window.compression_ratio,
        "comm/bytes_up": window.bytes_up / steps,
        "comm/bytes_down": window.bytes_down / steps,
        "comm/bytes_up_total": bytes_total,
        "comm/packets": window.packets / steps,
        "comm/elements": window.elements / steps,
        "time/compute_s": compute_s / steps,
        "time/encode_s": window.encode_s / steps,
        "time/comm_s": window.comm_s / steps,
        "time/decode_s": window.decode_s / steps,
        "time/step_s": (time.perf_counter() - window_start) / steps,
        "time/wall_s": time.perf_counter() - wall_start,
        "train/skipped_steps": skipped,
        "sync/count": syncs,
    }


def build_schedule(cfg: RunConfig, group: CompressedGroup, params: list, plan: Plan, device: torch.device):
    """The sync schedule, plus the model averager (periodic/adaptive) or LAQ bookkeeping it needs."""
    sc = cfg.sync
    if sc.schedule == "every_step":
        return EveryStep(), None, None
    if sc.schedule == "laq":
        laq = LAQ(group, [(n, p.numel()) for n, p in params], bits=sc.bits, memory=sc.memory, xi=sc.xi,
                  max_skips=sc.max_skips, error_weight=sc.error_weight, device=device)
        return laq, None, laq
    averager = ModelAverager(group, params, outer_lr=sc.outer_lr, outer_momentum=sc.outer_momentum)
    if sc.schedule == "periodic":
        return Periodic(sc.period), averager, None
    warmup = sc.warmup_steps or plan.steps_per_epoch
    return Adaptive(sc.period, sc.p_min, sc.p_max, sc.kappa, sc.omega, warmup), averager, None


def check_finite(averaged: dict[str, torch.Tensor], local: dict[str, torch.Tensor], step: int, rank: int,
                 strict: bool) -> bool:
    """NaN/Inf detection: one reduction over all tensors; name the worker's offending tensors."""
    if bool(torch.isfinite(torch.stack([a.float().norm() for a in averaged.values()]).sum())):
        return True
    if strict:
        bad = [n for n, g in local.items() if not torch.isfinite(g).all()]
        raise NonFiniteGradientError(
            f"step {step}: the averaged gradient is not finite (NaN/Inf); worker {rank}'s non-finite local "
            f"gradients: {bad or 'none'}. Lower optimizer.lr, or set on_nonfinite=skip")
    return False


def evaluate(model: nn.Module, test: Split, rank: int, world: int, device: torch.device) -> tuple[float, float]:
    """Each worker scores its shard of the held-out split; counts are summed over the group."""
    import torch.distributed as dist

    model.eval()
    x, y = test.x[rank::world], test.y[rank::world]
    correct = torch.zeros((), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(y), 1024):
            xb, yb = x[i:i + 1024].to(device), y[i:i + 1024].to(device)
            out = model(xb)
            loss_sum += F.cross_entropy(out, yb, reduction="sum").double().cpu()
            correct += (out.argmax(1) == yb).sum().double().cpu()
    totals = torch.stack([correct, loss_sum, torch.tensor(float(len(y)), dtype=torch.float64)])
    if dist.is_initialized():
        comm = totals.to(device) if dist.get_backend() == "nccl" else totals
        dist.all_reduce(comm)
        totals = comm.cpu()
    model.train()
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def average_buffers(model: nn.Module, device: torch.device) -> None:
    """BatchNorm running statistics differ per worker; average them so evaluation is consistent."""
    import torch.distributed as dist

    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs or not dist.is_initialized():
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    cfg: RunConfig = from_dict(RunConfig, loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    progress = loop_config.get("progress")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    if cfg.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")

    task = get_task(cfg.task)
    train, test = task.load(cfg.data_dir)
    plan = make_plan(cfg, len(train), world)
    torch.manual_seed(cfg.seed)
    model = task.build_model().to(device)
    optimizer = build_optimizer(cfg, model)
    policy = build_policy(cfg)
    transport = TorchTransport(device if dist.get_backend() == "nccl" else torch.device("cpu"))
    group = CompressedGroup(policy, transport, seed=cfg.seed, strategy=cfg.compression.strategy)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    schedule, averager, laq = build_schedule(cfg, group, params, plan, device)

    start_step, clock_offset, bytes_total = 0, 0.0, 0
    codec_state: dict | None = None
    # A sweep runs several configs in one worker group: the previous run's checkpoint is not ours.
    restored = None if loop_config.get("fresh") else ray.train.get_checkpoint()
    source = "restart" if restored else ("resume" if cfg.resume else None)
    if restored or cfg.resume:
        def _load(directory: Path) -> tuple[dict, dict | None]:
            return ckpt.load(directory, rank)

        if restored:
            with restored.as_directory() as d:
                state, codec_state = _load(Path(d))
        else:
            state, codec_state = _load(Path(cfg.resume))  # type: ignore[arg-type]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_step = state["meta"]["step"]
        clock_offset = state["meta"].get("wall_s", 0.0)
        bytes_total = state["meta"].get("bytes_up_total", 0)
        if codec_state is not None:
            group.load_state_dict(codec_state["policy"])
            for obj, key in ((schedule, "schedule"), (averager, "averager"), (laq, "laq")):
                if obj is not None and key in codec_state:
                    obj.load_state_dict(codec_state[key])
    elif world > 1:
        for p in model.parameters():  # identical replicas even if a task's init is not seeded
            dist.broadcast(p.data, src=0)

    if averager is not None and not (codec_state and "averager" in codec_state):
        averager.reset_anchor()  # the anchor is the model every replica starts this run from
    clock, links, profile = None, None, None
    if cfg.cluster is not None:
        profile = load_profile(cfg.cluster, world, cfg.seed)
        clock, links = VirtualClock(world, profile.speed_factors), profile.links
        if source and state["meta"].get("clock"):
            clock.load_state_dict(state["meta"]["clock"])
    trace = open(run_dir / "trace.jsonl", "a") if rank == 0 else None
    tb = TensorBoardLog(run_dir / "tensorboard") if rank == 0 else None
    if tb and source:
        tb.text("run/events", f"{source} from step {start_step}", start_step)
    faults, view, fault_plan = None, None, FaultPlan.from_config(cfg, profile)
    if not fault_plan.empty:  # rayq.faults: every worker applies the same plan; rank 0 logs its events
        events = EventLog(run_dir, tb, progress.put_nowait if progress is not None else None) if rank == 0 else None
        faults = CollectiveFaults(fault_plan, rank, world, run_dir, start_step, profile.speed_factors if profile else None,
                                  cfg.faults.deadline, cfg.faults.restart_s, events)
        group.transport = faults.wrap(group.transport)
        faults.resumed(source, clock, sum(c.residual_norm() for c in policy.stateful_codecs().values()
                                          if isinstance(c, ErrorFeedback)))
    window = Ledger()
    window_loss, window_steps, window_compute, window_start = 0.0, 0, 0.0, time.perf_counter()
    window_sim_comm = 0.0
    last: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    skipped, syncs, last_variance = 0, 0, 0.0
    wall_start = time.perf_counter() - clock_offset
    model.train()

    for step in range(start_step, plan.total_steps):
        if faults is not None:  # may crash or delay this worker; says who contributes to this step
            view = faults.begin(step, clock.now if clock is not None else None)
            faults.apply_churn(view, model, policy, laq)
        epoch, i = divmod(step, plan.steps_per_epoch)
        idx = batch_indices(cfg.seed, epoch, i, rank, world, len(train), plan.batch_size)
        t0 = time.perf_counter()
        xb, yb = train.x[idx].to(device), train.y[idx].to(device)
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        grads = {n: p.grad for n, p in params}
        t1 = time.perf_counter()
        report_now = (step + 1) % max(cfg.report_every, 1) == 0 or step + 1 == plan.total_steps
        if schedule.mode == "model":  # local step; average the model delta when the schedule says so
            if check_finite(grads, grads, step, rank, cfg.on_nonfinite == "raise"):
                optimizer.step()
            else:
                skipped += 1
            ledger = Ledger(elements=sum(p.numel() for _, p in params))
            if schedule.should_sync(step):
                ledger, variance = averager.sync(step)  # type: ignore[union-attr]
                average_buffers(model, device)
                schedule.observe(SyncStats(step, step + 1 - schedule.last_sync, variance))  # type: ignore[attr-defined]
                syncs += 1
                last_variance = variance
        else:
            if laq is not None:
                before = torch.cat([p.detach().reshape(-1) for _, p in params]).clone()
                group0 = optimizer.param_groups[0]
                # With momentum β a step moves θ by ≈ lr/(1−β)·∇: that is the step size LAQ's rule compares with.
                lr_eff = group0["lr"] / (1.0 - group0.get("momentum", 0.0)) if "momentum" in group0 else group0["lr"]
                away = view is not None and not view.present[rank]
                averaged, ledger, uploaded = laq.exchange({n: g * 0 for n, g in grads.items()} if away else grads,
                                                          step, lr_eff)
                averaged = view.rescale(averaged) if view is not None else averaged
                syncs += int(uploaded)
            else:
                averaged, ledger = group.allreduce_mean(grads, step, measure=report_now,
                                                        weights=view.weights if view is not None else None)
                if faults is not None:
                    faults.after_exchange(step, ledger)
                syncs += 1
            if check_finite(averaged, grads, step, rank, cfg.on_nonfinite == "raise"):
                for n, p in params:
                    p.grad.copy_(averaged[n])
                optimizer.step()
            else:
                skipped += 1
            if laq is not None:
                after = torch.cat([p.detach().reshape(-1) for _, p in params])
                laq.observe_params(float(((after - before) ** 2).sum()))
        window.add(ledger)
        bytes_total += ledger.bytes_up
        if clock is not None:
            comm = step_comm_seconds(ledger.wire, links)
            if view is not None:
                faults.advance_clock(clock, view, t1 - t0, comm)  # type: ignore[union-attr]
            else:
                clock.step(t1 - t0, comm)
            window_sim_comm += comm
        if trace is not None:
            trace.write(json.dumps({"step": step + 1, "compute_s": t1 - t0,
                                    "wire": [[w.kind, w.rounds, list(w.bytes_up)] for w in ledger.wire]}) + "\n")
        window_loss += float(loss.detach())
        window_steps += 1
        window_compute += t1 - t0

        if not report_now:
            continue
        done = step + 1
        metrics: dict[str, Any] = window_metrics(done, plan, window, window_loss, window_steps, window_compute,
                                                 window_start, wall_start, bytes_total, skipped, syncs, device)
        if clock is not None:
            metrics["sim/time_s"] = clock.now
            metrics["sim/comm_s"] = window_sim_comm / window_steps
        if schedule.mode == "model":
            metrics["sync/period"] = schedule.period  # type: ignore[attr-defined]
            metrics["sync/variance"] = last_variance
        if laq is not None:
            metrics["sync/uploads"] = laq.state.uploads
            metrics["sync/upload_fraction"] = laq.state.uploads / (laq.state.rounds * world)
        if ledger.distortion is not None:
            metrics["comm/distortion"] = ledger.distortion
        ef = [c for c in policy.stateful_codecs().values() if isinstance(c, ErrorFeedback)]
        if ef:
            metrics["comm/ef_residual_norm"] = sum(c.residual_norm() for c in ef)
        if faults is not None:
            metrics.update(faults.metrics(view))
        final = done == plan.total_steps
        if final or (cfg.eval_every and (done // cfg.eval_every) > ((done - window_steps) // cfg.eval_every)):
            average_buffers(model, device)
            acc, eval_loss = evaluate(model, test, rank, world, device)
            last_eval = {"eval/accuracy": acc, "eval/loss": eval_loss}
            if trace is not None:
                trace.write(json.dumps({"eval_step": done, "eval/accuracy": acc, "eval/loss": eval_loss}) + "\n")
                trace.flush()
        metrics.update(last_eval)
        save_now = final or (cfg.checkpoint_every and
                             (done // cfg.checkpoint_every) > ((done - window_steps) // cfg.checkpoint_every))
        if tb:
            tb.scalars(metrics, done)
        if progress is not None and rank == 0:
            progress.put_nowait({**metrics, "total_steps": plan.total_steps})
        if save_now:
            with tempfile.TemporaryDirectory() as tmp:
                model_state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "rng": torch.get_rng_state()} if rank == 0 else None
                meta = {"step": done, "world": world, "wall_s": metrics["time/wall_s"],
                        "clock": clock.state_dict() if clock is not None else None,
                        "bytes_up_total": bytes_total, "task": cfg.task, "codec": cfg.compression.codec}
                state = {"policy": group.state_dict(), "schedule": schedule.state_dict()}
                if averager is not None:
                    state["averager"] = averager.state_dict()
                if laq is not None:
                    state["laq"] = laq.state_dict()
                ckpt.save(Path(tmp), rank, model_state=model_state, codec_state=state, meta=meta)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        last = metrics
        window = Ledger()
        window_loss, window_steps, window_compute, window_start = 0.0, 0, 0.0, time.perf_counter()
        window_sim_comm = 0.0

    if trace is not None:
        trace.close()
    if faults is not None and faults.log is not None:
        faults.log.close()
    if tb:
        tb.hparams(cfg.to_dict(), {k: v for k, v in last.items() if k.startswith(("eval/", "comm/bits", "comm/comp"))})
        tb.close()
    return {**last, "steps_total": plan.total_steps, "start_step": start_step}


def _mean_over_workers(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized():
        t = t.to(device) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
        return float(t.item()) / dist.get_world_size()
    return value
