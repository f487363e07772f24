"""Writers for a leakage report: JSON, a Markdown table, PNG grids and TensorBoard image summaries.

Reconstructions are shown next to the originals, one row per (codec, attacker), one file or tag per
attack. matplotlib and TensorBoard are imported only when their writer runs.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayq.privacy.leak import AttackName, LeakReport, LeakRow
from rayq.privacy.metrics import SUCCESS_PSNR_DB, SUCCESS_SSIM
from rayq.privacy.wire import CodecSpec, LayerRule


def _plain(value: Any) -> Any:
    """JSON-safe: enums by value, dataclasses as dicts (codec parameters as objects), ±inf as strings,
    NaN as null."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, CodecSpec):
        return {"name": value.name, **{f.name: _plain(dict(value.params) if f.name == "params" else getattr(value, f.name))
                                       for f in dataclasses.fields(value)}}
    if isinstance(value, LayerRule):
        return {"pattern": value.pattern, "codec": value.codec, "params": _plain(dict(value.params)),
                "per_channel": value.per_channel}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def _row_dict(row: LeakRow) -> dict[str, Any]:
    return {
        "codec": row.codec, "attack": row.attack.value, "knowledge": row.knowledge.value,
        "bits_per_coordinate": row.bits_per_coordinate, "psnr_db": list(row.psnr), "ssim": list(row.ssim),
        "psnr_median_db": row.psnr_median, "ssim_median": row.ssim_median, "success_rate": row.success_rate,
        "label_accuracy": row.label_accuracy, "final_loss": list(row.losses), "closure_calls": list(row.iterations),
        "restarts": row.restarts, "seconds": row.seconds,
    }


def write_json(report: LeakReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": _plain(report.config), "seconds": report.seconds,
           "success_threshold": {"psnr_db": SUCCESS_PSNR_DB, "ssim": SUCCESS_SSIM},
           "true_labels": report.labels.tolist(), "rows": [_plain(_row_dict(r)) for r in report.rows]}
    path.write_text(json.dumps(doc, indent=2, allow_nan=False))
    return path


def _fmt(x: float, digits: int = 1) -> str:
    return "∞" if math.isinf(x) and x > 0 else f"{x:.{digits}f}"


def markdown_table(report: LeakReport) -> str:
    """PSNR/SSIM (median [min, max] over images) against bits per coordinate, one line per cell."""
    lines = ["| codec | bits/coord | attack | attacker | PSNR dB median [min, max] | SSIM median [min, max] "
             "| success | label acc | closure calls | s |",
             "|---|---:|---|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(report.rows, key=lambda r: (r.attack.value, -r.bits_per_coordinate, r.codec, r.knowledge.value)):
        lines.append(
            f"| {r.codec} | {r.bits_per_coordinate:.2f} | {r.attack.value} | {r.knowledge.value} "
            f"| {_fmt(r.psnr_median)} [{_fmt(min(r.psnr))}, {_fmt(max(r.psnr))}] "
            f"| {r.ssim_median:.3f} [{min(r.ssim):.3f}, {max(r.ssim):.3f}] | {r.success_rate:.0%} "
            f"| {r.label_accuracy:.0%} | {sum(r.iterations)} | {r.seconds:.1f} |")
    cfg = report.config
    lines.append("")
    lines.append(f"Task {cfg.task}, victim {cfg.victim.value}, {cfg.trials} trial(s) × batch {cfg.batch_size}, "
                 f"labels {cfg.labels.value}, seed {cfg.seed}; success = PSNR ≥ {SUCCESS_PSNR_DB:g} dB or "
                 f"SSIM ≥ {SUCCESS_SSIM:g}; {report.seconds:.0f} s in all.")
    return "\n".join(lines) + "\n"


def write_markdown(report: LeakReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(report))
    return path


def _rows_of(report: LeakReport, attack: AttackName) -> list[LeakRow]:
    return [r for r in report.rows if r.attack is attack]


def write_png_grids(report: LeakReport, directory: str | Path) -> list[Path]:
    """One PNG per attack: the originals on top, then one row of reconstructions per (codec, attacker)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for attack in dict.fromkeys(r.attack for r in report.rows):
        rows = _rows_of(report, attack)
        grids = [("original", report.truth)] + [
            (f"{r.codec} [{r.knowledge.value}]\n{r.bits_per_coordinate:.2f} b/c, PSNR {_fmt(r.psnr_median)}", r.images)
            for r in rows]
        cols = report.truth.shape[0]
        label_in, cell_in = 3.2, 1.1
        width, height = label_in + cell_in * cols, 0.5 + cell_in * len(grids)
        fig, axes = plt.subplots(len(grids), cols, figsize=(width, height), squeeze=False)
        fig.subplots_adjust(left=label_in / width, right=0.98, top=1 - 0.4 / height, bottom=0.1 / height,
                            wspace=0.05, hspace=0.08)
        for i, (title, images) in enumerate(grids):
            for j in range(cols):
                ax = axes[i][j]
                img = images[j].detach().cpu()
                pixels = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
                ax.imshow(pixels.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[i][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=7)
        fig.suptitle(f"{attack.value}: originals vs reconstructions", fontsize=9, y=1 - 0.12 / height)
        path = directory / f"grid_{attack.value}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]+", "_", text).strip("_")


def write_tensorboard(report: LeakReport, log_dir: str | Path) -> Path:
    """The originals and every cell's reconstructions as image summaries (``add_images``), plus the table."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        writer.add_images("original", report.truth, 0)
        for r in report.rows:
            writer.add_images(_tag(f"{r.attack.value}/{r.knowledge.value}/{r.codec}"), r.images, 0)
            writer.add_scalar(_tag(f"psnr_median/{r.attack.value}/{r.knowledge.value}/{r.codec}"), r.psnr_median, 0)
        writer.add_text("leak/table", markdown_table(report), 0)
    finally:
        writer.close()
    return log_dir


@dataclass(frozen=True)
class WrittenReport:
    json: Path
    markdown: Path
    png: tuple[Path, ...]
    tensorboard: Path


def write_all(report: LeakReport, directory: str | Path) -> WrittenReport:
    """``leak.json``, ``leak.md``, ``grid_<attack>.png`` and a ``tensorboard/`` run under ``directory``."""
    directory = Path(directory)
    return WrittenReport(json=write_json(report, directory / "leak.json"),
                         markdown=write_markdown(report, directory / "leak.md"),
                         png=tuple(write_png_grids(report, directory)),
                         tensorboard=write_tensorboard(report, directory / "tensorboard"))
