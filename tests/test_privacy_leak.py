"""The leakage experiment end to end on digits with a tiny budget, and its writers."""

from __future__ import annotations

import json

import pytest

from rayq.privacy.attacks import DLGBudget, IGBudget, Knowledge
from rayq.privacy.leak import AttackName, LeakConfig, run_leak
from rayq.privacy.report import write_all
from rayq.privacy.wire import CodecSpec


@pytest.fixture(scope="module")
def report():
    cfg = LeakConfig(codecs=(CodecSpec.of("none"), CodecSpec.of("int8", bits=2),
                             CodecSpec.of("topk", density=0.01, error_feedback="steady", warmup_rounds=2)),
                     trials=2, dlg=DLGBudget(steps=15, restarts=1), ig=IGBudget(iterations=40), seed=1)
    return run_leak(cfg)


def test_every_codec_attack_and_attacker_gets_a_row_with_a_score_per_image(report):
    cells = {(r.codec, r.attack, r.knowledge) for r in report.rows}
    lossy = ("int8(bits=2)", "topk(density=0.01)+ef:steady")
    expected = {("none", a, Knowledge.AWARE) for a in AttackName if a is not AttackName.ANALYTIC}
    expected |= {(c, a, k) for c in lossy for a in (AttackName.DLG, AttackName.IG) for k in Knowledge
                 if k is not Knowledge.NAIVE}
    assert cells == expected   # no adaptive attacker against a lossless codec
    for r in report.rows:
        assert len(r.psnr) == len(r.ssim) == 2 and r.images.shape == report.truth.shape
        assert len(r.iterations) == 2 and all(i >= 1 for i in r.iterations)


def test_uncompressed_gradients_leak_and_fewer_bits_cost_fewer_bits(report):
    dense = report.row("none", "dlg", "aware")
    assert dense.success_rate == 1.0 and dense.label_accuracy == 1.0
    assert dense.bits_per_coordinate > 32 > report.row("int8(bits=2)", "dlg", "aware").bits_per_coordinate > 2


def test_writers_produce_json_markdown_png_and_tensorboard_files(report, tmp_path):
    written = write_all(report, tmp_path / "leak")
    doc = json.loads(written.markdown.with_suffix(".json").read_text())
    assert len(doc["rows"]) == len(report.rows) and doc["config"]["task"] == "digits"
    table = [line for line in written.markdown.read_text().splitlines() if line.startswith("| ")]
    assert len(table) == len(report.rows) + 1   # the header and one line per row
    assert [p.name for p in written.png] == ["grid_dlg.png", "grid_ig.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written.png)
    assert any(p.name.startswith("events.out.tfevents") for p in written.tensorboard.iterdir())


def test_analytic_attack_needs_the_mlp_victim_and_one_sample():
    with pytest.raises(ValueError, match="victim='mlp' and batch_size=1, got victim='lenet'"):
        LeakConfig(attacks=("analytic",))


def test_an_unknown_task_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="task='cifar10' has no image data.*digits"):
        LeakConfig(task="cifar10")
