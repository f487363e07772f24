"""Few-Bit Backward: activations whose backward keeps b-bit codes of the input instead of the input.

Novikov, Bershatsky, Gusak, Shonenkov, Dimitrov, Oseledets, "Few-Bit Backward: Quantized Gradients
of Activation Functions for Memory Footprint Reduction" (arXiv 2202.00441, 2022). The forward pass
computes y = f(x) exactly; autograd keeps only c = bucketize(x, borders) packed at b bits per
element, and the backward pass returns ∂L/∂x = ∂L/∂y ⊙ levels[c]: f′ is replaced by the
piecewise-constant q with 2^b pieces minimising ∫(f′ − q)² w dx.

* The tables of the smooth activations are solved once and shipped (:mod:`rayq.fewbit_dp`, which also
  holds the solvers).
* Piecewise-linear activations (relu, leaky_relu, hardtanh, ...) have a two-valued derivative, so
  one bit per element gives their exact gradient.
* Codes are bit-packed (8/b per byte for b = 1, 2, 4); 3-bit codes form a little-endian bit stream,
  code k in bits 3k..3k+2, ⌈3n/8⌉ bytes in all (the layout of :func:`compressors.bits.pack_bits`).
* :func:`saved_activation_bytes` measures what autograd really keeps, so the saving is measured,
  not assumed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from compressors.bits import pack_bits, packed_nbytes, unpack_bits
from rayq.fewbit_dp import PIECEWISE_LINEAR, SMOOTH, check_bits, table

__all__ = [
    "FewBitActivation", "FewBitCELU", "FewBitELU", "FewBitGELU", "FewBitHardshrink", "FewBitHardsigmoid",
    "FewBitHardswish", "FewBitHardtanh", "FewBitLeakyReLU", "FewBitLogSigmoid", "FewBitMish", "FewBitReLU",
    "FewBitReLU6", "FewBitSELU", "FewBitSiLU", "FewBitSigmoid", "FewBitSoftplus", "FewBitSoftshrink",
    "FewBitSoftsign", "FewBitTanh", "FewBitTanhshrink", "FewBitThreshold", "few_bit", "gelu_mlp", "pack_codes",
    "saved_activation_bytes", "swap_activations", "unpack_codes",
]

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------------
# Packed codes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes < 2^bits as ⌈n·bits/8⌉ bytes (LSB first), on the codes' device."""
    if bits != 3:
        return pack_bits(codes, bits)
    n = codes.numel()
    c = codes.reshape(-1).to(torch.int32)
    pad = (-n) % 8
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    words = (c.view(-1, 8) << torch.arange(0, 24, 3, dtype=torch.int32, device=c.device)).sum(dim=1, dtype=torch.int32)
    data = ((words.unsqueeze(1) >> torch.tensor([0, 8, 16], dtype=torch.int32, device=c.device)) & 0xFF)
    return data.to(torch.uint8).reshape(-1)[:packed_nbytes(n, 3)]


