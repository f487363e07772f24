"""Gradient-inversion attacks (T16) and the wire an eavesdropper taps.

iDLG label recovery, the exact analytic inversion of a fully-connected layer, a DLG smoke test on the
LeNet-sigmoid victim, the compressor-aware and adaptive objectives on toy cases, and the wire path's
bits, decoding, error feedback, LAQ sums and mixed-precision policies.
"""

from __future__ import annotations

import math

import pytest
import torch

from compressors import Packet, TensorInfo, make_codec
from rayq.privacy.attacks import (
    DLGBudget, Distance, GradientObjective, IGBudget, Knowledge, View, analytic_fc_inversion, dlg, idlg_labels,
    inverting_gradients,
)
from rayq.privacy.metrics import Normalization, mse
from rayq.privacy.victims import InputSpec, batch_gradient, build_victim
from rayq.privacy.wire import CodecSpec, ErrorFeedbackMode, LayerRule, RandomPrecision, capture, transmit
from rayq.tasks import load_digits_split

DIGIT = InputSpec(1, 8, 8, 10)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = load_digits_split()
    return train.x.reshape(-1, 1, 8, 8), train.y


def lenet_gradient(digits, index: int = 0, seed: int = 0):
    x, y = digits[0][index:index + 1], digits[1][index:index + 1]
    model = build_victim("lenet", DIGIT, seed)
    return model, x, y, batch_gradient(model, x, y)


# -- T16: iDLG, analytic inversion, DLG ---------------------------------------------------------

@pytest.mark.parametrize("index", range(8))
def test_idlg_label_equals_the_true_label(digits, index):
    _, _, y, grads = lenet_gradient(digits, index, seed=index)
    assert idlg_labels(grads["7.weight"]).item() == y.item()


def test_analytic_fc_inversion_recovers_the_input_exactly(digits):
    x, y = digits[0][5:6], digits[1][5:6]
    model = build_victim("mlp", DIGIT, seed=3)
    grads = batch_gradient(model, x, y)
    recovered = analytic_fc_inversion(grads["1.weight"], grads["1.bias"])
    assert (recovered.reshape(x.shape) - x).abs().max().item() < 1e-5


def test_dlg_recovers_a_digit_to_mse_below_1e_3(digits):
    model, x, y, grads = lenet_gradient(digits, index=2, seed=7)
    result = dlg(model, GradientObjective.exact(grads), x.shape, 10, DLGBudget(steps=20, restarts=3), seed=7)
    assert mse(Normalization().to_pixels(result.reconstruction), x).item() < 1e-3
    assert result.labels.tolist() == y.tolist()
    assert result.restarts == 3 and result.iterations >= 3 and len(result.trial_losses) == 3
    assert result.loss == min(result.trial_losses)


def test_inverting_gradients_keeps_the_reconstruction_in_the_box_and_reports_its_budget(digits):
    model, x, y, grads = lenet_gradient(digits, index=3, seed=1)
    result = inverting_gradients(model, GradientObjective.exact(grads, Distance.COSINE), x.shape, y,
                                 IGBudget(iterations=40, restarts=2), box=(0.0, 1.0), seed=0)
    assert 0.0 <= result.reconstruction.min() and result.reconstruction.max() <= 1.0
    assert result.iterations == 80 and result.restarts == 2 and result.loss == min(result.trial_losses)


# -- compressor-aware and adaptive objectives --------------------------------------------------

def test_support_objective_sees_only_the_transmitted_coordinates(digits):
    model, _, _, grads = lenet_gradient(digits)
    cap = capture(grads, CodecSpec.of("topk", density=0.05))
    aware = GradientObjective.from_capture(cap, Distance.L2, Knowledge.AWARE)
    naive = GradientObjective.from_capture(cap, Distance.L2, Knowledge.NAIVE)
    true = list(grads.values())
    assert set(aware.views) == {View.SUPPORT}
    assert aware(true).item() == 0.0 and naive(true).item() > 0.0
    off_support = [g + 5.0 * (~o.support) for g, o in zip(true, cap.params)]
    assert aware(off_support).item() == 0.0


