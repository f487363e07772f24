"""`rayq bench qadagrad | fewbit | blaq` run on tiny budgets with sane figures, and the three Tune spaces of
the training-side methods validate against the run config (speed is not asserted anywhere)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from rayq.launch.bench_methods import (
    Spread,
    activation_memory,
    mean_curve,
    memory_markdown,
)
from rayq.launch.cli import main
from rayq.launch.tune import SpaceError, load_space

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- figures


def test_spread_is_the_mean_and_sample_standard_deviation_over_seeds():
    s = Spread.of([0.90, 0.92, 0.94])
    assert s.mean == pytest.approx(0.92) and s.std == pytest.approx(0.02) and (s.lo, s.hi, s.n) == (0.90, 0.94, 3)
    assert s.fmt() == "0.920 ± 0.020"
    assert Spread.of([0.5]).std == 0.0 and Spread.of([]).fmt() == "–"


def test_mean_curve_averages_seeds_at_the_steps_they_share():
    assert mean_curve([[(10, 1.0), (20, 0.5)], [(10, 3.0), (20, 0.7), (30, 0.1)]]) == [
        (10, 2.0, 1.0, 3.0), (20, pytest.approx(0.6), 0.5, 0.7)]


def test_fewbit_gelus_keep_b_of_32_bits_and_the_model_saves_what_the_gelus_save():
    rows = activation_memory([1, 2, 4], [64], ["cpu"])
    exact = next(r for r in rows if r.bits is None)
    assert exact.activation_saved_bytes == 2 * 64 * 256 * 4  # two GELUs keep their fp32 input (64 × 256)
    for r in rows:
        if r.bits is not None:
            assert r.activation_saved_bytes == exact.activation_saved_bytes * r.bits // 32  # packed codes
            assert exact.model_saved_bytes - r.model_saved_bytes == exact.activation_saved_bytes - r.activation_saved_bytes
    assert "| cpu | 64 | 1-bit |" in memory_markdown(rows) and "96.9%" in memory_markdown(rows)


# ------------------------------------------------------------------------------------------- tune spaces

SPACES = {"qadagrad": {"optimizer.name", "optimizer.lr", "optimizer.l1", "compression.codec",
                       "compression.params.kappa"},
          "fewbit": {"model.fewbit_bits"},
          "blaq": {"optimizer.beta", "optimizer.projection", "optimizer.lr"}}


@pytest.mark.parametrize("name", list(SPACES))
def test_method_space_loads_validates_and_searches_its_knobs(name):
    space = load_space(REPO / "tune_spaces" / f"{name}.yaml")
    assert space.trial_count() >= 1
    assert SPACES[name] <= {".".join(e.path) for e in space.dims()}


def test_a_method_space_with_a_knob_its_optimizer_lacks_is_refused(tmp_path):
    data = yaml.safe_load((REPO / "tune_spaces" / "blaq.yaml").read_text())
    data["base"]["optimizer"]["name"] = "laq_weights"  # β is BLAQ's; LAQ-weights has none
    path = tmp_path / "blaq.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpaceError, match="optimizer.beta.*laq_weights"):
        load_space(path)


# ------------------------------------------------------------------------------------------- the commands on Ray

TINY = ["--workers", "2", "--cpus-per-worker", "0.5", "--seeds", "2"]
ARGV = {
    "qadagrad": ["--tasks", "sparse-logistic", "--optimizers", "qrda_adagrad", "--max-steps", "8", "--report-every", "4"],
    "fewbit": ["--bits", "2", "--batches", "16", "--max-steps", "6", "--report-every", "2", "--cpu-only"],
    "blaq": ["--weights", "binary", "--steps", "3", "--eval-every", "1"],
}


@pytest.fixture(scope="module")
def bench_out(ray_session, tmp_path_factory):
    """Each command's tiny plan, as `rayq bench <name>` parses and plans it, trained in ONE worker group (one Ray
    Train start-up instead of three: that start-up is most of the time) and reported by the command's own report."""
    from rayq.launch.bench_methods import METHODS, train_arms
    from rayq.launch.cli import build_parser

    root = tmp_path_factory.mktemp("bench_methods")
    plans = {}
    for name, argv in ARGV.items():
        argv = ["bench", name, *TINY, *argv, "--out", str(root / name)]
        args = build_parser().parse_args(argv)
        args.argv = argv
        plans[name] = (args, METHODS[name][0](args))
    results = iter(train_arms([arm for _, arms in plans.values() for arm in arms], [0, 1], root / "runs"))
    for name, (args, arms) in plans.items():
        (root / name).mkdir()
        METHODS[name][1](args, [next(results) for _ in arms], root / name)
    return root


