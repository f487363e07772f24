"""Scalar quantisers: TernGrad, signSGD / majority vote, scaled sign, blockwise int8, the threshold
quantiser, and QSGD in both codings (QSGD, TernGrad, signSGD, EF-SignSGD, the QCMD/QRDA threshold).

Monte-Carlo tests take N independent draws in one call by tiling the input N times: every codec here
quantises each bucket (QSGD, int8) or each element against one tensor-wide scale that tiling does not
change (TernGrad: ‖g‖∞), with fresh randomness per element, so the N tiles are N independent draws.
"""

from __future__ import annotations

import math

import pytest
import torch

from compressors import Packet, PacketError, TensorInfo, make_codec
from compressors.bits import packed_nbytes
from compressors.error_feedback import ErrorFeedback
from compressors.intcodes import delta_lengths, gamma_lengths
from compressors.sparse_index import layout

CASES = {
    "terngrad": ("terngrad", {}),
    "sign": ("sign", {}),
    "ef_sign": ("ef_sign", {}),
    "int8": ("int8", {}),
    "int8_stochastic": ("int8", {"rounding": "stochastic"}),
    "threshold": ("threshold", {}),
    "threshold_mean": ("threshold", {"reference": "mean", "kappa": 1.0}),
    "qsgd_fixed": ("qsgd", {}),
    "qsgd_elias": ("qsgd", {"coding": "elias"}),
}
F64 = torch.float64


def codec_of(case: str):
    name, params = CASES[case]
    return make_codec(name, params)


def info_for(x: torch.Tensor, step: int = 0, worker: int = 0, name: str = "layer.weight") -> TensorInfo:
    return TensorInfo(name, tuple(x.shape), worker=worker, step=step, seed=7)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def through_wire(codec, x: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    return codec.decode(Packet.from_bytes(codec.encode(x, info).to_bytes()), info)


def payload_bytes(packet: Packet) -> int:
    return sum(f.numel() * f.element_size() for f in packet.fields)


def draws(codec, v: torch.Tensor, n: int) -> torch.Tensor:
    """n independent decoded draws of ``codec`` on ``v`` (rows, float64); see the module docstring."""
    tiled = v.repeat(n)
    return codec.decode(codec.encode(tiled, info_for(tiled, step=1)), info_for(tiled, step=1)).view(n, -1).to(F64)


def unbiasedness_z(samples: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> float:
    """How many standard deviations the statistic Σ_i (mean_i − v_i)²/(σ_i²/N) lies above its
    expectation (the number of random coordinates), given each coordinate's exact variance σ_i².
    Coordinates with σ_i = 0 must come out exact."""
    n, error = samples.shape[0], samples.mean(0) - target.to(F64)
    random = variance > 0
    assert torch.equal(error[~random], torch.zeros_like(error[~random])), "a deterministic coordinate is off"
    stat = (error[random] ** 2 / (variance[random] / n)).sum()
    d = int(random.sum())
    return float((stat - d) / math.sqrt(2 * d))


def bernoulli_variance(step: torch.Tensor | float, r: torch.Tensor) -> torch.Tensor:
    """Variance of step·(⌊r⌋ + Bernoulli(r − ⌊r⌋)): step²·p(1 − p)."""
    p = r - r.floor()
    return step**2 * p * (1 - p)


# ---------------------------------------------------------------------------------------------
# Every codec: wire round trip, corruption, edge shapes, dtypes.


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(1,), (3,), (37, 29), (5000,)])
def test_decode_after_bytes_round_trip_is_identical(case, shape):
    codec = codec_of(case)
    x = gaussian(*shape)
    info = info_for(x)
    packet = codec.encode(x, info)
    direct = codec.decode(packet, info)
    assert direct.shape == (x.numel(),) and direct.dtype == torch.float32
    assert torch.equal(codec.decode(Packet.from_bytes(packet.to_bytes()), info), direct)


