"""Trainer ``sweep``: several runs back to back in one Ray Train worker group.

Each run goes through its own trainer's loop unchanged (``sync`` or ``ddp``; its own config, run
directory, TensorBoard files and trace); only the worker group and its process group are shared, which
saves Ray Train's start-up (~17 s with 4 workers on 2 cores) per run. Used by ``rayq.launch.train_many``
(benchmarks, the codec test matrix). Every run must use the same workers and devices.
"""

from __future__ import annotations

from typing import Any

from rayq.errors import NonFiniteGradientError
from trainers import ddp, sync

#: The loops a sweep can run (each run names its own in ``trainer``).
LOOPS = {"sync": sync.train_loop, "ddp": ddp.train_loop}


def train_loop(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for run in loop_config["runs"]:
        loop = LOOPS[run["config"]["trainer"]]
        try:
            results.append(loop({"config": run["config"], "run_dir": run["run_dir"],
                                 "progress": loop_config.get("progress"), "fresh": True}))
        except NonFiniteGradientError as err:
            # Every worker sees the same averaged gradient, so every worker stops this run at the same
            # step: the group stays in step and goes on with the next run.
            results.append({"error": str(err)})
    return results
