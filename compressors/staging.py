"""Host values onto a device without waiting for it.

A plain copy from ordinary (pageable) host memory to a GPU makes the host wait until the device's stream
has run everything queued before it (PyTorch copies, then synchronizes the stream): one such copy of a
packet header or a constant table stalls the whole exchange. :func:`to_device` stages the values in pinned
memory and copies them without blocking; PyTorch's pinned-memory cache keeps the staging buffer until the
copy has run. On the CPU it is an ordinary tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

_DEVICE_KERNELS_ON_CPU = False


def host_kernels(device: torch.device) -> bool:
    """Whether work on ``device`` takes the CPU's own kernels (compiled loops, cache-sized slices, counts read
    by the host) rather than the tensor operations every other device runs. Inside :func:`device_kernels`
    CPU tensors take the latter, so a GPU's code paths are tested where no GPU is."""
    return device.type == "cpu" and not _DEVICE_KERNELS_ON_CPU


@contextlib.contextmanager
def device_kernels() -> Iterator[None]:
    """Within the block, codecs run CPU tensors through the code paths of other devices (process-wide)."""
    global _DEVICE_KERNELS_ON_CPU
    before, _DEVICE_KERNELS_ON_CPU = _DEVICE_KERNELS_ON_CPU, True
    try:
        yield
    finally:
        _DEVICE_KERNELS_ON_CPU = before


def to_device(values: bytes | bytearray | Sequence[int] | Sequence[float] | np.ndarray | torch.Tensor,
              dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``values`` (bytes are read as uint8; a tensor must be on the CPU) as a tensor of ``dtype`` on ``device``,
    queued on its current stream without waiting for the device."""
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
    elif isinstance(values, np.ndarray):
        host = torch.from_numpy(values).to(dtype)
    elif isinstance(values, (bytes, bytearray)):
        host = torch.frombuffer(bytearray(values), dtype=torch.uint8) if values else torch.empty(0, dtype=torch.uint8)
        host = host.view(dtype) if dtype != torch.uint8 else host
    else:
        host = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
