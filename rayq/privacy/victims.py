"""The models whose gradients are attacked, and the gradient a worker would send for one batch.

The LeNet with sigmoids is the victim of Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019):
twice-differentiable activations and weights drawn from U(−0.5, 0.5), the easiest setting for an
attacker, hence a worst case for a defence. The MLP has a first fully-connected layer with bias,
whose input a single-sample gradient reveals exactly (Geiping et al., NeurIPS 2020).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn


class VictimKind(str, enum.Enum):
    LENET = "lenet"
    MLP = "mlp"


@dataclass(frozen=True)
class InputSpec:
    """Shape of one sample (channels, height, width) and the number of classes."""

    channels: int
    height: int
    width: int
    classes: int = 10

    def __post_init__(self) -> None:
        if min(self.channels, self.height, self.width, self.classes) < 1:
            raise ValueError(f"input spec {self} needs positive channels, height, width and classes")

    @property
    def numel(self) -> int:
        return self.channels * self.height * self.width


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def lenet_sigmoid(spec: InputSpec) -> nn.Sequential:
    """The DLG victim: Conv(c→12, k5, s2, p2)–σ–Conv(12→12, k5, s2, p2)–σ–Conv(12→12, k5, s1, p2)–σ–
    FC(·→classes); 8×8 inputs give a 12·2·2 = 48-wide FC, 28×28 give 588, 32×32 the paper's 768."""
    h, w = spec.height, spec.width
    for stride in (2, 2, 1):
        h, w = _conv_out(h, 5, stride, 2), _conv_out(w, 5, stride, 2)
    return nn.Sequential(
        nn.Conv2d(spec.channels, 12, 5, stride=2, padding=2), nn.Sigmoid(),
        nn.Conv2d(12, 12, 5, stride=2, padding=2), nn.Sigmoid(),
        nn.Conv2d(12, 12, 5, stride=1, padding=2), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(12 * h * w, spec.classes),
    )


def mlp_victim(spec: InputSpec, hidden: int = 64) -> nn.Sequential:
    """Flatten–FC(d→hidden, bias)–σ–FC(hidden→classes): the first layer admits the analytic inversion."""
    if hidden < 1:
        raise ValueError(f"hidden={hidden} must be >= 1")
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.numel, hidden), nn.Sigmoid(), nn.Linear(hidden, spec.classes))


def build_victim(kind: VictimKind | str, spec: InputSpec, seed: int) -> nn.Sequential:
    """A victim with every weight and bias drawn i.i.d. from U(−0.5, 0.5) by a generator seeded with ``seed``."""
    try:
        kind = VictimKind(kind)
    except ValueError:
        raise ValueError(f"victim={kind!r} is not a victim model; choose one of: "
                         f"{', '.join(k.value for k in VictimKind)}") from None
    model = lenet_sigmoid(spec) if kind is VictimKind.LENET else mlp_victim(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return model


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_batch −Σ_c y_c log softmax(logits)_c`` for probability (soft) or index (hard) labels."""
    if target.dtype in (torch.int64, torch.int32):
        target = nn.functional.one_hot(target, logits.shape[-1]).to(logits.dtype)
    return -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def parameter_names(model: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, _ in model.named_parameters())


def batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient a worker sends for batch (x, y): ∂ℓ/∂W of the mean cross-entropy, per parameter."""
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(soft_cross_entropy(model(x), y), params)
    return {name: g.detach() for name, g in zip(parameter_names(model), grads)}
