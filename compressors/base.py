"""The codec contract: what one flat tensor becomes on the wire, and back.

A codec is a small frozen dataclass of parameters with ``encode(x, info) -> Packet`` and
``decode(packet, info) -> Tensor``. Its :class:`Kind` is the contract with the collective layer:

* ``LINEAR`` codecs' packet fields can be summed across workers before decoding, so they are
  reduced with all-reduce. The exchange may take several rounds (PowerSGD: P, then Q); a codec
  declares that by overriding :meth:`Codec.exchange`, a generator that yields a packet per round
  and receives the field-wise *sum* over workers, never calling a collective itself
  (:attr:`Codec.multi_round` says so).
* ``GATHER`` codecs must be decoded before summing: all-gather of variable-size packets.

Every codec carries the whole contract, so no caller needs to look inside one: per-instance
properties (``unbiased``, ``multi_round``, ``carries_scale``), a stable ``spec`` string, and the
state protocol (``state_dict`` / ``load_state_dict`` / ``reset`` / ``residual_norm``, empty for
stateless codecs). After each exchange the collective calls :meth:`Codec.settle` with whether this
worker's contribution was applied: stateful codecs (error feedback) commit their memory only then.

Randomness is derived from ``info`` (a seed per worker, step and tensor; a shared seed per step and
tensor), so runs are reproducible and resume bit-exactly without checkpointing generator state.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import typing
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from compressors.packet import Packet, PacketError


class Kind(str, enum.Enum):
    LINEAR = "linear"
    GATHER = "gather"


class CodecError(ValueError):
    """Invalid codec name or parameters; the message names the key, the value and what is allowed."""


_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 over the parts)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK


@dataclass(frozen=True)
class TensorInfo:
    """What a codec may know about the tensor it encodes (after hivemind's CompressionInfo)."""

    name: str
    shape: tuple[int, ...]
    role: str = "grad"
    worker: int = 0
    world: int = 1
    step: int = 0
    seed: int = 0
    #: This worker's weight in the exchange (0: its contribution is not used, e.g. it left or is late).
    weight: float = 1.0
    #: The sum of every worker's weight (None: ``world``); a linear codec's sums are divided by it.
    weight_sum: float | None = None

    @property
    def total_weight(self) -> float:
        return float(self.world) if self.weight_sum is None else float(self.weight_sum)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def generator(self, device: torch.device, purpose: int = 0, shared: bool = False) -> torch.Generator:
        """A fresh generator for this (worker, step, tensor, purpose); ``shared`` drops the worker."""
        worker = -1 if shared else self.worker
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(self.seed, worker, self.step, hash_name(self.name), purpose))
        return g


def hash_name(name: str) -> int:
    """A stable (process-independent) integer for a tensor name; Python's hash() is salted."""
    import zlib

    return zlib.crc32(name.encode())


@runtime_checkable
class Stateful(Protocol):
    """Per-worker state that a checkpoint must carry (error-feedback memory, PowerSGD's warm start)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def reset(self) -> None: ...


ExchangeGen = Generator[Packet, Packet, torch.Tensor]


def all_finite(state: Any) -> bool:
    """Whether every floating-point tensor in a (nested) state holds finite values only (one host read each)."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or not state.numel() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    if isinstance(state, float):
        return math.isfinite(state)
    return True

#: Measured :meth:`Codec.gaussian_distortion` by (spec, numel).
_DISTORTION: dict[tuple[str, int], float] = {}


