"""Host values onto a device without waiting for it.

A plain copy from ordinary (pageable) host memory to a GPU makes the host wait until the device's stream
has run everything queued before it (PyTorch copies, then synchronizes the stream): one such copy of a
packet header or a constant table stalls the whole exchange. :func:`to_device` stages the values in pinned
memory and copies them without blocking; PyTorch's pinned-memory cache keeps the staging buffer until the
copy has run. On the CPU it is an ordinary tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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
