"""What a sweep optimises: each trial's accuracy, the bits all its workers uploaded, its simulated time.

Every report of a trial gets these four metrics: final eval accuracy (max), bits uploaded by all workers
``8·comm/bytes_up_total·workers`` (min), ``sim/time_s`` (min, when a cluster profile gives a simulated
clock), and ASHA's scalar score ``accuracy − bits_weight·log10(bits) − time_weight·log10(time)``.
"""

from __future__ import annotations

import math
from typing import Any

from rayq.launch.tune.pareto import Objective

#: The metrics each trial adds to its reports (objective_metrics) and what the front is made of.
ACCURACY = Objective("objective.accuracy", "max", "accuracy")
BITS = Objective("objective.bits", "min", "bits (all workers)", log=True)
SIM_TIME = Objective("objective.sim_time_s", "min", "sim time (s)", log=True)
SCORE = Objective("objective.score", "max", "score")


def objective_metrics(metrics: dict[str, Any], workers: int, bits_weight: float, time_weight: float) -> dict[str, float]:
    """The objectives of one report: accuracy, bits uploaded by all workers, simulated time, the score."""
    acc = float(metrics.get("eval/accuracy", math.nan))
    bits = 8.0 * float(metrics.get("comm/bytes_up_total", 0)) * workers
    sim = float(metrics.get("sim/time_s", math.nan))
    score = acc - bits_weight * math.log10(max(bits, 1.0))
    if time_weight:
        score -= time_weight * math.log10(sim) if sim > 0 else math.nan
    return {ACCURACY.key: acc, BITS.key: bits, SIM_TIME.key: sim, SCORE.key: score}
