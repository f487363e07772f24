"""vqSGD codec (Gandikota, Kane, Maity, Mazumdar, AISTATS 2021): cross-polytope, Hadamard and simplex points."""

from __future__ import annotations

import math

import pytest
import torch

from compressors import CodecError, Packet, PacketError, TensorInfo, make_codec
from compressors.bits import pack_bits
from compressors.vqsgd import fwht, point_probabilities
from tests.test_rcfed import _train_digits

TRIALS = 20_000


def _info(n: int, name: str = "g", **kw) -> TensorInfo:
    return TensorInfo(name, (n,), **kw)


def _samples(points: str, reps: int, g: torch.Tensor, trials: int = TRIALS) -> torch.Tensor:
    """``trials`` independent quantisations of ``g``: one tensor of copies, one block per copy."""
    d = g.numel()
    codec = make_codec("vqsgd", {"points": points, "reps": reps, "block": d})
    x = g.repeat(trials)
    info = _info(x.numel())
    return codec.decode(codec.encode(x, info), info).view(trials, d).double()


def _unit(d: int, seed: int) -> torch.Tensor:
    g = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return g / g.norm()


@pytest.mark.parametrize("points, d, reps, r2", [
    ("cross", 64, 1, 64), ("cross", 64, 8, 64),
    ("hadamard", 64, 1, 64), ("hadamard", 64, 8, 64),
    ("simplex", 16, 1, 256), ("simplex", 16, 8, 256),
])
def test_unbiased_with_variance_norm2_r2_minus_1_over_s(points, d, reps, r2):
    """T10: E Q(g) = g (each coordinate within 4 MC standard errors) and E‖Q(g)−g‖² = ‖g‖²(r²−1)/s
    (within 3 standard errors); at d=64, s=1 that is 63, at d=16 simplex 255."""
    g = 2.5 * _unit(d, seed=d + reps)
    q = _samples(points, reps, g.float())
    err = ((q - g.double()) ** 2).sum(dim=1)
    expected = float(g.norm() ** 2) * (r2 - 1) / reps
    assert abs(float(err.mean()) - expected) <= 3 * float(err.std()) / math.sqrt(TRIALS)
    se = q.std(dim=0) / math.sqrt(TRIALS)
    assert float(((q.mean(dim=0) - g.double()).abs() / se).max()) < 4.0


def test_block_product_variance_sums_over_blocks():
    """Block product: Var = Σ_b ‖g_b‖²(d_b − 1)/s with a norm per block."""
    g = torch.randn(256, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 257) / 64
    codec = make_codec("vqsgd", {"points": "cross", "reps": 4, "block": 64})
    trials = 5000
    x = g.repeat(trials)
    info = _info(x.numel())
    q = codec.decode(codec.encode(x, info), info).view(trials, 256).double()
    err = ((q - g.double()) ** 2).sum(dim=1)
    expected = float(sum(b.norm() ** 2 for b in g.view(4, 64))) * 63 / 4
    assert abs(float(err.mean()) - expected) <= 3 * float(err.std()) / math.sqrt(trials)


def test_hadamard_pads_a_block_to_a_power_of_two_and_stays_unbiased():
    g = torch.randn(48, generator=torch.Generator().manual_seed(2))
    q = _samples("hadamard", 4, g)
    se = q.std(dim=0) / math.sqrt(TRIALS)
    assert float(((q.mean(dim=0) - g.double()).abs() / se).max()) < 4.0
    err = ((q - g.double()) ** 2).sum(dim=1).mean()
    assert float(err) <= float(g.norm() ** 2) * (64 - 1) / 4 * 1.02     # bound with r² = P = 64


def test_whole_tensor_block_is_the_same_as_block_zero():
    x = torch.randn(300, generator=torch.Generator().manual_seed(3))
    info = _info(300)
    a = make_codec("vqsgd", {"block": 0}).encode(x, info)
    b = make_codec("vqsgd", {"block": 1000}).encode(x, info)
    assert a.to_bytes() == b.to_bytes()


