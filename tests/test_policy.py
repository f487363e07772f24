"""The policy: per-layer codecs (mixed precision, Ovi et al., 2022), small tensors dense and bucketed."""

from __future__ import annotations

import math

import pytest
import torch

from compressors import TensorInfo
from compressors.error_feedback import ErrorFeedback
from compressors.policy import SMALL_BUCKET, Override, Policy

SHAPES = {"0.weight": (128, 64), "0.bias": (128,), "2.weight": (128, 128), "4.weight": (10, 128), "4.bias": (10,)}
MIXED = [Override("0.*", "int8", {"bits": 2, "mode": "affine", "block": 64}),
         Override("2.*", "int8", {"bits": 4, "block": 128}),
         Override("4.weight", "int8", {"bits": 8})]


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def test_overrides_match_by_glob_first_match_wins_and_small_tensors_are_bucketed():
    policy = Policy("qsgd", min_numel=256, overrides=MIXED)
    plan = {e.key: e for e in policy.plan(SHAPES)}
    assert plan["0.weight"].codec.bits == 2 and plan["0.weight"].codec.mode == "affine"
    assert plan["0.bias"].codec.bits == 2  # an override also claims small tensors it names
    assert plan["2.weight"].codec.bits == 4 and plan["4.weight"].codec.bits == 8
    assert plan[SMALL_BUCKET].members == ("4.bias",) and plan[SMALL_BUCKET].codec.name == "none"


@pytest.mark.parametrize("override", MIXED, ids=lambda o: o.pattern)
def test_mixed_precision_error_is_within_half_a_step_and_bits_match_the_formula(override):
    policy = Policy("none", min_numel=0, overrides=[override])
    name = next(k for k in SHAPES if k.startswith(override.pattern.rstrip("*")))
    x = _grads()[name].reshape(-1)
    codec = policy.codec_for(name)
    info = TensorInfo(name, SHAPES[name])
    packet = codec.encode(x, info)
    y = codec.decode(packet, info)
    block, bits = codec.block, codec.bits
    rows = torch.nn.functional.pad(x, (0, (-x.numel()) % block)).view(-1, block)
    if codec.mode == "symmetric":
        step = rows.abs().amax(1) / (2 ** (bits - 1) - 1)
        side = 1
    else:
        assert x.numel() % block == 0  # no padded block at these sizes
        step = (rows.amax(1) - rows.amin(1)) / (2**bits - 1)
        side = 2  # scale and minimum
    bound = step.repeat_interleave(block)[: x.numel()] / 2
    assert bool(((y - x).abs() <= bound * (1 + 1e-5) + 1e-7).all())
    payload_bits = x.numel() * bits + 32 * side * math.ceil(x.numel() / block)
    assert 0 <= 8 * len(packet.to_bytes()) - payload_bits < 8 * 64  # header + CRC + padding to a byte


def test_error_feedback_wraps_each_codec_once_and_its_state_round_trips():
    policy = Policy("int8", {"bits": 4}, error_feedback=True, min_numel=0)
    codec = policy.codec_for("x")
    assert isinstance(codec, ErrorFeedback)
    info = TensorInfo("x", (1000,))
    codec.encode(torch.randn(1000), info)
    codec.settle(info, True)
    state = policy.state_dict()
    fresh = Policy("int8", {"bits": 4}, error_feedback=True, min_numel=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.codec_for("x").residuals["x"], codec.residuals["x"])
    fresh.reset()
    assert fresh.codec_for("x").residuals == {}


def test_unknown_codec_in_an_override_fails_when_the_policy_is_built():
    from compressors import CodecError

    with pytest.raises(CodecError, match="'int9' is not a codec"):
        Policy("qsgd", overrides=[Override("0.*", "int9")])
