"""Gradient-inversion attacks: recover a worker's training batch from the update it sends.

* DLG, Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019): minimise the L2 distance between the
  gradient of a dummy batch (x′, softmax(y′)) and the observed one, jointly over x′ and y′, with L-BFGS.
* iDLG (Zhao, Mopuri, Bilen, arXiv 2001.02610, 2020): the true label of one sample is the row of the
  last layer's weight gradient with a negative sum.
* Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020): cosine distance over all
  layers plus total variation, Adam on the sign of the gradient, box constraint, restarts; and the
  analytic inversion of a fully-connected layer with bias, ``x = ∇W_j / ∇b_j``.

What the attacker compares depends on what it knows about the compression (:class:`Knowledge`):
a naive attacker takes the decoded update as the gradient; a compressor-aware one compares only
what the packet really says (the transmitted support of a sparsifier, the projection P̂P̂ᵀ∇ of
PowerSGD, the signs of a sign codec); an adaptive one passes its own candidate gradient through the
same codec, with a straight-through estimator (Bengio, Léonard, Courville, arXiv 1308.3432, 2013)
for the rounding. Every budget is a parameter; every attack reports its closure calls.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compressors.base import mix_seed
from rayq.privacy.victims import soft_cross_entropy
from rayq.privacy.wire import SIGN_CODECS, ParamObservation, WireCapture

log = logging.getLogger(__name__)

_DLG_PURPOSE = 0x444C47
_IG_PURPOSE = 0x4947
_TINY = 1e-12


class Distance(str, enum.Enum):
    L2 = "l2"            # Σ_layers ‖a − b‖² (DLG)
    COSINE = "cosine"    # 1 − Σ⟨a, b⟩ / (‖a‖‖b‖), norms over all layers jointly (Inverting Gradients)


class Knowledge(str, enum.Enum):
    """What the attacker exploits about the codec that produced the update."""

    NAIVE = "naive"        # the decoded update is taken as the gradient itself
    AWARE = "aware"        # compares only what the packet says: support, projection, signs
    ADAPTIVE = "adaptive"  # passes its candidate through the same codec (straight-through)


class View(str, enum.Enum):
    """How one parameter's candidate gradient is compared with the observation."""

    PLAIN = "plain"            # candidate vs decoded
    SUPPORT = "support"        # (candidate − decoded) on the transmitted coordinates only
    PROJECTION = "projection"  # P̂P̂ᵀ·candidate vs decoded (PowerSGD's P̂Qᵀ = P̂P̂ᵀ·M)
    SIGN = "sign"              # tanh(candidate/τ) vs sgn(decoded), a smooth surrogate of the sign
    ADAPTIVE = "adaptive"      # D(C(candidate)) vs decoded, straight-through gradient


def view_for(obs: ParamObservation, knowledge: Knowledge) -> View:
    if knowledge is Knowledge.NAIVE:
        return View.PLAIN
    if knowledge is Knowledge.ADAPTIVE:
        return View.ADAPTIVE
    if obs.support is not None:
        return View.SUPPORT
    if obs.basis is not None:
        return View.PROJECTION
    if obs.codec.name in SIGN_CODECS:
        return View.SIGN
    return View.PLAIN


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, the identity's gradient in the backward pass."""
    return x + (quantized - x).detach()