def test_fwht_is_the_sylvester_hadamard_matrix():
    h = torch.tensor([[1.0]])
    for _ in range(4):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(fwht(x), x @ h, atol=1e-5)
    assert torch.allclose(fwht(fwht(x)), 16 * x, atol=1e-4)


@pytest.mark.parametrize("points", ["cross", "hadamard", "simplex"])
def test_point_probabilities_are_a_distribution_that_averages_to_v(points):
    v = torch.randn(5, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True) * torch.linspace(0, 1, 5, dtype=torch.float64).unsqueeze(1)
    a = point_probabilities(v, points)
    assert torch.all(a >= 0)
    assert torch.allclose(a.sum(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    codec = make_codec("vqsgd", {"points": points, "reps": 1, "block": 16})
    hits = torch.eye(a.shape[1], dtype=torch.float32)         # each point once, as a decoded block
    pts = codec.sum_points(hits, 16).double()                 # row j = point c_j
    assert torch.allclose(a @ pts, v, atol=1e-5)


@pytest.mark.parametrize("rho", [0.3, 0.7])
def test_cross_polytope_is_epsilon_ldp(rho):
    """Local privacy: for ‖v‖ ≤ ρ every point's probability ratio across inputs is ≤ (1+2ρ√d)/(1−ρ)."""
    d = 32
    g = torch.Generator().manual_seed(6)
    v = torch.randn(4000, d, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True) * rho * torch.rand(4000, 1, generator=g, dtype=torch.float64)
    extremes = rho * torch.cat([torch.eye(d), -torch.eye(d), torch.sign(torch.randn(8, d, generator=g)) / math.sqrt(d)])
    a = point_probabilities(torch.cat([v, extremes.double()]), "cross")
    ratio = float((a.max(dim=0).values / a.min(dim=0).values).max())
    bound = (1 + 2 * rho * math.sqrt(d)) / (1 - rho)
    assert ratio <= bound * (1 + 1e-9)
    assert ratio >= 0.9 * bound                                # the extremes come close to it


@pytest.mark.parametrize("points, index_bits", [("cross", 7), ("hadamard", 7), ("simplex", 7)])
def test_wire_size_is_norm_plus_s_indices_per_block(points, index_bits):
    codec = make_codec("vqsgd", {"points": points, "reps": 16, "block": 64})
    x = torch.randn(64 * 100, generator=torch.Generator().manual_seed(7))
    packet = codec.encode(x, _info(x.numel()))
    payload = 100 * 4 + math.ceil(100 * 16 * index_bits / 8)
    assert sum(f.numel() * f.element_size() for f in packet.fields) == payload
    assert len(packet.to_bytes()) == packet.nbytes
    assert len(packet.to_bytes()) * 8 / x.numel() == pytest.approx((32 + 16 * index_bits) / 64, abs=0.05)


@pytest.mark.parametrize("points", ["cross", "hadamard", "simplex"])
def test_bytes_round_trip_decodes_identically(points):
    codec = make_codec("vqsgd", {"points": points, "reps": 8, "block": 50})
    x = torch.randn(333, generator=torch.Generator().manual_seed(8))
    info = _info(333)
    packet = codec.encode(x, info)
    assert torch.equal(codec.decode(Packet.from_bytes(packet.to_bytes()), info), codec.decode(packet, info))


def test_corrupted_byte_raises_packet_error():
    codec = make_codec("vqsgd", {})
    x = torch.randn(1000, generator=torch.Generator().manual_seed(9))
    data = bytearray(codec.encode(x, _info(1000)).to_bytes())
    data[len(data) // 2] ^= 0x01
    with pytest.raises(PacketError):
        codec.decode(Packet.from_bytes(bytes(data)), _info(1000))


@pytest.mark.parametrize("points, block, count, bits", [("simplex", 64, 65, 7), ("cross", 3, 6, 3),
                                                       ("cross", 24, 48, 6)])
def test_an_index_outside_the_point_set_decodes_as_the_last_point_and_nothing_is_read_back(points, block, count,
                                                                                       bits):
    """With fewer than 2^bits points some codes name none; an intact packet (its CRC holds) that has one came
    from a faulty sender: it decodes as the set's last point, in bounds, without a read to the host (which
    would stall a GPU exchange), as top-k's clamped indices do."""
    from tests.host_reads import no_host_reads

    codec = make_codec("vqsgd", {"points": points, "reps": 2, "block": block})
    assert codec.index_bits(block) == bits and (1 << bits) > count
    bad = Packet("vqsgd", block, (torch.ones(1), pack_bits(torch.tensor([3, (1 << bits) - 1]), bits)))
    last = Packet("vqsgd", block, (torch.ones(1), pack_bits(torch.tensor([3, count - 1]), bits)))
    with no_host_reads():
        out = codec.decode(bad, _info(block))
    assert torch.equal(out, codec.decode(last, _info(block)))


def test_decode_rejects_a_norm_count_that_does_not_fit():
    codec = make_codec("vqsgd", {"reps": 2, "block": 8})
    good = codec.encode(torch.randn(16), _info(16))
    bad = Packet("vqsgd", 16, (torch.ones(3), good.fields[1]))
    with pytest.raises(PacketError, match="norms"):
        codec.decode(bad, _info(16))


@pytest.mark.parametrize("points", ["cross", "hadamard", "simplex"])
@pytest.mark.parametrize("values", [[0.7], [1.0, -2.0], [0.0] * 70])
def test_tiny_and_zero_tensors(points, values):
    codec = make_codec("vqsgd", {"points": points})
    x = torch.tensor(values)
    info = _info(x.numel())
    out = codec.decode(Packet.from_bytes(codec.encode(x, info).to_bytes()), info)
    assert out.shape == (x.numel(),) and out.dtype == torch.float32 and torch.isfinite(out).all()
    if not bool(x.any()):
        assert torch.equal(out, x)
    if x.numel() == 1 and points == "cross":
        assert torch.allclose(out, x)                           # ±√1·e_1 = ±x exactly


def test_float16_input_decodes_to_float32():
    codec = make_codec("vqsgd", {})
    x = torch.randn(4096, generator=torch.Generator().manual_seed(10)).half()
    info = _info(x.numel())
    out = codec.decode(codec.encode(x, info), info)
    assert out.dtype == torch.float32 and out.shape == (4096,)


def test_same_info_same_packet_other_worker_other_packet():
    codec = make_codec("vqsgd", {})
    x = torch.randn(640, generator=torch.Generator().manual_seed(11))
    a = codec.encode(x, _info(640, worker=0)).to_bytes()
    assert a == codec.encode(x, _info(640, worker=0)).to_bytes()
    assert a != codec.encode(x, _info(640, worker=1)).to_bytes()


@pytest.mark.parametrize("block", [3, 64, 1000])
def test_compiled_cpu_cross_sampler_draws_the_points_of_the_tensor_sampler(block):
    """The CPU pass (counting at blocks ≤ 256, binary search above) repeats the tensor sampler's float32
    operations, so from the same uniforms it draws the same points; torch's cumulative sum may add a
    long row in another order, so a point on a cell's edge may differ there (1 in 10^3 allowed)."""
    import math

    import numpy as np

    from compressors.bits import uniform_lanes
    from compressors.vqsgd import VQSGD, _sample_cross_rows

    gen = torch.Generator().manual_seed(block)
    rows = torch.randn(4000, block, generator=gen)
    rows[::7] *= 1e-3
    rows[3] = 0.0                                  # a zero block: only the uniform part
    rows[5, : block // 2 + 1] = 0.0
    norm = torch.linalg.vector_norm(rows, dim=1)
    safe = torch.where(norm > 0, norm, 1.0).unsqueeze(1)
    u = uniform_lanes(gen, rows.shape[0] * 16, rows.device).view(-1, 16).to(torch.float32).mul_(2.0**-32).add_(0.5)
    expected = VQSGD(block=block)._sample_cross(rows, safe, u.clone())
    got = torch.empty(u.shape, dtype=torch.int64)
    _sample_cross_rows(rows.numpy(), safe.numpy(), u.numpy(), np.float32(math.sqrt(block)), got.numpy())
    agree = float((got == expected).double().mean())
    assert agree == 1.0 if block <= 64 else agree >= 0.999
    assert int(got.min()) >= 0 and int(got.max()) < 2 * block


@pytest.mark.parametrize("points, d", [("cross", 12), ("hadamard", 12), ("hadamard", 16), ("simplex", 6),
                                       ("hadamard", 300), ("simplex", 300)])  # 300: binary search, butterflies
def test_the_sampler_draws_each_point_with_its_probability(points, d):
    """The draws of one block follow a_j of ``point_probabilities`` (cross and Hadamard through the mixture
    of a signed coordinate and γ spread evenly; simplex by its cumulative sums, compiled on the CPU in
    float32): every point's count is
    within 4.5 binomial standard deviations, over 65,536 draws of a vector with a zero coordinate."""
    from compressors.bits import unpack_codes
    from compressors.vqsgd import num_points

    g = _unit(d, seed=d) * 0.8
    g[1] = 0.0
    codec = make_codec("vqsgd", {"points": points, "reps": 65536, "block": d})
    packet = codec.encode(g, _info(d, seed=5))
    count = num_points(points, d)
    draws = unpack_codes(packet.fields[1], codec.index_bits(d), 65536).to(torch.int64)
    freq = torch.bincount(draws, minlength=count).double()
    a = point_probabilities((g / g.norm()).double().unsqueeze(0), points)[0]
    sd = (65536 * a * (1 - a)).sqrt()
    assert freq.numel() == count and torch.all((freq - 65536 * a).abs() <= 4.5 * sd + 1), (freq, 65536 * a)


@pytest.mark.parametrize("points", ["cross", "hadamard", "simplex"])
def test_decoding_sums_the_drawn_points_of_each_block(points):
    """Each decoder's own arithmetic equals the sum of the drawn points (``sum_points``) times norm/s."""
    from compressors.bits import unpack_codes

    codec = make_codec("vqsgd", {"points": points, "reps": 5, "block": 24})
    x = torch.randn(24 * 7 + 5, generator=torch.Generator().manual_seed(1))
    info = _info(x.numel(), seed=2)
    packet = codec.encode(x, info)
    norms, blocks = packet.fields[0], packet.fields[0].numel()
    index = unpack_codes(packet.fields[1], codec.index_bits(x.numel()), blocks * 5).to(torch.int64).view(blocks, 5)
    hits = torch.zeros(blocks, 48 if points == "cross" else 64 if points == "hadamard" else 25)
    hits.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    want = (codec.sum_points(hits, 24) * (norms / 5).unsqueeze(1)).reshape(-1)[:x.numel()]
    torch.testing.assert_close(codec.decode(packet, info), want, rtol=1e-5, atol=1e-5)


def test_parameters_are_validated():
    with pytest.raises(CodecError, match="choose one of"):
        make_codec("vqsgd", {"points": "octahedron"})
    with pytest.raises(CodecError, match="reps"):
        make_codec("vqsgd", {"reps": 0})
    with pytest.raises(CodecError, match="block"):
        make_codec("vqsgd", {"block": -1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("points", ["cross", "hadamard", "simplex"])
def test_runs_unchanged_on_cuda(points):
    codec = make_codec("vqsgd", {"points": points})
    x = torch.randn(10_000, device="cuda", generator=torch.Generator("cuda").manual_seed(12))
    info = _info(x.numel())
    packet = codec.encode(x, info)
    out = codec.decode(packet, info)
    assert out.device == x.device
    assert torch.allclose(codec.decode(Packet.from_bytes(packet.to_bytes()), info), out.cpu(), atol=1e-5)


def test_four_workers_train_digits_with_defaults():
    """Defaults (cross, block 64, 16 reps: 2.25 bits/element + header) train to ≥ 0.85."""
    assert _train_digits("vqsgd", {}) >= 0.85
