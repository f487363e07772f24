"""Trainer ``ddp``: the model wrapped in DistributedDataParallel, gradients averaged by a comm hook.

The run harness of ``trainers.sync`` (:mod:`rayq.run`), with DDP doing the averaging inside backward:

    batch → forward (DDP) → backward (the hook averages each bucket) → optimizer step

``ddp.hook`` picks the hook: ``rayq`` (rayq's compressed group, configured by ``compression.*``:
:mod:`rayq.ddp_hook`), ``powersgd`` (PyTorch's own ``powerSGD_hook``, rank ``ddp.powersgd_rank``, plain
all-reduce before ``ddp.start_powersgd_iter``: the reference peer of ``rayq bench e2e``) or
``allreduce`` (PyTorch's dense ``allreduce_hook``). Bytes are real for every hook: rayq's ledger, or
the tensors PyTorch's hooks pass to ``dist.all_reduce``, counted while backward runs
(:class:`rayq.ddp_hook.AllReduceCounter`, which also times them); metrics, ``trace.jsonl`` wire records
and simulated time are those of the ``sync`` trainer: compute time excludes the hook's own work
(encode, communicate, decode), so the virtual clock charges only the simulated network for it.
Gradients are averaged every step (``sync.schedule: every_step``); faults are not injected (the
config refuses both).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from rayq.config import RunConfig
from rayq.ddp_hook import AllReduceCounter, RayqHookState, rayq_hook
from rayq.run import Run, build_policy
from rayq.schedules import Outcome


def build_hook(cfg: RunConfig, ddp: torch.nn.parallel.DistributedDataParallel) -> tuple[Any, AllReduceCounter | None]:
    """Register the configured hook on ``ddp``; return its state and, for PyTorch's hooks, a byte counter."""
    if cfg.ddp.hook == "rayq":
        state = RayqHookState(build_policy(cfg), ddp.process_group, seed=cfg.seed,
                              strategy=cfg.compression.strategy, gather=cfg.compression.gather, model=ddp.module)
        ddp.register_comm_hook(state, rayq_hook)
        return state, None
    if cfg.ddp.hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(None, matrix_approximation_rank=cfg.ddp.powersgd_rank,
                                   start_powerSGD_iter=cfg.ddp.start_powersgd_iter, random_seed=cfg.seed)
        counter = AllReduceCounter(timed=not cfg.ddp.native_overlap)
        ddp.register_comm_hook(state, counter.wrap(psgd.powerSGD_hook))
        return state, counter
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counter = AllReduceCounter(timed=not cfg.ddp.native_overlap)
    ddp.register_comm_hook(None, counter.wrap(default_hooks.allreduce_hook))
    return None, counter


class HookState:
    """The hook's state as the run harness checkpoints it (rayq's, PyTorch's PowerSGD, or none)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        if self.state is None:
            return {}
        if isinstance(self.state, RayqHookState):
            return self.state.state_dict()
        return self.state.__getstate__()  # PowerSGDState: every slot but the process group

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if self.state is None or not saved:
            return
        if isinstance(self.state, RayqHookState):
            self.state.load_state_dict(saved)
        else:
            group = self.state.process_group
            self.state.__setstate__(saved)
            self.state.process_group = group

    def residual_norm(self) -> float:
        return self.state.group.residual_norm() if isinstance(self.state, RayqHookState) else 0.0

    def drop_nonfinite(self) -> list[str]:
        """After a skipped non-finite step: rayq's codec memories forget NaN/Inf. PyTorch's PowerSGD state drops
        a bucket's error where it holds them, and its warm start (P and Q: the hook draws a new Q) where Q does;
        Q is all-reduced, so every worker drops the same buckets and draws the same new Q."""
        if isinstance(self.state, RayqHookState):
            return self.state.group.drop_nonfinite()
        if self.state is None:
            return []

        def poisoned(memory: dict) -> list:
            return [k for k, t in memory.items() if not bool(torch.isfinite(t).all())]

        errors, qs = getattr(self.state, "error_dict", {}), getattr(self.state, "q_memory_dict", {})
        dropped = []
        for k in poisoned(errors):
            del errors[k]
            dropped.append(f"powersgd error of bucket {k}")
        for k in poisoned(qs):
            del qs[k]
            self.state.p_memory_dict.pop(k, None)
            dropped.append(f"powersgd warm start of bucket {k}")
        return dropped


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    run = Run(loop_config)
    model, optimizer = run.model, run.optimizer
    ddp = DDP(model, device_ids=[run.device] if run.device.type == "cuda" else None)  # broadcasts rank 0's state
    hook_state, counter = build_hook(run.cfg, ddp)
    run.track(hook=HookState(hook_state))
    rayq_hook_state = hook_state if isinstance(hook_state, RayqHookState) else None
    elements = run.replica.elements
    ddp.train()

    for step in run.steps():
        x, y = run.batch(step)
        if rayq_hook_state is not None:
            rayq_hook_state.measure = run.measuring(step)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(ddp(x), y)
        if counter is not None:
            with counter:
                loss.backward()
            ledger = counter.take_ledger(run.world, elements)
        else:
            loss.backward()
            ledger = rayq_hook_state.take_ledger()  # type: ignore[union-attr]
        ledger.resolve()  # its CUDA-timed stages are needed now
        # Compute time without the hook's work (encode, communicate, decode), as in the sync trainer.
        compute_s = time.perf_counter() - t0 - ledger.encode_s - ledger.comm_s - ledger.decode_s
        grads = run.replica.grads()
        applied = run.replica.finite(grads, grads, step, "averaged gradient")
        if applied:
            optimizer.step()
        run.end(step, loss, Outcome(ledger, True, applied, compute_s=compute_s))

    return run.finish()
