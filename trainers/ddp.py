"""Trainer ``ddp``: the model wrapped in DistributedDataParallel, gradients averaged by a comm hook.

The loop of ``trainers.sync`` (its helpers are reused), with DDP doing the averaging inside backward:

    batch → forward (DDP) → backward (the hook averages each bucket) → optimizer step

``ddp.hook`` picks the hook: ``rayq`` (rayq's compressed group, configured by ``compression.*``:
:mod:`rayq.ddp_hook`), ``powersgd`` (PyTorch's own ``powerSGD_hook``, rank ``ddp.powersgd_rank``, plain
all-reduce before ``ddp.start_powersgd_iter``: the reference peer of ``rayq bench e2e``) or
``allreduce`` (PyTorch's dense ``allreduce_hook``). Bytes are real for every hook: rayq's ledger, or
the tensors PyTorch's hooks pass to ``dist.all_reduce``, counted while backward runs
(:class:`rayq.ddp_hook.AllReduceCounter`, which also times them); metrics, ``trace.jsonl`` wire records
and simulated time are those of the ``sync`` trainer: compute time excludes the hook's own work
(encode, communicate, decode), so the virtual clock charges only the simulated network for it.
Gradients are averaged every step (``sync.schedule: every_step``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compressors.error_feedback import ErrorFeedback
from rayq import checkpoint as ckpt
from rayq.collective import Ledger
from rayq.config import ConfigError, RunConfig, from_dict
from rayq.ddp_hook import AllReduceCounter, RayqHookState, rayq_hook
from rayq.netsim import VirtualClock, step_comm_seconds
from rayq.profiles import load_profile
from rayq.tasks import get_task
from rayq.telemetry import TensorBoardLog
from trainers.sync import (average_buffers, batch_indices, build_optimizer, build_policy, check_finite, evaluate,
                           make_plan, window_metrics)


def build_hook(cfg: RunConfig, ddp: torch.nn.parallel.DistributedDataParallel) -> tuple[Any, AllReduceCounter | None]:
    """Register the configured hook on ``ddp``; return its state and, for PyTorch's hooks, a byte counter."""
    if cfg.ddp.hook == "rayq":
        state = RayqHookState(build_policy(cfg), ddp.process_group, seed=cfg.seed,
                              strategy=cfg.compression.strategy, model=ddp.module)
        ddp.register_comm_hook(state, rayq_hook)
        return state, None
    if cfg.ddp.hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(None, matrix_approximation_rank=cfg.ddp.powersgd_rank,
                                   start_powerSGD_iter=cfg.ddp.start_powersgd_iter, random_seed=cfg.seed)
        counter = AllReduceCounter()
        ddp.register_comm_hook(state, counter.wrap(psgd.powerSGD_hook))
        return state, counter
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counter = AllReduceCounter()
    ddp.register_comm_hook(None, counter.wrap(default_hooks.allreduce_hook))
    return None, counter


def hook_state_dict(state: Any) -> dict | None:
    if state is None:
        return None
    if isinstance(state, RayqHookState):
        return state.state_dict()
    return state.__getstate__()  # PowerSGDState: every slot but the process group


