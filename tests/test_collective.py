"""CompressedGroup on real gloo process groups: exact means, real bytes, one plan on every worker."""

from __future__ import annotations

import pytest
import torch

from compressors import TensorInfo, make_codec
from compressors.policy import SMALL_BUCKET, Policy
from rayq.collective import CompressedGroup
from rayq.transport import TorchTransport
from tests.distributed import run_workers

SHAPES = {"fc1.weight": (128, 64), "fc1.bias": (128,), "fc2.weight": (10, 128), "fc2.bias": (10,)}


def _grads(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _average(rank: int, world: int, codec: str, min_numel: int, steps: int) -> dict:
    group = CompressedGroup(Policy(codec, min_numel=min_numel), TorchTransport(), seed=7)
    out = {}
    for step in range(steps):
        avg, ledger = group.allreduce_mean(_grads(rank), step, measure=True)
        out[step] = {"avg": avg, "bytes_up": ledger.bytes_up, "packet_bytes": ledger.packet_bytes,
                     "bytes_down": ledger.bytes_down, "elements": ledger.elements, "rounds": ledger.rounds,
                     "distortion": ledger.distortion}
    return out


def _true_mean(world: int) -> dict[str, torch.Tensor]:
    grads = [_grads(r) for r in range(world)]
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in SHAPES}


def test_lossless_linear_and_gather_paths_give_the_exact_mean():
    world = 4
    mean = _true_mean(world)
    for codec in ("none",):
        results = run_workers(world, _average, codec, 0, 1)
        for r in results:
            for k in SHAPES:
                torch.testing.assert_close(r[0]["avg"][k], mean[k], rtol=0, atol=1e-6)
        assert results[0][0]["distortion"] == 0.0


def test_gather_codec_result_is_the_mean_of_every_workers_decoded_packet_and_identical_everywhere():
    world = 3
    results = run_workers(world, _average, "qsgd", 0, 2)
    codec = make_codec("qsgd")
    for step in range(2):
        for k, shape in SHAPES.items():
            decoded = []
            for w in range(world):
                info = TensorInfo(k, shape, worker=w, world=world, step=step, seed=7)
                decoded.append(codec.decode(codec.encode(_grads(w)[k].reshape(-1), info), info))
            expected = torch.stack(decoded).mean(0).view(shape)
            for r in results:
                torch.testing.assert_close(r[step]["avg"][k], expected, rtol=0, atol=1e-6)


def test_ledger_bytes_are_the_serialized_packet_lengths():
    world = 2
    results = run_workers(world, _average, "qsgd", 0, 1)
    codec = make_codec("qsgd")
    for w, r in enumerate(results):
        lengths = []
        for k, shape in SHAPES.items():
            info = TensorInfo(k, shape, worker=w, world=world, step=0, seed=7)
            lengths.append(len(codec.encode(_grads(w)[k].reshape(-1), info).to_bytes()))
        assert r[0]["packet_bytes"] == lengths
        assert r[0]["bytes_up"] == sum(lengths)
        assert r[0]["bytes_down"] == results[1 - w][0]["bytes_up"]
        assert r[0]["elements"] == sum(t.numel() for t in _grads(0).values())


def test_small_tensors_travel_dense_in_one_bucket():
    policy = Policy("qsgd", min_numel=256)
    plan = policy.plan(SHAPES)
    assert [e.key for e in plan] == ["fc1.weight", "fc2.weight", SMALL_BUCKET]
    assert plan[-1].members == ("fc1.bias", "fc2.bias") and plan[-1].codec.name == "none"
    world = 2
    mean = _true_mean(world)
    results = run_workers(world, _average, "qsgd", 256, 1)
    for k in ("fc1.bias", "fc2.bias"):  # the dense bucket is exact
        torch.testing.assert_close(results[0][0]["avg"][k], mean[k], rtol=0, atol=1e-6)


def test_fp16_mean_is_within_half_precision_error():
    world = 2
    mean = _true_mean(world)
    results = run_workers(world, _average, "fp16", 0, 1)
    for k in SHAPES:
        err = (results[0][0]["avg"][k] - mean[k]).abs().max()
        assert err < 2e-3
        assert torch.equal(results[0][0]["avg"][k], results[1][0]["avg"][k])


def _float64_sum(transport):
    g = torch.Generator().manual_seed(transport.rank)
    x = {"w": torch.randn(500, dtype=torch.float64, generator=g) * 1e3, "b": torch.randn(7, dtype=torch.float64, generator=g)}
    group = CompressedGroup(Policy("none", min_numel=64), transport)
    total, _ = group.allreduce_sum(x, 0)
    mean, _ = group.allreduce_mean(x, 1)
    return x, total, mean


@pytest.mark.parametrize("strategy_world", [3])
def test_lossless_means_bit_exact_in_the_tensors_own_dtype(strategy_world):
    from rayq.transport import run_local

    results = run_local(strategy_world, _float64_sum)
    for k in ("w", "b"):
        exact = results[0][0][k].clone()
        for x, _, _ in results[1:]:
            exact = exact + x[k]  # the same order as the transport's sum
        for _, total, mean in results:
            assert total[k].dtype == torch.float64
            assert torch.equal(total[k], exact), k
            assert torch.equal(mean[k], exact / strategy_world), k