def test_adaptive_objective_is_zero_at_the_true_gradient_where_the_dequantised_one_is_not(digits):
    _, _, _, grads = lenet_gradient(digits)
    cap = capture(grads, CodecSpec.of("int8", bits=4), step=3, seed=11)
    true = list(grads.values())
    adaptive = GradientObjective.from_capture(cap, Distance.L2, Knowledge.ADAPTIVE)
    assert adaptive(true).item() == 0.0
    assert GradientObjective.from_capture(cap, Distance.L2, Knowledge.AWARE)(true).item() > 0.0


def test_adaptive_objective_passes_the_gradient_straight_through_the_quantiser(digits):
    _, _, _, grads = lenet_gradient(digits)
    cap = capture(grads, CodecSpec.of("int8", bits=2))
    adaptive = GradientObjective.from_capture(cap, Distance.L2, Knowledge.ADAPTIVE)
    candidate = [(g + 0.3 * g.abs().mean() * torch.randn(g.shape, generator=torch.Generator().manual_seed(i)))
                 .requires_grad_(True) for i, g in enumerate(grads.values())]
    adaptive(candidate).backward()
    for c, obs in zip(candidate, cap.params):
        expected = 2 * (obs.roundtrip(c.detach()) - obs.decoded)   # d‖Q(c) − ĝ‖²/dc with dQ/dc := I
        assert torch.allclose(c.grad, expected, atol=1e-6)


def test_projection_objective_is_zero_at_the_true_gradient_for_powersgd(digits):
    _, _, _, grads = lenet_gradient(digits)
    cap = capture(grads, CodecSpec.of("powersgd", rank=2))
    aware = GradientObjective.from_capture(cap, Distance.L2, Knowledge.AWARE)
    assert View.PROJECTION in aware.views
    assert aware(list(grads.values())).item() < 1e-10
    assert GradientObjective.from_capture(cap, Distance.L2, Knowledge.NAIVE)(list(grads.values())).item() > 1e-6


def test_sign_surrogate_prefers_the_true_gradient_to_a_random_one(digits):
    _, _, _, grads = lenet_gradient(digits)
    aware = GradientObjective.from_capture(capture(grads, CodecSpec.of("sign")), Distance.COSINE, Knowledge.AWARE)
    assert set(aware.views) == {View.SIGN}
    random = [torch.randn(g.shape, generator=torch.Generator().manual_seed(1)) for g in grads.values()]
    assert aware(list(grads.values())).item() < 0.1 < 0.8 < aware(random).item()


# -- the wire -----------------------------------------------------------------------------------

@pytest.mark.parametrize("codec,params", [("none", {}), ("int8", {"bits": 4}), ("topk", {"density": 0.01}),
                                          ("sign", {}), ("powersgd", {}), ("rcfed", {}), ("qsgd", {})])
def test_wire_bits_are_eight_times_the_packet_bytes(digits, codec, params):
    _, _, _, grads = lenet_gradient(digits)
    cap = capture(grads, CodecSpec.of(codec, **params), step=4, worker=2, world=4, seed=9)
    c = make_codec(codec, params)
    expected = sum(8 * len(c.encode(g.reshape(-1), TensorInfo(n, tuple(g.shape), worker=2, world=4, step=4, seed=9))
                           .to_bytes()) for n, g in grads.items())
    assert cap.bits == expected
    assert cap.bits_per_coordinate == pytest.approx(expected / sum(g.numel() for g in grads.values()))


