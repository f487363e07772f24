"""Bad config fails before Ray starts, naming the key, the value and what is allowed."""

from __future__ import annotations

import re

import pytest

from rayq.config import ConfigError, RunConfig, load_config


def test_defaults_are_the_main_job():
    cfg = load_config()
    assert (cfg.task, cfg.workers, cfg.compression.codec) == ("digits", 4, "qsgd")


def test_yaml_then_set_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("workers: 2\ncompression:\n  codec: fp16\noptimizer:\n  lr: 0.2\n")
    cfg = load_config(f, ["compression.codec=none", "optimizer.momentum=0.5"])
    assert (cfg.workers, cfg.compression.codec, cfg.optimizer.lr, cfg.optimizer.momentum) == (2, "none", 0.2, 0.5)


@pytest.mark.parametrize("sets, message", [
    (["workerz=3"], "unknown config key 'workerz'; allowed keys: name, task"),
    (["compression.codec=qsdg"], "compression.codec='qsdg' is not a codec; choose one of: none, fp16"),
    (["compression.params.levels=0"], "levels=0 must be in 1..32768"),
    (["compression.params.norm=l3"], "compression.params.norm='l3' is not valid for codec 'qsgd'; choose one of: 'l2', 'max'"),
    (["compression.params.level=3"], "compression.params.level is not a parameter of codec 'qsgd'; allowed: levels"),
    (["task=imagenet"], "task='imagenet' is invalid; choose one of: digits, digits-wide, digits-gelu, sparse-logistic, fashion-mnist, mnist, cifar10"),
    (["workers=0"], "workers=0 is invalid; expected an integer >= 1"),
    (["workers=two"], "workers='two' is invalid; expected an integer"),
    (["optimizer.lr=-1"], "optimizer.lr=-1.0 is invalid; expected a positive number"),
    (["optimizer.name=lamb"], "optimizer.name='lamb' is invalid; choose one of: sgd, adam, adamw"),
    (["compression.error_feedback=maybe"], "compression.error_feedback='maybe' is invalid; expected true or false"),
    (["compression.bogus=1"], "unknown config key 'compression.bogus'; allowed keys in compression: codec"),
    (["resume=/nonexistent/ckpt"], "resume='/nonexistent/ckpt' is invalid; expected an existing checkpoint directory"),
    (["workers"], "must look like key=value"),
    (["compression.codec=qsgd", "compression.strategy=allreduce"], "codec 'qsgd' is gather-kind"),
    (["compression.codec=powersgd", "compression.strategy=allgather"], "strategy 'allgather' is not allowed"),
    (["compression.codec=powersgd", "compression.strategy=two_phase"], "strategy 'two_phase' is not allowed"),
])
def test_bad_values_name_key_value_and_allowed(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert message in str(err.value)


def test_bad_yaml_file_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("workers: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_per_layer_overrides_are_validated():
    with pytest.raises(ConfigError, match=r"compression.overrides\[0\]: compression.codec='nope'"):
        load_config(None, ["compression.overrides=[{pattern: '0.*', codec: nope}]"])
    cfg = load_config(None, ["compression.overrides=[{pattern: '0.*', codec: fp16}]"])
    assert cfg.compression.overrides[0].codec == "fp16"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    from rayq.launch import resolve

    cfg = resolve(load_config(None, ["compression.codec=fp16"]))
    cfg.dump(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and isinstance(again, RunConfig)
    assert cfg.optimizer.lr == 0.05 and cfg.epochs == 30 and cfg.batch_size == 32


@pytest.mark.parametrize("sets, message", [
    (["optimizer.name=adam", "optimizer.momentum=0.9"],
     "optimizer.momentum=0.9 is invalid with optimizer.name='adam': it is an option of sgd"),
    (["optimizer.name=adamw", "optimizer.nesterov=true"], "optimizer.nesterov=True is invalid with optimizer.name='adamw'"),
    (["optimizer.name=sgd", "optimizer.l1=0.1"], "optimizer.l1=0.1 is invalid with optimizer.name='sgd'"),
    (["optimizer.name=blaq", "sync.schedule=laq", "compression.codec=laq"],
     "optimizer.name='blaq' is invalid with sync.schedule='laq'"),
    (["sync.schedule=laq", "sync.bits=3"], "sync.bits was replaced by compression.params.bits"),
    (["sync.schedule=laq", "compression.codec=laq", "compression.error_feedback=true"],
     "sync.schedule='laq' is invalid with compression.error_feedback=true"),
    (["compression.strategy=two_phase", "faults.deadline=2"],
     "faults.deadline=2 is invalid with compression.strategy='two_phase'"),
    (["compression.strategy=two_phase", "faults.events=[{step: 1, worker: 1, kind: leave}]"],
     "faults.events[0] is invalid with compression.strategy='two_phase'"),
    (["trainer=ddp", "sync.schedule=periodic"], "trainer='ddp' is invalid with sync.schedule='periodic'"),
    (["trainer=ddp", "faults.deadline=2"], "faults.deadline=2 is invalid with trainer='ddp'"),
    (["trainer=volunteer", "compression.codec=powersgd"], "trainer='volunteer' is invalid with compression.codec='powersgd'"),
    (["compression.gather=direct", "compression.codec=fp16"],
     "compression.gather='direct' is invalid with compression.codec='fp16' under compression.strategy='auto'"),
    (["compression.gather=direct", "compression.codec=powersgd", "compression.overrides=[{pattern: '0.*', codec: none}]"],
     "compression.gather='direct' is invalid with compression.codec='powersgd', compression.overrides[0].codec='none'"),
    (["compression.gather=direct", "trainer=volunteer"], "compression.gather='direct' is invalid with trainer='volunteer'"),
    (["compression.gather=direct", "trainer=ddp", "ddp.hook=powersgd"],
     "compression.gather='direct' is invalid with ddp.hook='powersgd'"),
    (["trainer=ddp", "ddp.hook=powersgd", "compression.codec=topk"],
     "compression.codec='topk' is invalid with ddp.hook='powersgd'"),
    (["trainer=ddp", "ddp.hook=allreduce", "compression.bucket_mb=25"],
     "compression.bucket_mb=25.0 is invalid with ddp.hook='allreduce'"),
    (["trainer=volunteer", "resume=/tmp"], "resume='/tmp' is invalid with trainer='volunteer'"),
    (["optimizer.nesterov=true", "optimizer.momentum=0"], "optimizer.nesterov=True is invalid with optimizer.momentum=0"),
    (["optimizer.name=blaq", "optimizer.weight_bits=8"],
     "optimizer.weight_bits=8 is invalid with optimizer.projection='binary'"),
])
def test_settings_that_would_be_silently_ignored_are_config_errors(sets, message):
    if "compression.gather=direct" in sets:  # what it is refused with is fine on its own
        load_config(None, [s for s in sets if s != "compression.gather=direct"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, sets)


def test_sgd_momentum_defaults_to_0_9_and_adam_takes_none():
    assert load_config(None, []).optimizer.sgd_momentum == 0.9
    assert load_config(None, ["optimizer.name=adam"]).optimizer.momentum is None


def test_numbers_in_scientific_notation_and_periods_of_plain_local_sgd_are_accepted():
    """YAML 1.1 reads "5e-1" as a string: codec parameters take it as the number, as typed fields do; the bounds
    p_min/p_max belong to schedule adaptive, so periodic takes any period."""
    cfg = load_config(None, ["compression.codec=rcfed", "compression.params.rate=5e-1",
                             "compression.overrides=[{pattern: '0.*', codec: topk, params: {density: 1e-2}}]"])
    from rayq.run import build_policy

    policy = build_policy(cfg)
    assert policy.default.rate == 0.5 and policy.codec_for("0.weight").density == 0.01
    assert load_config(None, ["sync.schedule=periodic", "sync.period=128"]).sync.period == 128
    with pytest.raises(ConfigError, match=re.escape("1 <= p_min <= period <= p_max with schedule adaptive")):
        load_config(None, ["sync.schedule=adaptive", "sync.period=128"])
    assert load_config(None, ["trainer=ddp", "ddp.hook=powersgd"]).ddp.hook == "powersgd"  # defaults are fine