class Codec:
    """Base class: subclasses are dataclasses whose fields are the codec's parameters."""

    name: ClassVar[str]
    kind: ClassVar[Kind]
    summary: ClassVar[str] = ""
    #: Where the method comes from (authors, venue, year), for ``rayq codecs``.
    source: ClassVar[str] = ""
    #: True when the codec already compensates its own error (PowerSGD): EF is not stacked on it.
    builtin_error_feedback: ClassVar[bool] = False
    #: True when a tensor's packet has the same header (field dtypes and shapes) whatever its values, and
    #: decoding reads no value back to the host: receivers then check and slice peers' frames with tensor
    #: operations alone at every step (``compressors.packet.read_frames``; other codecs in the steps whose
    #: layouts happen to agree, which ``compressors.packet.layout_tag`` tells). A test holds every such
    #: codec to both.
    fixed_layout: ClassVar[bool] = False

    # -- properties of this instance (they may depend on the parameters) ----------------------------
    @property
    def unbiased(self) -> bool:
        """E[decode(encode(x))] = x for every x."""
        return False

    @property
    def carries_scale(self) -> bool:
        """The decoded value approximates the input's magnitude (false for a bare sign vote, whose scale is
        the learning rate): needed to average model deltas and for error feedback."""
        return True

    @property
    def multi_round(self) -> bool:
        """The exchange takes several all-reduce rounds, each needing the sum over all workers."""
        return type(self).exchange is not Codec.exchange

    @property
    def averages(self) -> bool:
        """The server rule is the weighted mean of the decoded contributions (not e.g. a majority vote)."""
        return type(self).aggregate is Codec.aggregate

    @property
    def stateful(self) -> bool:
        """The codec keeps per-worker state that checkpoints carry and a rejoin resets."""
        return False

    @property
    def spec(self) -> str:
        """A stable name for this codec and its parameters: ``qsgd(levels=7,bucket=512)``."""
        params = ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.params())
        return f"{self.name}({params})"

    def gaussian_distortion(self, numel: int = 4096) -> float:
        """‖D(C(x)) − x‖² / ‖x‖² on one fixed standard Gaussian vector of ``numel`` elements (seeded, so the
        same on every machine): how much of its input the codec loses. Error feedback needs less than 1 (a
        contractive codec): otherwise the memory grows instead of shrinking (Karimireddy et al., ICML 2019)."""
        key = (self.spec, numel)
        if key not in _DISTORTION:
            x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
            info = TensorInfo("gaussian", (numel,), step=0, seed=0)
            out = self.decode(self.encode(x, info), info).to(torch.float32)
            _DISTORTION[key] = float(((out - x) ** 2).sum() / (x ** 2).sum())
        return _DISTORTION[key]

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The floating dtype the codec wants its input in: float32 unless it keeps the tensor's own."""
        return torch.float32

    # -- state (empty for stateless codecs) ------------------------------------------------------------
    def settle(self, info: TensorInfo, applied: bool | torch.Tensor) -> None:
        """After the exchange: whether this worker's last contribution for ``info.name`` was applied (a bool,
        or a 0-dim bool tensor on the device when the exchange decided it there).

        Called only for contributions the worker offered (weight > 0). Stateful codecs commit their
        memory here, so a lost or dropped contribution is carried, never silently consumed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def reset(self) -> None:
        """Forget all state (a worker joined or rejoined: a stale memory must not meet a newer model)."""

    def forget(self, keys: set[str]) -> None:
        """Drop the memory of these tensor keys (and of their two-phase shards, ``key#...``): their gradients now
        travel under other keys (DDP rebuilt its buckets)."""

    def drop_nonfinite(self) -> list[str]:
        """After a step skipped for NaN/Inf: forget the state that took them in (it would carry them into every
        later step); the names of what was dropped. By default all of a codec's state that is not finite is
        reset; codecs with per-tensor memories drop only the poisoned tensors."""
        if not self.stateful or all_finite(self.state_dict()):
            return []
        self.reset()
        return [self.spec]

    def residual_norm(self) -> float:
        """‖memory‖ over all tensors (0 without one): the figure TensorBoard shows as the EF residual."""
        return 0.0

    def encode(self, x: torch.Tensor, info: TensorInfo) -> Packet:
        raise NotImplementedError

    def decode(self, packet: Packet, info: TensorInfo) -> torch.Tensor:
        raise NotImplementedError

    def encode_decode(self, x: torch.Tensor, info: TensorInfo) -> tuple[Packet, torch.Tensor]:
        """Encode and return what the receiver will decode (error feedback needs both)."""
        packet = self.encode(x, info)
        return packet, self.decode(packet, info)

    def exchange(self, x: torch.Tensor, info: TensorInfo) -> ExchangeGen:
        """Linear protocol: yield this worker's packet per round, receive the field-wise sum over
        workers, return the decoded *sum* (the collective divides by the number of workers)."""
        reduced = yield self.encode(x, info)
        return self.decode(reduced, info)

    def aggregate(self, decoded: list[torch.Tensor], weights: list[float] | torch.Tensor) -> torch.Tensor:
        """Combine the decoded contributions of the workers that took part: the weighted mean.
        Codecs with another server rule (signSGD's majority vote) override this. ``weights`` may be a
        tensor on the device (a contribution dropped there has weight 0); all zero gives zeros."""
        if isinstance(weights, torch.Tensor):
            w = weights.to(device=decoded[0].device, dtype=torch.float32)
            total = w.sum()
            w = torch.where(total > 0, w / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
            out = decoded[0] * w[0]
            for i, d in enumerate(decoded[1:], 1):
                out = out.add(d * w[i])
            return out
        total = float(sum(weights))
        out = decoded[0] * (weights[0] / total)
        for d, w in zip(decoded[1:], weights[1:]):
            out = out.add(d, alpha=w / total)
        return out

    def check(self, packet: Packet, info: TensorInfo, n_fields: int) -> tuple[torch.Tensor, ...]:
        """Validate that ``packet`` is ours and for this tensor; return its fields."""
        if packet.codec != self.name:
            raise PacketError(f"packet was made by codec {packet.codec!r}, cannot be decoded by {self.name!r}")
        if packet.numel != info.numel:
            raise PacketError(f"packet holds {packet.numel} elements, tensor {info.name!r} has {info.numel}")
        if len(packet.fields) != n_fields:
            raise PacketError(f"{self.name} packet needs {n_fields} fields, got {len(packet.fields)}")
        return packet.fields

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]

    def describe_params(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.params())


REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    if cls.name in REGISTRY:
        raise CodecError(f"codec name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def codec_names() -> list[str]:
    return list(REGISTRY)


#: A number written the way YAML 1.1 reads as a string ("1e-3", "5e-1"): a user means the number.
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _allowed(field: dataclasses.Field) -> tuple[Any, ...] | None:
    """``Literal[...]`` annotations are the closed set of allowed values."""
    hint = field.type
    if isinstance(hint, str):
        hint = eval(hint, vars(typing))  # annotations are postponed strings; Literal/int/float only
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return None


def _coerce(codec: str, field: dataclasses.Field, value: Any) -> Any:
    allowed = _allowed(field)
    if allowed is not None:
        if value not in allowed:
            raise CodecError(
                f"compression.params.{field.name}={value!r} is not valid for codec {codec!r}; "
                f"choose one of: {', '.join(map(repr, allowed))}"
            )
        return value
    default = field.default
    kind = type(default) if default is not dataclasses.MISSING else None
    if kind is bool:
        if not isinstance(value, bool):
            raise CodecError(f"compression.params.{field.name}={value!r} for codec {codec!r} must be true or false")
        return value
    if kind in (int, float):
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CodecError(f"compression.params.{field.name}={value!r} for codec {codec!r} must be a number")
        if kind is int and float(value) != int(value):
            raise CodecError(f"compression.params.{field.name}={value!r} for codec {codec!r} must be an integer")
        return kind(value)
    return value


def make_codec(name: str, params: dict[str, Any] | None = None) -> Codec:
    """Build a codec by config name, validating every parameter before anything runs.

    The registry is complete once ``compressors`` is imported, which Python does before any submodule."""
    if name not in REGISTRY:
        raise CodecError(f"compression.codec={name!r} is not a codec; choose one of: {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    fields = {f.name: f for f in cls.params()}
    params = dict(params or {})
    unknown = sorted(set(params) - set(fields))
    if unknown:
        allowed = ", ".join(fields) or "(none)"
        raise CodecError(f"compression.params.{unknown[0]} is not a parameter of codec {name!r}; allowed: {allowed}")
    kwargs = {k: _coerce(name, fields[k], v) for k, v in params.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise CodecError(f"codec {name!r}: {err}") from err
