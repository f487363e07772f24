"""How much an image reconstruction leaks: PSNR, SSIM, batch matching and label accuracy.

Every metric is computed on de-normalised images clamped to [0, 1] (data range L = 1), per image,
after matching the reconstructed batch to the true one (a gradient is invariant to the order of the
samples in its batch, so an attack recovers a set, not a sequence).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import torch
from scipy.optimize import linear_sum_assignment

#: Attack success: a reconstruction is recognisable when PSNR ≥ 20 dB or SSIM ≥ 0.5.
SUCCESS_PSNR_DB = 20.0
SUCCESS_SSIM = 0.5

_SSIM_SIGMA = 1.5
_SSIM_WINDOW = 11
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


@dataclass(frozen=True)
class Normalization:
    """The affine map the data went through: ``x_model = (x_pixel − mean) / std``."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"Normalization std={self.std} must be > 0")

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """De-normalise and clamp to the valid pixel range [0, 1]."""
        return (x * self.std + self.mean).clamp(0.0, 1.0)

    def box(self) -> tuple[float, float]:
        """The model-space interval that maps onto pixels in [0, 1] (the attack's box constraint)."""
        return (0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std


def _as_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError("images must be (batch, channels, height, width) or (batch, height, width); "
                         f"got shape {tuple(x.shape)}")
    return x


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: ``mean (a − b)²`` over channels and pixels."""
    a, b = _as_images(a), _as_images(b)
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB for data range 1: ``10·log10(1 / MSE)``; +inf when equal.

    Inputs are taken as they are (no clamping), so the noise identity PSNR = 20 dB for std 0.1 holds.
    """
    return -10.0 * torch.log10(mse(a, b))


@lru_cache(maxsize=8)
def _gaussian_taps(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    return w / w.sum()


def _symmetric_index(n: int, pad: int) -> torch.Tensor:
    """Indices of a length-n axis padded by half-sample symmetric reflection (``d c b a | a b c d``),
    valid for any pad, even one longer than the axis."""
    i = torch.arange(-pad, n + pad) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def _gaussian_filter(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (N, C, H, W) with symmetric boundary (scipy's ``mode='reflect'``)."""
    n, c, h, w = x.shape
    pad = taps.numel() // 2
    x = x[:, :, _symmetric_index(h, pad)][:, :, :, _symmetric_index(w, pad)]
    k = taps.to(x.dtype)
    x = torch.nn.functional.conv2d(x.reshape(n * c, 1, h + 2 * pad, w + 2 * pad), k.view(1, 1, -1, 1))
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))
    return x.reshape(n, c, h, w)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004), data range 1.

    Local statistics under an 11×11 Gaussian window (σ = 1.5) with population (biased) covariance;
    ``SSIM = (2μ_aμ_b + C1)(2σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2))``, C1 = (0.01)²,
    C2 = (0.03)², averaged over channels and *all* pixels: the window is extended past the border by
    symmetric reflection instead of cropping the border away, because an 8×8 digit has no interior
    11×11 patch. On large images this differs from scikit-image's default only by that border.
    """
    a, b = _as_images(a).double(), _as_images(b).double()
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    taps = _gaussian_taps(_SSIM_WINDOW, _SSIM_SIGMA)
    stats = _gaussian_filter(torch.cat([a, b, a * a, b * b, a * b], dim=1), taps)
    mu_a, mu_b, aa, bb, ab = stats.chunk(5, dim=1)
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


def match_batch(reconstruction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` minimising Σ_i MSE(reconstruction[p[i]], truth[i]) (Hungarian algorithm,
    Kuhn 1955, on the pairwise-MSE cost matrix); ``reconstruction[p]`` lines up with ``truth``."""
    r, t = _as_images(reconstruction), _as_images(truth)
    if r.shape != t.shape:
        raise ValueError(f"reconstruction {tuple(r.shape)} and truth {tuple(t.shape)} differ in shape")
    cost = torch.cdist(t.flatten(1).double(), r.flatten(1).double()).pow(2) / r[0].numel()
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def label_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of the batch's labels recovered, as a multiset (order-free, like the batch itself)."""
    if predicted.numel() != truth.numel():
        raise ValueError(f"{predicted.numel()} predicted labels for {truth.numel()} true ones")
    if truth.numel() == 0:
        return math.nan
    hits = Counter(predicted.tolist()) & Counter(truth.tolist())
    return sum(hits.values()) / truth.numel()


def is_success(psnr_db: float, ssim_value: float) -> bool:
    return psnr_db >= SUCCESS_PSNR_DB or ssim_value >= SUCCESS_SSIM


@dataclass(frozen=True)
class ImageScores:
    """Per-image leakage of one reconstructed batch, matched to the truth."""

    psnr: tuple[float, ...]
    ssim: tuple[float, ...]
    mse: tuple[float, ...]
    permutation: tuple[int, ...]

    @property
    def success(self) -> tuple[bool, ...]:
        return tuple(is_success(p, s) for p, s in zip(self.psnr, self.ssim))


def score_images(reconstruction: torch.Tensor, truth: torch.Tensor, norm: Normalization,
                 match: bool = True) -> ImageScores:
    """De-normalise and clamp both batches, match them (unless the pairing is known: ``match=False``),
    and score every image."""
    rec, tru = norm.to_pixels(_as_images(reconstruction).detach()), norm.to_pixels(_as_images(truth).detach())
    perm = match_batch(rec, tru) if match else torch.arange(rec.shape[0])
    rec = rec[perm]
    return ImageScores(psnr=tuple(psnr(rec, tru).tolist()), ssim=tuple(ssim(rec, tru).tolist()),
                       mse=tuple(mse(rec, tru).tolist()), permutation=tuple(perm.tolist()))