def _results(out: Path, stem: str) -> dict:
    assert (out / f"{stem}.png").stat().st_size > 10_000 and (out / f"{stem}.md").read_text().startswith("|")
    data = json.loads((out / f"{stem}.json").read_text())
    assert data["command"].startswith(f"rayq bench {stem}") and data["seeds"] == [0, 1]
    for arm in data["results"]:
        assert [r["seed"] for r in arm["runs"]] == [0, 1] and not any("error" in r for r in arm["runs"])
        assert arm["stats"]["eval/accuracy"]["n"] == 2 and 0 <= arm["stats"]["eval/accuracy"]["mean"] <= 1
    return {arm["name"]: arm for arm in data["results"]}


def test_bench_commands_refuse_what_they_cannot_run_before_ray_starts(tmp_path, capsys):
    assert main(["bench", "qadagrad", "--tasks", "mnist", "--out", str(tmp_path)]) == 2
    assert main(["bench", "blaq", "--weights", "quaternary", "--out", str(tmp_path)]) == 2
    assert main(["bench", "fewbit", "--set", "optimizer.l1=0.1", "--out", str(tmp_path)]) == 2  # an option of QCMD/QRDA
    out = capsys.readouterr().out
    assert "task(s) ['mnist'] have no settings here; choose from: sparse-logistic, digits" in out
    assert "weight set(s) ['quaternary'] are unknown" in out and "optimizer.l1" in out


@pytest.mark.ray
def test_bench_qadagrad_compares_quantisers_on_sparsity_and_bits(bench_out):
    arms = _results(bench_out / "qadagrad", "qadagrad")
    stats = {c: arms[f"sparse-logistic-qrda-{c}"]["stats"] for c in ("threshold", "terngrad", "none")}
    bits = {c: s["comm/bits_per_element"]["mean"] for c, s in stats.items()}
    assert bits["threshold"] < bits["none"] and 2 <= bits["terngrad"] < 8 and 32 <= bits["none"] < 34
    assert stats["none"]["distortion"]["mean"] == 0 < stats["threshold"]["distortion"]["mean"] < 1
    for s in stats.values():
        assert 0 < s["model/sparsity"]["mean"] <= 1  # RDA: exact zeros wherever |ū| ≤ λ
        assert s["step"]["mean"] == 8 and s["mbit_uploaded"]["mean"] > 0


@pytest.mark.ray
def test_bench_fewbit_measures_saved_bytes_and_reads_loss_curves_back(bench_out):
    arms = _results(bench_out / "fewbit", "fewbit")
    data = json.loads((bench_out / "fewbit" / "fewbit.json").read_text())
    assert data["cuda"].startswith("not measured") and {m["bits"] for m in data["memory"]} == {None, 2}
    for name in ("gelu-exact", "gelu-2bit"):
        curve = arms[name]["loss_curve"]
        assert [p[0] for p in curve] == [2, 4, 6] and all(lo <= mean <= hi for _, mean, lo, hi in curve)
        assert math.isfinite(arms[name]["stats"]["train/loss"]["mean"])
    # the same seeds and data: 2-bit GELU derivatives move the loss only a little in six steps
    assert arms["gelu-2bit"]["stats"]["train/loss"]["mean"] == pytest.approx(
        arms["gelu-exact"]["stats"]["train/loss"]["mean"], rel=0.05)


@pytest.mark.ray
def test_bench_blaq_counts_two_gradient_evaluations_per_step(bench_out):
    arms = _results(bench_out / "blaq", "blaq")
    evals = {n: a["stats"]["optim/gradient_evaluations"]["mean"] for n, a in arms.items()}
    assert evals == {"blaq-binary": 6, "laq-binary": 3, "laq-binary-2x": 6}
    assert [p[0] for p in arms["laq-binary-2x"]["accuracy_curve"]] == [1, 2, 3, 4, 5, 6]
    # the same seed and data: LAQ-weights' 3-step run is the first half of its 6-step run
    assert arms["laq-binary"]["accuracy_curve"] == arms["laq-binary-2x"]["accuracy_curve"][:3]
    for arm in arms.values():
        assert 0 <= arm["stats"]["optim/zigzag_negative_fraction"]["mean"] <= 1
    assert "| equal gradient evaluations | laq_weights | 6 | 6 |" in (bench_out / "blaq" / "blaq.md").read_text()
