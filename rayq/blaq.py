"""BLAQ: one-step forward and backtrack for loss-aware weight quantisation, and its LAQ-weights baseline.

Loss-aware weight quantisation (Hou & Kwok, "Loss-aware weight quantization of deep networks", ICLR
2018) keeps full-precision shadow weights w, runs the model at ŵ = Proj_Q(w) (per layer α·b with b
binary, ternary or m-bit) and steps w with Adam on g = ∇ℓ(ŵ); Proj_Q minimises ‖ŵ − w‖²_D with the
Adam preconditioner d = √v̂ + ε. The gradient error of ŵ makes successive steps zig-zag.

BLAQ (Ma, Zhou, Ma, Yu, Li, "Overcoming the zig-zagging in loss-aware quantisation: one-step forward
and backtrack", AAAI 2024, arXiv 2401.16760) takes a trial step, evaluates the gradient there and
backtracks with the blend of both, on the same minibatch:

    g = ∇ℓ(ŵ_t);   w̃ = w_t − η m̂′/d′,  ŵ̃ = Proj_Q(w̃)          (trial: the step LAQ would take)
    g̃ = ∇ℓ(ŵ̃);    h = (1 − β) g + β g̃
    m, v ← Adam moments updated with h;   w_{t+1} = w_t − η m̂/d,  ŵ_{t+1} = Proj_Q(w_{t+1})

where m′, v′ (and d′) are the moments provisionally updated with g. β = 0 is LAQ-weights exactly. The
abstract fixes only "trial gradient of the next step, then backtrack"; taking the LAQ step itself as the
trial point is our reading. Each step calls the closure twice (once for :class:`LAQWeights`): in rayq the
closure runs forward, backward and the compressed gradient averaging, so replicas stay identical.

Zig-zag is measured as cos(Δw_t, Δw_{t−1}) over all shadow weights and the running fraction of negative
cosines (:meth:`BLAQ.zigzag`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BLAQ", "LAQWeights", "Projected", "Projection", "ZigZag", "laq_param_groups", "project"]


class Projection(str, enum.Enum):
    """The per-layer weight sets: {−α, α}, {−α, 0, α}, α·{−1, …, −1/k, 0, 1/k, …, 1} with
    k = 2^(m−1) − 1, or full precision."""

    BINARY = "binary"
    TERNARY = "ternary"
    MBIT = "mbit"
    NONE = "none"


@dataclass(frozen=True)
class Projected:
    """ŵ = α·b, the D-weighted least-squares projection of w onto one layer's quantised set."""

    weight: torch.Tensor
    alpha: torch.Tensor
    codes: torch.Tensor


def _projection(value: Any) -> Projection:
    try:
        return Projection(value)
    except ValueError:
        raise ValueError(f"projection={value!r} is invalid; choose one of: "
                         f"{', '.join(p.value for p in Projection)}") from None


def project(w: torch.Tensor, d: torch.Tensor, projection: Projection | str = Projection.BINARY, bits: int = 2,
            iterations: int = 10) -> Projected:
    """argmin over (α, b) of Σ d_i (α b_i − w_i)² for one layer (Hou & Kwok, ICLR 2018).

    Binary: b = sgn(w) (+1 at 0) and α = ‖d⊙w‖₁/‖d‖₁ exactly. Ternary and m-bit alternate ``iterations``
    times b ← nearest level of w/α, α ← Σ d w b / Σ d b², from the binary α; α is the weighted
    least-squares optimum for the returned b.
    """
    kind = _projection(projection)
    if kind is Projection.NONE:
        return Projected(w.clone(), w.new_ones(()), w.clone())
    f64 = torch.float64
    tiny = torch.finfo(f64).tiny
    sign = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    alpha = torch.sum(d * w.abs(), dtype=f64) / torch.sum(d, dtype=f64).clamp(min=tiny)
    if kind is Projection.BINARY:
        return Projected(alpha.to(w.dtype) * sign, alpha.to(w.dtype), sign)
    if kind is Projection.MBIT and not (isinstance(bits, int) and bits >= 2):
        raise ValueError(f"bits={bits!r} is invalid for the m-bit projection; choose an integer >= 2 (2 is ternary)")
    k = 1 if kind is Projection.TERNARY else 2 ** (bits - 1) - 1
    codes = sign
    for _ in range(iterations):
        safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha)).to(w.dtype)
        codes = torch.round(w / safe * k).clamp_(-k, k).div_(k)
        den = torch.sum(d * codes * codes, dtype=f64)
        alpha = torch.where(den > 0, torch.sum(d * w * codes, dtype=f64) / den.clamp(min=tiny), alpha)
    return Projected(alpha.to(w.dtype) * codes, alpha.to(w.dtype), codes)


