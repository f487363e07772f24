"""Which codec each parameter goes through.

One default codec, per-name overrides by glob pattern (first match wins; mixed precision per layer as
in Ovi, Dey, Roy, Gangopadhyay, arXiv 2210.13457), tensors under ``min_numel`` elements sent dense,
and those small tensors bucketed into one packet per dtype so they cost one header, not one each.

With ``bucket_mb`` the tensors are instead laid end to end into flat buckets of up to that many MB
(fp32), in reverse parameter order as their gradients become ready in the backward pass (as DDP does),
one bucket per codec: each bucket is one packet, so biases are compressed too and headers are few.
Multi-round codecs (PowerSGD) keep each tensor's shape: they are never bucketed.

Each distinct codec (name, parameters, error feedback) is one instance whose state is keyed by
tensor name; the policy's state is keyed by the codec's :attr:`~compressors.base.Codec.spec`, so
a checkpoint stays loadable when an override is added or removed. The two-phase reduce's shard
owners re-encode with codecs of their own (:meth:`Policy.owner_codec`): a separate memory.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from compressors.base import Codec, make_codec
from compressors.error_feedback import ErrorFeedback

log = logging.getLogger(__name__)

SMALL_BUCKET = "__small__"
#: Flat buckets are keyed ``__bucket0__``, ``__bucket1__``, ... in the order they fill; a policy that plans parts
#: of a model one call at a time (DDP's buckets) keys them by their first and last members instead.
FLAT_BUCKET = "__bucket{}__"
FLAT_BUCKET_OF = "__bucket:{}..{}__"
#: Key prefix of the shard owners' codecs (two-phase reduce) in :meth:`Policy.state_dict`.
OWNER = "owner:"


@dataclass(frozen=True)
class Override:
    pattern: str
    codec: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One unit of exchange: a parameter, or a bucket of small ones, and the codec it goes through."""

    key: str
    members: tuple[str, ...]
    numels: tuple[int, ...]
    shape: tuple[int, ...]
    codec: Codec
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return sum(self.numels)