@dataclass(frozen=True, eq=False)
class GradientObjective:
    """Distance between a candidate gradient (one tensor per named parameter) and the observation.

    Build it with :meth:`exact` for an uncompressed gradient or :meth:`from_capture` for what came
    off the wire. ``sign_temperature`` τ scales the sign surrogate relative to mean|candidate|.
    """

    names: tuple[str, ...]
    views: tuple[View, ...]
    targets: tuple[torch.Tensor, ...]
    observations: tuple[ParamObservation | None, ...]
    distance: Distance = Distance.L2
    sign_temperature: float = 0.1

    @classmethod
    def exact(cls, grads: Mapping[str, torch.Tensor], distance: Distance | str = Distance.L2) -> GradientObjective:
        names = tuple(grads)
        return cls(names, (View.PLAIN,) * len(names), tuple(g.detach() for g in grads.values()),
                   (None,) * len(names), Distance(distance))

    @classmethod
    def from_capture(cls, capture: WireCapture, distance: Distance | str = Distance.L2,
                     knowledge: Knowledge | str = Knowledge.AWARE, sign_temperature: float = 0.1) -> GradientObjective:
        knowledge = Knowledge(knowledge)
        if not sign_temperature > 0:
            raise ValueError(f"sign_temperature={sign_temperature} must be > 0")
        views = tuple(view_for(o, knowledge) for o in capture.params)
        targets = []
        for obs, view in zip(capture.params, views):
            if view is View.SUPPORT:
                targets.append(obs.decoded[obs.support])
            elif view is View.SIGN:
                targets.append(torch.sign(obs.decoded))
            else:
                targets.append(obs.decoded)
        return cls(tuple(o.name for o in capture.params), views, tuple(targets), capture.params,
                   Distance(distance), sign_temperature)

    def compared(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """The candidate side of parameter ``i``, comparable with ``targets[i]``."""
        view, obs = self.views[i], self.observations[i]
        if view is View.PLAIN:
            return g
        assert obs is not None
        if view is View.SUPPORT:
            return g[obs.support]
        if view is View.PROJECTION:
            basis = obs.basis
            m = g.reshape(basis.shape[0], -1)
            return (basis @ (basis.t() @ m)).reshape(g.shape)
        if view is View.SIGN:
            scale = self.sign_temperature * g.detach().abs().mean() + _TINY
            return torch.tanh(g / scale)
        return straight_through(g, obs.roundtrip(g))

    def __call__(self, candidate: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(candidate) != len(self.names):
            raise ValueError(f"{len(candidate)} candidate tensors for {len(self.names)} observed parameters")
        pairs = [(self.compared(i, g), t) for i, (g, t) in enumerate(zip(candidate, self.targets))]
        if self.distance is Distance.L2:
            return sum(((a - b) ** 2).sum() for a, b in pairs)
        dot = sum((a * b).sum() for a, b in pairs)
        na = sum((a * a).sum() for a, _ in pairs)
        nb = sum((b * b).sum() for _, b in pairs)
        return 1.0 - dot / (na.sqrt() * nb.sqrt() + _TINY)


def candidate_gradients(model: nn.Module, names: Sequence[str], x: torch.Tensor,
                        y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """∂ℓ(F(x), y)/∂W for the named parameters, differentiable in x and y (second-order autograd)."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"observed parameters {missing} are not in the victim model; it has {list(params)}")
    return torch.autograd.grad(soft_cross_entropy(model(x), y), [params[n] for n in names], create_graph=True)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: ``mean|x[..., 1:] − x[..., :-1]| + mean|x[..., 1:, :] − x[..., :-1, :]|``."""
    return (x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


@dataclass(frozen=True, eq=False)
class AttackResult:
    """The best trial's reconstruction and labels, its final matching loss, and the effort spent."""

    reconstruction: torch.Tensor
    labels: torch.Tensor
    loss: float
    iterations: int          # objective evaluations (closure calls) over all trials
    restarts: int            # trials run
    trial_losses: tuple[float, ...]


@dataclass(frozen=True)
class DLGBudget:
    """L-BFGS budget: ``steps`` outer ``.step()`` calls of up to ``max_iter`` inner iterations each."""

    steps: int = 300
    max_iter: int = 20
    restarts: int = 1
    lr: float = 1.0
    tolerance: float = 0.0   # stop a trial once its loss is at or below this

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_iter < 1 or self.restarts < 1:
            raise ValueError(f"DLG budget {self} needs steps, max_iter and restarts >= 1")
        if not self.lr > 0:
            raise ValueError(f"DLG lr={self.lr} must be > 0")


@dataclass(frozen=True)
class IGBudget:
    """Adam budget on signed gradients; LR × 0.1 at 3/8, 5/8 and 7/8 of ``iterations``."""

    iterations: int = 4800
    restarts: int = 1
    lr: float = 0.1
    tv: float = 1e-4

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError(f"IG budget {self} needs iterations and restarts >= 1")
        if not self.lr > 0 or self.tv < 0:
            raise ValueError(f"IG budget lr={self.lr} must be > 0 and tv={self.tv} >= 0")


def _best(trials: list[tuple[float, torch.Tensor, torch.Tensor]], calls: int) -> AttackResult:
    losses = tuple(t[0] for t in trials)
    loss, x, y = min(trials, key=lambda t: t[0] if math.isfinite(t[0]) else math.inf)
    return AttackResult(reconstruction=torch.nan_to_num(x.detach()), labels=y, loss=loss, iterations=calls,
                        restarts=len(trials), trial_losses=losses)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"batch shape {shape} must be (batch, channels, height, width), all >= 1")
    return shape


def dlg(model: nn.Module, objective: GradientObjective, shape: Sequence[int], classes: int,
        budget: DLGBudget = DLGBudget(), *, labels: torch.Tensor | None = None, seed: int = 0) -> AttackResult:
    """Deep Leakage from Gradients: L-BFGS on a dummy batch x′ ~ N(0, I) (and dummy label logits y′ ~
    N(0, I) with soft labels softmax(y′), unless ``labels`` are known, e.g. from iDLG)."""
    shape = _check_shape(shape)
    trials, calls = [], 0
    for r in range(budget.restarts):
        g = torch.Generator().manual_seed(mix_seed(seed, r, _DLG_PURPOSE))
        x = torch.randn(shape, generator=g).requires_grad_(True)
        y_logits = torch.randn((shape[0], classes), generator=g).requires_grad_(True)
        learn_labels = labels is None
        opt = torch.optim.LBFGS([x, y_logits] if learn_labels else [x], lr=budget.lr, max_iter=budget.max_iter)

        def target() -> torch.Tensor:
            return y_logits.softmax(dim=-1) if learn_labels else labels

        def closure() -> torch.Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = objective(candidate_gradients(model, objective.names, x, target()))
            loss.backward()
            return loss

        previous = math.inf
        for _ in range(budget.steps):
            loss = float(opt.step(closure).detach())
            if not math.isfinite(loss) or loss <= budget.tolerance or loss == previous:
                break
            previous = loss
        final = _final_loss(model, objective, x, target())
        found = y_logits.detach().argmax(dim=-1) if learn_labels else labels
        log.debug("DLG trial %d: loss %.3e after %d closure calls in all", r, final, calls)
        trials.append((final, x.detach().clone(), found))
    return _best(trials, calls)


def _final_loss(model: nn.Module, objective: GradientObjective, x: torch.Tensor, y: torch.Tensor,
                tv: float = 0.0) -> float:
    x = x.detach().requires_grad_(True)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(soft_cross_entropy(model(x), y.detach()), [params[n] for n in objective.names])
    loss = float(objective(grads).detach()) + tv * float(total_variation(x.detach()))
    return loss if math.isfinite(loss) else math.inf


def inverting_gradients(model: nn.Module, objective: GradientObjective, shape: Sequence[int], labels: torch.Tensor,
                        budget: IGBudget = IGBudget(), *, box: tuple[float, float] | None = None,
                        seed: int = 0) -> AttackResult:
    """Inverting Gradients: minimise objective(∇(x′)) + λ_TV·TV(x′) with Adam on sgn(∂/∂x′), x′ clamped
    into ``box`` after every step, LR decay at 3/8, 5/8, 7/8; the trial with the lowest loss wins."""
    shape = _check_shape(shape)
    if labels.numel() != shape[0]:
        raise ValueError(f"{labels.numel()} labels for a batch of {shape[0]}")
    n = budget.iterations
    milestones = sorted({max(1, int(n * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
    trials, calls = [], 0
    for r in range(budget.restarts):
        g = torch.Generator().manual_seed(mix_seed(seed, r, _IG_PURPOSE))
        x = torch.randn(shape, generator=g)
        if box is not None:
            x.clamp_(*box)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=budget.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for _ in range(n):
            calls += 1
            opt.zero_grad()
            loss = objective(candidate_gradients(model, objective.names, x, labels)) + budget.tv * total_variation(x)
            if not torch.isfinite(loss):
                break
            loss.backward()
            x.grad.sign_()
            opt.step()
            sched.step()
            if box is not None:
                with torch.no_grad():
                    x.clamp_(*box)
        final = _final_loss(model, objective, x, labels, budget.tv)
        log.debug("IG trial %d: loss %.3e", r, final)
        trials.append((final, x.detach().clone(), labels))
    return _best(trials, calls)


def idlg_labels(last_weight_grad: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """iDLG: for one sample, ∂ℓ/∂W_j = (p_j − y_j)·hᵀ with h ≥ 0 is negative only on the true row j, so
    the label is argmin_j Σ_k (∇W)_jk. For ``batch`` > 1 the ``batch`` most negative rows are
    returned: exact only when the labels are distinct and dominate their rows."""
    if last_weight_grad.dim() != 2:
        raise ValueError(f"last-layer weight gradient must be (classes, features); got {tuple(last_weight_grad.shape)}")
    if not 1 <= batch <= last_weight_grad.shape[0]:
        raise ValueError(f"batch={batch} must be in 1..{last_weight_grad.shape[0]} (the number of classes)")
    return last_weight_grad.sum(dim=1).argsort()[:batch]


def analytic_fc_inversion(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """The input of a fully-connected layer z = Wx + b from one sample's gradient: ∂ℓ/∂W_j = (∂ℓ/∂z_j)·xᵀ
    and ∂ℓ/∂b_j = ∂ℓ/∂z_j, so x = ∇W_j / ∇b_j for any row j with ∇b_j ≠ 0 (the largest |∇b_j| is
    used)."""
    if weight_grad.dim() != 2 or bias_grad.shape != weight_grad.shape[:1]:
        raise ValueError(f"weight gradient {tuple(weight_grad.shape)} and bias gradient {tuple(bias_grad.shape)} "
                         "must be (out, in) and (out,)")
    j = int(bias_grad.abs().argmax())
    if bias_grad[j] == 0:
        raise ValueError("every bias gradient is zero: the layer's input cannot be recovered")
    return (weight_grad[j] / bias_grad[j]).unsqueeze(0)