@dataclass(frozen=True)
class ZigZag:
    """How much the shadow weights' updates zig-zag: cosines of successive steps Δw_t, Δw_{t−1}."""

    steps: int
    gradient_evaluations: int
    cosines: int
    last_cosine: float
    mean_cosine: float
    negative_fraction: float

    def metrics(self, prefix: str = "optim/") -> dict[str, float]:
        """Scalars for a metrics sink (TensorBoard tags)."""
        return {f"{prefix}zigzag_cosine": self.last_cosine, f"{prefix}zigzag_mean_cosine": self.mean_cosine,
                f"{prefix}zigzag_negative_fraction": self.negative_fraction,
                f"{prefix}gradient_evaluations": float(self.gradient_evaluations)}


def laq_param_groups(model: nn.Module, projection: Projection | str = Projection.BINARY,
                     bits: int = 2) -> list[dict[str, Any]]:
    """Parameter groups as loss-aware quantisation is usually run: weight matrices and kernels (ndim ≥ 2)
    quantised, biases and normalisation parameters in full precision."""
    weights = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    groups: list[dict[str, Any]] = [{"params": weights, "projection": _projection(projection).value, "bits": bits}]
    if others:
        groups.append({"params": others, "projection": Projection.NONE.value})
    return groups


class BLAQ(torch.optim.Optimizer):
    """One-step forward and backtrack over loss-aware quantised weights (Ma et al., AAAI 2024).

    The model's parameters always hold the quantised weights ŵ (constructing the optimizer projects them
    in place); the full-precision shadows, Adam moments, step count and zig-zag counters live in the
    optimizer and in ``state_dict()``. ``step(closure)`` needs a closure that zeroes the gradients,
    evaluates the loss at the current parameters and back-propagates (as for ``torch.optim.LBFGS``); it
    is called twice per step (once when β = 0). After a step ``p.grad`` holds the direction h used.

    Group options: ``lr``, ``betas``, ``eps``, ``beta`` (the trial weight β), ``projection`` (binary,
    ternary, mbit, none), ``bits`` (for mbit) and ``iterations`` (alternations of ternary / m-bit).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, beta: float = 0.5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 projection: Projection | str = Projection.BINARY, bits: int = 2, iterations: int = 10) -> None:
        defaults = {"lr": lr, "beta": beta, "betas": tuple(betas), "eps": eps, "projection": projection,
                    "bits": bits, "iterations": iterations}
        self._step = 0
        self._evaluations = 0
        self._cosines = 0
        self._counters: torch.Tensor | None = None  # [negative count, cosine sum, last cosine], float64
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group, keep its full-precision shadows and project its parameters in place (a group
        added after the first step starts with fresh moments)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        with torch.no_grad():
            for p in group["params"]:
                state = self.state[p]
                state["shadow"] = p.detach().clone(memory_format=torch.preserve_format)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["prev_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self._quantise(p, state["shadow"], torch.ones_like(p), group)

    def _check_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        if not group["lr"] > 0:
            raise ValueError(f"lr={group['lr']} is invalid for {owner}; it must be > 0")
        if not 0 <= group["beta"] <= 1:
            raise ValueError(f"beta={group['beta']} is invalid for {owner}; it must be in [0, 1] (0 is LAQ-weights)")
        b1, b2 = group["betas"]
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas={group['betas']} is invalid for {owner}; both must be in [0, 1)")
        if not group["eps"] > 0:
            raise ValueError(f"eps={group['eps']} is invalid for {owner}; it must be > 0")
        group["projection"] = _projection(group["projection"]).value
        if group["projection"] == Projection.MBIT.value and not (isinstance(group["bits"], int) and group["bits"] >= 2):
            raise ValueError(f"bits={group['bits']!r} is invalid for {owner}'s m-bit projection; "
                             f"choose an integer >= 2")
        if group["iterations"] < 1:
            raise ValueError(f"iterations={group['iterations']} is invalid for {owner}; it must be >= 1")

    @staticmethod
    def _preconditioner(exp_avg_sq: torch.Tensor, step: int, group: dict[str, Any]) -> torch.Tensor:
        """d = √v̂ + ε (all ones before the first step, when no statistics exist yet)."""
        if step == 0:
            return torch.ones_like(exp_avg_sq)
        return (exp_avg_sq / (1 - group["betas"][1] ** step)).sqrt_().add_(group["eps"])

    @staticmethod
    def _adam_step(state: dict[str, torch.Tensor], g: torch.Tensor, step: int, group: dict[str, Any],
                   commit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Moments updated with g (in place when ``commit``); returns the new shadow and d."""
        b1, b2 = group["betas"]
        m = state["exp_avg"] if commit else state["exp_avg"].clone()
        v = state["exp_avg_sq"] if commit else state["exp_avg_sq"].clone()
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        d = BLAQ._preconditioner(v, step, group)
        shadow = state["shadow"].addcdiv(m, d, value=-group["lr"] / (1 - b1 ** step))
        return shadow, d

    def _quantise(self, p: torch.Tensor, w: torch.Tensor, d: torch.Tensor, group: dict[str, Any]) -> None:
        p.copy_(project(w, d, group["projection"], group["bits"], group["iterations"]).weight)

    def _reproject(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                self._quantise(p, state["shadow"], self._preconditioner(state["exp_avg_sq"], self._step, group), group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that zeroes the gradients, evaluates the "
                             f"loss at the current (quantised) weights and back-propagates")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self._evaluations += 1
        step = self._step + 1
        live = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad.detach().clone() for p, _ in live]
        directions = grads
        if any(group["beta"] > 0 for _, group in live):
            for (p, group), g in zip(live, grads):
                shadow, d = self._adam_step(self.state[p], g, step, group, commit=False)
                self._quantise(p, shadow, d, group)
                p.grad = None
            closure()
            self._evaluations += 1
            directions = []
            for (p, group), g in zip(live, grads):
                trial = p.grad if p.grad is not None else torch.zeros_like(g)
                beta = group["beta"]
                directions.append(g if beta == 0 else g.mul(1 - beta).add_(trial, alpha=beta))
        dot, now_sq, prev_sq = [], [], []
        for (p, group), h in zip(live, directions):
            state = self.state[p]
            shadow, d = self._adam_step(state, h, step, group, commit=True)
            delta = shadow - state["shadow"]
            prev = state["prev_delta"]
            dot.append(torch.sum(delta * prev, dtype=torch.float64))
            now_sq.append(torch.sum(delta * delta, dtype=torch.float64))
            prev_sq.append(torch.sum(prev * prev, dtype=torch.float64))
            state["shadow"].copy_(shadow)
            prev.copy_(delta)
            self._quantise(p, shadow, d, group)
            p.grad = h
        for group in self.param_groups:  # parameters without a gradient did not move this step
            for p in group["params"]:
                if p.grad is None:
                    self.state[p]["prev_delta"].zero_()
        self._step = step
        if step >= 2 and live:
            self._record(torch.stack(dot).sum(), torch.stack(now_sq).sum(), torch.stack(prev_sq).sum())
        return loss

    def _record(self, dot: torch.Tensor, now_sq: torch.Tensor, prev_sq: torch.Tensor) -> None:
        """Accumulate the cosine on the device: no host synchronisation per step."""
        norm = (now_sq * prev_sq).sqrt()
        cosine = torch.where(norm > 0, dot / norm.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(dot))
        if self._counters is None:
            self._counters = torch.zeros(3, dtype=torch.float64, device=cosine.device)
        self._counters[0] += (cosine < 0).to(torch.float64)
        self._counters[1] += cosine
        self._counters[2] = cosine
        self._cosines += 1

    def zigzag(self) -> ZigZag:
        """Step count, gradient evaluations and the zig-zag statistics so far, as plain numbers."""
        negative, total, last = self._counters.tolist() if self._counters is not None else (0.0, 0.0, 0.0)
        n = self._cosines
        return ZigZag(self._step, self._evaluations, n, last, total / n if n else math.nan,
                      negative / n if n else math.nan)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        negative, total, last = self._counters.tolist() if self._counters is not None else (0.0, 0.0, 0.0)
        out["blaq"] = {"step": self._step, "gradient_evaluations": self._evaluations, "cosines": self._cosines,
                       "negative": negative, "cosine_sum": total, "last_cosine": last}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        try:
            extra = state_dict.pop("blaq")
        except KeyError:
            raise ValueError(f"this state_dict has no 'blaq' entry; it was not saved by "
                             f"{type(self).__name__}") from None
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._check_group(group)
        self._step = int(extra["step"])
        self._evaluations = int(extra["gradient_evaluations"])
        self._cosines = int(extra["cosines"])
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        self._counters = torch.tensor([extra["negative"], extra["cosine_sum"], extra["last_cosine"]],
                                      dtype=torch.float64, device=device)
        with torch.no_grad():
            self._reproject()


class LAQWeights(BLAQ):
    """Loss-aware weight quantisation with Adam (Hou & Kwok, ICLR 2018): BLAQ with β = 0, one gradient
    evaluation per step."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, projection: Projection | str = Projection.BINARY, bits: int = 2,
                 iterations: int = 10) -> None:
        super().__init__(params, lr=lr, beta=0.0, betas=betas, eps=eps, projection=projection, bits=bits,
                         iterations=iterations)
