"""Checkpoints that hold everything a resumed run needs, written so a crash never corrupts one.

Layout of one checkpoint directory (Ray Train merges the files every rank reports into it)::

    model.pt          rank 0: model, optimizer, step, RNG state, run metadata
    codec_rank{r}.pt  rank r: that worker's codec state (error-feedback residuals, PowerSGD Q, ...)

Files are written under a temporary name and renamed, so a worker killed mid-write leaves no
half-written ``model.pt`` behind; Ray only registers the directory after every rank has reported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

MODEL_FILE = "model.pt"


def codec_file(rank: int) -> str:
    return f"codec_rank{rank}.pt"


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def save(directory: Path, rank: int, *, model_state: dict | None, codec_state: dict, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0 and model_state is not None:
        atomic_save({**model_state, "meta": meta}, directory / MODEL_FILE)
    atomic_save({"codec": codec_state, "step": meta["step"], "world": meta["world"]}, directory / codec_file(rank))


class CheckpointError(RuntimeError):
    pass


def load(directory: Path, rank: int) -> tuple[dict, dict | None]:
    """Return (model file contents, this rank's codec state or None if the world size changed)."""
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(f"{directory} is not a rayq checkpoint: {MODEL_FILE} is missing")
    state = torch.load(model_path, map_location="cpu", weights_only=False)
    codec_path = directory / codec_file(rank)
    codec = None
    if codec_path.is_file():
        c = torch.load(codec_path, map_location="cpu", weights_only=False)
        if c["step"] != state["meta"]["step"]:
            raise CheckpointError(f"{codec_path} is from step {c['step']}, {MODEL_FILE} from {state['meta']['step']}")
        if c["world"] == state["meta"]["world"]:
            codec = c["codec"]
    return state, codec
