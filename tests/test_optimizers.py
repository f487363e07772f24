"""QCMD / QRDA AdaGrad (Xu et al. 2022 on Duchi, Hazan, Singer, JMLR 2011): the closed-form updates, the
RDA zero pattern, equivalence with plain AdaGrad-CMD/RDA for an identity quantiser, checkpoint resume and
sparsity of ℓ1-logistic regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressors import TensorInfo, make_codec
from rayq.optimizers import OPTIMIZERS, QCMDAdaGrad, QRDAAdaGrad, build, model_sparsity

LR, L1, DELTA = 0.3, 0.05, 1e-8


def _gradients(rounds: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.01, 1.0, d, dtype=torch.float64)
    return torch.randn(rounds, d, generator=gen, dtype=torch.float64) * scale


def _run(cls: type, grads: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    x = x0.clone().requires_grad_(True)
    opt = cls([x], lr=LR, l1=L1, delta=DELTA)
    for g in grads:
        x.grad = g.clone()
        opt.step()
    return x.detach(), opt


def _argmin_on_grid(objective, lo: torch.Tensor, hi: torch.Tensor, points: int = 4001, rounds: int = 4) -> torch.Tensor:
    """Brute-force 1-D minimisation per coordinate: a dense grid, then zoom in around the best point."""
    for _ in range(rounds):
        z = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * torch.linspace(0, 1, points, dtype=torch.float64)
        best = z.gather(1, objective(z).argmin(dim=1, keepdim=True)).squeeze(1)
        width = (hi - lo) / (points - 1)
        lo, hi = best - 2 * width, best + 2 * width
    return best


# ---------------------------------------------------------------- closed forms


def test_cmd_step_is_the_argmin_of_the_proximal_objective():
    # x⁺ = argmin_z η·g·z + ηλ|z| + ½·h·(z − x)², coordinate-wise, with h = δ + √G after this round.
    grads = _gradients(6, 64, seed=0)
    x0 = torch.linspace(-0.5, 0.5, 64, dtype=torch.float64)
    before, opt = _run(QCMDAdaGrad, grads[:-1], x0)
    after, _ = _run(QCMDAdaGrad, grads, x0)
    g = grads[-1]
    h = DELTA + grads.pow(2).sum(0).sqrt()

    def objective(z):
        return LR * g.unsqueeze(1) * z + LR * L1 * z.abs() + 0.5 * h.unsqueeze(1) * (z - before.unsqueeze(1)) ** 2

    brute = _argmin_on_grid(objective, before - 3, before + 3)
    assert torch.allclose(after, brute, atol=1e-6)
    assert (after == 0).any()  # the soft threshold is exercised


def test_rda_step_is_the_argmin_of_the_dual_averaging_objective():
    # x⁺ = argmin_z η·ū·z + ηλ|z| + h·z²/(2t).
    grads = _gradients(5, 64, seed=1)
    after, _ = _run(QRDAAdaGrad, grads, torch.zeros(64, dtype=torch.float64))
    t = grads.shape[0]
    mean = grads.mean(0)
    h = DELTA + grads.pow(2).sum(0).sqrt()

    def objective(z):
        return LR * mean.unsqueeze(1) * z + LR * L1 * z.abs() + h.unsqueeze(1) * z**2 / (2 * t)

    bound = torch.full((64,), 5.0, dtype=torch.float64)
    brute = _argmin_on_grid(objective, -bound, bound)
    assert torch.allclose(after, brute, atol=1e-6)


def test_rda_coordinate_is_zero_exactly_when_its_mean_gradient_is_within_lambda():
    grads = _gradients(20, 200, seed=2) + 0.03
    x, _ = _run(QRDAAdaGrad, grads, torch.zeros(200, dtype=torch.float64))
    small = grads.mean(0).abs() <= L1
    assert 0 < int(small.sum()) < 200
    assert torch.equal(x == 0, small)


# ---------------------------------------------------------------- identity quantiser = reference AdaGrad


def _reference(kind: str, grads: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Diagonal AdaGrad with an ℓ1 term (Duchi et al. 2011), written out directly in numpy."""
    x = x0.copy()
    G = np.zeros_like(x)
    total = np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        G += g * g
        H = DELTA + np.sqrt(G)
        if kind == "cmd":
            y = x - LR * g / H
            x = np.sign(y) * np.maximum(np.abs(y) - LR * L1 / H, 0.0)
        else:
            total += g
            u = total / t
            x = -np.sign(u) * (LR * t / H) * np.maximum(np.abs(u) - L1, 0.0)
    return x


