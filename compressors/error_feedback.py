"""Error feedback as a transparent wrapper around any single-round codec.

    u = g + e ;  send C(u) ;  e ← u − D(C(u))   if the contribution was applied,   e ← u   if it was lost

(Seide et al., Interspeech 2014; Karimireddy, Rebjock, Stich, Jaggi, ICML 2019.) The memory ``e`` is
per worker and per tensor name, kept in fp32, checkpointed with ``state_dict()`` and cleared by
``reset()`` when a worker (re)joins: a stale residual is never applied against a newer model.

The update is a transaction: :meth:`encode` stages ``(u, D(C(u)))`` and :meth:`settle` commits it once
the exchange says whether this worker's packet was applied. So per worker and tensor, always,

    e_after + (what was applied from this worker) = e_before + g,

and a contribution that never arrived (lost, corrupted) stays in the memory to be sent again. A
worker that offered nothing (weight 0: away, or too late) is never settled and keeps its residual.

The wrapper is transparent: name, kind, multi-round-ness, aggregation and decoding are the inner
codec's, so no caller needs to unwrap it.
"""

from __future__ import annotations

from typing import Any

import torch

from compressors.base import Codec, ExchangeGen, Kind, TensorInfo, all_finite
from compressors.packet import Packet


class ErrorFeedback(Codec):
    def __init__(self, inner: Codec) -> None:
        if isinstance(inner, ErrorFeedback):
            raise ValueError("error feedback is already applied to this codec")
        if inner.multi_round or inner.builtin_error_feedback:
            raise ValueError(f"codec {inner.name!r} compensates its own error (built-in error feedback); "
                             "error feedback cannot be stacked on it")
        if not inner.carries_scale:
            raise ValueError(f"codec {inner.name!r} decodes to a bare sign vote without the input's scale, so "
                             "the residual u - D(C(u)) is meaningless; use ef_sign (the scaled sign) with error feedback")
        self.inner = inner
        self.residuals: dict[str, torch.Tensor] = {}
        self._staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- the inner codec's contract, unchanged -----------------------------------------------------------
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def kind(self) -> Kind:  # type: ignore[override]
        return self.inner.kind

    @property
    def summary(self) -> str:  # type: ignore[override]
        return self.inner.summary

    @property
    def multi_round(self) -> bool:
        return False

    @property
    def averages(self) -> bool:
        return self.inner.averages

    @property
    def fixed_layout(self) -> bool:  # type: ignore[override]
        return self.inner.fixed_layout

    @property
    def stateful(self) -> bool:
        return True

    @property
    def spec(self) -> str:
        return f"{self.inner.spec}+ef"

    def params(self) -> list:  # type: ignore[override]
        return self.inner.params()

    def describe_params(self) -> str:
        return self.inner.describe_params() + ", error_feedback=True"

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        return self.inner.decode(packet, info)

    def aggregate(self, decoded: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        return self.inner.aggregate(decoded, weights)

    # -- compensate, compress, stage; settle after the exchange ---------------------------------------
    def compensate(self, x: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        e = self.residuals.get(info.name)
        x = x.reshape(-1).to(torch.float32)
        return x if e is None or e.numel() != x.numel() else x + e.to(x.device)

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        packet, _ = self.encode_decode(x, info)
        return packet

    def encode_decode(self, x: torch.Tensor, info: TensorInfo) -> tuple[Packet, torch.Tensor]:
        u = self.compensate(x, info)
        packet, decoded = self.inner.encode_decode(u, info)
        self._staged[info.name] = (u, decoded)
        return packet, decoded

    def exchange(self, x: torch.Tensor, info: TensorInfo) -> ExchangeGen:
        reduced = yield self.encode(x, info)
        return self.inner.decode(reduced, info)

    def settle(self, info: TensorInfo, applied: bool | torch.Tensor) -> None:
        staged = self._staged.pop(info.name, None)
        if staged is None:
            return
        u, decoded = staged
        if isinstance(applied, torch.Tensor):  # decided on the device: no read back
            self.residuals[info.name] = torch.where(applied.to(u.device), u - decoded, u)
        else:
            self.residuals[info.name] = u - decoded if applied else u

    # -- state -----------------------------------------------------------------------------------------
    def residual_norm(self) -> float:
        if not self.residuals:
            return 0.0
        return float(torch.sqrt(sum((r.double() ** 2).sum() for r in self.residuals.values())))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()}}
        inner = self.inner.state_dict()
        if inner:
            state["inner"] = inner
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}
        self._staged.clear()
        self.inner.load_state_dict(state.get("inner", {}))

    def reset(self) -> None:
        self.residuals.clear()
        self._staged.clear()

    def forget(self, keys: set[str]) -> None:
        for k in [k for k in self.residuals if k.split("#", 1)[0] in keys]:
            del self.residuals[k]
        self.inner.forget(keys)

    def drop_nonfinite(self) -> list[str]:
        """Forget the memories that hold NaN/Inf (the tensors of a skipped step's bad gradient); keep the others."""
        bad = [k for k, r in self.residuals.items() if not all_finite(r)]
        for k in bad:
            del self.residuals[k]
        return [f"{self.spec}:{k}" for k in bad] + self.inner.drop_nonfinite()
        self.inner.reset()
