"""Trainer ``sync``: data-parallel SGD on Ray Train with compressed exchange, one loop top to bottom.

Runs inside every Ray Train worker:

    batch → forward → backward → schedule.step: compressed exchange (rayq.collective) + optimizer step
    run.end: simulated clock, trace, metrics; every report_every steps a report, on cadence an
    evaluation and a checkpoint (model, optimizer, codec memories, schedule, RNG, clock)

What is exchanged and when is the schedule's business (every step, periodic model averaging, ADPSGD,
LAQ); the faults, the clock and the bookkeeping are the run harness's (:mod:`rayq.run`). Data order and
every codec's randomness derive from (seed, step, rank), so a resumed run continues bit-exactly.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from rayq import schedules
from rayq.run import Run


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    run = Run(loop_config)
    model, optimizer = run.model, run.optimizer
    group = run.group()
    schedule = schedules.build(run.cfg, run.replica, group, run.plan.steps_per_epoch, run.plan.total_steps)
    run.track(policy=group, schedule=schedule)

    for step in run.steps():
        faults = run.begin(step)  # the fault plan: crash, delay, who contributes; rejoiners resynchronise
        x, y = run.batch(step)

        def backward():  # the schedule runs it: once, twice (BLAQ), or with the exchange overlapping it
            optimizer.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        outcome = schedule.step(step, faults, measure=run.measuring(step), backward=backward)
        run.end(step, outcome.loss, outcome, faults)

    return run.finish()