class Policy:
    def __init__(self, codec: str, params: dict[str, Any] | None = None, error_feedback: bool = False,
                 min_numel: int = 0, bucket_small: bool = True, overrides: list[Override] | None = None,
                 small_codec: str = "none", bucket_mb: float | None = None) -> None:
        if bucket_mb is not None and not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r} is invalid; expected megabytes > 0, or None (per tensor)")
        self.error_feedback = error_feedback
        self.bucket_mb = bucket_mb
        self.min_numel = min_numel
        self.bucket_small = bucket_small
        self.overrides = list(overrides or [])
        #: ``order``: flat buckets keyed by their place in the plan (one plan per model); ``members``: by their
        #: members, unique across several plans (each DDP bucket is planned on its own) and stable when DDP
        #: rebuilds its buckets: the key of a memory then always names the same gradients.
        self.bucket_keys: Literal["order", "members"] = "order"
        self._codecs: dict[str, Codec] = {}
        self._recipes: dict[int, tuple[str, dict[str, Any], bool]] = {}
        self.default = self._codec(codec, params or {})
        self.small = self._codec(small_codec, {}, wrap=False)
        for o in self.overrides:  # validate every override up front
            self._codec(o.codec, o.params)

    def _codec(self, name: str, params: dict[str, Any], wrap: bool = True, prefix: str = "") -> Codec:
        """One instance per (name, params, error feedback): stateful codecs keep state keyed by tensor name."""
        codec = make_codec(name, params)
        if wrap and self.error_feedback and not codec.builtin_error_feedback:
            codec = ErrorFeedback(codec)
        key = prefix + codec.spec
        if key not in self._codecs:
            self._codecs[key] = codec
            self._recipes[id(codec)] = (name, dict(params), wrap)
        return self._codecs[key]

    def codec_for(self, name: str) -> Codec:
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                return self._codec(o.codec, o.params)
        return self.default

    def owner_codec(self, codec: Codec) -> Codec:
        """The codec a two-phase shard owner re-encodes with: same method, its own memory."""
        name, params, wrap = self._recipes[id(codec)]
        return self._codec(name, params, wrap=wrap, prefix=OWNER)

    def plan(self, shapes: dict[str, tuple[int, ...]],
             dtypes: dict[str, torch.dtype] | None = None) -> list[Entry]:
        """Entries in a fixed order (parameter order, then the small buckets), identical on every worker."""
        dtypes = dtypes or {}
        entries: list[Entry] = []
        small: dict[torch.dtype, list[tuple[str, int]]] = {}
        flat: list[tuple[str, int, Codec]] = []
        for name, shape in shapes.items():
            numel = 1
            for s in shape:
                numel *= s
            dtype = dtypes.get(name, torch.float32)
            if numel < self.min_numel and not any(fnmatch.fnmatchcase(name, o.pattern) for o in self.overrides):
                small.setdefault(dtype, []).append((name, numel))
                continue
            codec = self.codec_for(name)
            if self.bucket_mb is not None and not codec.multi_round and dtype == torch.float32:
                flat.append((name, numel, codec))
                continue
            entries.append(Entry(name, (name,), (numel,), tuple(shape), codec, codec.wire_dtype(dtype)))
        entries = self._buckets(flat) + entries
        for dtype, members in small.items():
            wire = self.small.wire_dtype(dtype)
            if self.bucket_small:
                key = SMALL_BUCKET if dtype == torch.float32 else f"{SMALL_BUCKET}{str(dtype).removeprefix('torch.')}"
                total = sum(n for _, n in members)
                entries.append(Entry(key, tuple(n for n, _ in members), tuple(k for _, k in members), (total,),
                                     self.small, wire))
            else:
                entries += [Entry(n, (n,), (k,), (k,), self.small, wire) for n, k in members]
        return entries

    def _buckets(self, flat: list[tuple[str, int, Codec]]) -> list[Entry]:
        """Flat buckets of up to ``bucket_mb`` MB per codec, filled in reverse parameter order."""
        if not flat:
            return []
        limit = max(1, int(self.bucket_mb * 2**20 / 4))  # type: ignore[operator]
        open_: dict[str, list[tuple[str, int]]] = {}
        codecs: dict[str, Codec] = {}
        done: list[tuple[Codec, list[tuple[str, int]]]] = []
        for name, numel, codec in reversed(flat):
            members = open_.setdefault(codec.spec, [])
            codecs[codec.spec] = codec
            if members and sum(n for _, n in members) + numel > limit:
                done.append((codec, members))
                members = open_[codec.spec] = []
            members.append((name, numel))
        done += [(codecs[spec], members) for spec, members in open_.items() if members]
        out = []
        for i, (codec, members) in enumerate(done):
            total = sum(n for _, n in members)
            key = (FLAT_BUCKET.format(i) if self.bucket_keys == "order" else
                   FLAT_BUCKET_OF.format(members[0][0], members[-1][0]))
            out.append(Entry(key, tuple(n for n, _ in members), tuple(k for _, k in members), (total,),
                             codec, codec.wire_dtype(torch.float32)))
        return out

    # -- state -------------------------------------------------------------------------------------------
    def stateful_codecs(self) -> dict[str, Codec]:
        """``{codec spec: codec}`` for every codec with state (error feedback, PowerSGD, owners')."""
        return {k: c for k, c in self._codecs.items() if c.stateful}

    def residual_norm(self) -> float:
        """‖every memory‖ of this worker's codecs (the owners' excluded): the EF residual figure."""
        return sum(c.residual_norm() for k, c in self.stateful_codecs().items() if not k.startswith(OWNER))

    def state_dict(self) -> dict[str, Any]:
        return {k: c.state_dict() for k, c in self.stateful_codecs().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in state:  # shard owners' codecs are made on first use: make them now to take their memory
            if k.startswith(OWNER) and k not in self._codecs and k.removeprefix(OWNER) in self._codecs:
                self.owner_codec(self._codecs[k.removeprefix(OWNER)])
        codecs = self.stateful_codecs()
        for k, s in state.items():
            if k in codecs:
                codecs[k].load_state_dict(s)
            else:
                log.warning("checkpoint holds state for codec %s, which this run's policy does not use: dropped", k)

    def reset(self) -> None:
        for c in self._codecs.values():
            c.reset()

    def forget(self, keys: set[str]) -> None:
        """Every codec (shard owners' included) drops its memory of these entry keys."""
        for c in self.stateful_codecs().values():
            c.forget(keys)

    def drop_nonfinite(self) -> list[str]:
        """Forget every codec memory (shard owners' included) that took in NaN/Inf: see ``Codec.drop_nonfinite``."""
        return [name for c in self.stateful_codecs().values() for name in c.drop_nonfinite()]