def unpack_codes(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` codes as int64."""
    if bits != 3:
        return unpack_bits(data, bits, count)
    if data.numel() != packed_nbytes(count, 3):
        raise ValueError(f"packed buffer has {data.numel()} bytes, {packed_nbytes(count, 3)} expected "
                         f"for {count} codes of 3 bits")
    d = data.to(torch.int32)
    pad = (-d.numel()) % 3
    if pad:
        d = torch.cat([d, d.new_zeros(pad)])
    shifts = torch.tensor([0, 8, 16], dtype=torch.int32, device=d.device)
    words = (d.view(-1, 3) << shifts).sum(dim=1, dtype=torch.int32)
    codes = (words.unsqueeze(1) >> torch.arange(0, 24, 3, dtype=torch.int32, device=d.device)) & 0b111
    return codes.reshape(-1)[:count].to(torch.int64)


# --------------------------------------------------------------------------------------------------
# Autograd


@dataclass(frozen=True, eq=False)
class _Rule:
    """How one activation runs: exact forward, x → codes, and the derivative value of every code."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor]
    levels: tuple[float, ...]
    bits: int


@functools.cache
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


class _FewBit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: _Rule) -> torch.Tensor:
        ctx.rule, ctx.shape = rule, x.shape
        ctx.save_for_backward(pack_codes(rule.encode(x), rule.bits))
        return rule.forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (packed,) = ctx.saved_tensors
        codes = unpack_codes(packed, ctx.rule.bits, grad.numel()).view(ctx.shape)
        return grad * _constant(ctx.rule.levels, grad.device, grad.dtype)[codes], None


def _bucketizer(borders: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(x, _constant(borders, x.device, x.dtype), out_int32=True)

    return encode


@functools.cache
def _table_rule(name: str, bits: int) -> _Rule:
    step = table(name, bits)
    return _Rule(SMOOTH[name], _bucketizer(step.borders), step.levels, bits)


@functools.cache
def _piecewise_rule(name: str, a: float = 0.0, b: float = 0.0) -> _Rule:
    """Exact 1-bit rules; codes say on which of the derivative's two values x lies, with the same
    convention at the kinks as torch's own backward."""
    if name == "relu":
        return _Rule(F.relu, lambda x: x > 0, (0.0, 1.0), 1)
    if name == "leaky_relu":
        return _Rule(functools.partial(F.leaky_relu, negative_slope=a), lambda x: x > 0, (a, 1.0), 1)
    if name == "hardtanh":
        return _Rule(functools.partial(F.hardtanh, min_val=a, max_val=b), lambda x: (x > a) & (x < b), (0.0, 1.0), 1)
    if name == "relu6":
        return _Rule(F.relu6, lambda x: (x > 0) & (x < 6), (0.0, 1.0), 1)
    if name == "hardsigmoid":
        return _Rule(F.hardsigmoid, lambda x: (x > -3) & (x < 3), (0.0, 1.0 / 6.0), 1)
    if name == "threshold":
        return _Rule(functools.partial(F.threshold, threshold=a, value=b), lambda x: x > a, (0.0, 1.0), 1)
    if name == "hardshrink":
        return _Rule(functools.partial(F.hardshrink, lambd=a), lambda x: (x < -a) | (x > a), (0.0, 1.0), 1)
    if name == "softshrink":
        return _Rule(functools.partial(F.softshrink, lambd=a), lambda x: (x < -a) | (x > a), (0.0, 1.0), 1)
    raise ValueError(f"activation {name!r} is not piecewise linear; choose one of: {', '.join(PIECEWISE_LINEAR)}")


def few_bit(x: torch.Tensor, name: str, bits: int) -> torch.Tensor:
    """f(x) exactly, with a backward from the shipped ``bits``-bit table of smooth activation ``name``."""
    if name not in SMOOTH:
        raise ValueError(f"activation {name!r} has no derivative table; choose one of: {', '.join(SMOOTH)}")
    return _FewBit.apply(x, _table_rule(name, check_bits(bits, f"few_bit({name!r})")))


# --------------------------------------------------------------------------------------------------
# Modules


class FewBitActivation(nn.Module):
    """Exact forward; the backward keeps ``bits`` bits per element of the input (the shipped table)."""

    function: ClassVar[str]

    def __init__(self, bits: int = 3) -> None:
        super().__init__()
        self.bits = check_bits(bits, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FewBit.apply(x, _table_rule(self.function, self.bits))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class FewBitGELU(FewBitActivation):
    function = "gelu"

    def __init__(self, bits: int = 3, approximate: str = "none") -> None:
        super().__init__(bits)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate={approximate!r} is invalid for FewBitGELU; choose one of 'none', 'tanh'")
        self.approximate = approximate
        self.function = "gelu" if approximate == "none" else "gelu_tanh"

    def extra_repr(self) -> str:
        return f"bits={self.bits}, approximate={self.approximate!r}"


class FewBitSiLU(FewBitActivation):
    function = "silu"


class FewBitTanh(FewBitActivation):
    function = "tanh"


class FewBitSigmoid(FewBitActivation):
    function = "sigmoid"


class FewBitELU(FewBitActivation):
    """ELU with α = 1 (the table's)."""

    function = "elu"


class FewBitCELU(FewBitActivation):
    """CELU with α = 1 (the table's)."""

    function = "celu"


class FewBitSELU(FewBitActivation):
    function = "selu"


class FewBitSoftplus(FewBitActivation):
    """Softplus with β = 1, threshold 20 (the table's)."""

    function = "softplus"


class FewBitMish(FewBitActivation):
    function = "mish"


class FewBitSoftsign(FewBitActivation):
    function = "softsign"


class FewBitLogSigmoid(FewBitActivation):
    function = "logsigmoid"


class FewBitTanhshrink(FewBitActivation):
    function = "tanhshrink"


class FewBitHardswish(FewBitActivation):
    function = "hardswish"


class _ExactOneBit(nn.Module):
    """Piecewise-linear activation: exact forward and exact gradient from one bit per element."""

    function: ClassVar[str]
    bits: ClassVar[int] = 1

    def _params(self) -> tuple[float, float]:
        return (0.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FewBit.apply(x, _piecewise_rule(self.function, *self._params()))


class FewBitReLU(_ExactOneBit):
    function = "relu"


class FewBitReLU6(_ExactOneBit):
    function = "relu6"


class FewBitHardsigmoid(_ExactOneBit):
    function = "hardsigmoid"


class FewBitLeakyReLU(_ExactOneBit):
    function = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def _params(self) -> tuple[float, float]:
        return (self.negative_slope, 0.0)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class FewBitHardtanh(_ExactOneBit):
    function = "hardtanh"

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0) -> None:
        super().__init__()
        if not min_val < max_val:
            raise ValueError(f"FewBitHardtanh min_val={min_val} must be below max_val={max_val}")
        self.min_val, self.max_val = float(min_val), float(max_val)

    def _params(self) -> tuple[float, float]:
        return (self.min_val, self.max_val)

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"


class FewBitThreshold(_ExactOneBit):
    function = "threshold"

    def __init__(self, threshold: float, value: float) -> None:
        super().__init__()
        self.threshold, self.value = float(threshold), float(value)

    def _params(self) -> tuple[float, float]:
        return (self.threshold, self.value)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, value={self.value}"


class FewBitHardshrink(_ExactOneBit):
    function = "hardshrink"

    def __init__(self, lambd: float = 0.5) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def _params(self) -> tuple[float, float]:
        return (self.lambd, 0.0)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


class FewBitSoftshrink(FewBitHardshrink):
    function = "softshrink"


def _replacement(module: nn.Module, bits: int) -> nn.Module | None:
    """The few-bit drop-in for ``module``, or None when there is none for its type or parameters."""
    kind = type(module)
    smooth: dict[type, type[FewBitActivation]] = {
        nn.SiLU: FewBitSiLU, nn.Tanh: FewBitTanh, nn.Sigmoid: FewBitSigmoid, nn.SELU: FewBitSELU,
        nn.Mish: FewBitMish, nn.Softsign: FewBitSoftsign, nn.LogSigmoid: FewBitLogSigmoid,
        nn.Tanhshrink: FewBitTanhshrink, nn.Hardswish: FewBitHardswish,
    }
    if kind in smooth:
        return smooth[kind](bits)
    if kind is nn.GELU:
        return FewBitGELU(bits, module.approximate)
    if kind is nn.ELU and module.alpha == 1.0:
        return FewBitELU(bits)
    if kind is nn.CELU and module.alpha == 1.0:
        return FewBitCELU(bits)
    if kind is nn.Softplus and module.beta == 1.0 and module.threshold == 20.0:
        return FewBitSoftplus(bits)
    simple: dict[type, Callable[[], nn.Module]] = {
        nn.ReLU: FewBitReLU, nn.ReLU6: FewBitReLU6, nn.Hardsigmoid: FewBitHardsigmoid,
    }
    if kind in simple:
        return simple[kind]()
    if kind is nn.LeakyReLU:
        return FewBitLeakyReLU(module.negative_slope)
    if kind is nn.Hardtanh:
        return FewBitHardtanh(module.min_val, module.max_val)
    if kind is nn.Threshold:
        return FewBitThreshold(module.threshold, module.value)
    if kind is nn.Hardshrink:
        return FewBitHardshrink(module.lambd)
    if kind is nn.Softshrink:
        return FewBitSoftshrink(module.lambd)
    if kind in (nn.ELU, nn.CELU, nn.Softplus):
        log.warning("%r keeps its exact backward: the few-bit tables are for its default parameters", module)
    return None


def swap_activations(model: nn.Module, bits: int | None) -> nn.Module:
    """Replace, in place, every activation module of ``model`` that has a few-bit drop-in (GELU, SiLU,
    Tanh, Sigmoid, ELU, Softplus, Mish, ... at ``bits`` bits; ReLU, LeakyReLU, Hardtanh, ReLU6, ... at
    one exact bit). ``bits`` None or 0 leaves the model exact. Returns ``model`` (or the drop-in when
    ``model`` is itself an activation). Shared modules stay shared."""
    if bits is None or bits == 0:
        return model
    bits = check_bits(bits, "swap_activations")
    top = _replacement(model, bits)
    if top is not None:
        return top
    made: dict[int, nn.Module | None] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in made:
                made[id(child)] = _replacement(child, bits)
            if made[id(child)] is not None:
                setattr(parent, name, made[id(child)])
    log.info("swap_activations: %d activation modules now keep %d-bit codes (piecewise-linear ones 1 bit)",
             sum(m is not None for m in made.values()), bits)
    return model


# --------------------------------------------------------------------------------------------------
# Memory accounting and a small model


def saved_activation_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of ``model(*inputs)``: every storage a saved tensor
    lives in, counted once, except the model's parameters and buffers (held anyway).

    Works on any device. On CUDA, ``torch.cuda.max_memory_allocated`` around the forward pass (after
    ``torch.cuda.reset_peak_memory_stats``) is the allocator-level cross-check; it also sees transient
    buffers, which this count deliberately leaves out.
    """
    own = {(t.device, t.untyped_storage().data_ptr()) for t in [*model.parameters(), *model.buffers()]}
    seen: dict[tuple[torch.device, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in own:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    del out
    return sum(seen.values())


_MLP_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "elu": nn.ELU, "softplus": nn.Softplus, "mish": nn.Mish,
}


def gelu_mlp(inputs: int = 64, hidden: int = 256, classes: int = 10, activation: str = "gelu", layers: int = 2,
             bits: int | None = None) -> nn.Sequential:
    """An MLP for 8×8 digits (64 inputs, 10 classes): ``layers`` hidden Linear+activation blocks, then a
    Linear head; with ``bits`` its activations are the few-bit drop-ins."""
    if activation not in _MLP_ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is invalid for gelu_mlp; choose one of: "
                         f"{', '.join(_MLP_ACTIVATIONS)}")
    if layers < 1:
        raise ValueError(f"layers={layers} is invalid for gelu_mlp; it must be >= 1")
    blocks: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), _MLP_ACTIVATIONS[activation]()]
        width = hidden
    model = nn.Sequential(*blocks, nn.Linear(width, classes))
    return swap_activations(model, bits)  # type: ignore[return-value]
