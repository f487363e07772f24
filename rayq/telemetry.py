"""What a person looks at (DESIGN.md §2: rayq.telemetry): TensorBoard files, progress lines, a summary.

Rank 0 writes the TensorBoard event files under ``<run>/tensorboard``; the CLI prints progress lines
it receives from rank 0 and a summary table at the end. Library code logs; only the CLI prints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
        ("tensorboard", f"tensorboard --logdir {result['tensorboard']}"),
        ("checkpoints", str(result["checkpoint"] or "(none)")),
    ]
    return table(rows, title="rayq summary")


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
