"""Node profiles: shipped profiles load with sane values, sampling is seeded, bad profiles fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayq.config import ConfigError
from rayq.netsim import Link, ring_allreduce_time
from rayq.profiles import (CLUSTERS_DIR, ClusterProfile, NodeSpec, load_profile, parse_bandwidth, parse_duration,
                           parse_profile, profile_names)

SHIPPED = ["datacenter-10g", "cloud-1g", "volunteer-100m", "volunteer-wan", "volunteer-40"]
MBIT = 1e6


def test_every_shipped_profile_is_listed_and_plain_yaml():
    assert set(SHIPPED) <= set(profile_names())
    for name in SHIPPED:
        assert isinstance(yaml.safe_load((CLUSTERS_DIR / f"{name}.yaml").read_text()), dict)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("workers", [4, 40])
def test_shipped_profiles_load_with_sane_values(name, workers):
    profile = load_profile(name, workers, seed=0)
    assert isinstance(profile, ClusterProfile) and profile.name == name and profile.workers == workers
    assert [n.index for n in profile.nodes] == list(range(workers))
    for n in profile.nodes:
        assert isinstance(n, NodeSpec)
        assert 1 * MBIT <= n.up_bps <= 1e11 and 1 * MBIT <= n.down_bps <= 1e11
        assert 0 <= n.latency_s <= 0.2
        assert 0.1 <= n.speed_factor <= 10
        assert 0 <= n.straggler_prob <= 1 and n.straggler_slowdown >= 1
        assert n.session_mean_s is None or n.session_mean_s > 0
    assert ring_allreduce_time(1e6, profile.links) > 0


@pytest.mark.parametrize("name, bps, latency", [
    ("datacenter-10g", 10e9, 25e-6), ("cloud-1g", 1e9, 0.5e-3), ("volunteer-100m", 100e6, 20e-3)])
def test_homogeneous_profiles_have_their_nominal_links(name, bps, latency):
    profile = load_profile(name, 4, seed=3)
    assert profile.links == [Link(bps, bps, latency)] * 4
    assert profile.speed_factors == [1.0] * 4


def test_volunteer_wan_is_heterogeneous_within_its_ranges():
    nodes = load_profile("volunteer-wan", 40, seed=0).nodes
    down = [n.down_bps for n in nodes]
    assert len(set(down)) > 30 and min(down) >= 10 * MBIT and max(down) <= 1000 * MBIT
    assert sum(n.up_bps < n.down_bps for n in nodes) > 20  # upload usually slower
    assert all(20e-3 <= n.latency_s <= 150e-3 for n in nodes)
    assert 2 <= sum(n.client_mode for n in nodes) <= 16  # ~20% of 40
    assert len({n.speed_factor for n in nodes}) > 30


def test_volunteer_40_is_a_run_config_holding_the_profile_under_cluster():
    data = yaml.safe_load((CLUSTERS_DIR / "volunteer-40.yaml").read_text())
    assert isinstance(data["cluster"], dict) and data["trainer"] == "volunteer"  # run keys beside the profile
    by_name = load_profile("volunteer-40", 40, seed=0)
    assert by_name == load_profile(CLUSTERS_DIR / "volunteer-40.yaml", 40, seed=0) == load_profile(data, 40, seed=0)
    nodes = by_name.nodes
    assert all(n.session_mean_s == 7200.0 and n.rejoin_delay_s == 1800.0 for n in nodes)
    assert all(n.straggler_prob == 0.05 and n.straggler_slowdown == 4.0 for n in nodes)
    assert 2 <= sum(n.client_mode for n in nodes) <= 16
    assert max(n.speed_factor for n in nodes) / min(n.speed_factor for n in nodes) > 3  # lognormal spread


def test_run_config_may_name_a_shipped_profile():
    assert load_profile({"cluster": "cloud-1g", "workers": 4}, 4, seed=0) == load_profile("cloud-1g", 4, seed=0)


def test_sampling_is_reproducible_from_the_seed_and_independent_of_the_worker_count():
    a = load_profile("volunteer-wan", 40, seed=7)
    assert a == load_profile("volunteer-wan", 40, seed=7)
    assert a.nodes != load_profile("volunteer-wan", 40, seed=8).nodes
    assert load_profile("volunteer-wan", 4, seed=7).nodes == a.nodes[:4]


def test_precedence_is_node_then_distribution_then_defaults_and_nodes_repeat():
    profile = load_profile({
        "defaults": {"up": "1Gbit", "down": "1Gbit", "latency": "5ms"},
        "distribution": {"down": {"dist": "uniform", "low": "10Mbit", "high": "20Mbit"}},
        "nodes": [{"count": 2, "latency": "1ms"}, {"down": "500Mbit", "client_mode": True}],
    }, 7, seed=0)
    n = profile.nodes
    assert [x.latency_s for x in n] == [1e-3, 1e-3, 5e-3] * 2 + [1e-3]
    assert [x.client_mode for x in n] == [False, False, True] * 2 + [False]
    assert n[2].down_bps == n[5].down_bps == 500 * MBIT
    assert all(10 * MBIT <= x.down_bps <= 20 * MBIT for i, x in enumerate(n) if i % 3 != 2)
    assert all(x.up_bps == 1e9 for x in n)


def test_units_parse_to_bits_per_second_and_seconds():
    assert [parse_bandwidth(v) for v in ("100Mbit", "1Gbit", "10Gbit/s", "100 Mbps", "12.5MB/s", "1e9", 5e8)] == \
        [1e8, 1e9, 1e10, 1e8, 1e8, 1e9, 5e8]
    assert [parse_duration(v) for v in ("20ms", "25us", "10µs", "0.5ms", "2h", "30min", "1.5", 3)] == \
        [0.02, 25e-6, 10e-6, 0.5e-3, 7200.0, 1800.0, 1.5, 3.0]


@pytest.mark.parametrize("profile, message", [
    ({"defaults": {"up": "-100Mbit"}}, "defaults.up='-100Mbit' is invalid; expected a bandwidth > 0 in bits/s"),
    ({"defaults": {"down": -5}}, "defaults.down=-5 is invalid; expected a bandwidth > 0"),
    ({"defaults": {"upp": "1Gbit"}}, "unknown config key 'defaults.upp'; allowed keys in defaults: up, down, latency"),
    ({"bandwidth": "1Gbit"}, "unknown config key 'bandwidth'; allowed keys: name, description, defaults"),
    ({"defaults": {"straggler_prob": 1.5}}, "defaults.straggler_prob=1.5 is invalid; expected a probability in [0, 1]"),
    ({"distribution": {"client_mode": {"dist": "bernoulli", "p": 1.5}}},
     "distribution.client_mode.p=1.5 is invalid; expected a probability in [0, 1]"),
    ({"defaults": {"up": "100Mbyte/h"}}, "defaults.up='100Mbyte/h' is invalid; expected a bandwidth > 0 in bits/s: "
                                         "a number or a string like '100Mbit'"),
    ({"defaults": {"up": "fast"}}, "defaults.up='fast' is invalid"),
    ({"defaults": {"latency": "20 parsecs"}}, "defaults.latency='20 parsecs' is invalid; expected seconds >= 0"),
    ({"defaults": {"speed_factor": 0}}, "defaults.speed_factor=0 is invalid; expected a compute-time multiplier > 0"),
    ({"defaults": {"client_mode": "yes"}}, "defaults.client_mode='yes' is invalid; expected true or false"),
    ({"nodes": [{"up": "1Gbit"}, {"count": 0}]}, "nodes[1].count=0 is invalid; expected an integer >= 1"),
    ({"distribution": {"down": {"dist": "gauss"}}},
     "distribution.down.dist='gauss' is invalid; choose one of: lognormal, uniform, loguniform, choice"),
    ({"distribution": {"down": {"dist": "uniform", "low": "10Mbit", "hi": "1Gbit"}}},
     "unknown config key 'distribution.down.hi'; allowed keys for dist uniform: dist, low, high"),
    ({"distribution": {"straggler_prob": {"dist": "lognormal", "mu": -3, "sigma": 1}}},
     "distribution.straggler_prob: dist lognormal can draw values straggler_prob does not allow; set max"),
    ({"cluster": {"defaults": {"up": -1}}}, "cluster.defaults.up=-1 is invalid"),
    ({"workers": 4, "task": "digits"}, "a run config holds its profile under a top-level 'cluster:' key"),
])
def test_bad_profiles_name_key_value_and_allowed(profile, message):
    with pytest.raises(ConfigError) as err:
        parse_profile(profile)
    assert message in str(err.value)


def test_bad_profile_files_and_names_are_named(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  up: -1Gbit\n")
    with pytest.raises(ConfigError, match=r"cluster profile '.*bad.yaml': defaults.up='-1Gbit' is invalid"):
        load_profile(bad, 4, seed=0)
    broken = tmp_path / "broken.yaml"
    broken.write_text("defaults: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_profile(broken, 4, seed=0)
    with pytest.raises(ConfigError, match="'nope' is neither a file nor a shipped profile; choose one of: cloud-1g"):
        load_profile("nope", 4, seed=0)
    with pytest.raises(ConfigError, match="workers=0 is invalid"):
        load_profile("cloud-1g", 0, seed=0)
