"""The code paths codecs take on a GPU, run on CPU tensors (``compressors.staging.device_kernels``).

On the CPU several codecs use their own kernels (compiled loops, cache-sized slices, counts read by the
host); every other device runs tensor operations instead. No GPU has run them, so they are checked here
against the CPU kernels: the same result where the codec is deterministic, the same error where it draws
at random, and the whole exchange conforming on the device path of gathered frames.
"""

from __future__ import annotations

import pytest
import torch

import compressors
from compressors import TensorInfo, make_codec
from compressors.staging import device_kernels, host_kernels
from rayq.matrix import cells
from rayq.schema import ConfigError
from tests.conformance import cell_config, check, simulate

SIZES = (70_001, 300)  # one spans several of the CPU's cache-sized slices; one fits in a single one


def _gradient(numel: int, seed: int) -> torch.Tensor:
    """Heavy-tailed, like a real gradient: Gaussian values under a log-normal scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g) * torch.randn(numel, generator=g).mul(0.7).exp()


def _round_trip(name: str, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
    codec = make_codec(name)
    info = TensorInfo("w", tuple(x.shape), step=seed, seed=seed)
    packet = codec.encode(x, info)
    return codec.decode(packet, info).reshape(-1).to(torch.float32), packet.nbytes


def test_the_switch_applies_to_cpu_tensors_inside_the_block_only():
    cpu = torch.device("cpu")
    assert host_kernels(cpu)
    with device_kernels():
        assert not host_kernels(cpu)
        with device_kernels():
            assert not host_kernels(cpu)
        assert not host_kernels(cpu)
    assert host_kernels(cpu)
    assert not host_kernels(torch.device("meta"))


@pytest.mark.parametrize("name", sorted(compressors.REGISTRY))
def test_each_codec_on_the_device_path_matches_its_cpu_kernels(name):
    for numel in SIZES:
        x = _gradient(numel, 7)
        host = [_round_trip(name, x, seed) for seed in range(4)]
        with device_kernels():
            device = [_round_trip(name, x, seed) for seed in range(4)]
        if all(torch.equal(host[0][0], h) for h, _ in host[1:]):  # deterministic: the same values
            for (h, h_bytes), (d, d_bytes) in zip(host, device):
                torch.testing.assert_close(d, h, rtol=1e-5, atol=1e-6)
                assert d_bytes == h_bytes
            continue
        # random draws: another stream of uniforms may be used, so compare the error over four draws
        err_host = sum(float(((h - x) ** 2).sum()) for h, _ in host) / 4
        err_device = sum(float(((d - x) ** 2).sum()) for d, _ in device) / 4
        assert 0.8 < err_device / err_host < 1.25, f"{name}, {numel} elements: {err_device:.4g} vs {err_host:.4g}"
        bytes_host = sum(b for _, b in host) / 4
        bytes_device = sum(b for _, b in device) / 4
        assert abs(bytes_device / bytes_host - 1) < 0.05, f"{name}: {bytes_device} vs {bytes_host} bytes"


def test_every_step_exchange_conforms_with_device_kernels_and_device_frames():
    """Every codec × error feedback × strategy under every-step averaging, without faults and with a
    corrupted payload, as a GPU runs it: the codecs' device paths and the frames' device path together."""
    ran, failed = 0, []
    with device_kernels():
        for cell in cells():
            if cell.schedule != "every_step" or cell.fault not in ("none", "corrupt"):
                continue
            try:
                cfg = cell_config(cell)
            except ConfigError:
                continue
            problems = check(cfg, simulate(cfg, device_frames=True))
            ran += 1
            if problems:
                failed.append((cell, problems[:3]))
    assert not failed, "\n".join(f"{c}: {p}" for c, p in failed[:20])
    assert ran > 80
