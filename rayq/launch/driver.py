"""Drive a run on Ray: resolve the config, start (or join) Ray, fit a TorchTrainer, relay progress.

The trainer is found by name (``trainer: sync`` → ``trainers.sync.train_loop``) or as
``package.module:function`` for a user's own loop: a plugin boundary, so users can point a run at
their own module without changing rayq.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from rayq.config import RunConfig
from rayq.errors import TrainingError
from rayq.schema import ConfigError
from rayq.tasks import check_available, get_task

log = logging.getLogger(__name__)

#: Ray Train's controller polls workers every 2 s by default; each report waits for a poll.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore"}


@dataclass
class DriverResult:
    """What a driver-run trainer (``find_runner``) returns, shaped like Ray Train's ``Result`` for summarize."""

    return_value: dict[str, Any]
    path: str | None = None

    @property
    def checkpoint(self) -> DriverResult | None:
        return self if self.path else None


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill what the config leaves to the task (epochs, batch size, learning rate) and name the run."""
    task = get_task(cfg.task)
    opt = cfg.optimizer if cfg.optimizer.lr is not None else replace(cfg.optimizer, lr=task.lr)
    epochs = cfg.epochs if cfg.epochs is not None else task.epochs
    batch = cfg.batch_size if cfg.batch_size is not None else task.batch_size
    name = cfg.name or f"{cfg.task}-{cfg.compression.codec}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    out = str(Path(cfg.output_dir).expanduser().resolve())
    resume = str(Path(cfg.resume).resolve()) if cfg.resume else None
    resolved = replace(cfg, optimizer=opt, epochs=epochs, batch_size=batch, name=name, output_dir=out, resume=resume)
    if cfg.use_gpu is False and cfg.backend == "nccl":
        raise ConfigError("backend='nccl' needs use_gpu=true; choose one of: auto, gloo")
    return resolved


def find_trainer(name: str) -> Callable[[dict[str, Any]], Any]:
    module, _, func = name.partition(":")
    if "." not in module and not func:
        module, func = f"trainers.{module}", "train_loop"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ConfigError(f"trainer={name!r}: cannot import {module!r} ({err}); built-in trainers: sync, "
                          "or give package.module:function") from err
    fn = getattr(mod, func or "train_loop", None)
    if fn is None:
        raise ConfigError(f"trainer={name!r}: {module} has no function {func or 'train_loop'!r}")
    return fn


def find_runner(name: str) -> Callable[..., dict[str, Any]] | None:
    """A trainer module's own driver, ``run(cfg, run_dir, on_progress) -> final metrics``, if it has one.

    Such a trainer (``volunteer``) drives its own actors from the driver instead of a TorchTrainer.
    """
    module, _, func = name.partition(":")
    if func:
        return None
    if "." not in module:
        module = f"trainers.{module}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        return None
    return getattr(mod, "run", None)


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a ``--address`` a driver cannot join: Ray itself retries an unreachable GCS for minutes."""
    import socket

    if address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r} is a dashboard (Jobs API) address; `rayq train --address` takes "
                          f"the GCS address HEAD:6379, or submit the run as a job: rayq submit --address {address} "
                          "-- train ...")
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is invalid; expected HOST:PORT of a head's GCS (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"cannot reach a Ray head at {address} ({err.strerror or err}); start one with "
                          "`ray start --head --port=6379` (or `bash clusters/local-cluster.sh start`) and pass "
                          "its GCS address") from None


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Start a local Ray (or connect to ``address``) quietly: progress comes from rayq, not Ray's logs."""
    import ray

    os.environ.update(RAY_ENV)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR,
                                  runtime_env={"env_vars": dict(RAY_ENV)})
    if address:
        check_address(address)
        kwargs["address"] = address
    else:
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    ray.init(**kwargs)


def check_before_start(cfg: RunConfig) -> None:
    if find_runner(cfg.trainer) is None:
        find_trainer(cfg.trainer)
    check_available(cfg.task, cfg.data_dir)
    run_dir = Path(cfg.output_dir) / str(cfg.name)
    if run_dir.exists() and any(run_dir.glob("checkpoint_*")):
        raise ConfigError(f"name={cfg.name!r}: run directory {run_dir} already holds checkpoints; choose another "
                          "name, or continue it with --resume <checkpoint dir>")


