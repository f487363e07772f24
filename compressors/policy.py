"""Which codec each parameter goes through (DESIGN.md §2: policy).

One default codec, per-name overrides by glob pattern (first match wins; mixed precision per layer,
ALGORITHMS.md §9.5), tensors under ``min_numel`` elements sent dense, and those small tensors bucketed
into a single packet so they cost one header, not one each.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from compressors.base import Codec, make_codec
from compressors.error_feedback import ErrorFeedback

SMALL_BUCKET = "__small__"


@dataclass(frozen=True)
class Override:
    pattern: str
    codec: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One unit of exchange: a parameter, or the bucket of small ones, and the codec it goes through."""

    key: str
    members: tuple[str, ...]
    numels: tuple[int, ...]
    shape: tuple[int, ...]
    codec: Codec

    @property
    def numel(self) -> int:
        return sum(self.numels)


class Policy:
    def __init__(self, codec: str, params: dict[str, Any] | None = None, error_feedback: bool = False,
                 min_numel: int = 0, bucket_small: bool = True, overrides: list[Override] | None = None,
                 small_codec: str = "none") -> None:
        self.error_feedback = error_feedback
        self.min_numel = min_numel
        self.bucket_small = bucket_small
        self.overrides = list(overrides or [])
        self._codecs: dict[tuple, Codec] = {}
        self.default = self._codec(codec, params or {})
        self.small = self._codec(small_codec, {}, wrap=False)
        for o in self.overrides:  # validate every override up front
            self._codec(o.codec, o.params)

    def _codec(self, name: str, params: dict[str, Any], wrap: bool = True) -> Codec:
        """One codec instance per (name, params): stateful wrappers keep state keyed by tensor name."""
        key = (name, tuple(sorted(params.items())), wrap and self.error_feedback)
        if key not in self._codecs:
            codec = make_codec(name, params)
            if key[2] and not codec.builtin_error_feedback:
                codec = ErrorFeedback(codec)
            self._codecs[key] = codec
        return self._codecs[key]

    def codec_for(self, name: str) -> Codec:
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                return self._codec(o.codec, o.params)
        return self.default

    def plan(self, shapes: dict[str, tuple[int, ...]]) -> list[Entry]:
        """Entries in a fixed order (parameter order), identical on every worker."""
        entries, small = [], []
        for name, shape in shapes.items():
            numel = 1
            for s in shape:
                numel *= s
            if numel < self.min_numel and not any(fnmatch.fnmatchcase(name, o.pattern) for o in self.overrides):
                small.append((name, numel))
                continue
            entries.append(Entry(name, (name,), (numel,), tuple(shape), self.codec_for(name)))
        if small and self.bucket_small:
            total = sum(n for _, n in small)
            entries.append(Entry(SMALL_BUCKET, tuple(n for n, _ in small), tuple(k for _, k in small),
                                 (total,), self.small))
        else:
            entries += [Entry(n, (n,), (k,), (k,), self.small) for n, k in small]
        return entries

    def stateful_codecs(self) -> dict[str, Codec]:
        return {f"{k[0]}:{i}": c for i, (k, c) in enumerate(self._codecs.items()) if hasattr(c, "state_dict")}

    def state_dict(self) -> dict[str, Any]:
        return {k: c.state_dict() for k, c in self.stateful_codecs().items()}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        codecs = self.stateful_codecs()
        for k, s in state.items():
            if k not in codecs:
                raise KeyError(f"checkpoint holds codec state {k!r}, this run's policy has {sorted(codecs)}")
            codecs[k].load_state_dict(s)  # type: ignore[attr-defined]

    def reset(self) -> None:
        for c in self.stateful_codecs().values():
            c.reset()  # type: ignore[attr-defined]
