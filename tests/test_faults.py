"""Fault plans and their injection (rayq.faults): clear errors before anything starts, plans reproducible from
their seed, in-band weighting of departed and dropped workers, and crash recovery of the collective trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from compressors import TensorInfo, make_codec
from compressors.policy import Policy
from rayq.collective import CompressedGroup
from rayq.transport import run_local
from rayq.config import ConfigError, load_config
from rayq.faults import FaultEvent, FaultKind, FaultPlan, corrupt_bytes, tamper
from rayq.profiles import load_profile

SHAPES = {"fc1.weight": (64, 32), "fc1.bias": (64,), "fc2.weight": (10, 64)}


# ---------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("sets, message", [
    (["faults.events=[{step: 3, worker: 4, kind: leave}]"],
     "faults.events[0].worker=4 is invalid; expected a worker index < workers (4)"),
    (["faults.events=[{step: -2, worker: 1, kind: leave}]"], "faults.events[0].step=-2 is invalid; expected a step >= 0"),
    (["faults.events=[{step: 1, worker: -1, kind: leave}]"],
     "faults.events[0].worker=-1 is invalid; expected a worker index >= 0"),
    (["faults.events=[{step: 1, worker: 1, kind: explode}]"],
     "faults.events[0].kind='explode' is invalid; expected one of: crash, kill, leave, straggle, delay, lose, corrupt"),
    (["faults.events=[{worker: 1, kind: crash}]", "max_failures=1"],
     "faults.events[0].step=None is invalid; expected a step >= 0"),
    (["faults.events=[{step: 1, worker: 1, kind: leave, wrker: 2}]"],
     "unknown config key 'faults.events[0].wrker'; allowed keys in faults.events[0]: kind, worker, step, duration"),
    (["faults.events=[{step: 1, worker: 1, kind: leave, duration: 0}]"],
     "faults.events[0].duration=0 is invalid; expected a number of steps >= 1"),
    (["faults.events=[{worker: 1, kind: straggle, factor: 0.5}]"],
     "faults.events[0].factor=0.5 is invalid; expected a slowdown factor >= 1"),
    (["faults.events=[{step: 1, worker: 1, kind: crash, factor: 5}]", "max_failures=1"],
     "faults.events[0].factor=5.0 is invalid for kind 'crash'; factor belongs to kind straggle"),
    (["faults.events=[{step: 1, worker: 1, kind: delay, seconds: -1}]"],
     "faults.events[0].seconds=-1.0 is invalid; expected real seconds > 0"),
    (["faults.packet_loss=1.5"], "faults.packet_loss=1.5 is invalid; expected a probability in [0, 1]"),
    (["faults.packet_corruption=-0.1"], "faults.packet_corruption=-0.1 is invalid; expected a probability in [0, 1]"),
    (["faults.deadline=0.5"], "faults.deadline=0.5 is invalid; expected 0 (no deadline) or a multiple >= 1"),
    (["faults.restart_s=-3"], "faults.restart_s=-3.0 is invalid; expected simulated seconds >= 0"),
    (["faults.bogus=1"], "unknown config key 'faults.bogus'; allowed keys in faults: events, from_profile, seed"),
    (["faults.events=[{step: 3, worker: 1, kind: crash}]"],
     "faults.events[0] crashes a worker but max_failures=0, so the run would fail; set max_failures >= 1"),
    (["faults.events=[{step: 3, worker: 1, kind: corrupt}]", "compression.codec=fp16"],
     "faults.events[0] (corrupt) is invalid with compression.codec='fp16' under compression.strategy='auto': "
     "lost or corrupted payloads are injected into all-gathered frames"),
    (["faults.events=[{step: 3, worker: 1, kind: leave}]", "sync.schedule=periodic"],
     "faults.events[0] is invalid with sync.schedule='periodic'"),
    (["volunteer.target_batch_size=0"], "volunteer.target_batch_size=0 is invalid; expected an integer >= 1"),
    (["trainer=volunteer", "volunteer.actors=5"], "volunteer.actors=5 is invalid; expected 1..workers (4)"),
    (["volunteer.sample_time_s=-1"], "volunteer.sample_time_s=-1.0 is invalid; expected simulated seconds > 0"),
    (["volunteer.stop_at_target=true"], "volunteer.stop_at_target=True is invalid; expected false unless target_accuracy"),
])
def test_bad_fault_plans_fail_before_anything_starts_naming_key_value_and_allowed(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert message in str(err.value)


@pytest.mark.parametrize("cluster, message", [
    ({"defaults": {"up": "-100Mbit"}}, "cluster: defaults.up='-100Mbit' is invalid; expected a bandwidth > 0"),
    ({"defaults": {"straggler_prob": 1.2}}, "cluster: defaults.straggler_prob=1.2 is invalid; expected a probability in [0, 1]"),
    ({"defaults": {"session_mean": "-2h"}}, "cluster: defaults.session_mean='-2h' is invalid; expected seconds > 0"),
    ({"defaults": {"straggler_slowdown": 0.5}}, "cluster: defaults.straggler_slowdown=0.5 is invalid; expected a slowdown factor >= 1"),
    ({"defaults": {"churn": 1}}, "cluster: unknown config key 'defaults.churn'; allowed keys in defaults: up, down"),
])
def test_bad_profiles_in_a_run_config_fail_before_anything_starts(cluster, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [], extra={"cluster": cluster})
    assert message in str(err.value)


def test_a_valid_fault_section_loads_from_yaml_text():
    cfg = load_config(None, ["faults.events=[{step: 12, worker: 1, kind: crash}, {step: 5, worker: 2, kind: leave, "
                             "duration: 10}, {worker: 3, kind: straggle, factor: 5}]", "max_failures=1"])
    plan = FaultPlan.from_config(cfg)
    assert [e.kind for e in plan.events] == [FaultKind.CRASH, FaultKind.LEAVE, FaultKind.STRAGGLE]
    assert plan.away(2, 5) and plan.away(2, 14) and not plan.away(2, 15) and not plan.away(2, 4)
    assert plan.slowdown(3, 0) == 5.0 and plan.slowdown(3, 10_000) == 5.0 and plan.slowdown(1, 3) == 1.0
    assert [e.worker for e in plan.at(12)] == [1]


# ---------------------------------------------------------------------------------------- reproducibility


def _profile(workers: int, seed: int = 0):
    return load_profile({"defaults": {"straggler_prob": 0.1, "straggler_slowdown": 4.0, "session_mean": "10min",
                                      "rejoin_delay": "2min"}}, workers, seed)


def _plan(workers: int, seed: int) -> FaultPlan:
    return FaultPlan(workers, seed, [FaultEvent(FaultKind.CRASH, 1, 7)], _profile(workers).nodes,
                     packet_loss=0.02, packet_corruption=0.02, churn=True)


def test_the_fault_plan_is_reproducible_from_its_seed():
    a = _plan(8, seed=3).timeline(steps=200, horizon_s=7200)
    assert a == _plan(8, seed=3).timeline(steps=200, horizon_s=7200)
    assert a != _plan(8, seed=4).timeline(steps=200, horizon_s=7200)
    kinds = {e["kind"] for e in a}
    assert {"crash", "straggle", "lose", "corrupt", "join", "leave"} <= kinds


def test_a_workers_faults_do_not_depend_on_the_number_of_workers_or_the_query_order():
    small, large = _plan(4, seed=5), _plan(40, seed=5)
    later = [(w, s) for s in reversed(range(300)) for w in range(4)]
    for w, s in later:  # query backwards on one plan, forwards on the other
        assert small.slowdown(w, s) == large.slowdown(w, s)
        assert small.packet_fault(w, s) == large.packet_fault(w, s)
    for w in range(4):
        assert large.churn_changes(w, 0, 36000) == small.churn_changes(w, 0, 36000)


def test_profile_stragglers_and_churn_follow_their_distributions():
    plan = FaultPlan(50, 11, (), _profile(50).nodes, churn=True)
    draws = [plan.slowdown(w, s) for w in range(50) for s in range(400)]
    frac = sum(d == 4.0 for d in draws) / len(draws)
    assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(draws))  # 20,000 Bernoulli(0.1) draws
    sessions, gaps = [], []
    for w in range(50):
        b = plan.churn[w].bounds
        plan.churn[w].online(200 * 3600)
        b = plan.churn[w].bounds
        sessions += [b[i + 1] - b[i] for i in range(0, len(b) - 1, 2)]
        gaps += [b[i + 1] - b[i] for i in range(1, len(b) - 1, 2)]
    assert len(sessions) > 2000
    assert sum(sessions) / len(sessions) == pytest.approx(600, rel=0.06)   # Exp(10 min)
    assert sum(gaps) / len(gaps) == pytest.approx(120, rel=0.06)           # Exp(2 min)


def test_a_peer_that_never_rejoins_stays_offline_and_late_joiners_arrive_at_join_at():
    nodes = load_profile({"defaults": {"session_mean": "1h", "join_at": "5min"}}, 3, 0).nodes
    plan = FaultPlan(3, 0, (), nodes, churn=True)
    assert not plan.online(0, 299.0) and plan.online(0, 300.0)
    leave = plan.next_offline(0, 300.0)
    assert 300 < leave < math.inf and not plan.online(0, leave + 1e6)


def test_corrupting_bytes_is_caught_by_the_packet_checksum():
    from compressors import Packet, PacketError

    codec = make_codec("qsgd")
    info = TensorInfo("w", (1000,), seed=1)
    data = codec.encode(torch.randn(1000), info).to_bytes()
    for step in range(50):
        bad = corrupt_bytes(data, 0, 1, step)
        assert bad != data and len(bad) == len(data)
        with pytest.raises(PacketError):
            Packet.from_bytes(bad)


# ---------------------------------------------------------------------------------------- in-band weighting


def _grads(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _exchange(transport, codec: str, weights, damage=None):
    if damage is not None and transport.rank == damage[0]:
        transport.tamper = tamper(damage[1], 0, transport.rank, 3)
    group = CompressedGroup(Policy(codec, min_numel=0), transport, seed=1)
    avg, ledger = group.allreduce_mean(_grads(transport.rank), step=3, weights=weights)
    return avg, ledger.dropped


@pytest.mark.parametrize("codec", ["none", "fp16", "qsgd"])
def test_a_worker_weighted_zero_contributes_nothing_and_the_mean_is_over_the_others(codec):
    world, weights = 4, [1.0, 0.0, 1.0, 1.0]
    results = run_local(world, _exchange, codec, weights)
    c = make_codec(codec)
    for k, shape in SHAPES.items():
        decoded = []
        for w in (0, 2, 3):
            info = TensorInfo(k, shape, worker=w, world=world, step=3, seed=1)
            decoded.append(c.decode(c.encode(_grads(w)[k].reshape(-1), info), info).view(shape))
        expected = torch.stack(decoded).mean(0)
        for avg, dropped in results:  # fp16 fields are summed in fp16
            torch.testing.assert_close(avg[k], expected, rtol=0, atol=4e-3 if codec == "fp16" else 2e-6)
            assert dropped == []


@pytest.mark.parametrize("kind", [FaultKind.CORRUPT, FaultKind.LOSE])
def test_a_lost_or_corrupted_gather_frame_is_dropped_by_every_receiver(kind):
    world = 3
    results = run_local(world, _exchange, "qsgd", None, (2, kind))
    c = make_codec("qsgd")
    for k, shape in SHAPES.items():
        decoded = []
        for w in (0, 1):
            info = TensorInfo(k, shape, worker=w, world=world, step=3, seed=1)
            decoded.append(c.decode(c.encode(_grads(w)[k].reshape(-1), info), info).view(shape))
        for avg, dropped in results:
            torch.testing.assert_close(avg[k], torch.stack(decoded).mean(0), rtol=0, atol=2e-6)
            assert [w for w, _ in dropped] == [2]
            assert "packet" in dropped[0][1]


# ---------------------------------------------------------------------------------------- collective mode, real Ray


def _checkpoint_at(run_dir: Path, step: int) -> Path:
    for d in sorted(run_dir.glob("checkpoint_*")):
        if torch.load(d / "model.pt", weights_only=False)["meta"]["step"] == step:
            return d
    raise AssertionError(f"no checkpoint at step {step} in {run_dir}")


@pytest.mark.slow
@pytest.mark.ray
def test_a_worker_killed_mid_run_resumes_from_its_checkpoint_with_the_accuracy_of_an_uninterrupted_run(train_run):
    from rayq.telemetry import read_events

    # Top-k (10 %) + error feedback on 4 workers; worker 2 leaves for 6 steps, worker 3 straggles 5x (past a 3x deadline,
    # so its contributions are dropped), worker 1's packet is corrupted once, worker 0 is cut off for 5 steps. The crashed run adds: worker 1 calls
    # os._exit at step 150; the last checkpoint before it is at step 120.
    events = ("[{step: 30, worker: 2, kind: leave, duration: 6}, {step: 60, worker: 3, kind: straggle, factor: 5, "
              "duration: 10}, {step: 90, worker: 1, kind: corrupt}, {step: 100, worker: 0, kind: lose, duration: 5}")
    base = ["compression.codec=topk", "compression.params={density: 0.1}", "compression.error_feedback=true",
            "max_steps=200", "optimizer.lr=0.1", "report_every=10",
            "checkpoint_every=40", "eval_every=0", "keep_checkpoints=10", "max_failures=1", "faults.deadline=3",
            "cluster=cloud-1g"]
    clean, clean_dir = train_run(base + [f"faults.events={events}]"], name="uninterrupted")
    crashed, crashed_dir = train_run(base + [f"faults.events={events}, {{step: 150, worker: 1, kind: crash}}]"],
                                     name="crashed")

    # Resumed from its checkpoint (not from scratch) and finished every step.
    fired = [json.loads(line) for line in (crashed_dir / "faults_fired.jsonl").read_text().splitlines()]
    assert fired == [{**fired[0], "step": 150, "worker": 1, "kind": "crash"}]
    log = read_events(crashed_dir)
    restart = next(e for e in log if e["event"] == "restart")
    assert restart["step"] in (40, 80, 120) and restart["crash_step"] == 150
    assert crashed["step"] == 200 and crashed["start_step"] == restart["step"]

    # Error feedback survived the restart: restored, not zeroed (the restart logs rank 0's restored residual norm,
    # equal to the checkpoint's), and the final residuals equal the uninterrupted run's bit for bit.
    ckpt = torch.load(_checkpoint_at(crashed_dir, restart["step"]) / "codec_rank0.pt", weights_only=False)
    saved = next(iter(ckpt["codec"]["policy"].values()))["residuals"]
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in saved.values()))
    assert norm > 0 and restart["ef_residual_norm"] == pytest.approx(norm, rel=1e-6)
    for r in range(4):
        a = torch.load(_checkpoint_at(clean_dir, 200) / f"codec_rank{r}.pt", weights_only=False)["codec"]["policy"]
        b = torch.load(_checkpoint_at(crashed_dir, 200) / f"codec_rank{r}.pt", weights_only=False)["codec"]["policy"]
        for key in a:
            for name, t in a[key]["residuals"].items():
                assert torch.equal(t, b[key]["residuals"][name]), (r, name)

    # Same accuracy as the uninterrupted run (tolerance 0.01; bit-exact resume makes it identical) and above the bar.
    assert crashed["eval/accuracy"] == pytest.approx(clean["eval/accuracy"], abs=0.01)
    assert crashed["eval/accuracy"] >= 0.90
    ma = torch.load(_checkpoint_at(clean_dir, 200) / "model.pt", weights_only=False)["model"]
    mb = torch.load(_checkpoint_at(crashed_dir, 200) / "model.pt", weights_only=False)["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)

    # Every event is in the log with its step and worker; the crash and the time it cost are recorded.
    seen = {(e["event"], e["step"], e["worker"]) for e in log}
    assert {("crash", 150, 1), ("leave", 30, 2), ("rejoin", 36, 2), ("straggle", 60, 3), ("late", 65, 3),
            ("corrupt", 90, 1), ("dropped", 90, 1), ("recovered", 150, 1), ("lose", 100, 0), ("dropped", 104, 0),
            ("heal", 105, 0)} <= seen  # a partition of worker 0 for 5 steps, then it resynchronises
    assert crashed["recovery/lost_s"] > 0 and crashed["recovery/sim_lost_s"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(crashed_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("faults/events/text_summary")]
    assert any("crash" in t and "worker 1" in t and "step 150" in t for t in texts)
    assert {"faults/crash", "faults/leave", "faults/late", "faults/dropped"} <= set(acc.Tags()["scalars"])


# ---------------------------------------------------------------------------------------- a deadline saves simulated time


def _sim_time(deadline: float, straggle: bool, steps: int = 10, compute_s: float = 0.1, comm_s: float = 0.02) -> float:
    from rayq.faults import CollectiveFaults
    from rayq.netsim import VirtualClock

    events = [FaultEvent(FaultKind.STRAGGLE, 3, None, None, 5.0)] if straggle else []
    plan = FaultPlan(4, seed=0, events=events)
    faults = CollectiveFaults(plan, 0, 4, Path("/nonexistent"), 0, None, deadline)
    clock = VirtualClock(4)
    for step in range(steps):
        faults.advance_clock(clock, faults.view(step), compute_s, comm_s)
    return clock.now


def test_a_deadline_that_drops_a_5x_straggler_saves_simulated_time_as_the_barrier_model_says():
    # 4 workers, 0.1 s of compute each, one 5x straggler, 0.02 s of communication per step, 10 steps.
    base = _sim_time(0.0, straggle=False)
    slow = _sim_time(0.0, straggle=True)
    cut = _sim_time(2.0, straggle=True)
    assert base == pytest.approx(10 * (0.1 + 0.02))          # the barrier of equal workers
    assert slow == pytest.approx(10 * (5 * 0.1 + 0.02))      # everyone waits for the straggler
    assert cut == pytest.approx(10 * (0.1 + 0.02))           # dropped at the barrier: it waits for no one
    assert cut < slow


def test_a_dropped_straggler_rejoins_at_the_barrier_with_the_others():
    from rayq.faults import CollectiveFaults
    from rayq.netsim import VirtualClock

    plan = FaultPlan(3, seed=0, events=[FaultEvent(FaultKind.STRAGGLE, 2, 0, 1, 10.0)])
    faults = CollectiveFaults(plan, 0, 3, Path("/nonexistent"), 0, None, 2.0)
    clock = VirtualClock(3)
    view = faults.view(0)
    assert view.late == [2] and view.weights == [1.0, 1.0, 0.0]
    faults.advance_clock(clock, view, 1.0, 0.5)
    assert clock.times == [1.5, 1.5, 1.5] and clock.now == 1.5
