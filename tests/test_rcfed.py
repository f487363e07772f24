"""RC-FED codec (Hamidi & Bereyhi, ICASSP 2025): normalised ECSQ + ANS coding at a target rate."""

from __future__ import annotations

import pytest
import torch

from compressors import CodecError, Packet, PacketError, TensorInfo, make_codec
from compressors import ecsq
from compressors.rcfed import GRID


def _info(n: int, name: str = "w", **kw) -> TensorInfo:
    return TensorInfo(name, (n,), **kw)


def _stream_rate(packet: Packet) -> float:
    """Bits per coordinate of the entropy-coded index stream (the field the rate constrains)."""
    return packet.fields[2].numel() * 8 / packet.numel


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rate", [0.5, 1.0, 2.0, 3.0, 4.0])
def test_gaussian_rate_and_mse_match_the_design(gaussian, rate):
    """T8: on 1e6 N(0,1) samples the coded rate and the MSE are within 1% of the design (cell indices
    held as uint8 up to rate 3, int16 above)."""
    codec = make_codec("rcfed", {"rate": rate})
    info = _info(gaussian.numel())
    packet = codec.encode(gaussian, info)
    out = codec.decode(packet, info)
    design = ecsq.design(rate)
    assert int(packet.fields[1]) == GRID                     # no adaptation needed on Gaussian data
    assert _stream_rate(packet) == pytest.approx(design.entropy, rel=0.01)
    assert len(packet.to_bytes()) * 8 / gaussian.numel() == pytest.approx(rate, rel=0.02)
    mse = float(((out - gaussian) ** 2).mean() / gaussian.var(correction=0))
    assert mse == pytest.approx(design.distortion, rel=0.01)


@pytest.mark.parametrize("rate", [1.0, 2.0, 3.0])
def test_heavy_tailed_data_still_codes_at_the_target_rate(rate):
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((200_000,))
    codec = make_codec("rcfed", {"rate": rate})
    packet = codec.encode(x, _info(x.numel()))
    assert int(packet.fields[1]) > GRID                      # the design rate moved up
    assert _stream_rate(packet) == pytest.approx(rate, rel=0.02)


def test_without_adaptation_heavy_tails_miss_the_rate():
    torch.manual_seed(1)
    x = torch.distributions.StudentT(3.0).sample((200_000,))
    packet = make_codec("rcfed", {"rate": 1.0, "adapt": False}).encode(x, _info(x.numel()))
    assert int(packet.fields[1]) == GRID
    assert abs(_stream_rate(packet) - 1.0) > 0.02


