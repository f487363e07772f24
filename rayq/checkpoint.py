"""Checkpoints that hold everything a resumed run needs, written so a crash never corrupts one.

Layout of one checkpoint directory (Ray Train merges the files every rank reports into it)::

    model.pt          rank 0: model, optimizer, RNG state, run metadata (step, clock, bytes, format)
    codec_rank{r}.pt  rank r: that worker's own state — codec memories (error feedback, PowerSGD),
                      its schedule (anchor, LAQ references, period), a DDP hook's state

Files are written under a temporary name and renamed, so a worker killed mid-write leaves no
half-written file behind; Ray only registers the directory after every rank has reported. A
checkpoint written by another format version is refused with a clear message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

MODEL_FILE = "model.pt"
#: Bumped when the layout changes; :func:`load` refuses other versions.
FORMAT = 2


class CheckpointError(RuntimeError):
    pass


def codec_file(rank: int) -> str:
    return f"codec_rank{rank}.pt"


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def save(directory: Path, rank: int, *, model_state: dict | None, worker_state: dict[str, Any],
         meta: dict[str, Any]) -> None:
    """Write rank 0's model file (when ``model_state`` is given) and this rank's own state."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "format": FORMAT}
    if rank == 0 and model_state is not None:
        atomic_save({**model_state, "meta": meta}, directory / MODEL_FILE)
    atomic_save({"codec": worker_state, "step": meta["step"], "world": meta["world"], "format": FORMAT},
                directory / codec_file(rank))


def load(directory: Path, rank: int) -> tuple[dict, dict | None]:
    """Return (model file contents, this rank's own state or None if the world size changed)."""
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(f"{directory} is not a rayq checkpoint: {MODEL_FILE} is missing")
    state = torch.load(model_path, map_location="cpu", weights_only=False)
    version = state["meta"].get("format", 1)
    if version != FORMAT:
        raise CheckpointError(f"{directory} was written in checkpoint format {version}; this rayq reads format "
                              f"{FORMAT}. Resume it with the rayq version that wrote it, or start a new run")
    codec_path = directory / codec_file(rank)
    worker = None
    if codec_path.is_file():
        c = torch.load(codec_path, map_location="cpu", weights_only=False)
        if c["step"] != state["meta"]["step"]:
            raise CheckpointError(f"{codec_path} is from step {c['step']}, {MODEL_FILE} from {state['meta']['step']}")
        if c["world"] == state["meta"]["world"]:
            worker = c["codec"]
    return state, worker
