"""Distance correlation (T22): the NoPeek V-statistic and the bias-corrected dCor² for measurement."""

from __future__ import annotations

import pytest
import torch

from rayq.privacy.dcor import bias_corrected_dcor2, distance_correlation, nopeek_loss


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn((n, d), generator=gen(seed), dtype=torch.float64)


def rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(normal(d, d, seed))
    return q


def test_dcor_of_an_affine_map_is_one():
    x = normal(128, 5, 0)
    assert distance_correlation(x, -3.0 * x + 7.0).item() == pytest.approx(1.0, abs=1e-6)
    assert bias_corrected_dcor2(x, 2.0 * x - 1.0).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("transform", ["rotation", "translation", "scaling"])
def test_dcor_is_invariant_to_rotating_translating_and_scaling_either_argument(transform):
    x, z = normal(96, 4, 1), normal(96, 4, 2)
    z = z + 0.5 * x**2   # some dependence, so the value is not trivially 0
    maps = {"rotation": lambda a: a @ rotation(4, 3), "translation": lambda a: a + 11.0,
            "scaling": lambda a: 0.01 * a}
    f = maps[transform]
    base = distance_correlation(x, z).item()
    assert distance_correlation(f(x), z).item() == pytest.approx(base, abs=1e-6)
    assert distance_correlation(x, f(z)).item() == pytest.approx(base, abs=1e-6)
    corrected = bias_corrected_dcor2(x, z).item()
    assert bias_corrected_dcor2(f(x), f(z)).item() == pytest.approx(corrected, abs=1e-6)


@pytest.mark.parametrize("n", [64, 256])
def test_bias_corrected_dcor2_is_near_zero_for_independent_data(n):
    x, z = normal(n, 20, 4), normal(n, 5, 5)
    assert abs(bias_corrected_dcor2(x, z).item()) < 0.05


def test_the_v_statistic_is_biased_upward_for_independent_data():
    x, z = normal(256, 20, 6), normal(256, 5, 7)
    assert distance_correlation(x, z).item() > 0.2


def test_nonlinear_dependence_is_detected():
    x = normal(256, 5, 8)
    independent = normal(256, 5, 9)
    assert bias_corrected_dcor2(x, x**2).item() > 0.1 > abs(bias_corrected_dcor2(x, independent).item())
    assert distance_correlation(x, x**2).item() > distance_correlation(x, independent).item() + 0.05


def test_dcor_is_differentiable_even_with_duplicate_rows():
    x = normal(16, 3, 10)
    z = torch.cat([x[:8], x[:8]]).clone().requires_grad_(True)   # zero distances between the copies
    distance_correlation(x, z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_nopeek_loss_weights_dcor_and_cross_entropy():
    x = normal(32, 6, 11).float()
    smashed = torch.tanh(x @ normal(6, 4, 12).float())
    logits = normal(32, 3, 13).float()
    labels = torch.randint(3, (32,), generator=gen(14))
    total, dcor, ce = nopeek_loss(x, smashed, logits, labels, alpha_dcor=10.0, alpha_task=0.5)
    assert total.item() == pytest.approx(10.0 * dcor.item() + 0.5 * ce.item(), rel=1e-6)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def test_samples_must_pair_up():
    with pytest.raises(ValueError, match="X has 10 samples, Z has 9"):
        distance_correlation(normal(10, 2, 0), normal(9, 2, 1))
