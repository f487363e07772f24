"""What collective calls moved, as one worker saw it: packet bytes, wire records, time, dropped frames."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rayq.transport import Purpose, WireRecord


@dataclass
class Ledger:
    """What one or more collective calls moved, as seen by worker ``rank``.

    ``bytes_up`` / ``bytes_down``: packet bytes this worker sent / decoded from others (the codec's figure:
    bits per element). ``wire``: every collective with every worker's bytes — payload, padding and
    control — which is what the network model times; ``wire_up`` etc. are this worker's totals from it.
    """

    rank: int = 0
    elements: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    packets: int = 0
    rounds: int = 0
    encode_s: float = 0.0
    comm_s: float = 0.0
    decode_s: float = 0.0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    packet_bytes: list[int] = field(default_factory=list)
    wire: list[WireRecord] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (worker, why): frames that failed to decode
    unchecked: list[torch.Tensor] = field(default_factory=list)   # per-worker frame checks still on the device
    spans: list[tuple[str, Any, Any]] = field(default_factory=list)  # (time field, CUDA events) not yet read

    def resolve(self) -> None:
        """Read what the device still holds: the frame checks (into ``dropped``, one host read for all of
        them) and the CUDA-event spans of the exchange's stages (into ``encode_s``, ``comm_s``, ``decode_s``)."""
        read_spans(self)
        if not self.unchecked:
            return
        checks = torch.stack([ok.reshape(-1) for ok in self.unchecked]).cpu().tolist()
        self.unchecked = []
        for ok in checks:
            self.dropped.extend((w, "corrupted frame: its header or CRC-32 failed the check on the device")
                                for w, good in enumerate(ok) if not good)

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.bytes_up / self.elements if self.elements else 0.0

    @property
    def compression_ratio(self) -> float:
        return 32.0 * self.elements / (8.0 * self.bytes_up) if self.bytes_up else 0.0

    @property
    def distortion(self) -> float | None:
        """Relative distortion ‖C(g)−g‖²/‖g‖² of this worker's own contribution (when measured)."""
        return self.err_sq / self.ref_sq if self.ref_sq > 0 else None

    @property
    def wire_up(self) -> int:
        return sum(r.up(self.rank) for r in self.wire)

    @property
    def wire_down(self) -> int:
        return sum(r.down(self.rank) for r in self.wire)

    @property
    def padding(self) -> int:
        return sum(r.pad(self.rank) for r in self.wire)

    def purpose_up(self, purpose: Purpose) -> int:
        return sum(r.up(self.rank) for r in self.wire if r.purpose == purpose.value)

    def add(self, other: Ledger) -> None:
        for name in ("elements", "bytes_up", "bytes_down", "packets", "rounds", "encode_s", "comm_s",
                     "decode_s", "err_sq", "ref_sq"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.packet_bytes.extend(other.packet_bytes)
        self.wire.extend(other.wire)
        self.dropped.extend(other.dropped)
        self.unchecked.extend(other.unchecked)
        self.spans.extend(other.spans)


class Clock:
    """Times spans of a step into an object's float fields (a :class:`Ledger`'s stages, a step's compute).

    On the CPU a mark is the wall clock. On CUDA it is an event recorded on the current stream, so a span is
    device time: waiting for the device at every mark would serialise the host with it (and time only the
    host's queueing), so the spans wait in the object's ``spans`` list until :func:`read_spans`, at the end
    of the step, when the training loop waits for the loss anyway."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> Any:
        if self.cuda:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
            return mark
        return time.perf_counter()

    def charge(self, target: Any, name: str, start: Any, end: Any = None) -> None:
        """Add the span from ``start`` to ``end`` (default: now) to ``target``'s ``name`` seconds."""
        end = self.now() if end is None else end
        if self.cuda:
            target.spans.append((name, start, end))
        else:
            setattr(target, name, getattr(target, name) + end - start)


def read_spans(target: Any) -> None:
    """Add ``target``'s pending CUDA-event spans to its fields (waiting for the last of them if it must)."""
    for name, start, end in target.spans:
        end.synchronize()
        setattr(target, name, getattr(target, name) + start.elapsed_time(end) / 1000.0)
    target.spans = []