@pytest.fixture(scope="module")
def cnn_gradients() -> dict[str, torch.Tensor]:
    """Gradients of a small CNN on 64 sklearn digits (kurtosis ≈ 8, heavier tailed than Gaussian)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:64] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64 * 64, 10))
    torch.nn.functional.cross_entropy(model(x), torch.tensor(y[:64])).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("rate", [1.0, 2.0, 3.0])
def test_real_gradients_code_within_2_percent_of_the_target(cnn_gradients, rate):
    """Per large tensor and over all tensors of the model."""
    codec = make_codec("rcfed", {"rate": rate})
    stream_bits = numel = 0
    for name, g in cnn_gradients.items():
        packet = codec.encode(g, TensorInfo(name, tuple(g.shape)))
        stream_bits += packet.fields[2].numel() * 8
        numel += g.numel()
        if g.numel() >= 10_000:
            assert _stream_rate(packet) == pytest.approx(rate, rel=0.02), name
    assert stream_bits / numel == pytest.approx(rate, rel=0.02)


def test_affine_covariance():
    """T8: quantising a·z + b gives a·Q(z) + b, hence MSE a²·D."""
    z = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    codec = make_codec("rcfed", {"rate": 2.0})
    info = _info(z.numel())
    base = codec.decode(codec.encode(z, info), info)
    a, b = 3.5, -2.0
    shifted = codec.decode(codec.encode(a * z + b, info), info)
    assert torch.allclose(shifted, a * base + b, atol=1e-4)
    mse_base = float(((base - z) ** 2).mean())
    mse_shifted = float(((shifted - (a * z + b)) ** 2).mean())
    assert mse_shifted == pytest.approx(a * a * mse_base, rel=1e-3)


def test_bytes_round_trip_decodes_identically():
    codec = make_codec("rcfed", {"rate": 1.5})
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    info = _info(x.numel())
    packet = codec.encode(x, info)
    data = packet.to_bytes()
    assert len(data) == packet.nbytes
    assert torch.equal(codec.decode(Packet.from_bytes(data), info), codec.decode(packet, info))
    assert 1.5 < len(data) * 8 / x.numel() < 1.5 * 1.02 + 64 * 8 / x.numel()


def test_corrupted_byte_raises_packet_error():
    codec = make_codec("rcfed", {"rate": 2.0})
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    data = bytearray(codec.encode(x, _info(x.numel())).to_bytes())
    data[len(data) // 2] ^= 0x10
    with pytest.raises(PacketError):
        codec.decode(Packet.from_bytes(bytes(data)), _info(x.numel()))


def test_decode_rejects_a_design_code_outside_the_grid():
    codec = make_codec("rcfed", {"rate": 2.0})
    x = torch.randn(100, generator=torch.Generator().manual_seed(5))
    p = codec.encode(x, _info(100))
    bad = Packet(p.codec, p.numel, (p.fields[0], torch.tensor([7], dtype=torch.int16), p.fields[2]))
    with pytest.raises(PacketError, match="design code 7"):
        codec.decode(bad, _info(100))


@pytest.mark.parametrize("values", [[0.7], [1.0, -2.0], [0.0] * 50, [3.25] * 7])
def test_tiny_and_constant_tensors(values):
    codec = make_codec("rcfed", {"rate": 2.0})
    x = torch.tensor(values)
    info = _info(x.numel())
    out = codec.decode(Packet.from_bytes(codec.encode(x, info).to_bytes()), info)
    assert out.shape == (x.numel(),) and out.dtype == torch.float32
    if x.numel() == 1 or bool((x == x[0]).all()):
        assert torch.equal(out, x)                           # σ = 0: the mean is exact
    else:
        assert torch.allclose(out, x, rtol=0.3)


def test_float16_input_decodes_to_float32():
    codec = make_codec("rcfed", {"rate": 3.0})
    x = torch.randn(4096, generator=torch.Generator().manual_seed(6)).half()
    info = _info(x.numel())
    out = codec.decode(codec.encode(x, info), info)
    assert out.dtype == torch.float32
    assert float(((out - x.float()) ** 2).mean()) < 0.03


@pytest.mark.parametrize("rate", [0.5, 2.0, 4.0])
def test_compiled_cpu_quantiser_matches_the_tensor_quantiser(rate):
    """The CPU pass (counting thresholds at ≤ 16 thresholds, the grid cell above) gives exactly the
    cells and histogram of ScalarQuantizer.quantize, also on values that sit exactly on a threshold."""
    import numpy as np

    from compressors.rcfed import _LINEAR_THRESHOLDS, _design

    design = _design(rate, GRID)
    t = torch.from_numpy(design._cpu_grid[0])
    assert (t.numel() <= _LINEAR_THRESHOLDS) == (rate < 3)        # both branches are exercised
    ties = torch.cat([t, torch.nextafter(t, torch.tensor(-np.inf)), torch.nextafter(t, torch.tensor(np.inf))])
    u = torch.cat([torch.randn(100_003, generator=torch.Generator().manual_seed(8)) * 3, ties,
                   torch.tensor([-1e30, 1e30, 0.0])])
    for mu, sigma in ((0.0, 1.0), (0.25, 1.7)):
        mu_t, sigma_t = torch.tensor(mu), torch.tensor(sigma)
        out = torch.empty(u.numel(), dtype=torch.int32)
        bits = design.quantize(u, mu_t, sigma_t, out)
        expected = design.quantizer.quantize((u - mu_t).div_(sigma_t))
        assert torch.equal(out, expected)
        counts = torch.bincount(expected, minlength=design.quantizer.size).numpy()
        assert bits == pytest.approx(float(counts @ design.model.lengths), rel=1e-12)


@pytest.mark.parametrize("values", [[1.0, float("nan"), 2.0], [1e30, -1e30, 3e29]])
def test_non_finite_or_overflowing_input_is_refused_with_the_tensor_named(values):
    codec = make_codec("rcfed", {})
    with pytest.raises(ValueError, match="rcfed cannot encode tensor 'w': it holds non-finite values, or values so large"):
        codec.encode(torch.tensor(values), TensorInfo("w", (3,)))


def test_parameters_are_validated():
    with pytest.raises(CodecError, match="rate"):
        make_codec("rcfed", {"rate": 0.0})
    with pytest.raises(CodecError, match="true or false"):
        make_codec("rcfed", {"adapt": 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_unchanged_on_cuda():
    codec = make_codec("rcfed", {"rate": 2.0})
    x = torch.randn(100_000, device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    info = _info(x.numel())
    packet = codec.encode(x, info)
    out = codec.decode(packet, info)
    assert out.device == x.device
    cpu = codec.decode(Packet.from_bytes(packet.to_bytes()), info)
    assert torch.allclose(out.cpu(), cpu)
    assert _stream_rate(packet) == pytest.approx(2.0, rel=0.02)


def _train_digits(codec_name: str, params: dict, lr: float = 0.05, epochs: int = 5, workers: int = 4) -> float:
    """Four simulated workers (one process, no Ray): each encodes its gradient, the average of the
    decoded gradients drives SGD with momentum 0.9. Returns the test accuracy of MLP 64-128-10
    (fp32 reaches 0.92 with these settings). Also used by test_vqsgd."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y),
                                          test_size=0.2, random_state=0, stratify=y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    codec = make_codec(codec_name, params)
    shards = torch.arange(len(xtr)).chunk(workers)
    gen = torch.Generator().manual_seed(0)
    step = 0
    for _ in range(epochs):
        perms = [s[torch.randperm(len(s), generator=gen)] for s in shards]
        for b in range(min(len(p) for p in perms) // 32):
            total = [torch.zeros_like(p) for p in model.parameters()]
            for w in range(workers):
                batch = perms[w][b * 32:(b + 1) * 32]
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(xtr[batch]), ytr[batch]).backward()
                for acc, (name, p) in zip(total, model.named_parameters()):
                    info = TensorInfo(name, tuple(p.shape), worker=w, world=workers, step=step)
                    acc += codec.decode(codec.encode(p.grad, info), info).view_as(p)
            for p, acc in zip(model.parameters(), total):
                p.grad = acc / workers
            opt.step()
            step += 1
    with torch.no_grad():
        return float((model(xte).argmax(1) == yte).float().mean())


def test_four_workers_train_digits_at_two_bits():
    assert _train_digits("rcfed", {"rate": 2.0}) >= 0.85
