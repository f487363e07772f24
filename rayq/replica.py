"""One worker's replica of the model and what a step of any schedule reports.

The pieces every schedule shares (:mod:`rayq.schedules`, :mod:`rayq.laq`): the :class:`Replica` (model,
optimizer, NaN/Inf detection, applying an averaged update, averaging BatchNorm buffers), the
:class:`Outcome` of a step, and the helpers that run the trainer's backward closure and time the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rayq.errors import NonFiniteGradientError
from rayq.faults import StepFaults
from rayq.ledger import Clock, Ledger, read_spans
from rayq.transport import Purpose, Transport


@dataclass
class Replica:
    """One worker's copy of the model and what updates it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    on_nonfinite: str = "raise"
    rank: int = 0
    #: The optimizer evaluates the averaged gradient itself, through a closure (BLAQ: at the weights and at a
    #: trial point; each evaluation is a forward, a backward and an exchange).
    needs_closure: bool = False

    def __post_init__(self) -> None:
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        #: Times the step's compute and exposed communication: device time (CUDA events) on a GPU.
        self.clock = Clock(self.params[0][1].device if self.params else torch.device("cpu"))

    @property
    def elements(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in self.params}

    def finite(self, tensors: dict[str, torch.Tensor], local: dict[str, torch.Tensor], step: int, what: str) -> bool:
        """NaN/Inf detection with one host read (the largest magnitude of every tensor: NaN propagates, and a
        huge finite value is not mistaken for an overflow); ``raise`` names this worker's offending local tensors."""
        peaks = [torch.isfinite(torch.linalg.vector_norm(t, float("inf"))) for t in tensors.values()
                 if t.numel() and t.is_floating_point()]
        if not peaks or bool(torch.stack(peaks).all()):
            return True
        if self.on_nonfinite == "raise":
            bad = [n for n, g in local.items() if not torch.isfinite(g).all()]
            where = (f"worker {self.rank}'s non-finite local gradients: {bad}" if bad else
                     f"worker {self.rank}'s local gradients are finite, so another worker's are not, or the exchange "
                     "overflowed (e.g. a codec's fp32 scale of values above ~1e19)")
            raise NonFiniteGradientError(f"step {step}: the {what} is not finite (NaN/Inf); {where}. Lower "
                                         "optimizer.lr, or set on_nonfinite=skip")
        return False

    def apply(self, update: dict[str, torch.Tensor], local: dict[str, torch.Tensor], step: int,
              what: str = "averaged gradient") -> bool:
        """Put ``update`` in the gradients and take one optimizer step; False (skipped) if it is not finite."""
        if not self.finite(update, local, step, what):
            return False
        for n, p in self.params:
            if p.grad is None:
                p.grad = update[n].detach().clone()
            else:
                p.grad.copy_(update[n])
        self.optimizer.step()
        return True

    def average_buffers(self, transport: Transport) -> None:
        """BatchNorm running statistics differ per worker: average them (exact, counted as control)."""
        bufs = [b for b in self.model.buffers() if b.is_floating_point()]
        if not bufs or transport.world == 1:
            return
        flat = transport.all_reduce_sum(torch.cat([b.detach().reshape(-1) for b in bufs]), Purpose.CONTROL)
        flat = flat / transport.world
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


@dataclass
class Outcome:
    """What one step of a schedule did: the exchange's ledger, whether it synced and applied an update, the
    loss of this worker's batch, its compute time, and how long the step waited on communication after its
    compute was done (all of the exchange without overlap; only the tail that backward did not hide, with it).
    On a GPU both times are device time, read by :meth:`resolve` at the end of the step."""

    ledger: Ledger
    synced: bool
    applied: bool
    loss: torch.Tensor | None = None
    compute_s: float = 0.0
    exposed_s: float = 0.0
    spans: list[tuple[str, Any, Any]] = field(default_factory=list)  # (time field, CUDA events) not yet read

    def resolve(self) -> None:
        """Read the step's CUDA-event times and its ledger's (see :meth:`Ledger.resolve`)."""
        read_spans(self)
        self.ledger.resolve()


#: Recompute this worker's local gradients at the current weights (zero, forward, backward; returns the loss).
Backward = Callable[[], torch.Tensor]


def weights_of(faults: StepFaults | None) -> list[float] | None:
    return None if faults is None else faults.weights


def run_backward(backward: Backward | None, clock: Clock) -> tuple[torch.Tensor | None, tuple[Any, Any] | None]:
    """Run this step's forward and backward (when the caller has not already): the loss and the clock's marks
    around it."""
    if backward is None:
        return None, None
    t0 = clock.now()
    loss = backward()
    return loss, (t0, clock.now())


def timed(outcome: Outcome, clock: Clock, compute: tuple[Any, Any] | None, started: Any,
          loss: torch.Tensor | None) -> Outcome:
    """``outcome`` with the loss, the compute span and the exposed span from ``started`` to now."""
    outcome.loss = loss
    if compute is not None:
        clock.charge(outcome, "compute_s", *compute)
    clock.charge(outcome, "exposed_s", started)
    return outcome
