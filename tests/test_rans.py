"""The rANS coder under RC-FED: exact round trips, code length at the entropy, malformed streams refused."""

from __future__ import annotations

import numpy as np
import pytest

from compressors import rans


def _symbols(probs, n, seed=0):
    return np.random.default_rng(seed).choice(len(probs), size=n, p=np.asarray(probs) / np.sum(probs)).astype(np.int32)


SKEWED = [0.02, 0.08, 0.2, 0.4, 0.2, 0.08, 0.02]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 17, 1000, 100_001])
def test_round_trip_every_length(n):
    """Both parities: symbol i uses state i % 2, and an odd count leaves state 0 one symbol more."""
    model = rans.Model.from_probs(np.array(SKEWED))
    sym = _symbols(SKEWED, n, seed=n)
    words = rans.encode(sym, model)
    assert words.dtype == np.uint16
    assert np.array_equal(rans.decode(words, model, n), sym)


@pytest.mark.parametrize("probs", [[1.0], [0.5, 0.5], [0.999, 0.001], [1e-9, 1.0, 1e-9],
                                   list(np.exp(-np.linspace(-6, 6, 301) ** 2 / 2))])
def test_round_trip_every_model_shape(probs):
    """One symbol, uniform, very skewed, symbols below 2**-16 (coded at frequency 1), 301 symbols."""
    model = rans.Model.from_probs(np.array(probs))
    assert model.freq.sum() == rans.TOTAL and model.freq.min() >= 1
    sym = np.concatenate([_symbols(probs, 20_000), np.arange(len(probs), dtype=np.int32)])  # every symbol once
    assert np.array_equal(rans.decode(rans.encode(sym, model), model, sym.size), sym)


@pytest.mark.parametrize("probs", [SKEWED, [0.03, 0.94, 0.03]])
def test_length_is_the_ideal_code_length_plus_the_final_states(probs):
    """Coded bits = Σ −log2(f/2**16) over the symbols + 64 bits of final states, and the coder's own
    rounding: with states of at least 2**16 and a 2**16 model it costs < 0.25% of the ideal length."""
    model = rans.Model.from_probs(np.array(probs))
    sym = _symbols(probs, 200_000, seed=1)
    ideal = float(np.bincount(sym, minlength=len(probs)) @ model.lengths)
    bits = rans.encode(sym, model).size * 16
    assert ideal + rans.OVERHEAD_BITS - 16 <= bits <= ideal * 1.0025 + rans.OVERHEAD_BITS + 16
    share = np.bincount(sym, minlength=len(probs)) / sym.size
    entropy = -(share * np.log2(share)).sum()                 # of the sample itself
    assert bits / sym.size == pytest.approx(entropy, rel=0.005)   # 16-bit model loses < 0.5%


def test_frequencies_are_deterministic_and_close_to_the_probabilities():
    p = np.array(SKEWED)
    f = rans.frequencies(p)
    assert np.array_equal(f, rans.frequencies(p.copy()))
    assert np.abs(f / rans.TOTAL - p / p.sum()).max() < 2 / rans.TOTAL
    for bad in ([], [0.0, 0.0], [0.5, np.nan], [-0.1, 1.0]):
        with pytest.raises(ValueError, match="rANS model"):
            rans.frequencies(np.array(bad))


def test_symbols_outside_the_model_are_refused():
    model = rans.Model.from_probs(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="symbol 2 is outside"):
        rans.encode(np.array([0, 1, 2, 0], dtype=np.int32), model)
    with pytest.raises(ValueError, match="symbol -1 is outside"):
        rans.encode(np.array([-1, 0, 1], dtype=np.int32), model)


def test_truncated_extended_and_corrupted_streams_raise():
    model = rans.Model.from_probs(np.array(SKEWED))
    sym = _symbols(SKEWED, 5000, seed=2)
    words = rans.encode(sym, model)
    with pytest.raises(rans.StreamError, match="at least 4 words"):
        rans.decode(words[:3], model, sym.size)
    with pytest.raises(rans.StreamError):
        rans.decode(words[:-1], model, sym.size)
    with pytest.raises(rans.StreamError, match="does not end"):
        rans.decode(np.concatenate([words, words[-1:]]), model, sym.size)
    with pytest.raises(rans.StreamError):
        rans.decode(words, model, sym.size - 1)              # fewer symbols than were coded
    caught = 0
    rng = np.random.default_rng(3)
    for _ in range(200):                                     # a flipped bit anywhere
        bad = words.copy()
        bad[rng.integers(bad.size)] ^= np.uint16(1 << int(rng.integers(16)))
        try:
            rans.decode(bad, model, sym.size)
        except rans.StreamError:
            caught += 1
    assert caught == 200


def test_decode_can_look_up_values_as_it_decodes():
    model = rans.Model.from_probs(np.array(SKEWED))
    sym = _symbols(SKEWED, 1001, seed=4)
    levels = np.linspace(-3, 3, len(SKEWED)).astype(np.float32)
    out = rans.decode(rans.encode(sym.astype(np.uint8), model), model, sym.size, levels)
    assert out.dtype == np.float32 and np.array_equal(out, levels[sym])
    with pytest.raises(ValueError, match="lookup table"):
        rans.decode(rans.encode(sym, model), model, sym.size, levels[:3])
