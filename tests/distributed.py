"""Run a function on N real torch.distributed (gloo) processes without Ray, for collective tests."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The result is on disk. Leave without the interpreter's teardown, where a C++ thread of the
    # process group or DDP's reducer that is still joinable aborts the process now and then
    # ("terminate called without an active exception": 2 runs in 20 of test_ddp_hook before this).
    os._exit(0)


def run_workers(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes; returns each rank's return value."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(world, _free_port(), out, fn, args), nprocs=world,
                           start_method="spawn", join=True)
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world)]
