"""What a person looks at (DESIGN.md §2: rayq.telemetry): TensorBoard files, progress lines, a summary.

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


def console_line(m: dict[str, Any]) -> str:
    """What the CLI prints for one item from a run: an event line or a progress line."""
    return event_line(m) if "event" in m else progress_line(m, m["total_steps"])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def progress_line(m: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {m['step']:>{len(str(total_steps))}}/{total_steps}", f"epoch {m.get('epoch', 0):.2f}",
             f"loss {m.get('train/loss', float('nan')):.4f}"]
    if "eval/accuracy" in m:
        parts.append(f"acc {m['eval/accuracy']:.4f}")
    parts.append(f"{m.get('comm/bits_per_element', 0):.2f} bits/elem")
    parts.append(f"x{m.get('comm/compression_ratio', 0):.1f}")
    parts.append(f"{m.get('time/step_s', 0) * 1000:.1f} ms/step")
    if "volunteer/alive" in m:
        parts.append(f"{m['volunteer/alive']:.0f}/{m.get('volunteer/peers', 0):.0f} peers")
    if "sim/time_s" in m:
        parts.append(f"sim {m['sim/time_s']:.1f} s")
    if m.get("faults/stragglers"):
        parts.append(f"{m['faults/stragglers']:.0f} straggling")
    return "  ".join(parts)


def table(rows: list[tuple[str, str]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [title] if title else []
    out.append(line)
    for k, v in rows:
        out.append(f"| {k:<{width}} | {v:<{vwidth}} |")
    out.append(line)
    return "\n".join(out)


def summary_table(result: dict[str, Any]) -> str:
    rows = [
        ("run", str(result["run"])),
        ("task / codec", f"{result['task']} / {result['codec']}"),
        ("workers", str(result["workers"])),
        ("test accuracy", f"{result['eval/accuracy']:.4f}"),
        ("test loss", f"{result['eval/loss']:.4f}"),
        ("train loss", f"{result['train/loss']:.4f}"),
        ("steps", str(result["step"])),
        ("bits per element", f"{result['comm/bits_per_element']:.3f}"),
        ("compression ratio", f"{result['comm/compression_ratio']:.1f}x"),
        ("bytes sent (per worker)", human_bytes(result["comm/bytes_up_total"])),
        ("bytes sent (all workers)", human_bytes(result["comm/bytes_up_total"] * result["workers"])),
        ("wall time", f"{result['wall_s']:.1f} s"),
        *fault_rows(result),
        ("tensorboard", f"tensorboard --logdir {result['tensorboard']}"),
        ("checkpoints", str(result["checkpoint"] or "(none)")),
    ]
    return table(rows, title="rayq summary")


def fault_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary rows of volunteer mode and fault injection, for the figures the run has."""
    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    def secs(x: float) -> str:
        return f"{x:.1f} s"

    spec = [
        ("sim/time_s", "simulated time", secs),
        ("sim/time_to_accuracy_s", "time to accuracy (simulated)", secs),
        ("volunteer/alive", "alive peers (end / min / mean)", None),
        ("volunteer/samples_per_s", "samples per second (simulated)", lambda x: f"{x:.1f}"),
        ("volunteer/utilisation", "utilisation (useful compute / online)", pct),
        ("volunteer/wasted_samples", "wasted samples", lambda x: f"{x:.0f}"),
        ("volunteer/staleness_mean", "staleness of state downloads (rounds)", lambda x: f"{x:.2f}"),
        ("recovery/lost_s", "time lost to recovery", secs),
        ("recovery/sim_lost_s", "time lost to recovery (simulated)", secs),
        ("faults/dropped_payloads", "dropped payloads", lambda x: f"{x:.0f}"),
    ]
    rows = []
    for key, label, fmt in spec:
        if key not in result or result[key] is None:
            continue
        if key == "sim/time_to_accuracy_s":
            target = result.get("volunteer/target_accuracy")
            label = f"time to accuracy {target:.2f} (simulated)" if target else label
        if key == "volunteer/alive":
            value = f"{result[key]:.0f} / {result.get('volunteer/alive_min', 0):.0f} / " \
                    f"{result.get('volunteer/alive_mean', 0):.1f} of {result.get('volunteer/peers', 0):.0f}"
        elif key == "volunteer/wasted_samples":
            value = f"{result[key]:.0f} ({pct(result.get('volunteer/wasted_fraction', 0))})"
        else:
            value = fmt(result[key])  # type: ignore[misc]
        rows.append((label, value))
    if "volunteer/target_accuracy" in result and "sim/time_to_accuracy_s" not in result:
        rows.insert(1, (f"time to accuracy {result['volunteer/target_accuracy']:.2f} (simulated)", "not reached"))
    if result.get("faults/events"):
        rows.append(("fault events", str(result["faults/events"])))
    return rows


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
            wire = tuple((k, r, tuple(b)) for k, r, b in rec["wire"])
            steps[rec["step"]] = TraceStep(rec["step"], rec["compute_s"], wire)
    return [steps[k] for k in sorted(steps)], evals
