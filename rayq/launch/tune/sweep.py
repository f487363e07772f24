"""Run a search space on Ray Tune: one rayq run per trial, ASHA or Optuna, and nothing leaked afterwards.

A trial is ``prepare`` + ``make_trainer(...).fit()`` of the launch driver inside a Tune function
trainable; its run directory (config.yaml, TensorBoard with hparams, trace) lives under the sweep
directory. Mode ``asha`` stops trials early on the scalar score; mode ``multi`` searches the
objectives with Optuna. Two Ray workarounds live here: the placement-group reaper (Tune stopping a
trial leaves its Train workers' group reserved) and explicit trial resources for driver-run trainers.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from rayq.config import RunConfig
from rayq.errors import TrainingError
from rayq.launch.driver import (
    DriverResult,
    describe_failure,
    find_runner,
    find_trainer,
    init_ray,
    make_trainer,
    prepare,
    summarize,
)
from rayq.launch.tune.objectives import SCORE, objective_metrics
from rayq.launch.tune.report import SweepResult, TrialOutcome, short, write_report
from rayq.launch.tune.space import Space, SpaceError, SweepSettings
from rayq.schema import ConfigError, from_dict
from rayq.tasks import check_available

#: The CPU a trial's own process reserves (Tune rejects 0); the Train workers reserve theirs.
TRIAL_CPU = 0.01


def _objective_callback(workers: int, s: SweepSettings):
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        """Tune's bridge from Train reports, adding the sweep's objective metrics to each."""

        def after_report(self, run_context, metrics, checkpoint):
            first = {**metrics[0], **objective_metrics(metrics[0], workers, s.bits_weight, s.time_weight, s.leakage,
                                                       s.leak_weight)}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ObjectiveReport()


class PlacementGroupReaper:
    """Removes the Train worker groups' placement groups of trials that ended (a Ray actor, one per sweep).

    A placement group lives as long as the job, not as long as the actor that created it. When Tune stops a
    trial (ASHA), the trial's Train controller dies without removing its workers' group; Ray Train's own
    cleaner needs the state API (a dashboard, and a single Ray instance on the machine) to notice. Without
    it the group's CPUs stay reserved and later trials wait for them forever. So each trial registers its
    groups here, and the sweep releases them as soon as Tune reports the trial complete or failed.
    """

    def __init__(self) -> None:
        self.groups: dict[str, list[Any]] = {}

    def register(self, trial_id: str, group: Any) -> None:
        self.groups.setdefault(trial_id, []).append(group)

    def release(self, trial_id: str) -> int:
        """Remove the trial's groups that are still there; return how many were removed."""
        from ray.util import placement_group_table, remove_placement_group

        removed = 0
        for group in self.groups.pop(trial_id, []):
            try:
                if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
                    remove_placement_group(group)
                    removed += 1
            except Exception:  # noqa: BLE001 - already gone
                pass
        return removed

    def release_all(self) -> int:
        return sum(self.release(t) for t in list(self.groups))


def _register_callback(reaper: str, namespace: str, trial_id: str) -> Any:
    """A Train worker-group callback that hands the group's placement group to the sweep's reaper."""
    import ray
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RegisterWorkerGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            ray.get(ray.get_actor(reaper, namespace=namespace).register.remote(trial_id, group))

    return RegisterWorkerGroup()


