"""What an eavesdropper on the wire sees of one worker's gradient at one step.

Every parameter is encoded with the real codec, serialised to bytes, parsed back and decoded as a
receiver does; the bits are ``8·len(bytes)`` of those packets. Besides the decoded tensor the
observer keeps what the packet reveals to any receiver: the transmitted support of a sparsifier, the
orthonormal basis P̂ of PowerSGD, and (LAQ) the receiver's running sum of past innovations.

Error feedback is simulated here with the codec's own encode/decode (Karimireddy et al., ICML 2019):
``u = g + e ; send C(u) ; e ← u − D(C(u))``. The first message after a (re)join carries no
residual (e = 0); a steady-state message carries residuals of earlier batches, simulated with the
same weights. Mixed-precision policies choose a codec per layer by name pattern, or draw bits and
mode per layer and per round from a seeded distribution (after Ovi et al., arXiv 2210.13457, 2022).
"""

from __future__ import annotations

import enum
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from compressors import Codec, Packet, TensorInfo, make_codec
from compressors.base import hash_name, mix_seed

#: Codecs whose message is a subset of coordinates: zeros outside the support carry no information.
SPARSIFIERS = frozenset({"topk", "gaussiank", "randomk", "threshold"})
#: Codecs whose message is a sign per coordinate.
SIGN_CODECS = frozenset({"sign", "ef_sign"})
#: Codecs that send innovations against the receiver's last reconstruction (LAQ, Sun et al. NeurIPS 2019).
INNOVATION_CODECS = frozenset({"laq"})
_RANDOM_PRECISION_PURPOSE = 0x4D495850


class ErrorFeedbackMode(str, enum.Enum):
    OFF = "off"
    FIRST = "first"      # first message after a (re)join: residual 0
    STEADY = "steady"    # after ``warmup_rounds`` earlier rounds of residual accumulation


@dataclass(frozen=True)
class LayerRule:
    """Parameters whose name matches ``pattern`` (glob, first rule wins) go through this codec.

    ``per_channel`` gives an ``int8`` codec one scale per output channel of a weight (its block is
    the size of one output channel's slice); other codecs ignore the shape.
    """

    pattern: str
    codec: str
    params: tuple[tuple[str, Any], ...] = ()
    per_channel: bool = False


