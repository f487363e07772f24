"""Error feedback as a wrapper around any codec (ALGORITHMS.md §2.4, §6.1; reset rules §16).

    u = g + e ;  send C(u) ;  e ← u − D(C(u))

The residual ``e`` is per worker and per tensor name, kept in fp32, checkpointed with
``state_dict()``, and cleared by ``reset()`` when a worker (re)joins: a stale residual is never
applied against a newer model.
"""

from __future__ import annotations

from typing import Any

import torch

from compressors.base import Codec, ExchangeGen, Kind, TensorInfo
from compressors.packet import Packet


class ErrorFeedback(Codec):
    def __init__(self, inner: Codec) -> None:
        if isinstance(inner, ErrorFeedback):
            raise ValueError("error feedback is already applied to this codec")
        self.inner = inner
        self.residuals: dict[str, torch.Tensor] = {}

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def kind(self) -> Kind:  # type: ignore[override]
        return self.inner.kind

    def describe_params(self) -> str:
        return self.inner.describe_params() + ", error_feedback=True"

    def compensate(self, x: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        e = self.residuals.get(info.name)
        x = x.reshape(-1).to(torch.float32)
        return x if e is None else x + e.to(x.device)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        packet, _ = self.encode_decode(x, info)
        return packet

    def encode_decode(self, x: torch.Tensor, info: TensorInfo) -> tuple[Packet, torch.Tensor]:
        u = self.compensate(x, info)
        packet, decoded = self.inner.encode_decode(u, info)
        self.residuals[info.name] = u - decoded
        return packet, decoded

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        return self.inner.decode(packet, info)

    def aggregate(self, decoded: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        return self.inner.aggregate(decoded, weights)

    def exchange(self, x: torch.Tensor, info: TensorInfo) -> ExchangeGen:
        packet, _ = self.encode_decode(x, info)
        reduced = yield packet
        return self.inner.decode(reduced, info)

    def residual_norm(self) -> float:
        if not self.residuals:
            return 0.0
        return float(torch.sqrt(sum((r.double() ** 2).sum() for r in self.residuals.values())))

    def state_dict(self) -> dict[str, Any]:
        state = {"residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()}}
        inner = getattr(self.inner, "state_dict", None)
        if inner is not None:
            state["inner"] = inner()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}
        if "inner" in state and hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state["inner"])

    def reset(self) -> None:
        self.residuals.clear()
        if hasattr(self.inner, "reset"):
            self.inner.reset()
