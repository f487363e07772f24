"""What a sweep optimises: each trial's accuracy, the bits all its workers uploaded, its simulated time, and
(with ``tune.leakage``) what it leaks.

Every report of a trial gets these metrics: final eval accuracy (max), bits uploaded by all workers
``8·comm/bytes_up_total·workers`` (min; a trainer whose workers send unequal amounts, ``split``, reports
the exact ``comm/bytes_up_all_workers_total``), ``sim/time_s`` (min, when a cluster profile gives a
simulated clock), a leakage figure (min: the membership loss attack's AUC, or the split decoder attack's
SSIM / PSNR, or the smashed data's dCor²) and ASHA's scalar score
``accuracy − bits_weight·log10(bits) − time_weight·log10(time) − leak_weight·leakage``.
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

#: ``tune.leakage`` → the run metric it minimises (every run logs the membership figures at each
#: evaluation; the decoder figures and dCor come from ``trainer: split``'s last evaluation).
LEAKAGE_METRICS: dict[str, str] = {
    "membership_auc": "privacy/loss_auc",
    "correctness_attack": "privacy/correctness_attack_acc",
    "decoder_ssim": "privacy/decoder_ssim",
    "decoder_psnr": "privacy/decoder_psnr",
    "dcor": "privacy/dcor",
}
#: Leakage figures only split learning reports.
SPLIT_LEAKAGE = ("decoder_ssim", "decoder_psnr", "dcor")


def leakage_objective(name: str) -> Objective:
    """The leakage objective of ``tune.leakage`` (min)."""
    if name not in LEAKAGE_METRICS:
        raise ValueError(f"tune.leakage={name!r} is not a leakage figure; choose one of: "
                         f"none, {', '.join(LEAKAGE_METRICS)}")
    return Objective("objective.leakage", "min", f"leakage ({name})")


def objective_metrics(metrics: dict[str, Any], workers: int, bits_weight: float, time_weight: float,
                      leakage: str = "none", leak_weight: float = 0.0) -> dict[str, float]:
    """The objectives of one report: accuracy, bits uploaded by all workers, simulated time, leakage, the score."""
    acc = float(metrics.get("eval/accuracy", math.nan))
    if "comm/bytes_up_all_workers_total" in metrics:
        bits = 8.0 * float(metrics["comm/bytes_up_all_workers_total"])
    else:
        bits = 8.0 * float(metrics.get("comm/bytes_up_total", 0)) * workers
    sim = float(metrics.get("sim/time_s", math.nan))
    score = acc - bits_weight * math.log10(max(bits, 1.0))
    if time_weight:
        score -= time_weight * math.log10(sim) if sim > 0 else math.nan
    out = {ACCURACY.key: acc, BITS.key: bits, SIM_TIME.key: sim}
    if leakage != "none":
        leak = float(metrics.get(LEAKAGE_METRICS[leakage], math.nan))
        out[leakage_objective(leakage).key] = leak
        if leak_weight:
            score -= leak_weight * leak
    out[SCORE.key] = score
    return out
