"""ℓ1-regularised diagonal AdaGrad on (quantised) gradients: QCMD AdaGrad and QRDA AdaGrad.

Xu, Wangni, Zhang, Ye, Wu, Zhao, "Quantized adaptive subgradient algorithms and their applications"
(2022) build AdaGrad's adaptive matrix from the averaged quantised gradient ĝ and keep the model
sparse with ψ(x) = λ‖x‖₁. The two base methods are diagonal AdaGrad composite mirror descent (CMD)
and regularised dual averaging (RDA) of Duchi, Hazan, Singer, "Adaptive subgradient methods for
online learning and stochastic optimization" (JMLR 2011), whose closed forms are used here:

    G ← G + ĝ²,   h = δ + √G
    CMD:  y = x − η ĝ/h,   x ← sgn(y)·max(|y| − ηλ/h, 0)
    RDA:  ū = (1/t) Σ_{τ≤t} ĝ_τ,   x ← −sgn(ū)·(η t/h)·max(|ū| − λ, 0)

The optimizers use whatever gradient they are given: in rayq that is the averaged quantised gradient,
identical on every replica, so G, the RDA sum and the iterate stay identical too. The round counter
t lives in every parameter's state ("step"), so it is checkpointed by ``state_dict()`` and keeps
counting global rounds across restarts.

:func:`build` makes any of the optimizers of this package by name (including BLAQ and the
LAQ-weights baseline of :mod:`rayq.blaq`); all of them accept ``step(closure)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["OPTIMIZERS", "QCMDAdaGrad", "QRDAAdaGrad", "build", "model_sparsity"]


def _check_hyper(owner: str, lr: float, l1: float, delta: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr={lr} is invalid for {owner}; it must be > 0")
    if not l1 >= 0:
        raise ValueError(f"l1={l1} is invalid for {owner}; it must be >= 0")
    if not delta > 0:
        raise ValueError(f"delta={delta} is invalid for {owner}; it must be > 0 (it keeps 1/h finite)")


class _L1AdaGrad(torch.optim.Optimizer):
    """Shared bookkeeping: per-parameter ``step`` (the round t), ``sum_sq`` (G) and the update rule."""

    def __init__(self, params: Iterable[Any], lr: float = 0.1, l1: float = 0.0, delta: float = 1e-10) -> None:
        _check_hyper(type(self).__name__, lr, l1, delta)
        super().__init__(params, {"lr": lr, "l1": l1, "delta": delta})

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["sum_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._init_extra(p, state)
        return state

    def _init_extra(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Extra per-parameter state of a subclass."""

    def _update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], t: float,
                lr: float, l1: float, delta: float) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One round with the gradients in ``p.grad``. Every parameter's t advances, with or without a
        gradient this round; a parameter without one is left as it is (for RDA its missing gradient
        counts as zero in ū)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self._state(p)
                state["step"] += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} takes dense gradients; got a sparse one for a "
                                     f"parameter of shape {tuple(p.shape)}")
                self._update(p, p.grad, state, float(state["step"]), group["lr"], group["l1"], group["delta"])
        return loss

    @property
    def rounds(self) -> int:
        """Global rounds t taken so far (restored by ``load_state_dict``)."""
        return max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)


class QCMDAdaGrad(_L1AdaGrad):
    """Diagonal AdaGrad composite mirror descent with an ℓ1 prox (Duchi et al., JMLR 2011), fed with the
    averaged quantised gradient as in QCMD AdaGrad (Xu et al., 2022):
    y = x − ηĝ/h,  x ← sgn(y)·max(|y| − ηλ/h, 0),  h = δ + √G."""

    def _update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], t: float,
                lr: float, l1: float, delta: float) -> None:
        sum_sq = state["sum_sq"]
        sum_sq.addcmul_(g, g)
        h = sum_sq.sqrt().add_(delta)
        y = p.addcdiv(g, h, value=-lr)
        shrunk = (y.abs() - (lr * l1) / h).clamp_(min=0)
        p.copy_(torch.sign(y) * shrunk)


class QRDAAdaGrad(_L1AdaGrad):
    """Diagonal AdaGrad regularised dual averaging with ψ = λ‖x‖₁ (Duchi et al., JMLR 2011), fed with the
    averaged quantised gradient as in QRDA AdaGrad (Xu et al., 2022):
    ū = (1/t)Σĝ,  x ← −sgn(ū)·(ηt/h)·max(|ū| − λ, 0). Coordinates with |ū| ≤ λ are exactly zero."""

    def _init_extra(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        state["grad_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], t: float,
                lr: float, l1: float, delta: float) -> None:
        sum_sq, grad_sum = state["sum_sq"], state["grad_sum"]
        sum_sq.addcmul_(g, g)
        grad_sum.add_(g)
        h = sum_sq.sqrt().add_(delta)
        mean = grad_sum / t
        shrunk = (mean.abs() - l1).clamp_(min=0)
        p.copy_(torch.sign(mean).neg_() * shrunk * (lr * t) / h)


def model_sparsity(params: Iterable[torch.Tensor]) -> float:
    """Fraction of exact zeros over all elements of ``params`` (what the ℓ1 prox is for)."""
    tensors = [p.detach() for p in params]
    total = sum(t.numel() for t in tensors)
    if total == 0:
        raise ValueError("model_sparsity got no elements; pass a non-empty iterable of tensors")
    nonzeros = sum(int(torch.count_nonzero(t)) for t in tensors)
    return (total - nonzeros) / total


def _blaq(params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    from rayq.blaq import BLAQ

    return BLAQ(params, **kwargs)


def _laq_weights(params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    from rayq.blaq import LAQWeights

    return LAQWeights(params, **kwargs)


#: Optimizer names :func:`build` knows, each with its constructor.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "qcmd_adagrad": QCMDAdaGrad,
    "qrda_adagrad": QRDAAdaGrad,
    "blaq": _blaq,
    "laq_weights": _laq_weights,
}


def build(name: str, params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer called ``name`` over ``params`` with its keyword hyper-parameters."""
    try:
        make = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer {name!r} is not known; choose one of: {', '.join(OPTIMIZERS)}") from None
    return make(params, **kwargs)
