"""`rayq tune`: search-space grammar and validation (no Ray), and real sweeps on the session's Ray."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml

from rayq.launch.tune import (ACCURACY, BITS, SIM_TIME, TUNE_BASE, SpaceError, actor_bundles, load_space,
                              objective_metrics, run_sweep)

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))


def write_space(tmp_path: Path, data: dict, name: str = "space") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("space", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_spaces_validate(space):
    s = load_space(space)
    assert s.dims() and s.trial_count() >= 1
    keys = [o.key for o in s.objectives()]
    assert keys[:3] == [ACCURACY.key, BITS.key, SIM_TIME.key]
    assert keys[3:] == ([] if s.settings.leakage == "none" else ["objective.leakage"])


def test_shipped_spaces_are_the_ones_the_readme_names():
    import re

    named = set(re.findall(r"^\| `(\w+)\.yaml` \|", (REPO / "tune_spaces" / "README.md").read_text(), re.M))
    assert {p.stem for p in SPACES} == named


BAD = {
    "unknown key": ({"compression": {"levle": {"choice": [1, 2]}}},
                    "search.compression.levle: unknown config key 'compression.levle'; allowed keys in compression: codec"),
    "unknown top-level key": ({"optimiser": {"lr": 0.1}}, "search.optimiser: unknown config key 'optimiser'"),
    "bad distribution name": ({"compression": {"codec": {"choise": ["qsgd"]}}},
                              "search.compression.codec: {choise: ...} is not a distribution; choose one of: grid, "
                              "choice, uniform, loguniform, randint"),
    "low > high": ({"optimizer": {"lr": {"loguniform": [0.1, 0.001]}}},
                   "search.optimizer.lr.loguniform: low=0.1 > high=0.001; expected low <= high"),
    "randint low > high": ({"sync": {"period": {"randint": [8, 2]}}}, "search.sync.period.randint: low=8 > high=2"),
    "loguniform from zero": ({"optimizer": {"lr": {"loguniform": [0, 0.1]}}}, "loguniform needs 0 < low"),
    "choice over an invalid codec name": (
        {"compression": {"codec": {"choice": ["qsgd", "qsdg"]}}},
        "search.compression.codec: choice value 'qsdg' gives an invalid run config: compression.codec='qsdg' is not "
        "a codec; choose one of: none"),
    "codec parameter of another codec": (
        {"compression": [{"codec": {"choice": ["qsgd", "topk"]}},
                         {"when": {"codec": "topk"}, "params": {"levels": {"choice": [3]}}}]},
        "search.compression[1].params.levels: choice value 3 (when compression.codec=topk) gives an invalid run "
        "config: compression.params.levels is not a parameter of codec 'topk'"),
    "float range for an integer key": ({"sync": {"period": {"uniform": [1, 8]}}},
                                       "search.sync.period: bound 1.0 gives an invalid run config"),
    "list without a distribution": ({"workers": [1, 2]}, "search.workers: a list is not a value of workers"),
    "distribution on a section": ({"optimizer": {"choice": [{"name": "sgd"}]}},
                                  "search.optimizer: optimizer is a section, not a value"),
    "condition on an unknown key": ({"compression": {"params": {"when": {"codc": "topk"}, "density": 0.1}}},
                                    "search.compression.params.when.codc: 'codc' is not a config key"),
    "block that never applies": ({"compression": {"params": {"when": {"codec": "topk"}, "density": 0.1}}},
                                 "search.compression.params.density: never applies: it needs compression.codec=topk"),
    "key set twice": ({"compression": [{"codec": {"choice": ["qsgd", "topk"]}}, {"codec": "qsgd"}]},
                      "compression.codec is set twice, at search.compression[0].codec and search.compression[1].codec"),
    "grid under a random condition": (
        {"compression": [{"codec": {"choice": ["qsgd", "topk"]}},
                         {"when": {"codec": "qsgd"}, "params": {"levels": {"grid": [3, 7]}}}]},
        "a grid under a condition on compression.codec=qsgd cannot be expanded"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spaces_name_the_key_path_before_ray_starts(tmp_path, case):
    search, message = BAD[case]
    with pytest.raises(SpaceError) as err:
        load_space(write_space(tmp_path, {"search": search}))
    assert str(err.value).startswith("space.yaml: ")
    assert message in str(err.value)


def test_bad_sweep_settings_and_top_level_keys(tmp_path):
    with pytest.raises(SpaceError, match=r"tune.mode='pareto' is invalid; choose one of: asha, multi"):
        load_space(write_space(tmp_path, {"search": {"seed": {"grid": [0, 1]}}, "tune": {"mode": "pareto"}}))
    with pytest.raises(SpaceError, match=r"unknown top-level key 'serch'; allowed: description, base, search, tune"):
        load_space(write_space(tmp_path, {"serch": {}}))
    with pytest.raises(SpaceError, match=r"the trials' base config .* is invalid: workers=0"):
        load_space(write_space(tmp_path, {"base": {"workers": 0}, "search": {"seed": {"grid": [0, 1]}}}))


def test_base_layers_defaults_then_space_then_file_then_sets(tmp_path):
    base_file = tmp_path / "base.yaml"
    base_file.write_text("max_steps: 80\nreport_every: 10\n")
    space = write_space(tmp_path, {"base": {"max_steps": 60, "eval_every": 30, "report_every": 30},
                                   "search": {"seed": {"grid": [0, 1]}}})
    s = load_space(space, base_file, ["report_every=5"])
    assert s.base_full["workers"] == TUNE_BASE["workers"]      # tune default
    assert s.base_full["eval_every"] == 30                     # space base over the default
    assert s.base_full["max_steps"] == 80                      # -c file over the space base
    assert s.base_full["report_every"] == 5                    # --set over everything


def test_a_conditional_block_applies_only_with_its_codec(tmp_path):
    s = load_space(write_space(tmp_path, {"search": {"compression": [
        {"codec": {"choice": ["qsgd", "topk"]}},
        {"when": {"codec": "qsgd"}, "params": {"levels": {"choice": [3, 7]}}},
        {"when": {"codec": "topk"}, "error_feedback": True, "params": {"density": {"loguniform": [0.001, 0.1]}}},
    ]}}))
    names = {e.key: e.name for e in s.dims()}
    raw = {names["compression.codec"]: "topk", names["compression.params.levels"]: 7,
           names["compression.params.density"]: 0.02}
    cfg, params = s.config_from(raw)
    assert cfg.compression.codec == "topk" and cfg.compression.error_feedback
    assert cfg.compression.params == {"density": 0.02}
    assert params == {"codec": "topk", "density": 0.02}
    cfg, params = s.config_from({**raw, names["compression.codec"]: "qsgd"})
    assert cfg.compression.params == {"levels": 7} and not cfg.compression.error_feedback
    assert params == {"codec": "qsgd", "levels": 7}


def test_a_changed_codec_drops_the_base_codec_parameters(tmp_path):
    s = load_space(write_space(tmp_path, {"base": {"compression": {"codec": "qsgd", "params": {"levels": 3}}},
                                          "search": {"compression": {"codec": {"choice": ["qsgd", "fp16"]}}}}))
    (codec,) = s.dims()
    assert s.config_from({codec.name: "fp16"})[0].compression.params == {}
    assert s.config_from({codec.name: "qsgd"})[0].compression.params == {"levels": 3}


def test_conditional_grids_expand_only_where_they_apply(tmp_path):
    s = load_space(write_space(tmp_path, {"search": {"compression": [
        {"codec": {"grid": ["qsgd", "topk", "fp16"]}},
        {"when": {"codec": "qsgd"}, "params": {"levels": {"grid": [3, 7]}}},
        {"when": {"codec": "topk"}, "params": {"density": {"grid": [0.01, 0.1]}}},
    ]}, "tune": {"samples": 2}}))
    variants = s.grid_variants()
    assert len(variants) == 5                                  # qsgd×2 + topk×2 + fp16
    assert s.trial_count() == 10                               # each sample repeats the grid (Tune's num_samples)
    configs = [s.config_from({"grid": i})[0].compression for i in range(5)]
    assert sorted((c.codec, tuple(c.params.values())) for c in configs) == [
        ("fp16", ()), ("qsgd", (3,)), ("qsgd", (7,)), ("topk", (0.01,)), ("topk", (0.1,))]


def test_optuna_define_by_run_suggests_only_the_values_in_force(tmp_path):
    import optuna

    s = load_space(write_space(tmp_path, {"search": {"compression": [
        {"codec": {"choice": ["qsgd", "topk"]}},
        {"when": {"codec": "qsgd"}, "params": {"levels": {"choice": [3, 7]}}},
        {"when": {"codec": "topk"}, "params": {"density": {"loguniform": [0.001, 0.1]}}},
    ], "optimizer": {"lr": {"loguniform": ["1e-3", 0.1]}}}, "tune": {"mode": "multi"}}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        s.define_by_run(trial)
        codec = trial.params["compression.codec"]
        inactive = "levels" if codec == "topk" else "density"
        assert not any(inactive in k for k in trial.params), trial.params
        cfg, _ = s.config_from(trial.params)
        assert cfg.compression.codec == codec and 1e-3 <= cfg.optimizer.lr <= 0.1
        seen.add(codec)
    assert seen == {"qsgd", "topk"}


def test_objectives_count_every_workers_bits_and_score_trades_accuracy_for_bits():
    m = objective_metrics({"eval/accuracy": 0.9, "comm/bytes_up_total": 1250, "sim/time_s": 4.0}, workers=2,
                          bits_weight=0.02, time_weight=0.1)
    assert m[BITS.key] == 8 * 1250 * 2
    assert m["objective.score"] == pytest.approx(0.9 - 0.02 * math.log10(20000) - 0.1 * math.log10(4.0))
    assert math.isnan(objective_metrics({}, 2, 0.02, 0.0)[ACCURACY.key])


def test_volunteer_trials_reserve_their_actors_in_the_trial_placement_group():
    s = load_space(REPO / "tune_spaces" / "volunteer.yaml")
    (codec,) = [e for e in s.dims() if e.key == "compression.codec"]
    raw = {e.name: e.dist.candidates()[0] for e in s.dims()}
    cfg, _ = s.config_from(raw)
    assert actor_bundles(cfg) == [{"CPU": 0.25}, {"CPU": 0.25}]
    from rayq.launch.tune import trial_resources

    pgf = trial_resources(raw, s)
    assert pgf.bundles == [{"CPU": 0.01}, {"CPU": 0.25}, {"CPU": 0.25}]
    sync = load_space(REPO / "tune_spaces" / "rate_thresholds.yaml")
    raw = {e.name: e.dist.candidates()[0] for e in sync.dims()}
    assert trial_resources(raw, sync).bundles == [{"CPU": 0.01}]   # Ray Train places its own workers


# ------------------------------------------------------------------------------------- sweeps


def _cpus_back(ray, total: float, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= total - 1e-6 or time.monotonic() > deadline:
            return free
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_weak_trials_then_a_second_sweep_runs_and_nothing_leaks(ray_session, tmp_path):
    ray = ray_session
    total = ray.cluster_resources()["CPU"]
    # One good learning rate first, then one that cannot learn, one trial at a time: ASHA (first rung at step 20,
    # keep the top half) must stop the weak one long before its end. Train's reports reach Tune through a
    # short pipeline, so a stopped trial may log a report or two more before it is gone: hence 120 steps.
    space = load_space(write_space(tmp_path, {
        "base": {"max_steps": 120, "report_every": 10, "eval_every": 10, "compression": {"codec": "fp16"}},
        "search": {"optimizer": {"lr": {"grid": [0.1, 1.0e-5]}}},
        "tune": {"mode": "asha", "samples": 1, "max_concurrent": 1, "grace_period": 20},
    }, "asha"))
    result = run_sweep(space, tmp_path / "sweeps", name="asha")
    status = {t.number: t.status for t in result.trials}
    assert status == {0: "done", 1: "stopped"}, [(t.number, t.status, t.step) for t in result.trials]
    assert result.trials[0].step == 120 and result.trials[1].step < 120
    assert result.front == [0]
    assert (result.sweep_dir / "pareto.png").is_file() and "accuracy" in result.table
    # Every trial's TensorBoard (rayq's own scalars) lives under the sweep, with hparams — the stopped one too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for t in result.trials:
        acc = EventAccumulator(str(t.run_dir / "tensorboard"))
        acc.Reload()
        assert "eval/accuracy" in acc.Tags()["scalars"]
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert _cpus_back(ray, total) == pytest.approx(total)

    second = load_space(write_space(tmp_path, {
        "base": {"max_steps": 40, "report_every": 20, "eval_every": 20},
        "search": {"compression": {"codec": {"grid": ["fp16", "qsgd"]}}},
        "tune": {"mode": "asha", "samples": 1, "max_concurrent": 2},
    }, "second"))
    again = run_sweep(second, tmp_path / "sweeps", name="second")
    assert [t.status for t in again.trials] == ["done", "done"]
    assert _cpus_back(ray, total) == pytest.approx(total)


@pytest.mark.ray
@pytest.mark.slow
def test_multi_objective_sweep_writes_front_plot_and_best_configs_that_reproduce(ray_session, tmp_path):
    from rayq.config import load_config
    from rayq.launch import train

    space = load_space(write_space(tmp_path, {
        "base": {"max_steps": 40, "report_every": 20, "eval_every": 20, "cluster": "volunteer-100m"},
        "search": {"compression": [{"codec": {"choice": ["fp16", "qsgd"]}},
                                   {"when": {"codec": "qsgd"}, "params": {"levels": {"choice": [1, 15]}}}]},
        "tune": {"mode": "multi", "samples": 2, "max_concurrent": 2, "seed": 3},
    }, "multi"))
    result = run_sweep(space, tmp_path / "sweeps", name="multi")
    assert [t.status for t in result.trials] == ["done", "done"], [t.error for t in result.trials]
    assert result.front and set(result.best) == {"accuracy", "bits (all workers)", "sim time (s)"}
    assert (result.sweep_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (result.sweep_dir / "results.csv").read_text().count("\n") == 3
    best = result.best["accuracy"]
    header = best.read_text().splitlines()[0]
    trial = next(t for t in result.trials if f"(trial #{t.number}, {t.trial_id})" in header)
    assert trial.metrics[ACCURACY.key] == max(t.metrics[ACCURACY.key] for t in result.trials)
    cfg = load_config(best, extra={"output_dir": str(tmp_path / "rerun")})   # `rayq train -c best.yaml` as is
    assert cfg.name is None and cfg.seed == 0 and cfg.cluster == "volunteer-100m"
    summary = train(cfg)
    # Same config, same seed: same data order and codec randomness, so the same accuracy (±0.02 stated).
    assert summary["eval/accuracy"] == pytest.approx(trial.metrics[ACCURACY.key], abs=0.02)
    assert summary["step"] == trial.step == 40
