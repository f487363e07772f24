"""Split learning with NoPeek on digits: the dCor term trades accuracy for what a decoder can rebuild."""

from __future__ import annotations

import pytest
import torch

from rayq.privacy.metrics import Normalization
from rayq.privacy.split import (
    decoder_leakage, mlp_decoder, smashed_bits, split_accuracy, split_cnn, split_step, train_decoder_attack,
    train_split,
)
from rayq.privacy.victims import InputSpec
from rayq.tasks import load_digits_split

DIGIT = InputSpec(1, 8, 8, 10)


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits_split()
    return (train.x.reshape(-1, 1, 8, 8), train.y), (test.x.reshape(-1, 1, 8, 8), test.y)


def trained(digits, alpha: float):
    (x, y), (xt, yt) = digits
    model = split_cnn(DIGIT, seed=0)
    history = train_split(model, x, y, alpha_dcor=alpha, epochs=5, batch_size=64, lr=3e-3)
    decoder = mlp_decoder(8 * 4 * 4, DIGIT)
    train_decoder_attack(model.client, decoder, xt[:200], epochs=30)   # the attacker's auxiliary queries
    return history, split_accuracy(model, xt, yt), decoder_leakage(model.client, decoder, xt[200:328], Normalization())


@pytest.fixture(scope="module")
def plain(digits):
    return trained(digits, alpha=0.0)


@pytest.fixture(scope="module")
def nopeek(digits):
    return trained(digits, alpha=10.0)


def test_without_nopeek_the_split_model_learns_and_the_decoder_rebuilds_the_digits(plain):
    _, accuracy, leak = plain
    assert accuracy > 0.85 and leak.ssim_mean > 0.75 and leak.dcor2 > 0.8


def test_nopeek_lowers_the_distance_correlation_of_the_smashed_data(plain, nopeek):
    assert nopeek[2].dcor2 < plain[2].dcor2 - 0.3
    assert nopeek[0].epoch_dcor[-1] < nopeek[0].epoch_dcor[0]


def test_nopeek_lowers_what_the_decoder_attack_rebuilds(plain, nopeek):
    assert nopeek[2].ssim_mean < plain[2].ssim_mean - 0.1
    assert nopeek[2].psnr_mean < plain[2].psnr_mean - 2.0


def test_a_split_step_reports_the_bits_of_the_smashed_activations(digits):
    (x, y), _ = digits
    model = split_cnn(DIGIT, seed=1)
    step = split_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x[:32], y[:32], alpha_dcor=1.0)
    assert step.bits_up == smashed_bits(model.client(x[:32])) == 32 * 32 * 8 * 4 * 4
    assert step.loss == pytest.approx(step.dcor + step.cross_entropy, rel=1e-5)
