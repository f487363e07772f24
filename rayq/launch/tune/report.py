"""What a sweep leaves behind: the Pareto front, its table and plot, best_<objective>.yaml, results.csv.

The front is computed over the trials that ran to their last step only: a trial ASHA stopped spent fewer
bits and less time because it trained less, so it is listed but cannot be on the front. Each
``best_<objective>.yaml`` is the best trial's full run config, runnable as is with ``rayq train -c``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rayq.launch.tune.objectives import ACCURACY, SCORE
from rayq.launch.tune.pareto import Objective, best_index, format_table, pareto_front, plot_front
from rayq.launch.tune.space import Space

log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    """How one trial ended: done (ran to its last step), stopped early by ASHA, or error; its last figures."""

    number: int
    trial_id: str
    status: Literal["done", "stopped", "error"]
    step: int
    metrics: dict[str, float]
    params: dict[str, Any]                 # searched values in force (short label → value)
    run_dir: Path | None
    last: dict[str, float] = field(default_factory=dict)   # the last report, all numeric metrics
    error: str | None = None
    trace: Path | None = None              # Tune's error.txt of a failed trial


@dataclass
class SweepResult:
    """A finished sweep: its trials, the Pareto front over those that finished, and the files written."""

    name: str
    sweep_dir: Path
    mode: str
    objectives: list[Objective]
    trials: list[TrialOutcome]
    front: list[int]                       # indices into trials (finished trials only)
    best: dict[str, Path]                  # objective label → best_<objective>.yaml
    table: str
    plot: Path | None
    wall_s: float


def write_report(space: Space, name: str, sweep_dir: Path, trials: list[TrialOutcome], objectives: list[Objective],
                 wall: float) -> SweepResult:
    """Pareto front over the finished trials, the table, plot, best YAMLs, results.csv and missing hparams."""
    done = [t for t in trials if t.status == "done"]
    points = [t.metrics for t in done]
    front_local = pareto_front(points, objectives)
    front = [trials.index(done[i]) for i in front_local]
    ranked = objectives + ([SCORE] if space.settings.mode == "asha" else [])
    best: dict[str, Path] = {}
    for o in ranked:
        i = best_index(points, o, objectives)
        if i is not None and done[i].run_dir is not None:
            best[o.name] = write_best(done[i], o, objectives, sweep_dir, name)
    table = sweep_table(trials, objectives, set(front), space.settings.mode == "asha")
    plot = None
    if done:
        plot = plot_front(points, objectives, front_local, sweep_dir / "pareto.png",
                          labels=[f"#{t.number}" for t in done],
                          extra=[t.metrics for t in trials if t.status == "stopped"],
                          title=f"{name}: {len(done)} finished trials, Pareto front in red")
    (sweep_dir / "pareto.txt").write_text(table + "\n")
    log.info("sweep %s: %d trials, %d finished, front %s", name, len(trials), len(done), [trials[i].number for i in front])
    _write_csv(sweep_dir / "results.csv", trials, set(front))
    for t in trials:
        if t.run_dir is not None and not (t.run_dir / "summary.json").is_file():
            _write_hparams(t)  # stopped or failed before the trainer's own hparams call
    return SweepResult(name, sweep_dir, space.settings.mode, objectives, trials, front, best, table, plot, wall)


def sweep_table(trials: list[TrialOutcome], objectives: list[Objective], front: set[int], score: bool) -> str:
    """One row per trial: front marker, status, objectives, the searched values; front first, then accuracy."""
    order = sorted(range(len(trials)), key=lambda i: (i not in front, trials[i].status != "done",
                                                      -_num(trials[i].metrics.get(ACCURACY.key))))
    cols = objectives + ([SCORE] if score else [])
    header = ["#", "trial", "front", "status", "step"] + [o.name for o in cols] + ["searched values"]
    rows = []
    for i in order:
        t = trials[i]
        params = "  ".join(f"{k}={short(v)}" for k, v in t.params.items())
        status = t.status if t.status != "error" else "failed"
        rows.append([t.number, t.trial_id, "*" if i in front else "", status, t.step]
                    + [t.metrics.get(o.key) for o in cols] + [params])
    return format_table(rows, header, title=f"Pareto front over {', '.join(o.name for o in objectives)} "
                                            "(* = on the front; only trials that ran to the end count)")


def _num(v: Any) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


def short(v: Any) -> str:
    """A searched value as tables and progress lines show it."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_best(t: TrialOutcome, objective: Objective, objectives: list[Objective], sweep_dir: Path, sweep: str) -> Path:
    """The trial's full resolved run config, with name and output_dir left to ``rayq train``'s defaults."""
    assert t.run_dir is not None
    cfg = yaml.safe_load((t.run_dir / "config.yaml").read_text())
    for key in ("name", "output_dir", "resume"):
        cfg.pop(key, None)
    slug = objective.key.split(".", 1)[-1]
    path = sweep_dir / f"best_{slug}.yaml"
    figures = ", ".join(f"{o.name} {t.metrics.get(o.key, math.nan):.6g}" for o in objectives)
    header = (f"# rayq tune: best {objective.name} of sweep {sweep} (trial #{t.number}, {t.trial_id})\n"
              f"# {figures}\n# trial run: {t.run_dir}\n# reproduce: rayq train -c {path}\n")
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return path


def _write_csv(path: Path, trials: list[TrialOutcome], front: set[int]) -> None:
    keys = sorted({k for t in trials for k in t.metrics})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "trial_id", "status", "step", "front", *keys, "params", "run_dir", "error"])
        for i, t in enumerate(trials):
            w.writerow([t.number, t.trial_id, t.status, t.step, i in front, *[t.metrics.get(k) for k in keys],
                        json.dumps(t.params), t.run_dir or "", t.error or ""])


def _write_hparams(t: TrialOutcome) -> None:
    """Trials stopped early never reach the trainer's own hparams call: write them from Tune's last report."""
    from rayq.telemetry import TensorBoardLog

    assert t.run_dir is not None
    config_file = t.run_dir / "config.yaml"
    if not config_file.is_file():
        return
    tb = TensorBoardLog(t.run_dir / "tensorboard")
    tb.text("run/events", f"{t.status} at step {t.step}" + (f": {t.error}" if t.error else ""), t.step)
    final = {k: v for k, v in t.last.items() if k.startswith(("eval/", "comm/bits", "comm/comp"))}  # as the trainer
    tb.hparams(yaml.safe_load(config_file.read_text()), final)
    tb.close()
