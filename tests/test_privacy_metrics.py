"""Leakage metrics (T17): PSNR and SSIM identities, the SSIM construction, batch matching, labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from rayq.privacy.metrics import (
    SUCCESS_PSNR_DB, SUCCESS_SSIM, Normalization, is_success, label_accuracy, match_batch, psnr, score_images, ssim,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 4, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 1, side, side), generator=gen(seed), dtype=torch.float64)


def test_psnr_of_unclipped_std_0_1_noise_on_mid_grey_is_20_db():
    grey = torch.full((1, 1, 32, 32), 0.5, dtype=torch.float64)
    noise = torch.randn(grey.shape, generator=gen(1), dtype=torch.float64)
    noise = (noise - noise.mean()) / noise.std(correction=0) * 0.1   # empirical std exactly 0.1, mean 0
    assert psnr(grey + noise, grey).item() == pytest.approx(20.0, abs=1e-6)


def test_psnr_of_identical_images_is_infinite():
    x = images()
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()


def test_ssim_of_identical_images_is_one():
    x = images()
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_ssim_is_symmetric():
    a, b = images(seed=1), images(seed=2)
    assert torch.allclose(ssim(a, b), ssim(b, a), atol=1e-12)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004) with scipy's Gaussian filter (σ = 1.5, 11 taps, mode='reflect'), all pixels averaged."""
    def f(z: np.ndarray) -> np.ndarray:
        return gaussian_filter(z, sigma=1.5, truncate=3.5, mode="reflect")

    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


@pytest.mark.parametrize("side", [8, 28])
def test_ssim_matches_a_scipy_gaussian_filter_reference(side):
    a = images(1, side, seed=3)
    b = (a + 0.2 * torch.randn(a.shape, generator=gen(4), dtype=torch.float64)).clamp(0, 1)
    expected = _ssim_reference(a[0, 0].numpy(), b[0, 0].numpy())
    assert ssim(a, b).item() == pytest.approx(expected, abs=1e-10)


def test_ssim_falls_as_noise_grows():
    x = images(1, 28, seed=5)
    noise = torch.randn(x.shape, generator=gen(6), dtype=torch.float64)
    values = [ssim(x, x + s * noise).item() for s in (0.01, 0.05, 0.2, 0.5)]
    assert values == sorted(values, reverse=True) and values[0] > 0.95 and values[-1] < 0.5


def test_hungarian_matching_recovers_the_permutation_of_a_shuffled_batch():
    truth = images(6, seed=7)
    perm = torch.randperm(6, generator=gen(8))
    recon = truth[perm] + 0.01 * torch.randn(truth.shape, generator=gen(9), dtype=torch.float64)
    matched = match_batch(recon, truth)
    assert torch.equal(perm[matched], torch.arange(6))


def test_scores_are_invariant_to_permuting_the_reconstructed_batch():
    truth = images(5, seed=10)
    recon = (truth + 0.1 * torch.randn(truth.shape, generator=gen(11), dtype=torch.float64)).clamp(0, 1)
    norm = Normalization()
    base = score_images(recon, truth, norm)
    shuffled = score_images(recon[torch.randperm(5, generator=gen(12))], truth, norm)
    assert shuffled.psnr == pytest.approx(base.psnr, abs=1e-12)
    assert shuffled.ssim == pytest.approx(base.ssim, abs=1e-12)


def test_scores_are_computed_on_denormalised_pixels_clamped_to_the_unit_range():
    norm = Normalization(mean=0.5, std=0.5)
    pixels = images(2, seed=13)
    model_space = (pixels - 0.5) / 0.5
    beyond = model_space + 3.0 * (model_space > 0)   # pushes bright pixels far past white
    scores = score_images(beyond, model_space, norm)
    expected = psnr((pixels + 1.5 * (pixels > 0.5)).clamp(0, 1), pixels)
    assert scores.psnr == pytest.approx(expected.tolist(), abs=1e-9)
    assert norm.box() == (-1.0, 1.0)


def test_label_accuracy_counts_the_recovered_multiset():
    assert label_accuracy(torch.tensor([3, 1, 1]), torch.tensor([1, 3, 1])) == 1.0
    assert label_accuracy(torch.tensor([3, 3, 1]), torch.tensor([1, 3, 2])) == pytest.approx(2 / 3)


def test_success_means_psnr_at_least_20_db_or_ssim_at_least_one_half():
    assert SUCCESS_PSNR_DB == 20.0 and SUCCESS_SSIM == 0.5
    assert is_success(20.0, 0.0) and is_success(5.0, 0.5) and not is_success(19.99, 0.49)
    assert is_success(math.inf, 1.0)


def test_mismatched_batches_are_refused_with_their_shapes():
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\) vs \(3, 1, 16, 16\)"):
        psnr(images(2), images(3))
