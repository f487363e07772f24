"""The shared bit packing and element-wise blocks of ``compressors.bits``, against plain reference code."""

from __future__ import annotations

import pytest
import torch

from compressors.bits import (
    SLICE, add_rows_, byte_table, lookup, pack_bits, packed_nbytes, scale_rows_, slices, stochastic_round_,
    uniform_lanes, unpack_bits, unpack_codes,
)


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """The documented layout, one bit at a time: code i's bit j is stream bit i·bits + j, LSB first."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[8 * k + j] << j for j in range(8)) for k in range(len(stream) // 8))


@pytest.mark.parametrize("bits", list(range(1, 33)))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 61, 1000])
def test_every_width_packs_to_the_documented_layout_and_back(bits, count):
    g = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=g, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(count, bits)
    assert bytes(packed.tolist()) == _reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)
    assert torch.equal(unpack_codes(packed, bits, count).to(torch.int64), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 12])
def test_sliced_packing_of_a_long_vector_equals_the_reference(bits):
    """Above SLICE elements the CPU packs slice by slice: the seams must not show."""
    count = 2 * SLICE + 13
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    assert len(slices(count, codes.device)) == 3
    packed = pack_bits(codes, bits)
    assert bytes(packed.tolist()) == _reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_slices_cover_the_range_in_whole_buckets():
    for n, multiple in [(SLICE * 3 + 5, 512), (SLICE + 1, 100), (10, 8)]:
        parts = slices(n, torch.device("cpu"), multiple)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert all((hi - lo) % multiple == 0 and lo % 8 == 0 for lo, hi in parts[:-1])


def test_a_wrong_buffer_size_is_refused():
    with pytest.raises(ValueError, match="expected"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="1..32"):
        pack_bits(torch.zeros(4, dtype=torch.int64), 33)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_the_byte_table_decodes_every_packed_byte(bits):
    values = torch.randn(2**bits, generator=torch.Generator().manual_seed(bits))
    codes = torch.randint(0, 2**bits, (800,), generator=torch.Generator().manual_seed(7))
    out = torch.empty(800)
    lookup(pack_bits(codes, bits), byte_table(values, bits), out)
    assert torch.equal(out, values[codes])


def test_stochastic_rounding_is_exact_on_integers_and_unbiased():
    g = torch.Generator().manual_seed(0)
    ints = torch.arange(-50, 50, dtype=torch.float32)
    assert torch.equal(stochastic_round_(ints.clone(), uniform_lanes(g, 100, ints.device)), ints)
    x = torch.tensor([-2.3, -0.5, 0.1, 0.75, 3.999], dtype=torch.float32)
    trials = 20000
    rows = x.repeat(trials)
    r = stochastic_round_(rows.clone(), uniform_lanes(g, rows.numel(), rows.device)).view(trials, -1)
    assert torch.all((r == torch.floor(x)) | (r == torch.floor(x) + 1))
    p = x - torch.floor(x)
    se = (p * (1 - p) / trials).sqrt()
    assert torch.all((r.mean(0) - x).abs() < 5 * se + 1e-6), (r.mean(0), x)


def test_uniform_lanes_are_uniform_and_follow_the_generator():
    lanes = uniform_lanes(torch.Generator().manual_seed(3), 200_001, torch.device("cpu"))
    assert lanes.dtype == torch.int32 and lanes.numel() == 200_001
    u = (lanes.double() + 2**31) / 2**32
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=16, min=0, max=1)
    assert float(hist.min()) > 0.95 * u.numel() / 16
    again = uniform_lanes(torch.Generator().manual_seed(3), 200_001, torch.device("cpu"))
    assert torch.equal(lanes, again)


def test_row_helpers_apply_one_factor_per_bucket_including_a_short_last_one():
    v = torch.ones(10)
    scale_rows_(v, torch.tensor([2.0, 3.0, 5.0]), 4)
    assert v.tolist() == [2.0] * 4 + [3.0] * 4 + [5.0] * 2
    add_rows_(v, torch.tensor([1.0, 1.0, -1.0]), 4)
    assert v.tolist() == [3.0] * 4 + [4.0] * 4 + [4.0] * 2