@dataclass(frozen=True)
class RandomPrecision:
    """Per-round random precision: each parameter independently draws a bit width from ``bits``
    (2..8 → blockwise integer quantiser, 16 → fp16, 32 → fp32) and a mode from ``modes``."""

    bits: tuple[int, ...] = (2, 4, 8, 16)
    probs: tuple[float, ...] | None = None
    modes: tuple[str, ...] = ("symmetric", "affine")
    block: int = 256
    per_channel: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [b for b in self.bits if not (2 <= b <= 8 or b in (16, 32))]
        if not self.bits or bad:
            raise ValueError(f"RandomPrecision bits={self.bits} must be non-empty, each in 2..8, 16 or 32")
        if self.probs is not None and (len(self.probs) != len(self.bits) or min(self.probs) < 0
                                       or sum(self.probs) <= 0):
            raise ValueError(f"RandomPrecision probs={self.probs} must be {len(self.bits)} non-negative weights")
        bad_modes = [m for m in self.modes if m not in ("symmetric", "affine")]
        if not self.modes or bad_modes:
            raise ValueError(f"RandomPrecision modes={self.modes} must be non-empty, from: symmetric, affine")
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"RandomPrecision per_channel={self.per_channel!r} must be true or false")

    def draw(self, name: str, step: int) -> tuple[str, dict[str, Any]]:
        """The (codec, params) of parameter ``name`` at round ``step``: reproducible from the seed."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, step, hash_name(name), _RANDOM_PRECISION_PURPOSE))
        weights = torch.tensor(self.probs if self.probs is not None else [1.0] * len(self.bits), dtype=torch.float64)
        b = self.bits[int(torch.multinomial(weights, 1, generator=g))]
        mode = self.modes[int(torch.randint(len(self.modes), (1,), generator=g))]
        if b == 32:
            return "none", {}
        if b == 16:
            return "fp16", {}
        return "int8", {"bits": b, "mode": mode, "block": self.block}


@dataclass(frozen=True)
class CodecSpec:
    """How every parameter of one worker's update is compressed.

    ``codec``/``params`` are the default; ``rules`` override it per layer by name (mixed precision,
    fixed pattern); ``random_precision`` replaces both with a per-round draw. ``messages`` > 1 lets
    the observer average that many independent encodings of the same gradient (the sample average
    that tames vqSGD's variance; bits then count every message).
    """

    codec: str = "none"
    params: tuple[tuple[str, Any], ...] = ()
    rules: tuple[LayerRule, ...] = ()
    random_precision: RandomPrecision | None = None
    error_feedback: ErrorFeedbackMode = ErrorFeedbackMode.OFF
    warmup_rounds: int = 3
    messages: int = 1
    label: str = ""

    def __post_init__(self) -> None:
        modes = [m.value for m in ErrorFeedbackMode]
        if self.error_feedback not in modes and self.error_feedback not in list(ErrorFeedbackMode):
            raise ValueError(f"error feedback {self.error_feedback!r} is not a mode; choose one of: {', '.join(modes)}")
        object.__setattr__(self, "error_feedback", ErrorFeedbackMode(self.error_feedback))
        if self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds={self.warmup_rounds} must be >= 0")
        if self.messages < 1:
            raise ValueError(f"messages={self.messages} must be >= 1")
        make_codec(self.codec, dict(self.params))  # validates name and parameters up front
        for rule in self.rules:
            make_codec(rule.codec, dict(rule.params))

    @classmethod
    def of(cls, codec: str, label: str = "", **kwargs: Any) -> CodecSpec:
        """Shorthand: ``CodecSpec.of("int8", bits=4)``; spec fields (``error_feedback`` …) pass through."""
        own = {f: kwargs.pop(f) for f in ("rules", "random_precision", "error_feedback", "warmup_rounds", "messages")
               if f in kwargs}
        return cls(codec=codec, params=tuple(sorted(kwargs.items())), label=label, **own)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        params = ",".join(f"{k}={v}" for k, v in self.params)
        base = f"{self.codec}({params})" if params else self.codec
        if self.rules:
            base = "mixed[" + ";".join(f"{r.pattern}:{r.codec}" + ("/" + ",".join(f"{k}={v}" for k, v in r.params)
                                                                      if r.params else "") for r in self.rules) + "]"
        if self.random_precision is not None:
            base = f"random-precision{self.random_precision.bits}"
        if self.error_feedback is not ErrorFeedbackMode.OFF:
            base += f"+ef:{self.error_feedback.value}"
        return base

    def codec_for(self, name: str, shape: tuple[int, ...], step: int) -> Codec:
        """The codec that encodes parameter ``name`` (of ``shape``) at round ``step``."""
        if self.random_precision is not None:
            codec, params = self.random_precision.draw(name, step)
            return make_codec(codec, _per_channel(codec, params, shape, self.random_precision.per_channel))
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return make_codec(rule.codec, _per_channel(rule.codec, dict(rule.params), shape, rule.per_channel))
        return make_codec(self.codec, dict(self.params))


def _per_channel(codec: str, params: dict[str, Any], shape: tuple[int, ...], per_channel: bool) -> dict[str, Any]:
    if per_channel and codec == "int8" and len(shape) >= 2:
        return {**params, "block": math.prod(shape[1:])}
    return params


@dataclass(frozen=True, eq=False)
class ParamObservation:
    """What the receiver reconstructs of one parameter's gradient, and what the packet reveals.

    ``decoded`` is the receiver's reconstruction (LAQ: the running sum of innovations);
    ``support`` the transmitted coordinates of a sparsifier; ``basis`` PowerSGD's P̂ (n × r);
    ``reference`` what is added to a decoded innovation (LAQ), zero otherwise. ``codec`` and
    ``info`` let an adaptive attacker pass its own candidate through the same quantiser.
    """

    name: str
    shape: tuple[int, ...]
    codec: Codec
    info: TensorInfo
    decoded: torch.Tensor
    bits: int
    support: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def roundtrip(self, g: torch.Tensor) -> torch.Tensor:
        """``reference + D(C(g − reference))`` with this parameter's codec and tensor info (one message)."""
        flat = g.detach().reshape(-1).to(torch.float32)
        if self.reference is None:
            return self.codec.encode_decode(flat, self.info)[1].reshape(self.shape)
        ref = self.reference.reshape(-1)
        return (ref + self.codec.encode_decode(flat - ref, self.info)[1]).reshape(self.shape)


@dataclass(frozen=True, eq=False)
class WireCapture:
    """One worker's update at one step as an eavesdropper sees it."""

    spec: CodecSpec
    params: tuple[ParamObservation, ...]
    error_feedback: ErrorFeedbackMode
    residual_norm: float = 0.0

    @property
    def bits(self) -> int:
        return sum(p.bits for p in self.params)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def bits_per_coordinate(self) -> float:
        return self.bits / self.numel

    def decoded(self) -> dict[str, torch.Tensor]:
        return {p.name: p.decoded for p in self.params}


def transmit(codec: Codec, x: torch.Tensor, info: TensorInfo) -> tuple[torch.Tensor, Packet, int]:
    """Encode ``x``, serialise, parse and decode as a receiver does: (decoded, parsed packet, bits)."""
    wire = codec.encode(x.reshape(-1).to(torch.float32), info).to_bytes()
    packet = Packet.from_bytes(wire)
    return codec.decode(packet, info).reshape(x.shape), packet, 8 * len(wire)


def support_mask(codec: Codec, packet: Packet, info: TensorInfo) -> torch.Tensor | None:
    """The coordinates a sparsifier's packet transmits, by decoding it with unit values (what any
    receiver can do); None for codecs that send every coordinate."""
    if codec.name not in SPARSIFIERS:
        return None
    fields = list(packet.fields)
    if codec.name in ("topk", "gaussiank", "randomk"):
        fields[0] = torch.ones_like(fields[0])
    else:  # threshold: (scale, count, signs, support) → unit scale, all signs positive
        fields[0] = torch.ones_like(fields[0])
        fields[2] = torch.zeros_like(fields[2])
    ones = codec.decode(Packet(packet.codec, packet.numel, tuple(fields)), info)
    return (ones != 0).reshape(info.shape)


def powersgd_basis(codec: Codec, packet: Packet, info: TensorInfo) -> torch.Tensor | None:
    """P̂ (n × r) of a PowerSGD packet that carries factors; None for one sent dense."""
    if codec.name != "powersgd" or len(packet.fields) != 2:
        return None
    return packet.fields[0].to(torch.float32)


def _replay(past: Sequence[Mapping[str, torch.Tensor]], spec: CodecSpec, start: int, steady: bool,
            info_for: Callable[[str, tuple[int, ...], int], TensorInfo]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the earlier rounds; return the state they leave: the error-feedback residual e of every
    parameter (``steady`` only) and the receiver's sum of LAQ innovations."""
    residual: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for t, earlier in enumerate(past, start=start):
        for name, g in earlier.items():
            shape = tuple(g.shape)
            codec = spec.codec_for(name, shape, t)
            u = g.float() + residual.get(name, 0.0) if steady else g.float()
            innovation = codec.name in INNOVATION_CODECS
            sent = u - reference.get(name, 0.0) if innovation else u
            decoded, _, _ = transmit(codec, sent, info_for(name, shape, t))
            if innovation:
                reference[name] = decoded = reference.get(name, 0.0) + decoded
            if steady:
                residual[name] = u - decoded
    return residual, reference


def capture(grads: Mapping[str, torch.Tensor], spec: CodecSpec, *, step: int = 0, worker: int = 0, world: int = 1,
            seed: int = 0, history: Sequence[Mapping[str, torch.Tensor]] = ()) -> WireCapture:
    """Transmit ``grads`` (one worker, round ``step``) through ``spec`` and observe the packets.

    ``history`` holds the same worker's gradients of earlier rounds, oldest first: they build the
    error-feedback residual (``spec.error_feedback == STEADY``, the last ``warmup_rounds`` of them)
    and LAQ's receiver-side sum of innovations. Earlier rounds use steps ``step − len(history) …``.
    """
    ef = spec.error_feedback
    steady = ef is ErrorFeedbackMode.STEADY
    past = list(history)
    if steady:
        if len(past) < spec.warmup_rounds:
            raise ValueError(f"steady-state error feedback needs {spec.warmup_rounds} earlier gradients, "
                             f"history holds {len(past)}")
        past = past[len(past) - spec.warmup_rounds:] if spec.warmup_rounds else []
    elif not any(spec.codec_for(n, tuple(g.shape), step).name in INNOVATION_CODECS for n, g in grads.items()):
        past = []  # nothing an earlier round leaves behind changes this message

    def info_for(name: str, shape: tuple[int, ...], t: int) -> TensorInfo:
        return TensorInfo(name, tuple(shape), worker=worker, world=world, step=t, seed=seed)

    residual, reference = _replay(past, spec, step - len(past), steady, info_for)
    observations = []
    for name, g in grads.items():
        shape = tuple(g.shape)
        codec = spec.codec_for(name, shape, step)
        u = g.float() + residual.get(name, 0.0) if steady else g.float()
        ref = reference.get(name, torch.zeros(shape)) if codec.name in INNOVATION_CODECS else None
        sent = u - ref if ref is not None else u
        decoded_sum = torch.zeros(shape)
        bits, support, basis = 0, None, None
        for m in range(spec.messages):
            info = info_for(name, shape, step + m)
            decoded, packet, b = transmit(codec, sent, info)
            decoded_sum += decoded
            bits += b
            if m == 0:
                support = support_mask(codec, packet, info)
                basis = powersgd_basis(codec, packet, info)
        decoded = decoded_sum / spec.messages
        if ref is not None:
            decoded = ref + decoded
        observations.append(ParamObservation(name=name, shape=shape, codec=codec, info=info_for(name, shape, step),
                                             decoded=decoded, bits=bits, support=support, basis=basis, reference=ref))
    norm = math.sqrt(sum(float(r.double().pow(2).sum()) for r in residual.values()))
    return WireCapture(spec=spec, params=tuple(observations), error_feedback=ef, residual_norm=norm)