def test_transmit_returns_what_a_receiver_decodes_from_the_bytes():
    x = torch.randn(300, generator=torch.Generator().manual_seed(0))
    info = TensorInfo("w", (300,), step=2, seed=5)
    codec = make_codec("qsgd", {"levels": 3})
    decoded, packet, bits = transmit(codec, x, info)
    wire = codec.encode(x, info).to_bytes()
    assert bits == 8 * len(wire) and torch.equal(decoded, codec.decode(Packet.from_bytes(wire), info))


def test_first_error_feedback_message_carries_no_residual(digits):
    _, _, _, grads = lenet_gradient(digits)
    history = [lenet_gradient(digits, i)[3] for i in (1, 2, 3)]
    plain = capture(grads, CodecSpec.of("topk", density=0.01), history=history)
    first = capture(grads, CodecSpec.of("topk", density=0.01, error_feedback="first"), history=history)
    assert all(torch.equal(a.decoded, b.decoded) for a, b in zip(plain.params, first.params))


def test_steady_state_error_feedback_sends_the_compressed_gradient_plus_residual(digits):
    _, _, _, grads = lenet_gradient(digits)
    history = [lenet_gradient(digits, i)[3] for i in (1, 2, 3)]
    spec = CodecSpec.of("topk", density=0.01, error_feedback="steady", warmup_rounds=3)
    cap = capture(grads, spec, step=10, seed=1, history=history)
    codec = make_codec("topk", {"density": 0.01})
    for name, g in grads.items():   # u = g + e ; send C(u) ; e ← u − D(C(u)), rounds 7, 8, 9, then 10
        e = torch.zeros(g.numel())
        for step, earlier in zip((7, 8, 9), history):
            u = earlier[name].reshape(-1) + e
            e = u - codec.decode(codec.encode(u, TensorInfo(name, tuple(g.shape), step=step, seed=1)),
                                 TensorInfo(name, tuple(g.shape), step=step, seed=1))
        u = g.reshape(-1) + e
        info = TensorInfo(name, tuple(g.shape), step=10, seed=1)
        expected = codec.decode(codec.encode(u, info), info)
        assert torch.equal(cap.params[[p.name for p in cap.params].index(name)].decoded.reshape(-1), expected)
    assert cap.error_feedback is ErrorFeedbackMode.STEADY and cap.residual_norm > 0


def test_laq_observer_sums_innovations_to_within_tau_r_of_the_gradient(digits):
    _, _, _, grads = lenet_gradient(digits)
    history = [lenet_gradient(digits, i)[3] for i in (1, 2)]
    cap = capture(grads, CodecSpec.of("laq", bits=3), history=history)
    tau = 1 / (2**3 - 1)
    for obs in cap.params:
        radius = (grads[obs.name] - obs.reference).abs().max()
        assert (obs.decoded - grads[obs.name]).abs().max() <= tau * radius + 1e-6


def test_per_channel_rule_sends_one_scale_per_output_channel(digits):
    _, _, _, grads = lenet_gradient(digits)
    spec = CodecSpec(codec="none", rules=(LayerRule("2.weight", "int8", (("bits", 4),), per_channel=True),))
    obs = next(p for p in capture(grads, spec).params if p.name == "2.weight")
    assert obs.codec.block == 12 * 25
    header = obs.bits - 8 * (12 * 4 + math.ceil(obs.numel * 4 / 8))   # 12 fp32 scales, 4-bit values
    assert 0 < header <= 8 * 40


def test_random_precision_is_reproducible_and_changes_between_rounds():
    policy = RandomPrecision(bits=(2, 4, 8, 16, 32), seed=3)
    names = [f"layer{i}.weight" for i in range(16)]
    round0 = [policy.draw(n, 0) for n in names]
    assert round0 == [policy.draw(n, 0) for n in names]
    assert round0 != [policy.draw(n, 1) for n in names]
    assert {c for c, _ in round0} <= {"int8", "fp16", "none"}


def test_codec_spec_refuses_an_unknown_codec_by_name():
    with pytest.raises(ValueError, match="'topq' is not a codec"):
        CodecSpec.of("topq")
