"""Information-theory fixtures (Gaussian R(D), ECSQ and Lloyd–Max designs, Huffman codes)."""

from __future__ import annotations

import math
import time

import pytest
import numpy as np

from compressors import ecsq
from compressors.infotheory import (
    HIGH_RATE_GAP,
    ScalarQuantizer,
    average_length,
    entropy,
    gaussian_distortion,
    gaussian_rate,
    huffman_lengths,
    lloyd_max,
)

# ECSQ of N(0,1), recomputed with an independent numpy/scipy script: H, D (σ² = 1), Huffman L
ECSQ_TABLE = [
    (0.851, 0.41848, 1.266),
    (1.349, 0.21856, 1.558),
    (1.649, 0.14461, 1.785),
    (2.151, 0.07217, 2.253),
    (2.651, 0.03607, 2.704),
    (3.312, 0.014427, 3.358),
    (3.812, 0.007214, 3.845),
    (4.312, 0.003607, 4.349),
    (4.973, 0.001443, 5.012),
]

# Lloyd–Max quantisers of N(0,1), recomputed likewise: bits, positive levels, positive thresholds, D, H, Huffman L
LLOYD_MAX_TABLE = [
    (1, [0.7979], [0.0], 0.36338, 1.0000, 1.000),
    (2, [0.4528, 1.5104], [0.0, 0.9816], 0.11748, 1.9111, 1.989),
    (3, [0.2451, 0.7560, 1.3439, 2.1519], [0.0, 0.5005, 1.0500, 1.7479], 0.03455, 2.8249, 2.884),
    (4, None, None, 0.00950, 3.7653, 3.809),
]


def test_gaussian_rate_distortion_is_half_log_ratio():
    assert gaussian_rate(1 / 16) == pytest.approx(2.0, abs=1e-12)
    assert gaussian_rate(4.0, variance=4.0) == 0.0
    assert gaussian_rate(2.0) == 0.0  # D above σ² costs nothing
    assert gaussian_distortion(3.0, variance=2.0) == pytest.approx(2.0 / 64, rel=1e-12)
    for r in (0.1, 1.0, 2.5, 7.0):
        assert gaussian_rate(gaussian_distortion(r)) == pytest.approx(r, abs=1e-12)


def test_high_rate_gap_is_half_log2_pi_e_over_6():
    assert HIGH_RATE_GAP == pytest.approx(0.254614, abs=1e-6)


@pytest.mark.parametrize("step, h_ref, d_ref", [(1.0, 2.1048, 0.076915), (0.5, 3.0620, 0.020408),
                                                (0.25, 4.0508, 0.005181)])
def test_uniform_midtread_quantizer_matches_reference(step, h_ref, d_ref):
    k = math.ceil(12 / step)
    thresholds = (np.arange(-k, k) + 0.5) * step
    sq = ScalarQuantizer.from_cells(thresholds)
    assert sq.entropy == pytest.approx(h_ref, abs=1e-4)
    assert sq.distortion == pytest.approx(d_ref, rel=1e-3)


@pytest.mark.parametrize("h_ref, d_ref, l_ref", ECSQ_TABLE)
def test_ecsq_design_reproduces_table(h_ref, d_ref, l_ref):
    sq = ecsq.design(h_ref)
    assert abs(sq.entropy - h_ref) <= 0.005
    assert sq.distortion == pytest.approx(d_ref, rel=0.01)
    assert sq.huffman_length == pytest.approx(l_ref, abs=0.005)


@pytest.mark.parametrize("bits, levels, thresholds, d_ref, h_ref, l_ref", LLOYD_MAX_TABLE)
def test_lloyd_max_reproduces_table(bits, levels, thresholds, d_ref, h_ref, l_ref):
    sq = lloyd_max(bits)
    half = sq.size // 2
    if levels is not None:
        assert sq.levels[half:].tolist() == pytest.approx(levels, abs=2e-4)
        assert sq.thresholds[half - 1:].tolist() == pytest.approx(thresholds, abs=2e-4)
    assert sq.distortion == pytest.approx(d_ref, rel=0.01)
    assert sq.entropy == pytest.approx(h_ref, abs=0.005)
    assert sq.huffman_length == pytest.approx(l_ref, abs=0.005)


def test_lloyd_max_one_bit_distortion_is_one_minus_two_over_pi():
    assert lloyd_max(1).distortion == pytest.approx(1 - 2 / math.pi, abs=1e-9)


@pytest.mark.parametrize("rate", [2.5, 3.0, 4.0, 5.0, 6.0])
def test_ecsq_high_rate_gap_approaches_0_2546(rate):
    sq = ecsq.design(rate)
    gap = sq.entropy - gaussian_rate(sq.distortion)
    assert gap == pytest.approx(0.2546, abs=0.002)


@pytest.mark.parametrize("lam", [2.0, 0.8, 0.3, 0.1, 0.03, 0.01, 1e-3])
def test_ecsq_gap_stays_between_zero_and_uniform_limit(lam):
    sq = ecsq.design_for_lambda(lam)
    gap = sq.entropy - gaussian_rate(sq.distortion)
    assert 0.0 <= gap <= 0.2547


def test_ecsq_beats_lloyd_max_at_equal_entropy():
    """T1.1. At H = 1.911 ECSQ reaches D ≈ 1.4225·2^(−2H) = 0.1006 against Lloyd–Max's 0.1175: a
    0.67 dB gain (0.080 and 1.6 dB would be an arithmetic slip: 2^(−3.822) = 0.0707)."""
    lm = lloyd_max(2)
    ec = ecsq.design(lm.entropy)
    gain_db = 10 * math.log10(lm.distortion / ec.distortion)
    assert ec.entropy == pytest.approx(lm.entropy, abs=1e-4)
    assert ec.distortion == pytest.approx(1.4225 * 2 ** (-2 * lm.entropy), rel=0.01)
    assert gain_db == pytest.approx(0.675, abs=0.05)


def test_ecsq_design_hits_rate_and_is_fast():
    ecsq.design.cache_clear()
    start = time.perf_counter()
    sq = ecsq.design(2.37)
    assert time.perf_counter() - start < 1.0
    assert sq.entropy == pytest.approx(2.37, abs=1e-4)
    assert (np.diff(sq.thresholds) > 0).all()
    assert (np.diff(sq.levels) > 0).all()


def test_ecsq_design_is_deterministic_per_rate():
    a = ecsq.design.__wrapped__(1.7)
    b = ecsq.design.__wrapped__(1.7)
    assert np.array_equal(a.thresholds, b.thresholds) and np.array_equal(a.probs, b.probs)


@pytest.mark.parametrize("seed", range(5))
def test_huffman_kraft_equality_and_length_bounds(seed):
    p = np.random.default_rng(seed).random(3 + 7 * seed) ** 3
    p = p / p.sum()
    lengths = huffman_lengths(p)
    assert sum(2.0 ** -l for l in lengths) == pytest.approx(1.0, abs=1e-12)
    h, length = entropy(p), average_length(p, lengths)
    assert h <= length < h + 1


def test_huffman_dyadic_distribution_is_exact():
    p = [0.5, 0.25, 0.125, 0.125]
    lengths = huffman_lengths(p)
    assert lengths == [1, 2, 3, 3]
    assert average_length(p, lengths) == entropy(p) == 1.75


def test_huffman_single_symbol_takes_one_bit():
    assert huffman_lengths([1.0]) == [1]


def test_huffman_rejects_negative_probabilities():
    with pytest.raises(ValueError, match="finite and >= 0"):
        huffman_lengths([0.5, -0.1])
