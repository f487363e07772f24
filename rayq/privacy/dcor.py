"""Distance correlation between a batch of inputs X and what a model reveals of them, Z.

dCor (Székely, Rizzo, Bakirov, Annals of Statistics 2007) is zero only under independence and one
for Z an affine (similarity) map of X. Split learning's NoPeek (Vepakomma, Gupta, Dubey, Raskar,
ICDMW 2020) adds the sample dCor(X, Z) of the smashed activations to the loss. The plain sample
statistic is a V-statistic, biased upward for independent data at small n and high dimension;
for measurement use the bias-corrected (U-centred) dCor² (Székely & Rizzo, Annals of Statistics 2014).
"""

from __future__ import annotations

import torch


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() < 1 or x.shape[0] < 2:
        raise ValueError(f"{what} must hold a batch of at least 2 samples along dim 0; got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of x, exact and differentiable everywhere.

    A safe square root of the squared ``torch.cdist`` distances: ``sqrt`` only where d² > 0 (its
    argument replaced by 1 elsewhere, so no infinite derivative is ever formed) and 0 with a zero
    gradient at coincident rows. Unlike ``sqrt(max(d², ε))`` it keeps the diagonal at exactly 0, so
    dCor stays invariant to scaling the data however small.
    """
    x = x.reshape(x.shape[0], -1)
    sq = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _double_centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (V-statistic), differentiable: the NoPeek loss term.

    A, B = double-centred distance matrices of the rows of X and Z;
    dCov² = mean(A∘B), dVar²(X) = mean(A∘A); dCor = √dCov² / √(√dVar²(X)·√dVar²(Z)) ∈ [0, 1].
    """
    x, z = _rows(x, "X"), _rows(z, "Z")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"X has {x.shape[0]} samples, Z has {z.shape[0]}; they must pair up")
    a, b = _double_centred(pairwise_distances(x)), _double_centred(pairwise_distances(z))
    dcov2 = (a * b).mean().clamp_min(0.0)
    dvar_x, dvar_z = (a * a).mean(), (b * b).mean()
    return dcov2.sqrt() / (dvar_x.sqrt() * dvar_z.sqrt()).clamp_min(1e-30).sqrt()


def _u_centred(d: torch.Tensor) -> torch.Tensor:
    n = d.shape[0]
    u = (d - d.sum(dim=0, keepdim=True) / (n - 2) - d.sum(dim=1, keepdim=True) / (n - 2)
         + d.sum() / ((n - 1) * (n - 2)))
    return u.fill_diagonal_(0.0)


def bias_corrected_dcor2(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Bias-corrected squared distance correlation (Székely & Rizzo 2014), for measurement.

    With U-centred distance matrices Ã, B̃ (zero diagonal),
    ``(Ã·B̃) = Σ_{i≠j} Ã_ij B̃_ij / (n(n − 3))`` is an unbiased estimator of dCov², and
    ``dCor²* = (Ã·B̃) / √((Ã·Ã)(B̃·B̃))``: ≈ 0 for independent data at any n and dimension, and it can
    be slightly negative. Needs n ≥ 4; computed in float64.
    """
    x, z = _rows(x, "X").double(), _rows(z, "Z").double()
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"the bias-corrected dCor² needs n >= 4 samples; got {n}")
    if z.shape[0] != n:
        raise ValueError(f"X has {n} samples, Z has {z.shape[0]}; they must pair up")
    a, b = _u_centred(torch.cdist(x, x)), _u_centred(torch.cdist(z, z))
    scale = n * (n - 3)
    ab, aa, bb = (a * b).sum() / scale, (a * a).sum() / scale, (b * b).sum() / scale
    denominator = (aa * bb).sqrt()
    return ab / denominator if denominator > 0 else torch.zeros((), dtype=torch.float64)


def nopeek_loss(x: torch.Tensor, smashed: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                alpha_dcor: float, alpha_task: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NoPeek's ``α₁·dCor(X, Z) + α₂·CE(Y, ŷ)``; returns (total, dCor, cross-entropy)."""
    if alpha_dcor < 0 or alpha_task < 0:
        raise ValueError(f"NoPeek weights must be >= 0; got alpha_dcor={alpha_dcor}, alpha_task={alpha_task}")
    dcor = distance_correlation(x, smashed)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    return alpha_dcor * dcor + alpha_task * ce, dcor, ce