@pytest.mark.parametrize("case", CASES)
def test_a_corrupted_byte_raises_packet_error(case):
    codec = codec_of(case)
    x = gaussian(1000)
    data = codec.encode(x, info_for(x)).to_bytes()
    for pos in (len(data) // 2, len(data) - 5):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(PacketError):
            codec.decode(Packet.from_bytes(bytes(bad)), info_for(x))


@pytest.mark.parametrize("case", CASES)
def test_zero_tensor_decodes_to_zero(case):
    codec = codec_of(case)
    x = torch.zeros(300)
    assert torch.equal(through_wire(codec, x, info_for(x)), torch.zeros(300))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("numel", [1, 3])
def test_tiny_tensors_decode_to_finite_values_of_their_size(case, numel):
    codec = codec_of(case)
    x = torch.tensor([0.7, -1.3, 0.2][:numel])
    out = through_wire(codec, x, info_for(x))
    assert out.shape == (numel,) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith(("sign", "threshold"))])
def test_a_single_element_is_reproduced(case):
    x = torch.tensor([-0.37])
    assert torch.allclose(through_wire(codec_of(case), x, info_for(x)), x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_float16_input_encodes_as_its_float32_value(case):
    codec = codec_of(case)
    x = gaussian(777).half()
    info = info_for(x)
    assert torch.equal(codec.decode(codec.encode(x, info), info), codec.decode(codec.encode(x.float(), info), info))


@pytest.mark.parametrize("case", CASES)
def test_same_info_gives_the_same_packet(case):
    codec = codec_of(case)
    x = gaussian(2000)
    a, b = codec.encode(x, info_for(x, step=3)), codec.encode(x, info_for(x, step=3))
    assert a.to_bytes() == b.to_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_cuda_tensors_encode_on_the_device_and_decode_anywhere(case):
    codec = codec_of(case)
    x = gaussian(10_001).cuda()
    info = info_for(x)
    packet = codec.encode(x, info)
    assert all(f.device.type == "cuda" for f in packet.fields)
    on_device = codec.decode(packet, info)
    assert on_device.device.type == "cuda"
    assert torch.equal(codec.decode(Packet.from_bytes(packet.to_bytes()), info), on_device.cpu())


# ---------------------------------------------------------------------------------------------
# Bits on the wire: payload bytes as the spec counts them (headers come on top).


def test_terngrad_payload_is_two_bits_per_element_plus_fp32_scale():
    for n in (1, 3, 1001, 1_000_000):
        x = gaussian(n)
        assert payload_bytes(make_codec("terngrad").encode(x, info_for(x))) == 4 + packed_nbytes(n, 2)
    packet = make_codec("terngrad").encode(x, info_for(x))
    assert 2.0 < len(packet.to_bytes()) * 8 / n < 2.001


def test_sign_payload_is_one_bit_per_element_plus_zero_count():
    x = gaussian(1_000_000)
    packet = make_codec("sign").encode(x, info_for(x))
    assert payload_bytes(packet) == 8 + packed_nbytes(x.numel(), 1)
    assert 1.0 < len(packet.to_bytes()) * 8 / x.numel() < 1.0005


def test_sign_of_a_zero_tensor_costs_one_bit_per_element():
    x = torch.zeros(10_000)
    assert payload_bytes(make_codec("sign").encode(x, info_for(x))) == 8 + packed_nbytes(x.numel(), 1)


def test_ef_sign_payload_is_one_bit_per_element_plus_fp32_scale():
    x = gaussian(1_000_000)
    packet = make_codec("ef_sign").encode(x, info_for(x))
    assert payload_bytes(packet) == 4 + 8 + packed_nbytes(x.numel(), 1)


@pytest.mark.parametrize("block", [64, 256, 1000])
def test_int8_payload_is_one_byte_per_element_plus_fp32_per_block(block):
    x = gaussian(100_003)
    packet = make_codec("int8", {"block": block}).encode(x, info_for(x))
    assert payload_bytes(packet) == x.numel() + 4 * math.ceil(x.numel() / block)


@pytest.mark.parametrize("reference, kappa, x", [
    ("mean", 0.5, gaussian(100_000)),   # dense support: a bitmap
    ("max", 0.5, gaussian(100_000)),    # ~3% kept: Elias–Fano indices
    ("max", 0.0, gaussian(100_000)),    # everything kept
    ("max", 0.5, torch.full((1000,), 2.0)),
], ids=["mean-dense", "max-sparse", "all", "constant"])
def test_threshold_payload_uses_the_cheaper_index_code_within_the_spec_bound(reference, kappa, x):
    codec = make_codec("threshold", {"kappa": kappa, "reference": reference})
    packet = codec.encode(x, info_for(x))
    d, k = x.numel(), int(codec.support(x).sum())
    index_bytes = layout(k, d).nbytes
    assert index_bytes <= packed_nbytes(d, 1)
    assert payload_bytes(packet) == 4 + 8 + packed_nbytes(k, 1) + index_bytes
    spec_bits = min(k * (math.ceil(math.log2(d)) + 1), 2 * d) + 32  # sparse or dense ternary, + fp32 a
    assert payload_bytes(packet) * 8 <= spec_bits + 64 + 2 * 7  # + the int64 |T|, + byte padding of 2 fields


def test_qsgd_fixed_payload_is_fp32_per_bucket_plus_sign_and_level_bits():
    x = gaussian(100_003)
    codec = make_codec("qsgd", {"levels": 7, "bucket": 512})
    assert payload_bytes(codec.encode(x, info_for(x))) == 4 * math.ceil(x.numel() / 512) + packed_nbytes(x.numel(), 4)


def test_qsgd_elias_payload_is_the_shorter_elias_code_of_gaps_and_levels():
    x = gaussian(100_003)
    fixed, elias = make_codec("qsgd"), make_codec("qsgd", {"coding": "elias"})
    _, signed = fixed.quantize(x, info_for(x))
    idx = signed.nonzero().reshape(-1)
    gaps, levels = torch.diff(idx, prepend=torch.tensor([-1])), signed[idx].abs()

    def elias_bytes(v):
        return packed_nbytes(min(int(gamma_lengths(v).sum()), int(delta_lengths(v).sum())), 1)

    scales, header, signs = 4 * math.ceil(x.numel() / 512), 3 * 8, packed_nbytes(idx.numel(), 1)
    expected = scales + header + elias_bytes(gaps) + elias_bytes(levels) + signs
    assert payload_bytes(elias.encode(x, info_for(x))) == expected


def test_qsgd_elias_at_s_sqrt_d_stays_under_theorem_3_2_bound():
    """QSGD's Theorem 3.2: with s = √d the Elias-coded bucket costs ≤ 2.8d + 32 bits."""
    d = 1024
    codec = make_codec("qsgd", {"levels": 32, "bucket": d, "coding": "elias"})
    for seed in range(5):
        x = gaussian(d, seed=seed)
        assert payload_bytes(codec.encode(x, info_for(x, step=seed))) * 8 <= 2.8 * d + 32 + 24 * 8


# ---------------------------------------------------------------------------------------------
# TernGrad (Wen et al., NeurIPS 2017).

TERN_D, TERN_N = 1000, 10_000


@pytest.fixture(scope="module")
def terngrad_draws():
    g = gaussian(TERN_D, seed=11)
    return g, draws(make_codec("terngrad", {"clip": 0.0}), g, TERN_N)


def test_terngrad_error_energy_is_s_l1_minus_l2(terngrad_draws):
    """T5: E‖Q(g) − g‖² = ‖g‖∞‖g‖₁ − ‖g‖², within 2%."""
    g, q = terngrad_draws
    g = g.to(F64)
    exact = float(g.abs().max() * g.abs().sum() - g.pow(2).sum())
    measured = float((q - g).pow(2).sum(1).mean())
    assert measured == pytest.approx(exact, rel=0.02)


def test_terngrad_is_unbiased_without_clipping(terngrad_draws):
    g, q = terngrad_draws
    g = g.to(F64)
    s = g.abs().max()
    assert unbiasedness_z(q, g, bernoulli_variance(s, g.abs() / s)) < 3.0


def test_terngrad_sends_only_zero_and_plus_minus_scale(terngrad_draws):
    g, q = terngrad_draws
    s = float(g.abs().max())
    assert bool(((q == 0) | (q.abs() == s)).all())
    assert bool((q * g.to(F64) >= 0).all())


def test_terngrad_clips_the_scale_to_c_times_rms():
    g = gaussian(10_000, seed=3)
    g[17] = 100.0
    codec = make_codec("terngrad", {"clip": 2.5})
    q = codec.decode(codec.encode(g, info_for(g)), info_for(g))
    assert float(q.abs().max()) == pytest.approx(2.5 * float(g.norm()) / 100.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# signSGD and majority vote (Bernstein et al., ICML 2018).


def test_sign_decodes_to_plus_minus_one_and_keeps_exact_zeros():
    x = torch.tensor([-2.0, 0.0, 3.0, -0.0, 1e-30, -1e-30, 5.0])
    assert torch.equal(through_wire(make_codec("sign"), x, info_for(x)), torch.tensor([-1.0, 0, 1, 0, 1, -1, 1]))


def test_sign_with_mostly_zeros_round_trips():
    x = torch.zeros(5000)
    x[::7] = gaussian(715)
    assert torch.equal(through_wire(make_codec("sign"), x, info_for(x)), torch.sign(x))


def test_majority_vote_is_the_sign_of_the_sum_of_signs():
    sign = make_codec("sign")
    votes = [torch.tensor([1.0, 1, -1, 1]), torch.tensor([1.0, -1, -1, -1]), torch.tensor([-1.0, -1, -1, 1])]
    assert torch.equal(sign.aggregate(votes, [1.0, 1.0, 1.0]), torch.tensor([1.0, -1, -1, 1]))


def test_majority_vote_tie_is_zero():
    sign = make_codec("sign")
    votes = [torch.tensor([1.0, -1, 0]), torch.tensor([-1.0, 1, 0])]
    assert torch.equal(sign.aggregate(votes, [1.0, 1.0]), torch.zeros(3))


def test_majority_vote_weights_the_workers():
    sign = make_codec("sign")
    votes = [torch.tensor([1.0, -1]), torch.tensor([-1.0, 1]), torch.tensor([-1.0, 1])]
    assert torch.equal(sign.aggregate(votes, [3.0, 1.0, 1.0]), torch.tensor([1.0, -1]))
    assert torch.equal(sign.aggregate(votes, [2.0, 1.0, 1.0]), torch.tensor([0.0, 0]))


# ---------------------------------------------------------------------------------------------
# Scaled sign of EF-SignSGD (Karimireddy et al., ICML 2019).


@pytest.mark.parametrize("sampler", ["gaussian", "laplace", "uniform", "tiny"])
def test_scaled_sign_error_is_one_minus_delta_times_energy(sampler):
    """T6: ‖C(p) − p‖² = (1 − δ)‖p‖², δ = ‖p‖₁²/(d‖p‖²), to 1e-9 relative."""
    g = torch.Generator().manual_seed(5)
    p = {
        "gaussian": lambda: torch.randn(100_000, generator=g),
        "laplace": lambda: torch.distributions.Laplace(0.0, 1.0).sample((50_000,)),
        "uniform": lambda: torch.rand(1000, generator=g) - 0.3,
        "tiny": lambda: torch.tensor([0.5, -2.0, 3.0]),
    }[sampler]()
    c = through_wire(make_codec("ef_sign"), p, info_for(p)).to(F64)
    p = p.to(F64)
    delta = p.abs().sum() ** 2 / (p.numel() * p.pow(2).sum())
    assert float((c - p).pow(2).sum()) == pytest.approx(float((1 - delta) * p.pow(2).sum()), rel=1e-9)


def test_scaled_sign_delta_is_two_over_pi_for_gaussian():
    p = gaussian(100_000, seed=9)
    c = through_wire(make_codec("ef_sign"), p, info_for(p)).to(F64)
    p = p.to(F64)
    delta = 1 - float((c - p).pow(2).sum() / p.pow(2).sum())
    assert delta == pytest.approx(2 / math.pi, abs=1e-2)


def test_scaled_sign_with_zeros_is_still_a_delta_compressor():
    p = gaussian(10_000, seed=4)
    p[::3] = 0.0
    c = through_wire(make_codec("ef_sign"), p, info_for(p)).to(F64)
    p = p.to(F64)
    delta = p.abs().sum() ** 2 / (p.numel() * p.pow(2).sum())
    assert bool((c[p == 0] == 0).all())
    assert float((c - p).pow(2).sum()) <= float((1 - delta) * p.pow(2).sum())


# ---------------------------------------------------------------------------------------------
# Blockwise int8.


def blocky(n: int, block: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values whose magnitude changes by orders of magnitude from block to block."""
    x = gaussian(n, seed=seed)
    return x * torch.logspace(-4, 2, math.ceil(n / block)).repeat_interleave(block)[:n]


@pytest.mark.parametrize("block", [1, 7, 256])
def test_int8_nearest_error_is_at_most_half_a_step(block):
    x = blocky(10_001, block)
    out = through_wire(make_codec("int8", {"block": block}), x, info_for(x))
    steps = (x.abs().reshape(-1)).to(F64)
    pad = (-x.numel()) % block
    steps = torch.cat([steps, steps.new_zeros(pad)]).view(-1, block).amax(1).div(127).repeat_interleave(block)
    err = (out.to(F64) - x.to(F64)).abs()
    assert bool((err <= steps[: x.numel()] * (0.5 + 1e-6)).all())


def test_int8_stochastic_rounding_is_unbiased_within_a_step():
    x = blocky(256, 256, seed=2)
    q = draws(make_codec("int8", {"rounding": "stochastic"}), x, 10_000)
    step = float(x.abs().max().to(F64)) / 127
    assert float((q - x.to(F64)).abs().max()) < step * (1 + 1e-6)
    assert unbiasedness_z(q, x, bernoulli_variance(step, x.abs().to(F64) / step)) < 3.0


def test_int8_decoder_with_another_block_size_refuses_the_packet():
    x = gaussian(1000)
    packet = make_codec("int8", {"block": 128}).encode(x, info_for(x))
    with pytest.raises(PacketError, match="int8 scales"):
        make_codec("int8", {"block": 256}).decode(packet, info_for(x))


# ---------------------------------------------------------------------------------------------
# Threshold quantiser (QCMD / QRDA AdaGrad, Xu et al., 2022).


@pytest.mark.parametrize("kappa,reference", [(0.5, "mean"), (0.3, "max"), (3.0, "mean"), (0.0, "mean")])
@pytest.mark.parametrize("n", [1, 9, 1000, 70_001])
def test_threshold_compiled_cpu_pass_gives_the_tensor_paths_packet_and_tensor(kappa, reference, n):
    """The CPU's one-pass encoder and bitmap decoder against the tensor path other devices run: the same
    support, signs and index code, the scale within float32 rounding (a float64 sum there), and the same
    decoded tensor from either decoder. Ties at zero, exact zeros and a bitmap or Elias-Fano support."""
    codec = make_codec("threshold", {"kappa": kappa, "reference": reference})
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)).round(decimals=1)
    g[::7] = 0.0
    fast, slow = codec._encode_cpu(g), codec._encode_tensor(g)
    torch.testing.assert_close(fast.fields[0], slow.fields[0], rtol=2e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(fast.fields[1:], slow.fields[1:]))
    info = TensorInfo("w", (n,))
    a, count, signs, code = slow.fields
    k = int(count[0])
    assert torch.equal(codec.decode(slow, info),
                       codec._decode_tensor(a, signs, code, k, torch.zeros(n, dtype=torch.float32)))


@pytest.mark.parametrize("clip", [2.5, 0.0, 0.5])
@pytest.mark.parametrize("n", [1, 5, 65_537, 200_003])
def test_terngrad_compiled_cpu_pass_gives_the_tensor_paths_bytes(clip, n):
    """The CPU's one-pass clip-draw-code-pack against the tensor code other devices run, from the same
    scale and the same random stream: the same bytes, exact zeros and −0 included."""
    codec = make_codec("terngrad", {"clip": clip})
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)).round(decimals=1)
    g[::5] = -0.0
    bound, scale = codec._bound_and_scale(g)
    per_unit = 2.0**32 / torch.where(scale > 0, scale, 1.0)
    out = []
    for pack in (codec._pack_compiled, codec._pack_tensor):
        packed = torch.empty(packed_nbytes(n, 2), dtype=torch.uint8)
        pack(g, bound, per_unit, TensorInfo("w", (n,), seed=3, step=1).generator(g.device), packed)
        out.append(packed)
    assert torch.equal(out[0], out[1])


def test_threshold_bitmap_with_a_wrong_number_of_ones_is_refused():
    codec = make_codec("threshold", {"kappa": 0.5})
    info = TensorInfo("w", (4000,))
    packet = codec.encode(torch.randn(4000, generator=torch.Generator().manual_seed(1)), info)
    a, count, signs, code = packet.fields
    assert code.numel() == packed_nbytes(4000, 1)  # a bitmap support
    for flip in (0x01, 0x80):
        bad = code.clone()
        bad[0] ^= flip
        with pytest.raises(PacketError, match="bitmap"):
            codec.decode(Packet(packet.codec, packet.numel, (a, count, signs, bad)), info)


@pytest.mark.parametrize("reference", ["max", "mean"])
def test_threshold_support_is_above_kappa_times_reference(reference):
    g = gaussian(20_000, seed=6)
    codec = make_codec("threshold", {"kappa": 0.6, "reference": reference})
    q = through_wire(codec, g, info_for(g))
    ref = g.abs().max() if reference == "max" else g.abs().mean()
    assert torch.equal(q != 0, g.abs() > 0.6 * ref)
    assert torch.equal(torch.sign(q[q != 0]), torch.sign(g[q != 0]))


def test_threshold_scale_is_the_l2_optimal_scalar_for_its_support():
    g = gaussian(1000, seed=8).to(F64)
    codec = make_codec("threshold", {"kappa": 0.3, "reference": "max"})
    q = through_wire(codec, g.float(), info_for(g)).to(F64)
    support, a = q != 0, float(q.abs().max())
    signs = torch.sign(g) * support

    def error(scale: torch.Tensor) -> torch.Tensor:
        return (scale.unsqueeze(1) * signs - g).pow(2).sum(1)

    grid = torch.linspace(0.5 * a, 1.5 * a, 1001, dtype=F64)
    best = float(grid[error(grid).argmin()])
    assert a == pytest.approx(best, abs=float(grid[1] - grid[0]))
    assert float(error(torch.tensor([a], dtype=F64))) <= float(error(grid).min()) * (1 + 1e-9)


def test_threshold_error_is_dropped_energy_plus_spread_on_the_support():
    g = gaussian(5000, seed=10)
    q = through_wire(make_codec("threshold"), g, info_for(g)).to(F64)
    g = g.to(F64)
    t = q != 0
    a = g[t].abs().mean()
    formula = g[~t].pow(2).sum() + (g[t].abs() - a).pow(2).sum()
    assert float((q - g).pow(2).sum()) == pytest.approx(float(formula), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# QSGD (Alistarh et al., NeurIPS 2017), both codings: one bucket of d = 1000, ℓ2 norm.

QSGD_D, QSGD_N = 1000, 10_000


# Elias at s = 31 would code ~7e6 nonzeros; it decodes to exactly what fixed decodes (tested below).
@pytest.fixture(scope="module", params=[("fixed", 1), ("fixed", 4), ("fixed", 31), ("elias", 1), ("elias", 4)],
                ids=lambda p: f"{p[0]}-s{p[1]}")
def qsgd_draws(request):
    coding, s = request.param
    v = gaussian(QSGD_D, seed=12)
    codec = make_codec("qsgd", {"levels": s, "bucket": QSGD_D, "norm": "l2", "coding": coding})
    return s, v.to(F64), draws(codec, v, QSGD_N)


def test_qsgd_is_unbiased(qsgd_draws):
    s, v, q = qsgd_draws
    assert unbiasedness_z(q, v, bernoulli_variance(v.norm() / s, s * v.abs() / v.norm())) < 3.0


def test_qsgd_variance_matches_the_exact_formula_within_3_sigma(qsgd_draws):
    """E‖Q − v‖² = (‖v‖/s)²·Σ p_i(1 − p_i), p_i the fractional part of s|v_i|/‖v‖."""
    s, v, q = qsgd_draws
    r = s * v.abs() / v.norm()
    p = r - r.floor()
    exact = float((v.norm() / s) ** 2 * (p * (1 - p)).sum())
    err = (q - v).pow(2).sum(1)
    assert abs(float(err.mean()) - exact) <= 3 * float(err.std()) / math.sqrt(QSGD_N)


def test_qsgd_variance_is_below_the_lemma_3_1_bound(qsgd_draws):
    s, v, q = qsgd_draws
    bound = min(QSGD_D / s**2, math.sqrt(QSGD_D) / s) * float(v.pow(2).sum())
    assert float((q - v).pow(2).sum(1).mean()) <= bound


def test_qsgd_expected_nonzeros_match_and_respect_the_bound(qsgd_draws):
    """E‖Q‖₀ = Σ min(r_i, 1) ≤ s(s + √d)."""
    s, v, q = qsgd_draws
    nnz = (q != 0).sum(1).to(F64)
    exact = float((s * v.abs() / v.norm()).clamp(max=1).sum())
    assert abs(float(nnz.mean()) - exact) <= 3 * float(nnz.std()) / math.sqrt(QSGD_N)
    assert exact <= s * (s + math.sqrt(QSGD_D))


@pytest.mark.parametrize("norm", ["l2", "max"])
@pytest.mark.parametrize("levels", [1, 7, 255])
def test_qsgd_elias_decodes_to_exactly_what_fixed_decodes(norm, levels):
    x = blocky(20_011, 512, seed=levels)
    info = info_for(x, step=levels)
    fixed = make_codec("qsgd", {"levels": levels, "norm": norm})
    elias = make_codec("qsgd", {"levels": levels, "norm": norm, "coding": "elias"})
    assert torch.equal(through_wire(elias, x, info), through_wire(fixed, x, info))


def test_qsgd_elias_is_smaller_than_fixed_at_default_parameters():
    x = gaussian(100_000)
    sizes = [len(make_codec("qsgd", {"coding": c}).encode(x, info_for(x)).to_bytes()) for c in ("fixed", "elias")]
    assert sizes[1] < 0.5 * sizes[0]


def test_qsgd_decoder_with_the_other_coding_refuses_the_packet():
    x = gaussian(1000)
    packet = make_codec("qsgd", {"coding": "elias"}).encode(x, info_for(x))
    with pytest.raises(PacketError, match="needs 2 fields"):
        make_codec("qsgd").decode(packet, info_for(x))


# ---------------------------------------------------------------------------------------------
# Each codec trains: 4 simulated workers in one process on sklearn digits, SGD with momentum 0.9.


def train_digits(make_codec_for_worker, lr: float, steps: int = 150, workers: int = 4, batch: int = 32) -> float:
    """Test accuracy of a 64-32-10 MLP after ``steps`` synchronous steps through the codec.

    Runs on one intra-op thread: the tensors are tiny, and a busy thread pool only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_digits(make_codec_for_worker, lr, steps, workers, batch)
    finally:
        torch.set_num_threads(threads)


def _train_digits(make_codec_for_worker, lr: float, steps: int, workers: int, batch: int) -> float:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    codecs = [make_codec_for_worker() for _ in range(workers)]
    aggregate = codecs[0].aggregate
    sampler = torch.Generator().manual_seed(1)
    for step in range(steps):
        decoded: dict[str, list[torch.Tensor]] = {name: [] for name in params}
        for w, codec in enumerate(codecs):
            pick = train[torch.randint(len(train), (batch,), generator=sampler)]
            loss = torch.nn.functional.cross_entropy(model(x[pick]), y[pick])
            for (name, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
                info = TensorInfo(name, tuple(p.shape), worker=w, world=workers, step=step)
                decoded[name].append(codec.decode(codec.encode(g, info), info))
                codec.settle(info, True)  # the contribution was applied: error feedback commits its memory
        for name, p in params.items():
            p.grad = aggregate(decoded[name], [1.0] * workers).view_as(p)
        opt.step()
    with torch.no_grad():
        return float((model(x[test]).argmax(1) == y[test]).float().mean())


def test_terngrad_trains_digits_in_process():
    assert train_digits(lambda: make_codec("terngrad"), lr=0.05) >= 0.85


def test_sign_majority_vote_trains_digits_in_process():
    assert train_digits(lambda: make_codec("sign"), lr=0.002) >= 0.85


def test_ef_sign_with_error_feedback_trains_digits_in_process():
    assert train_digits(lambda: ErrorFeedback(make_codec("ef_sign")), lr=0.05) >= 0.85


def test_int8_trains_digits_in_process():
    assert train_digits(lambda: make_codec("int8"), lr=0.05) >= 0.85


def test_threshold_trains_digits_in_process():
    assert train_digits(lambda: make_codec("threshold"), lr=0.05) >= 0.85


def test_unbiasedness_is_a_property_of_the_instance_not_of_the_class():
    assert make_codec("terngrad", {"clip": 0.0}).unbiased and not make_codec("terngrad", {"clip": 2.5}).unbiased
    assert make_codec("int8", {"rounding": "stochastic"}).unbiased and not make_codec("int8").unbiased
    assert make_codec("randomk").unbiased and not make_codec("randomk", {"rescale": False}).unbiased
    assert make_codec("qsgd").unbiased and make_codec("none").unbiased and not make_codec("fp16").unbiased
    from compressors.error_feedback import ErrorFeedback
    assert not ErrorFeedback(make_codec("qsgd")).unbiased  # the memory makes any codec biased per step


def test_terngrad_with_clipping_is_biased_on_a_heavy_tailed_vector_and_unbiased_without():
    x = torch.zeros(1000)
    x[0] = 100.0  # one outlier: clipping at 2.5 sigma cuts it
    x[1:] = torch.randn(999, generator=torch.Generator().manual_seed(0))
    mean = {}
    for clip in (0.0, 2.5):
        codec = make_codec("terngrad", {"clip": clip})
        draws = torch.stack([codec.decode(codec.encode(x, TensorInfo("x", (1000,), step=s)), TensorInfo("x", (1000,)))
                             for s in range(400)])
        mean[clip] = draws.mean(0)[0]
    assert abs(float(mean[0.0]) - 100.0) < 5.0
    assert float(mean[2.5]) < 20.0