@pytest.mark.parametrize(("cls", "kind"), [(QCMDAdaGrad, "cmd"), (QRDAAdaGrad, "rda")])
def test_averaged_identity_quantised_gradients_reproduce_reference_adagrad(cls, kind):
    # Four workers send Q(g) = g; the optimizer sees their mean, as every replica would.
    gen = torch.Generator().manual_seed(3)
    per_worker = torch.randn(30, 4, 50, generator=gen, dtype=torch.float64)
    grads = per_worker.mean(dim=1)
    x0 = torch.randn(50, generator=gen, dtype=torch.float64)
    ours, _ = _run(cls, grads, x0)
    expected = _reference(kind, grads.numpy(), x0.numpy())
    assert np.allclose(ours.numpy(), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- checkpoints and rounds


@pytest.mark.parametrize("cls", [QCMDAdaGrad, QRDAAdaGrad])
def test_state_dict_round_trip_resumes_bit_exactly(cls):
    grads = _gradients(10, 32, seed=4).float()
    x0 = torch.linspace(-1, 1, 32)
    straight, _ = _run(cls, grads, x0)
    first, opt = _run(cls, grads[:4], x0)
    saved = opt.state_dict()
    x = first.clone().requires_grad_(True)
    resumed = cls([x], lr=LR, l1=L1, delta=DELTA)
    resumed.load_state_dict(saved)
    assert resumed.rounds == 4
    for g in grads[4:]:
        x.grad = g.clone()
        resumed.step()
    assert resumed.rounds == 10
    assert torch.equal(x.detach(), straight)


def test_round_counter_advances_for_parameters_without_a_gradient():
    a, b = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = QRDAAdaGrad([a, b], lr=LR, l1=0.0)
    a.grad = torch.ones(3)
    opt.step()
    opt.step()  # b never has a gradient; a's second round has its old one
    assert [float(opt.state[p]["step"]) for p in (a, b)] == [2.0, 2.0]
    assert torch.equal(b.detach(), torch.ones(3))


def test_step_with_a_closure_returns_its_loss():
    x = torch.ones(2, requires_grad=True)
    opt = QCMDAdaGrad([x], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(2.0)
    assert torch.all(x.detach() < 1)


# ---------------------------------------------------------------- sparsity on ℓ1-logistic regression


def _logistic_problem(seed: int, workers: int = 8, n: int = 800, d: int = 60, k: int = 6):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.zeros(d, dtype=torch.float64)
    w[:k] = 2 * torch.randn(k, generator=gen, dtype=torch.float64)
    y = ((X @ w + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)) > 0).to(torch.float64)
    return X.view(workers, n // workers, d), y.view(workers, n // workers)


def _train_logistic(cls, seed: int, l1: float, codec=None, rounds: int = 150) -> tuple[float, float]:
    """Mean over workers of Q(∇ logistic loss of the worker's shard); returns (sparsity, accuracy)."""
    X, y = _logistic_problem(seed)
    x = torch.zeros(X.shape[2], dtype=torch.float64, requires_grad=True)
    opt = cls([x], lr=0.5, l1=l1)
    for t in range(rounds):
        logits = torch.einsum("mnd,d->mn", X, x.detach())
        grads = torch.einsum("mnd,mn->md", X, torch.sigmoid(logits) - y) / X.shape[1]
        if codec is not None:
            infos = [TensorInfo("w", (X.shape[2],), worker=m, world=X.shape[0], step=t, seed=seed)
                     for m in range(X.shape[0])]
            grads = torch.stack([codec.decode(codec.encode(g, i), i).to(torch.float64) for g, i in zip(grads, infos)])
        x.grad = grads.mean(0)
        opt.step()
    accuracy = float(((torch.einsum("mnd,d->mn", X, x.detach()) > 0).to(torch.float64) == y).to(torch.float64).mean())
    return model_sparsity([x]), accuracy


@pytest.mark.parametrize("cls", [QCMDAdaGrad, QRDAAdaGrad])
def test_l1_logistic_regression_finds_a_sparse_accurate_model(cls):
    # 6 of 60 features matter: about 90% of the weights should be exactly zero.
    sparsity, accuracy = _train_logistic(cls, seed=0, l1=0.02, codec=make_codec("threshold", {"kappa": 1.0}))
    dense, dense_accuracy = _train_logistic(cls, seed=0, l1=0.0)
    assert 0.8 <= sparsity <= 0.95
    assert dense == 0.0
    assert accuracy >= 0.93 and dense_accuracy >= 0.93


def test_noisier_quantiser_leaves_cmd_less_sparse():
    # Low-error threshold quantisation keeps the zeros; unbiased but noisy TernGrad adds spurious nonzeros.
    threshold = make_codec("threshold", {"kappa": 1.0})
    terngrad = make_codec("terngrad", {"clip": 0.0})
    quiet = np.mean([_train_logistic(QCMDAdaGrad, s, l1=0.02, codec=threshold)[0] for s in range(3)])
    noisy = np.mean([_train_logistic(QCMDAdaGrad, s, l1=0.02, codec=terngrad)[0] for s in range(3)])
    assert quiet >= noisy + 0.05


def test_model_sparsity_counts_exact_zeros_over_all_tensors():
    assert model_sparsity([torch.tensor([0.0, 1.0, 0.0, 2.0]), torch.zeros(4)]) == 0.75
    with pytest.raises(ValueError, match="no elements"):
        model_sparsity([])


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(("key", "value"), [("lr", 0.0), ("l1", -1.0), ("delta", 0.0)])
def test_invalid_hyperparameters_name_the_value(key, value):
    with pytest.raises(ValueError, match=f"{key}={value} is invalid for QCMDAdaGrad"):
        QCMDAdaGrad([torch.zeros(1, requires_grad=True)], **{key: value})


def test_build_makes_optimizers_by_name_and_lists_the_choices():
    p = [torch.zeros(2, requires_grad=True)]
    assert isinstance(build("qrda_adagrad", p, lr=0.1, l1=0.01), QRDAAdaGrad)
    assert set(OPTIMIZERS) >= {"qcmd_adagrad", "qrda_adagrad", "blaq", "laq_weights"}
    with pytest.raises(ValueError, match="optimizer 'adagard' is not known; choose one of: qcmd_adagrad"):
        build("adagard", p)