def _reaper_callback(reaper: Any) -> Any:
    """The Tune callback that releases a trial's worker groups once the trial has ended."""
    import ray
    from ray.tune import Callback

    class ReleaseWorkerGroups(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            ray.get(reaper.release.remote(trial.trial_id))

        def on_trial_error(self, iteration, trials, trial, **info):
            ray.get(reaper.release.remote(trial.trial_id))

    return ReleaseWorkerGroups()


@dataclass(frozen=True)
class TrialPlan:
    """What every trial needs besides its sampled values."""

    space: Space
    trials_dir: str
    reaper: str                            # the name of the sweep's PlacementGroupReaper actor
    namespace: str


def run_trial(raw: dict[str, Any], plan: TrialPlan) -> None:
    """One Tune trial: resolve the config, run it as a rayq run under the sweep directory.

    A TorchTrainer trainer reports through Train's callback; a driver-run trainer (``volunteer``) runs
    right here, in the trial, and its progress items are reported to Tune directly.
    """
    import ray.tune

    cfg, _ = plan.space.config_from(raw)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = replace(cfg, name=f"{trial_id}-{cfg.compression.codec}", output_dir=plan.trials_dir, resume=None)
    cfg, run_dir = prepare(cfg)
    s = plan.space.settings
    started = time.perf_counter()
    runner = find_runner(cfg.trainer)
    if runner is not None:
        def report(item: dict[str, Any]) -> None:
            if "event" in item:  # a fault or recovery event, not metrics
                return
            numbers = {k: v for k, v in item.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            ray.tune.report({**numbers, **objective_metrics(numbers, cfg.workers, s.bits_weight, s.time_weight,
                                                            s.leakage, s.leak_weight)})

        final = runner(cfg, run_dir, report)
        summarize(cfg, run_dir, DriverResult(final, final.pop("checkpoint", None)), time.perf_counter() - started)
        return
    callbacks = [_objective_callback(cfg.workers, s),
                 _register_callback(plan.reaper, plan.namespace, trial_id)]
    try:
        result = make_trainer(cfg, run_dir, callbacks=callbacks).fit()
    except Exception as err:  # noqa: BLE001 - Tune records the trial as failed with the worker's message
        raise TrainingError(describe_failure(err)) from err
    summarize(cfg, run_dir, result, time.perf_counter() - started)


def actor_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """The actors a driver-run trainer creates inside its trial, one bundle each (empty for TorchTrainers).

    Ray Train places a TorchTrainer's workers itself, outside the trial's placement group. A driver-run
    trainer (``volunteer``: ``volunteer.actors`` peer hosts of ``volunteer.cpus_per_actor``; any other:
    ``workers × cpus_per_worker``) creates plain actors, which Tune captures into the trial's group: the
    group reserves them up front, so concurrent trials never each hold half of what they need (deadlock).
    """
    if find_runner(cfg.trainer) is None:
        return []
    if cfg.trainer == "volunteer":
        return [{"CPU": cfg.volunteer.cpus_per_actor}] * (cfg.volunteer.actors or cfg.workers)
    return [{"CPU": cfg.cpus_per_worker}] * cfg.workers


def trial_resources(raw: dict[str, Any], space: Space) -> Any:
    """Tune's reservation for a trial: a driver bundle, plus one bundle per actor the trial creates itself."""
    from ray.tune import PlacementGroupFactory

    cfg, _ = space.config_from(raw)
    return PlacementGroupFactory([{"CPU": TRIAL_CPU}] + actor_bundles(cfg))


# ------------------------------------------------------------------------------------------- sweeps


def _asha_steps(space: Space) -> tuple[int, int]:
    """ASHA's max_t and grace period in steps; max_t just below max_steps keeps every rung before the end."""
    max_steps = space.base_full["max_steps"]
    max_t = max(max_steps - 1, 1) if max_steps else 10**9
    grace = space.settings.grace_period or 2 * max(int(space.base_full["report_every"]), 1)
    return max_t, min(grace, max_t)


def _ray_cpus_needed(space: Space) -> float:
    """Logical CPUs for ``max_concurrent`` trials of the base config (a local Ray gets at least that many)."""
    cfg = from_dict(RunConfig, space.base)
    per_trial = TRIAL_CPU + (sum(b["CPU"] for b in actor_bundles(cfg)) or cfg.workers * cfg.cpus_per_worker)
    return space.settings.max_concurrent * per_trial


def run_sweep(space: Space, output_dir: str | Path = "runs/sweeps", name: str | None = None,
              address: str | None = None, on_event: Callable[[str], None] | None = None) -> SweepResult:
    """Run the sweep on Ray Tune (starting or joining Ray), then compute and write the Pareto outputs."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = space.settings
    base_cfg = from_dict(RunConfig, space.base)
    if find_runner(base_cfg.trainer) is None:
        find_trainer(base_cfg.trainer)
    check_available(base_cfg.task, base_cfg.data_dir)
    name = name or f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
    sweep_dir = Path(output_dir).expanduser().resolve() / name
    if sweep_dir.exists():
        raise SpaceError(f"sweep directory {sweep_dir} already exists; choose another --name")
    trials_dir = sweep_dir / "trials"
    trials_dir.mkdir(parents=True)
    (sweep_dir / "base.yaml").write_text(yaml.safe_dump(space.base, sort_keys=False))
    (sweep_dir / "space.yaml").write_text(Path(space.path).read_text())

    init_ray(address, num_cpus=None if address else max(float(os.cpu_count() or 1), math.ceil(_ray_cpus_needed(space))))
    reaper = ray.remote(num_cpus=0)(PlacementGroupReaper).options(name=f"rayq-reaper-{name}").remote()
    plan = TrialPlan(space, str(trials_dir), f"rayq-reaper-{name}", ray.get_runtime_context().namespace)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                                    lambda raw: trial_resources(raw, space))
    objectives = space.objectives()
    if s.mode == "multi":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(space=space.define_by_run, metric=[o.key for o in objectives],
                              mode=[o.mode for o in objectives], seed=s.seed)
        scheduler: Any = FIFOScheduler()
        param_space: dict[str, Any] = {}
        if space.grid_entries() and on_event:
            on_event("note: tune.mode=multi draws grid entries like choice (Optuna samples, it does not enumerate)")
    else:
        search = BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)  # it ignores Tune's limit
        # Rungs are in steps, all before the last one: a trial that reaches its end finishes on its own.
        max_t, grace = _asha_steps(space)
        scheduler = ASHAScheduler(time_attr="step", metric=SCORE.key, mode="max", max_t=max_t, grace_period=grace,
                                  reduction_factor=s.reduction_factor, stop_last_trials=False)
        param_space = space.param_space()
    callbacks = [_reaper_callback(reaper)] + ([_progress_callback(on_event, space)] if on_event else [])
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=s.samples,
                                    max_concurrent_trials=s.max_concurrent if s.mode == "multi" else None,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=str(sweep_dir.parent), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=callbacks),
    )
    started = time.perf_counter()
    legacy = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new engine prints its banner even at verbose=0
    try:
        grid = tuner.fit()
    finally:
        ray.get(reaper.release_all.remote())
        ray.kill(reaper)
        if legacy is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = legacy
    wall = time.perf_counter() - started
    trials = sorted((_outcome(r, space, trials_dir) for r in grid), key=lambda t: t.number)
    for i, t in enumerate(trials):  # Tune counts from 0 or 1 depending on the searcher: number them 0..n-1
        t.number = i
    return write_report(space, name, sweep_dir, trials, objectives, wall)


def _trial_dirname(trial: Any) -> str:
    """Tune's per-trial directory: ``<creation counter>-<trial id>`` (the counter orders the table)."""
    return f"{trial.experiment_tag.split('_', 1)[0]}-{trial.trial_id}"


def _outcome(result: Any, space: Space, trials_dir: Path) -> TrialOutcome:
    counter, _, dir_id = Path(result.path).name.partition("-")
    trial_id = str(result.metrics.get("trial_id") or dir_id)
    number = int(counter) if counter.isdigit() else 0
    run_dirs = sorted(trials_dir.glob(f"{trial_id}-*"))
    run_dir = run_dirs[0] if run_dirs else None
    try:
        _, params = space.config_from(result.config)
    except (ConfigError, KeyError, IndexError):
        params = {}
    last = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics = {k: v for k, v in last.items() if k.startswith("objective.")}
    step = int(last.get("step", 0))
    if result.error is not None:
        text = [line for line in str(result.error).strip().splitlines() if line.strip()]
        message = re.sub(r"^[\w.]+(Error|Exception): ", "", text[-1]) if text else "failed"
        trace = Path(result.path) / "error.txt"
        return TrialOutcome(number, trial_id, "error", step, metrics, params, run_dir, last, message,
                            trace if trace.is_file() else None)
    total = None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        total = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("max_steps")
    done = step >= total if total else run_dir is not None and (run_dir / "summary.json").is_file()
    return TrialOutcome(number, trial_id, "done" if done else "stopped", step, metrics, params, run_dir, last)


def _progress_callback(on_event: Callable[[str], None], space: Space) -> Any:
    """A Tune callback turning trial events into one line each (the CLI prints them)."""
    from ray.tune import Callback

    objectives = space.objectives()

    class Progress(Callback):
        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.last: dict[str, dict] = {}

        def say(self, text: str) -> None:
            on_event(f"[{time.perf_counter() - self.started:6.1f}s] {text}")

        def on_trial_start(self, iteration, trials, trial, **info):
            try:
                params = space.config_from(trial.config)[1]
            except (ConfigError, KeyError, IndexError):
                params = {}
            self.say(f"trial {trial.trial_id} started: "
                     + ("  ".join(f"{k}={short(v)}" for k, v in params.items()) or "(base config)"))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last[trial.trial_id] = result

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = self.last.get(trial.trial_id, {})
            figures = "  ".join(f"{o.name} {short(float(r.get(o.key, math.nan)))}" for o in objectives)
            self.say(f"trial {trial.trial_id} ended at step {r.get('step', 0)}: {figures}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.say(f"trial {trial.trial_id} failed (its error is in the table below)")

    return Progress()