def load_hook_state(state: Any, saved: dict | None) -> None:
    if state is None or saved is None:
        return
    if isinstance(state, RayqHookState):
        state.load_state_dict(saved)
    else:
        group = state.process_group
        state.__setstate__(saved)
        state.process_group = group


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    from ray.train import Checkpoint
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg: RunConfig = from_dict(RunConfig, loop_config["config"])
    if cfg.sync.schedule != "every_step":
        raise ConfigError(f"trainer=ddp averages gradients every step; sync.schedule={cfg.sync.schedule!r} needs "
                          "trainer=sync")
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
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elements = sum(p.numel() for _, p in params)

    start_step, clock_offset, bytes_total = 0, 0.0, 0
    codec_state: dict | None = None
    restored = ray.train.get_checkpoint()
    source = "restart" if restored else ("resume" if cfg.resume else None)
    state: dict = {}
    if restored or cfg.resume:
        if restored:
            with restored.as_directory() as d:
                state, codec_state = ckpt.load(Path(d), rank)
        else:
            state, codec_state = ckpt.load(Path(cfg.resume), rank)  # type: ignore[arg-type]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_step = state["meta"]["step"]
        clock_offset = state["meta"].get("wall_s", 0.0)
        bytes_total = state["meta"].get("bytes_up_total", 0)
    # DDP broadcasts rank 0's parameters and buffers: identical replicas from here on.
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None)
    hook_state, counter = build_hook(cfg, ddp)
    if codec_state is not None:
        load_hook_state(hook_state, codec_state.get("hook"))

    clock, links = None, None
    if cfg.cluster is not None:
        profile = load_profile(cfg.cluster, world, cfg.seed)
        clock, links = VirtualClock(world, profile.speed_factors), profile.links
        if source and state["meta"].get("clock"):
            clock.load_state_dict(state["meta"]["clock"])
    trace = open(run_dir / "trace.jsonl", "a") if rank == 0 else None
    tb = TensorBoardLog(run_dir / "tensorboard") if rank == 0 else None
    if tb and source:
        tb.text("run/events", f"{source} from step {start_step}", start_step)
    window = Ledger()
    window_loss, window_steps, window_compute, window_start = 0.0, 0, 0.0, time.perf_counter()
    window_sim_comm = 0.0
    last: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    skipped = 0
    wall_start = time.perf_counter() - clock_offset
    ddp.train()

    for step in range(start_step, plan.total_steps):
        epoch, i = divmod(step, plan.steps_per_epoch)
        idx = batch_indices(cfg.seed, epoch, i, rank, world, len(train), plan.batch_size)
        report_now = (step + 1) % max(cfg.report_every, 1) == 0 or step + 1 == plan.total_steps
        if isinstance(hook_state, RayqHookState):
            hook_state.measure = report_now
        t0 = time.perf_counter()
        xb, yb = train.x[idx].to(device), train.y[idx].to(device)
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(ddp(xb), yb)
        if counter is not None:
            with counter:
                loss.backward()
            ledger = counter.take_ledger(world, elements)
        else:
            loss.backward()
            ledger = hook_state.take_ledger()
        t1 = time.perf_counter()
        # Compute time without the hook's work (encode, communicate, decode), as in the sync trainer.
        compute = t1 - t0 - ledger.encode_s - ledger.comm_s - ledger.decode_s
        grads = {n: p.grad for n, p in params}
        if check_finite(grads, grads, step, rank, cfg.on_nonfinite == "raise"):
            optimizer.step()
        else:
            skipped += 1
        window.add(ledger)
        bytes_total += ledger.bytes_up
        if clock is not None:
            comm = step_comm_seconds(ledger.wire, links)
            clock.step(compute, comm)
            window_sim_comm += comm
        if trace is not None:
            trace.write(json.dumps({"step": step + 1, "compute_s": compute,
                                    "wire": [[w.kind, w.rounds, list(w.bytes_up)] for w in ledger.wire]}) + "\n")
        window_loss += float(loss.detach())
        window_steps += 1
        window_compute += compute

        if not report_now:
            continue
        done = step + 1
        metrics: dict[str, Any] = window_metrics(done, plan, window, window_loss, window_steps, window_compute,
                                                 window_start, wall_start, bytes_total, skipped, done, device)
        if clock is not None:
            metrics["sim/time_s"] = clock.now
            metrics["sim/comm_s"] = window_sim_comm / window_steps
        if ledger.distortion is not None:
            metrics["comm/distortion"] = ledger.distortion
        if isinstance(hook_state, RayqHookState):
            ef = [c for c in hook_state.group.policy.stateful_codecs().values() if isinstance(c, ErrorFeedback)]
            if ef:
                metrics["comm/ef_residual_norm"] = sum(c.residual_norm() for c in ef)
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
                        "bytes_up_total": bytes_total, "task": cfg.task, "codec": cfg.compression.codec,
                        "ddp_hook": cfg.ddp.hook}
                ckpt.save(Path(tmp), rank, model_state=model_state, codec_state={"hook": hook_state_dict(hook_state)},
                          meta=meta)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        last = metrics
        window = Ledger()
        window_loss, window_steps, window_compute, window_start = 0.0, 0, 0.0, time.perf_counter()
        window_sim_comm = 0.0

    if trace is not None:
        trace.close()
    if tb:
        tb.hparams(cfg.to_dict(), {k: v for k, v in last.items() if k.startswith(("eval/", "comm/bits", "comm/comp"))})
        tb.close()
    return {**last, "steps_total": plan.total_steps, "start_step": start_step}
