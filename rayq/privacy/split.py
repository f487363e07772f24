"""Split learning with NoPeek, and the decoder attack that measures what the smashed data reveals.

The client network f_c: X → Z sends the "smashed" activations Z to the server, which computes
ŷ = f_s(Z) and returns ∂L/∂Z (split learning: Gupta & Raskar, J. Network and Computer Applications
2018). NoPeek (Vepakomma, Gupta, Dubey, Raskar, ICDMW 2020) trains with
``L = α₁·dCor(X, Z) + α₂·CE(Y, ŷ)`` so that Z keeps little of X. The attacker, holding auxiliary
images, queries the frozen client and fits a decoder Z → X; its reconstructions of held-out images
are scored with PSNR/SSIM. Everything here is a plain function of modules and tensors: no transport.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compressors.base import mix_seed
from rayq.privacy.dcor import bias_corrected_dcor2, nopeek_loss
from rayq.privacy.metrics import Normalization, score_images
from rayq.privacy.victims import InputSpec

_SHUFFLE_PURPOSE, _INIT_PURPOSE, _DECODER_PURPOSE = 0x53504C54, 0x494E4954, 0x44454344


@dataclass(frozen=True, eq=False)
class SplitModel:
    """The two halves: ``client`` (X → Z, on the data owner) and ``server`` (Z → logits)."""

    client: nn.Module
    server: nn.Module

    def parameters(self) -> list[nn.Parameter]:
        return [*self.client.parameters(), *self.server.parameters()]


def split_cnn(spec: InputSpec, channels: int = 8, seed: int = 0) -> SplitModel:
    """A small CNN split after its first block: client Conv3×3(c→channels)–ReLU–MaxPool2, server
    Conv3×3(channels→16)–ReLU–FC. Z has channels·⌊H/2⌋·⌊W/2⌋ values per sample."""
    if channels < 1:
        raise ValueError(f"channels={channels} must be >= 1")
    with torch.random.fork_rng(devices=[]):   # PyTorch's initialisers, seeded, without touching the global RNG
        torch.manual_seed(mix_seed(seed, _INIT_PURPOSE))
        client = nn.Sequential(nn.Conv2d(spec.channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        server = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                               nn.Linear(16 * (spec.height // 2) * (spec.width // 2), spec.classes))
    return SplitModel(client, server)


def smashed_bits(z: torch.Tensor) -> int:
    """Bits one batch's activations cost on the way up as fp32 (the gradient back costs the same)."""
    return 32 * z.numel()


@dataclass(frozen=True)
class SplitStep:
    loss: float
    dcor: float
    cross_entropy: float
    bits_up: int


def split_step(model: SplitModel, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               alpha_dcor: float, alpha_task: float = 1.0) -> SplitStep:
    """One NoPeek step: client forward, server forward, ``α₁·dCor(X, Z) + α₂·CE`` backward through both."""
    optimizer.zero_grad()
    z = model.client(x)
    loss, dcor, ce = nopeek_loss(x, z, model.server(z), y, alpha_dcor, alpha_task)
    loss.backward()
    optimizer.step()
    return SplitStep(float(loss.detach()), float(dcor.detach()), float(ce.detach()), smashed_bits(z))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [b for b in order.split(batch_size) if b.numel() >= 4]   # dCor needs a few samples per batch


@dataclass(frozen=True)
class SplitTraining:
    epoch_loss: tuple[float, ...]
    epoch_dcor: tuple[float, ...]
    bits_up: int


def train_split(model: SplitModel, x: torch.Tensor, y: torch.Tensor, *, alpha_dcor: float, alpha_task: float = 1.0,
                epochs: int = 5, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> SplitTraining:
    """Train both halves with Adam on the NoPeek loss; returns per-epoch means and the bits sent up."""
    if epochs < 1 or batch_size < 4:
        raise ValueError(f"epochs={epochs} must be >= 1 and batch_size={batch_size} >= 4 (dCor per batch)")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(mix_seed(seed, _SHUFFLE_PURPOSE))
    losses, dcors, bits = [], [], 0
    for _ in range(epochs):
        steps = [split_step(model, optimizer, x[b], y[b], alpha_dcor, alpha_task)
                 for b in _batches(len(y), batch_size, g)]
        losses.append(sum(s.loss for s in steps) / len(steps))
        dcors.append(sum(s.dcor for s in steps) / len(steps))
        bits += sum(s.bits_up for s in steps)
    return SplitTraining(tuple(losses), tuple(dcors), bits)


@torch.no_grad()
def split_accuracy(model: SplitModel, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.server(model.client(x)).argmax(dim=-1) == y).double().mean())


