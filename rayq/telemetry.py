"""What a person looks at: TensorBoard files, run events, traces; the launch layer prints progress and a summary.

Rank 0 writes the TensorBoard event files under ``<run>/tensorboard``; the CLI prints progress lines
it receives from rank 0 and a summary table at the end. Library code logs; only the CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCALAR_TAGS = (
    "train/loss", "eval/accuracy", "eval/loss", "comm/bits_per_element", "comm/bytes_up", "comm/bytes_down",
    "comm/compression_ratio", "comm/distortion", "time/compute_s", "time/encode_s", "time/comm_s",
    "time/decode_s", "time/step_s",
)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def hparam_value(v: Any) -> bool | int | float | str:
    if isinstance(v, (bool, int, float, str)):
        return v
    return "null" if v is None else str(v)


class TensorBoardLog:
    """Scalars per step and the config as hparams (so TensorBoard's HParams view compares runs)."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.writer = SummaryWriter(log_dir=str(directory))

    def scalars(self, metrics: dict[str, Any], step: int) -> None:
        for tag, value in metrics.items():
            if "/" in tag and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def hparams(self, config: dict[str, Any], final: dict[str, Any]) -> None:
        params = {k: hparam_value(v) for k, v in flatten(config).items()}
        metrics = {f"hparam/{k}": v for k, v in final.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.writer.add_hparams(params, metrics, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class EventLog:
    """Run events (faults, recoveries, dropped payloads), each with its step and worker: one JSON line in
    ``<run>/events.jsonl``, a TensorBoard text entry (``faults/events``) and running counters
    (``faults/<kind>``), and, unless ``quiet``, an item for the console (``emit``: the progress channel)."""

    def __init__(self, run_dir: Path, tb: TensorBoardLog | None = None,
                 emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(run_dir) / "events.jsonl"
        self.counts: Counter[str] = Counter(e["event"] for e in read_events(Path(run_dir)))  # a restarted run goes on
        self.file = open(self.path, "a")
        self.tb, self.emit = tb, emit

    def log(self, step: int, kind: str, worker: int | None, detail: str = "", quiet: bool = False,
            **extra: Any) -> dict[str, Any]:
        rec = {"event": kind, "step": step, "worker": worker, "detail": detail,
               **{k: v for k, v in extra.items() if v is not None}}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.counts[kind] += 1
        if self.tb is not None:
            self.tb.text("faults/events", event_line(rec), step)
            self.tb.writer.add_scalar(f"faults/{kind}", self.counts[kind], step)
            self.tb.writer.flush()
        log.info(event_line(rec))
        if self.emit is not None and not quiet:
            self.emit(rec)
        return rec

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.writer.flush()


def event_line(rec: dict[str, Any]) -> str:
    worker = "" if rec.get("worker") is None else f"  worker {rec['worker']}"
    when = f"  t={rec['time_s']:.1f}s" if isinstance(rec.get("time_s"), (int, float)) else ""
    return f"event  step {rec['step']}{worker}  {rec['event']}{when}  {rec.get('detail', '')}".rstrip()


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The events a run logged (``events.jsonl``), in order."""
    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_trace(path: Path) -> tuple[list, dict[int, float]]:
    """Read a run's ``trace.jsonl``: its steps (netsim.TraceStep, in order) and ``{step: eval accuracy}``.

    A run resumed after a crash may have logged some steps twice; the later record of a step wins.
    """
    import json

    from rayq.netsim import TraceStep

    steps: dict[int, TraceStep] = {}
    evals: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if "eval_step" in rec:
            evals[rec["eval_step"]] = rec["eval/accuracy"]
        else:
            wire = tuple(tuple(w) for w in rec["wire"])  # WireRecord JSON: kind, rounds, up, down?, purpose?, padding?
            slow, counted = rec.get("slowdown"), rec.get("counted")
            steps[rec["step"]] = TraceStep(rec["step"], rec["compute_s"], wire,
                                           None if slow is None else tuple(slow),
                                           None if counted is None else tuple(bool(c) for c in counted))
    return [steps[k] for k in sorted(steps)], evals
