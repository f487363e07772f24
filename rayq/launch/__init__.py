"""The launch layer: the CLI, the Train driver, Tune sweeps, Ray Jobs and the benchmarks.

It is the only layer that prints; the runtime below it logs. ``from rayq.launch import train`` runs
one job from Python as ``rayq train`` does.
"""

from rayq.errors import TrainingError
from rayq.launch.driver import (
    RAY_ENV,
    DriverResult,
    check_address,
    describe_failure,
    find_runner,
    find_trainer,
    init_ray,
    make_trainer,
    prepare,
    resolve,
    summarize,
    train,
    train_many,
)

__all__ = [
    "RAY_ENV", "DriverResult", "TrainingError", "check_address", "describe_failure", "find_runner", "find_trainer",
    "init_ray", "make_trainer", "prepare", "resolve", "summarize", "train", "train_many",
]
