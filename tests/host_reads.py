"""A guard that fails on any read of tensor data by the host, and on any tensor made from host values other
than through :func:`compressors.staging.to_device`: what a CUDA exchange must not do.

On a GPU each such read is a device→host copy and a wait for the device, and a copy of ordinary host memory
to the device waits for its stream too (``torch.cuda.set_sync_debug_mode`` catches both there). On the CPU
nothing is copied, so this guard catches the same calls by name: a scalar read (``item``, ``bool``, ``int``,
``float``: ``aten::_local_scalar_dense``), an operation whose output shape depends on values (``nonzero``,
``masked_select``, ``unique``), the Python-side reads ``tolist``, ``numpy`` and ``cpu``, and tensors made
from Python values (``torch.tensor``, ``as_tensor``: ``aten::lift_fresh``; ``torch.frombuffer``), which on a
GPU would be copied there from pageable memory.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compressors import staging

_DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive",
                   "unique_dim", "is_nonzero", "equal"}


class HostRead(AssertionError):
    pass


def _staging() -> bool:
    """Whether :func:`compressors.staging.to_device` is on the call stack (it may make tensors of host values)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is staging.to_device.__code__:
            return True
        frame = frame.f_back
    return False


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _DATA_DEPENDENT:
            raise HostRead(f"host read of tensor data: aten::{name}")
        if name == "lift_fresh" and not _staging():
            raise HostRead("a tensor made from host values (torch.tensor): a blocking copy to a GPU; "
                           "use compressors.staging.to_device")
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


def _refuse_frombuffer(original):
    def call(*args, **kwargs):
        if getattr(_INSIDE, "depth", 0) and not _staging():
            raise HostRead("a tensor made from host bytes (torch.frombuffer): a blocking copy to a GPU; "
                           "use compressors.staging.to_device")
        return original(*args, **kwargs)
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
            _SAVED["frombuffer"] = torch.frombuffer
            torch.frombuffer = _refuse_frombuffer(torch.frombuffer)
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
                torch.frombuffer = _SAVED.pop("frombuffer")
                for m, f in _SAVED.items():
                    setattr(torch.Tensor, m, f)
