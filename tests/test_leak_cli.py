"""``rayq leak`` as a user types it: codec specs, a tiny attack budget, the files it writes, its errors."""

from __future__ import annotations

import json

import pytest

from rayq.launch.cli import main
from rayq.launch.leak import SWEEP, SpecError, parse_codec
from rayq.privacy import ErrorFeedbackMode


def test_a_codec_spec_sets_the_codecs_parameters_and_the_specs_options():
    spec = parse_codec("topk:density=0.05,ef=steady,warmup=2")
    assert spec.codec == "topk" and dict(spec.params) == {"density": 0.05}
    assert spec.error_feedback is ErrorFeedbackMode.STEADY and spec.warmup_rounds == 2


def test_a_mixed_spec_lists_layer_rules_in_order_and_a_default():
    spec = parse_codec("mixed:0.*=int8/bits=2/per_channel;7.*=fp16;*=int8/bits=8")
    assert [(r.pattern, r.codec, dict(r.params), r.per_channel) for r in spec.rules] == [
        ("0.*", "int8", {"bits": 2}, True), ("7.*", "fp16", {}, False)]
    assert spec.codec == "int8" and dict(spec.params) == {"bits": 8}
    assert spec.codec_for("7.weight", (10, 48), 0).name == "fp16"
    assert spec.codec_for("2.weight", (12, 12, 5, 5), 0).name == "int8"


def test_a_per_channel_default_rule_stays_a_rule():
    spec = parse_codec("mixed:0.*=fp16;*=int8/bits=2/per_channel")
    assert spec.name == "mixed(0.*:fp16,*:2b/pc)"
    assert spec.codec_for("2.weight", (12, 12, 5, 5), 0).block == 12 * 5 * 5


def test_a_random_spec_draws_from_the_listed_bit_widths():
    spec = parse_codec("random:bits=2/16,modes=affine,seed=3")
    rp = spec.random_precision
    assert rp.bits == (2, 16) and rp.modes == ("affine",) and rp.seed == 3


@pytest.mark.parametrize("text, match", [("qsdg", "qsdg"), ("int8:bits", "not key=value"),
                                         ("int8:levels=3", "levels"), ("mixed:*=int8", "at least one"),
                                         ("mixed:0.*=int8/loud", "per_channel"),
                                         ("mixed:*=int8/bits=2", "a '\\*=' rule alone is a plain spec"),
                                         ("topk:ef=maybe", "choose one of: off, first, steady"),
                                         ("random:per_channel=maybe", "per_channel='maybe' must be true or false")])
def test_a_bad_spec_is_an_error_that_names_it(text, match):
    with pytest.raises(SpecError, match=match):
        parse_codec(text)


def test_every_sweep_spec_parses_to_a_distinct_name():
    names = [parse_codec(s).name for s in SWEEP]
    assert len(set(names)) == len(names)


def test_rayq_leak_on_a_tiny_budget_prints_the_table_and_writes_every_output(tmp_path, capsys):
    out = tmp_path / "leak"
    rc = main(["leak", "--codec", "none", "--codec", "int8:bits=4", "--attack", "dlg", "--trials", "1",
               "--dlg-steps", "1", "--dlg-max-iter", "2", "--dlg-restarts", "1", "--sweep", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| int8(bits=4) |" in text and "leak trial 0 int8(bits=4) dlg/adaptive" in text
    for name in ("leak.json", "leak.md", "grid_dlg.png", "psnr_vs_bits.png", "psnr_vs_bits.md"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = json.loads((out / "leak.json").read_text())["rows"]
    assert {(r["codec"], r["knowledge"]) for r in rows} == {("none", "aware"), ("int8(bits=4)", "aware"),
                                                           ("int8(bits=4)", "adaptive")}
    bits = {r["codec"]: r["bits_per_coordinate"] for r in rows}
    assert bits["none"] > 32 and 4 < bits["int8(bits=4)"] < 5      # packet bytes, headers and scales included


def test_rayq_leak_refuses_a_bad_spec_with_exit_code_2(capsys):
    assert main(["leak", "--codec", "int8:bits=9"]) == 2
    assert "int8:bits=9" in capsys.readouterr().err