def prepare(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """Resolve and check a config, create its run directory and save the resolved config there."""
    cfg = resolve(cfg)
    check_before_start(cfg)
    run_dir = Path(cfg.output_dir) / str(cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.dump(run_dir / "config.yaml")
    return cfg, run_dir


def make_trainer(cfg: RunConfig, run_dir: Path, progress: Any = None, callbacks: list | None = None,
                 loop_config: dict[str, Any] | None = None):
    """The Ray Train ``TorchTrainer`` for a prepared config (used by ``train`` and by Tune trials)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.use_gpu and cfg.gpus_per_worker >= 1 else "gloo")
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        find_trainer(cfg.trainer),
        train_loop_config=loop_config or {"config": cfg.to_dict(), "run_dir": str(run_dir), "progress": progress},
        torch_config=TorchConfig(backend=backend, timeout_s=int(cfg.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(
            name=cfg.name, storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks or [],
        ),
    )


def summarize(cfg: RunConfig, run_dir: Path, result: Any, wall_s: float) -> dict[str, Any]:
    """The run's final figures (the CLI's summary table), also written to ``summary.json``."""
    import json

    final = dict(result.return_value or {})
    elements = final.get("comm/elements", 0)
    steps = final.get("step", 0)
    summary = {
        **{k: v for k, v in final.items() if isinstance(v, (int, float, str))},
        "run": cfg.name, "task": cfg.task, "codec": cfg.compression.codec, "workers": cfg.workers,
        "comm/bytes_up_total": final.get("comm/bytes_up_total", 0),
        "wall_s": wall_s,
        "run_dir": str(run_dir),
        "tensorboard": str(run_dir / "tensorboard"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    if elements and steps:
        bits = 8.0 * summary["comm/bytes_up_total"] / (elements * steps)
        summary["comm/bits_per_element"] = bits
        summary["comm/compression_ratio"] = 32.0 / bits
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def train(cfg: RunConfig, on_progress: Callable[[dict[str, Any]], None] | None = None,
          address: str | None = None) -> dict[str, Any]:
    """Run one training job to completion and return its summary (also written to summary.json)."""
    import ray
    from ray.util.queue import Empty, Queue

    cfg, run_dir = prepare(cfg)
    init_ray(address)
    runner = find_runner(cfg.trainer)
    if runner is not None:
        started = time.perf_counter()
        final = runner(cfg, run_dir, on_progress)
        return summarize(cfg, run_dir, DriverResult(final, final.pop("checkpoint", None)), time.perf_counter() - started)
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = make_trainer(cfg, run_dir, progress=queue)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = err

    started = time.perf_counter()
    thread = threading.Thread(target=fit, name="rayq-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            item = queue.get(timeout=0.5)
        except Empty:
            continue
        if on_progress:
            on_progress(item)
    thread.join()
    try:
        ray.kill(queue.actor)
    except Exception:  # noqa: BLE001 - already gone
        pass
    if "error" in outcome:
        raise TrainingError(describe_failure(outcome["error"])) from outcome["error"]
    return summarize(cfg, run_dir, outcome["result"], time.perf_counter() - started)


def describe_failure(err: BaseException) -> str:
    """Turn Ray Train's terminal errors into the first worker's own message."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, exc = sorted(failures.items())[0]
        cause = exc
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        text = str(cause).strip().splitlines()
        last = next((line for line in reversed(text) if line.strip()), str(cause))
        return f"worker {rank} failed: {last}"
    return f"{type(err).__name__}: {err}"


def train_many(cfgs: list[RunConfig], address: str | None = None) -> list[dict[str, Any]]:
    """Train several configurations back to back in one worker group (trainer ``sweep``).

    All of them must share ``workers``, ``cpus_per_worker``, ``use_gpu`` and ``backend``: they run on the
    same Ray Train workers, one after another, each with its own run directory and summary. A run that
    diverges (NaN/Inf) gets a summary with an ``error`` and the others go on.
    """
    prepared = [prepare(c) for c in cfgs]
    first = prepared[0][0]
    for c, _ in prepared[1:]:
        for key in ("workers", "cpus_per_worker", "use_gpu", "gpus_per_worker", "backend"):
            if getattr(c, key) != getattr(first, key):
                raise ConfigError(f"train_many: every run must share {key}; got {getattr(first, key)!r} and "
                                  f"{getattr(c, key)!r}")
    loops = ("sync", "ddp")
    odd = next((c.trainer for c, _ in prepared if c.trainer not in loops), None)
    if odd is not None:
        raise ConfigError(f"train_many: trainer={odd!r} cannot share a worker group; choose one of: {', '.join(loops)}")
    init_ray(address)
    sweep_cfg = replace(first, trainer="trainers.sweep:train_loop", name=f"{first.name}-sweep")
    sweep_dir = prepared[0][1].parent / str(sweep_cfg.name)
    trainer = make_trainer(sweep_cfg, sweep_dir, loop_config={
        "runs": [{"config": c.to_dict(), "run_dir": str(d)} for c, d in prepared]})
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray Train's terminal errors
        raise TrainingError(describe_failure(err)) from err
    wall = time.perf_counter() - started
    summaries = []
    for (c, d), final in zip(prepared, result.return_value or []):
        if "error" in final:
            summaries.append({"run": c.name, "codec": c.compression.codec, "error": final["error"]})
            continue
        # each run's own loop time (the shared start-up is not split across runs)
        summaries.append(summarize(c, d, _Finished(final), final.get("time/wall_s", wall / len(prepared))))
    return summaries


class _Finished:
    """What ``summarize`` reads from a Ray ``Result``, for one run of a sweep."""

    def __init__(self, return_value: dict) -> None:
        self.return_value = return_value
        self.checkpoint = None
