"""Leakage as a Tune objective, and the privacy search spaces (mixed precision per layer, NoPeek's alpha)."""

from __future__ import annotations

import math

import pytest

from rayq.launch.tune import ACCURACY, BITS, SCORE, SpaceError, load_space, objective_metrics
from rayq.launch.tune.objectives import leakage_objective


@pytest.mark.parametrize("name, leakage, keys", [
    ("mixed_precision", "membership_auc", {"compression.params.bits", "compression.params.mode",
                                           "compression.params.rounding", "compression.overrides"}),
    ("nopeek", "decoder_ssim", {"split.nopeek_alpha", "compression.codec", "compression.params.bits"}),
])
def test_the_privacy_spaces_load_with_a_leakage_objective(name, leakage, keys):
    space = load_space(f"tune_spaces/{name}.yaml")
    assert space.objectives()[-1] == leakage_objective(leakage)
    assert {e.key for e in space.dims()} == keys


def test_the_nopeek_space_sweeps_alpha_over_several_decades_in_split_trials():
    space = load_space("nopeek")
    alpha = next(e for e in space.dims() if e.key == "split.nopeek_alpha").dist
    assert alpha.kind == "loguniform" and math.log10(alpha.values[1] / alpha.values[0]) >= 6
    assert space.base_full["trainer"] == "split"


def test_the_mixed_precision_space_gives_the_first_and_last_layers_their_own_bits():
    space = load_space("mixed_precision")
    overrides = next(e for e in space.dims() if e.key == "compression.overrides").dist.values
    patterns = {tuple(o["pattern"] for o in choice) for choice in overrides}
    assert ("0.*", "4.*") in patterns and () in patterns


def test_leakage_is_the_named_run_metric_and_enters_the_score_only_with_its_weight():
    m = {"eval/accuracy": 0.9, "comm/bytes_up_total": 1000, "privacy/loss_auc": 0.6}
    plain = objective_metrics(m, 2, 0.02, 0.0, "membership_auc")
    assert plain["objective.leakage"] == 0.6
    weighted = objective_metrics(m, 2, 0.02, 0.0, "membership_auc", leak_weight=0.5)
    assert weighted[SCORE.key] == pytest.approx(plain[SCORE.key] - 0.3)
    assert "objective.leakage" not in objective_metrics(m, 2, 0.02, 0.0)


def test_a_trainer_that_reports_every_workers_bytes_is_counted_exactly():
    m = {"eval/accuracy": 0.9, "comm/bytes_up_total": 1000, "comm/bytes_up_all_workers_total": 1500}
    assert objective_metrics(m, 4, 0.02, 0.0)[BITS.key] == 8 * 1500
    assert objective_metrics({"comm/bytes_up_total": 1000}, 4, 0.02, 0.0)[BITS.key] == 8 * 4000
    assert math.isnan(objective_metrics({}, 4, 0.02, 0.0, "decoder_ssim")["objective.leakage"])
    assert ACCURACY.key in objective_metrics({}, 4, 0.02, 0.0)


def test_a_decoder_leakage_objective_without_the_split_trainer_is_refused(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("search:\n  optimizer:\n    lr: {loguniform: [0.01, 0.1]}\ntune:\n  leakage: decoder_ssim\n")
    with pytest.raises(SpaceError, match="trainer split only"):
        load_space(str(space))
    space.write_text("search:\n  optimizer:\n    lr: {loguniform: [0.01, 0.1]}\ntune:\n  leakage: leak\n")
    with pytest.raises(SpaceError, match="membership_auc"):
        load_space(str(space))
