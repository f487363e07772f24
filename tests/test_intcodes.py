"""Elias γ / δ integer codes (Elias, IEEE Trans. Inf. Theory, 1975): code words, lengths, round trips, malformed streams."""

from __future__ import annotations

import math

import pytest
import torch

from compressors.bits import unpack_bits
from compressors.intcodes import (
    MAX_VALUE,
    IntCode,
    decode_delta,
    decode_gamma,
    decode_ints,
    delta_lengths,
    encode_delta,
    encode_gamma,
    encode_ints,
    floor_log2,
    gamma_lengths,
)
from compressors.packet import PacketError

CODECS = {"gamma": (encode_gamma, decode_gamma, gamma_lengths), "delta": (encode_delta, decode_delta, delta_lengths)}


def bit_string(data: torch.Tensor, nbits: int) -> str:
    return "".join(str(int(b)) for b in unpack_bits(data, 1, 8 * data.numel())[:nbits])


def edge_values() -> torch.Tensor:
    powers = [1 << k for k in range(62)]
    near = [p + d for p in powers for d in (-1, 0, 1) if 1 <= p + d <= MAX_VALUE]
    return torch.tensor(sorted(set(near)) + [MAX_VALUE, 123_456_789_012], dtype=torch.int64)


def test_floor_log2_is_exact_next_to_powers_of_two():
    v = edge_values()
    expected = torch.tensor([int(x).bit_length() - 1 for x in v.tolist()])
    assert torch.equal(floor_log2(v), expected)


@pytest.mark.parametrize("n, word", [(1, "1"), (2, "010"), (3, "011"), (4, "00100"), (5, "00101"), (9, "0001001")])
def test_gamma_code_words(n, word):
    assert bit_string(encode_gamma(torch.tensor([n])), len(word)) == word


@pytest.mark.parametrize("n, word", [(1, "1"), (2, "0100"), (3, "0101"), (4, "01100"), (7, "01111"), (17, "001010001")])
def test_delta_code_words(n, word):
    assert bit_string(encode_delta(torch.tensor([n])), len(word)) == word


def test_code_lengths_follow_the_closed_forms():
    n = torch.arange(1, 5000)
    lg = torch.tensor([math.floor(math.log2(k)) for k in range(1, 5000)])
    assert torch.equal(gamma_lengths(n), 2 * lg + 1)
    assert torch.equal(delta_lengths(n), lg + 2 * torch.floor(torch.log2(lg + 1.0)).long() + 1)


@pytest.mark.parametrize("code", CODECS)
def test_stream_is_the_codes_back_to_back_in_whole_bytes(code):
    encode, _, lengths = CODECS[code]
    v = torch.randint(1, 10_000, (777,), generator=torch.Generator().manual_seed(1))
    assert encode(v).numel() == math.ceil(int(lengths(v).sum()) / 8)


@pytest.mark.parametrize("code", CODECS)
def test_round_trip_edge_values(code):
    encode, decode, _ = CODECS[code]
    v = edge_values()
    assert torch.equal(decode(encode(v), v.numel()), v)


@pytest.mark.parametrize("code", CODECS)
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 9, 100, 1025])
def test_round_trip_random_heavy_tailed_values(code, count):
    encode, decode, _ = CODECS[code]
    g = torch.Generator().manual_seed(count)
    v = (torch.rand(count, generator=g, dtype=torch.float64) ** -4).clamp(max=2.0**60).long()
    assert torch.equal(decode(encode(v), count), v)


@pytest.mark.parametrize("code", CODECS)
def test_round_trip_a_long_stream_of_small_gaps(code):
    encode, decode, _ = CODECS[code]
    mask = torch.rand(200_000, generator=torch.Generator().manual_seed(2)) < 0.3
    gaps = torch.diff(mask.nonzero().reshape(-1), prepend=torch.tensor([-1]))
    assert torch.equal(decode(encode(gaps), gaps.numel()), gaps)


@pytest.mark.parametrize("code", CODECS)
def test_empty_stream_is_zero_bytes(code):
    encode, decode, _ = CODECS[code]
    data = encode(torch.empty(0, dtype=torch.int64))
    assert data.numel() == 0
    assert decode(data, 0).numel() == 0


@pytest.mark.parametrize("code", CODECS)
@pytest.mark.parametrize("bad", [0, -3, MAX_VALUE + 1])
def test_encode_rejects_values_outside_the_code_range(code, bad):
    with pytest.raises(ValueError, match="1.."):
        CODECS[code][0](torch.tensor([5, bad]))


@pytest.mark.parametrize("code", CODECS)
def test_decoding_more_codes_than_were_written_raises(code):
    encode, decode, _ = CODECS[code]
    v = torch.tensor([300, 7, 1, 2, 90_000])
    with pytest.raises(PacketError):
        decode(encode(v), v.numel() + 1)


@pytest.mark.parametrize("code", CODECS)
def test_decoding_fewer_codes_than_the_bytes_hold_raises(code):
    encode, decode, _ = CODECS[code]
    v = torch.full((40,), 1000)
    with pytest.raises(PacketError):
        decode(encode(v), 3)


@pytest.mark.parametrize("code", CODECS)
def test_nonzero_padding_raises(code):
    encode, decode, _ = CODECS[code]
    data = encode(torch.tensor([1, 1, 1]))  # 3 bits of codes, 5 of padding
    with pytest.raises(PacketError, match="padding"):
        decode(data | 0x80, 3)


def test_gamma_stream_of_only_zeros_raises():
    with pytest.raises(PacketError):
        decode_gamma(torch.zeros(4, dtype=torch.uint8), 1)


def test_encode_ints_picks_gamma_for_small_and_delta_for_large_values():
    small = torch.randint(1, 8, (1000,), generator=torch.Generator().manual_seed(3))
    large = torch.randint(1 << 20, 1 << 30, (1000,), generator=torch.Generator().manual_seed(4))
    assert encode_ints(small)[0] is IntCode.GAMMA
    assert encode_ints(large)[0] is IntCode.DELTA
    for v in (small, large):
        code, data = encode_ints(v)
        assert data.numel() == math.ceil(min(int(gamma_lengths(v).sum()), int(delta_lengths(v).sum())) / 8)
        assert torch.equal(decode_ints(int(code), data, v.numel()), v)


def test_decode_ints_rejects_an_unknown_code_flag():
    with pytest.raises(PacketError, match="unknown Elias code flag 7"):
        decode_ints(7, torch.zeros(1, dtype=torch.uint8), 1)
