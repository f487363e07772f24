"""A guard that fails on any read of tensor data by the host: what a CUDA exchange must not do.

On a GPU each such read is a device→host copy and a wait for the device (``torch.cuda.set_sync_debug_mode``
catches them there). On the CPU nothing is copied, so this guard catches the same calls by name: a scalar
read (``item``, ``bool``, ``int``, ``float``: ``aten::_local_scalar_dense``), an operation whose output shape
depends on values (``nonzero``, ``masked_select``, ``unique``), and the Python-side reads ``tolist``,
``numpy`` and ``cpu``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive",
                   "unique_dim", "is_nonzero", "equal"}


class HostRead(AssertionError):
    pass


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _DATA_DEPENDENT:
            raise HostRead(f"host read of tensor data: aten::{name}")
        return func(*args, **(kwargs or {}))


_LOCK = threading.Lock()
_USERS = 0
_SAVED: dict[str, object] = {}


_INSIDE = threading.local()


def _refuse(method: str, original):
    def call(self, *args, **kwargs):
        if getattr(_INSIDE, "depth", 0):
            raise HostRead(f"host read of tensor data: Tensor.{method}()")
        return original(self, *args, **kwargs)
    return call


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Raise :class:`HostRead` on the first read of tensor data by the host inside the block (this thread
    only: other threads of a local collective may read while this one is inside)."""
    global _USERS
    with _LOCK:
        if _USERS == 0:
            for m in ("tolist", "numpy", "cpu"):
                _SAVED[m] = getattr(torch.Tensor, m)
                setattr(torch.Tensor, m, _refuse(m, _SAVED[m]))
        _USERS += 1
    _INSIDE.depth = getattr(_INSIDE, "depth", 0) + 1
    try:
        with _Mode():
            yield
    finally:
        _INSIDE.depth -= 1
        with _LOCK:
            _USERS -= 1
            if _USERS == 0:
                for m, f in _SAVED.items():
                    setattr(torch.Tensor, m, f)