def mlp_decoder(smashed_dim: int, spec: InputSpec, hidden: int = 256, seed: int = 0) -> nn.Module:
    """The attacker's decoder Z → X: FC(dim Z → hidden)–ReLU–FC(hidden → C·H·W), reshaped to images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, _DECODER_PURPOSE))
        return nn.Sequential(nn.Flatten(), nn.Linear(smashed_dim, hidden), nn.ReLU(), nn.Linear(hidden, spec.numel),
                             nn.Unflatten(1, (spec.channels, spec.height, spec.width)))


def train_decoder_attack(client: nn.Module, decoder: nn.Module, aux_x: torch.Tensor, *, epochs: int = 20,
                         batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> tuple[float, ...]:
    """Fit ``decoder`` to invert the frozen ``client`` on auxiliary images (MSE on (client(x), x) pairs,
    the attacker's queries); returns the per-epoch training MSE."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    with torch.no_grad():
        z = client(aux_x)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    g = torch.Generator().manual_seed(mix_seed(seed, _SHUFFLE_PURPOSE, 1))
    history = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for b in torch.randperm(len(aux_x), generator=g).split(batch_size):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(decoder(z[b]), aux_x[b])
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(b), count + len(b)
        history.append(total / count)
    return tuple(history)


@dataclass(frozen=True)
class DecoderLeakage:
    """How well the decoder attack rebuilds held-out images, and how dependent Z is on X there."""

    psnr_mean: float
    ssim_mean: float
    dcor2: float            # bias-corrected dCor²(X, Z) on the held-out batch
    samples: int


@torch.no_grad()
def decoder_leakage(client: nn.Module, decoder: nn.Module, x: torch.Tensor, norm: Normalization) -> DecoderLeakage:
    """Score the decoder's reconstructions of ``x`` one to one (no matching: the attacker knows which
    Z came from which query) and measure the bias-corrected dCor² of (X, Z)."""
    z = client(x)
    scores = score_images(decoder(z), x, norm, match=False)
    finite = [p for p in scores.psnr if math.isfinite(p)]
    return DecoderLeakage(psnr_mean=sum(finite) / max(1, len(finite)), ssim_mean=sum(scores.ssim) / len(scores.ssim),
                          dcor2=float(bias_corrected_dcor2(x, z)), samples=len(x))


@dataclass(frozen=True, eq=False)
class DecoderAttack:
    """The decoder attack on a trained client network: its scores, and a few reconstructions to look at."""

    leakage: DecoderLeakage
    public: int                  # images the attacker fitted its decoder on
    originals: torch.Tensor      # up to 16 held-out images in pixels, (n, C, H, W)
    reconstructions: torch.Tensor


def decoder_attack(client: nn.Module, x: torch.Tensor, spec: InputSpec, norm: Normalization, *, epochs: int = 200,
                   hidden: int = 256, seed: int = 0, max_public: int = 4096, max_scored: int = 512) -> DecoderAttack:
    """Attack a frozen client network with held-out data ``x`` (in the layout the client takes).

    A seeded half of ``x`` (at most ``max_public``) is the attacker's public data: it queries the client
    and fits an :func:`mlp_decoder` Z → X on the pairs; the other half (at most ``max_scored``, which
    keeps the O(n²) dCor small) is scored one to one with PSNR/SSIM and the bias-corrected dCor².
    """
    if len(x) < 8:
        raise ValueError(f"the decoder attack needs at least 8 held-out images; got {len(x)}")
    g = torch.Generator().manual_seed(mix_seed(seed, _DECODER_PURPOSE, 2))
    order = torch.randperm(len(x), generator=g)
    half = len(x) // 2
    public, scored = x[order[:min(half, max_public)]], x[order[half:half + max_scored]]
    images = (spec.channels, spec.height, spec.width)
    layout = tuple(x.shape[1:])

    class _FromImages(nn.Module):
        def forward(self, pictures: torch.Tensor) -> torch.Tensor:
            return client(pictures.reshape(len(pictures), *layout))

    querying = _FromImages()
    public_img, scored_img = public.reshape(len(public), *images), scored.reshape(len(scored), *images)
    with torch.no_grad():
        dim = querying(public_img[:1]).numel()
    decoder = mlp_decoder(dim, spec, hidden=hidden, seed=seed)
    train_decoder_attack(querying, decoder, public_img, epochs=epochs, seed=seed)
    leakage = decoder_leakage(querying, decoder, scored_img, norm)
    with torch.no_grad():
        shown = scored_img[:16]
        rebuilt = decoder(querying(shown))
    return DecoderAttack(leakage, len(public), norm.to_pixels(shown), norm.to_pixels(rebuilt))
