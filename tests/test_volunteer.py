"""Volunteer mode (trainer ``volunteer``; DeDLOC): the round schedule, the sample-weighted
aggregator, and end-to-end runs on real Ray actors that crash, leave, straggle and lose packets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compressors import PacketError, TensorInfo, pack_frame
from rayq.dedloc import Aggregator, PeerSlot, ProgressTracker, multi_round_codecs, peer_indices, plan_round
from rayq.run import build_policy

# ---------------------------------------------------------------------------------------- round schedule


def test_equal_peers_share_the_target_batch_equally():
    plan = plan_round([PeerSlot(p, 0.0, 1.0) for p in range(4)], target=16 * 12, microbatch=16)
    assert plan.microbatches == {0: 3, 1: 3, 2: 3, 3: 3}
    assert plan.close == 3.0 and plan.averaging_at == 3.0 and plan.reported == 16 * 12


def test_a_5x_straggler_contributes_a_fifth_of_a_normal_peers_samples():
    slots = [PeerSlot(p, 0.0, 1.0) for p in range(5)] + [PeerSlot(5, 0.0, 5.0)]
    plan = plan_round(slots, target=8 * 51, microbatch=8)
    assert plan.close == 10.0
    assert [plan.microbatches[p] for p in range(5)] == [10] * 5 and plan.microbatches[5] == 2


def test_a_microbatch_finishing_within_the_grace_joins_the_round_and_a_later_one_is_abandoned():
    slots = [PeerSlot(0, 0.0, 1.0), PeerSlot(1, 0.0, 1.0), PeerSlot(2, 0.0, 1.4), PeerSlot(3, 0.0, 3.0)]
    plan = plan_round(slots, target=4, microbatch=1, grace=0.5)
    assert plan.close == 2.0 and plan.deadline == 2.5  # peers 0 and 1 finish two micro-batches each at t=2
    assert plan.microbatches == {0: 2, 1: 2, 2: 1, 3: 0}
    assert plan.averaging_at == 2.0
    assert plan.wasted_s[3] == pytest.approx(2.0) and plan.wasted_s[2] == pytest.approx(0.6)  # abandoned at the close
    late = plan_round(slots, target=4, microbatch=1, grace=0.9)  # peer 2's second micro-batch ends at 2.8
    assert late.microbatches[2] == 2 and late.averaging_at == pytest.approx(2.8)


def test_a_peer_that_leaves_before_averaging_loses_its_counted_samples():
    slots = [PeerSlot(0, 0.0, 1.0), PeerSlot(1, 0.0, 1.0, leaves_at=2.5)]
    plan = plan_round(slots, target=6, microbatch=1, grace=0.0)
    assert plan.close == 4.0 and plan.reported == 6  # the tracker counted peer 1's two micro-batches
    assert plan.microbatches == {0: 4, 1: 0} and plan.left == [1] and plan.wasted_s[1] == 2.5


def test_no_round_when_no_peer_can_finish_a_microbatch():
    assert plan_round([], 10, 1) is None
    assert plan_round([PeerSlot(0, 0.0, 2.0, leaves_at=1.0)], 10, 1) is None


def test_progress_tracker_is_an_ema_of_samples_per_second_and_gives_the_eta():
    t = ProgressTracker(alpha=0.1)
    t.report(0, 100, 1.0)
    t.report(0, 200, 1.0)
    t.report(1, 50, 1.0)
    assert t.rate[0] == pytest.approx(110.0) and t.throughput() == pytest.approx(160.0)
    assert t.eta(target=480, accumulated=160) == pytest.approx(2.0)


def test_each_peer_streams_the_data_in_its_own_order_one_permutation_per_pass():
    n = 50
    a = peer_indices(7, peer=1, cursor=0, count=2 * n, n=n)
    assert sorted(a[:n].tolist()) == list(range(n)) and sorted(a[n:].tolist()) == list(range(n))
    assert torch.equal(peer_indices(7, 1, 30, 40, n), a[30:70])  # resumable from any cursor
    assert not torch.equal(peer_indices(7, 2, 0, n, n), a[:n])


# ---------------------------------------------------------------------------------------- aggregator


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.ReLU(), torch.nn.Linear(300, 5))


def _mean_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _frame(policy, grads: dict[str, torch.Tensor], peer: int, round_id: int, world: int) -> bytes:
    packets = []
    for e in policy.plan({n: tuple(g.shape) for n, g in grads.items()}):
        flat = torch.cat([grads[m].reshape(-1) for m in e.members])
        packets.append(e.codec.encode(flat, TensorInfo(e.key, e.shape, worker=peer, world=world, step=round_id, seed=0)))
    return pack_frame(packets)


def test_dedloc_averaging_weighted_by_samples_is_the_exact_mean_gradient_over_every_sample():
    from rayq.config import load_config

    cfg = load_config(None, ["compression.codec=none"])
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(175, 20, generator=g), torch.randint(0, 5, (175,), generator=g)
    counts = [8, 40, 127]  # peers contributed very different numbers of samples
    bounds = np.cumsum([0] + counts)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    policy = build_policy(cfg)
    agg = Aggregator(policy, shapes, seed=0, world=3)
    decoded = []
    for peer, (a, b) in enumerate(zip(bounds, bounds[1:])):  # each peer's mean gradient, through real bytes
        decoded.append(agg.decode(_frame(policy, _mean_grad(model, x[a:b], y[a:b]), peer, 4, 3), peer, 4))
    mean = agg.average(decoded, counts)
    full = _mean_grad(model, x, y)
    for n in full:
        torch.testing.assert_close(mean[n], full[n], rtol=0, atol=1e-6)
    unweighted = agg.average(decoded, [1, 1, 1])  # averaging by peer count would be wrong
    assert max(float((unweighted[n] - full[n]).abs().max()) for n in full) > 1e-3


def test_the_aggregator_refuses_damaged_payloads_and_multi_round_codecs_are_flagged():
    from rayq.config import load_config

    cfg = load_config(None, ["compression.codec=qsgd"])
    model = _model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    policy = build_policy(cfg)
    agg = Aggregator(policy, shapes, seed=0, world=2)
    frame = _frame(policy, {n: torch.randn(s) for n, s in shapes.items()}, 0, 0, 2)
    agg.decode(frame, 0, 0)
    for bad in (frame[:-7], frame[:40] + bytes([frame[40] ^ 0xFF]) + frame[41:], b""):
        with pytest.raises(PacketError):
            agg.decode(bad, 0, 0)
    assert multi_round_codecs(build_policy(load_config(None, ["compression.codec=powersgd"])), shapes) == ["powersgd"]
    assert multi_round_codecs(policy, shapes) == []


# ---------------------------------------------------------------------------------------- end to end, real Ray


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.ray
def test_six_volunteers_two_killed_one_back_one_straggling_5x_train_without_a_restart(train_run):
    from rayq.telemetry import read_events

    rng = np.random.default_rng(2024)
    crash_at, kill_at = int(rng.integers(10, 40)), int(rng.integers(10, 60))  # random steps, fixed by the seed
    events = [
        {"step": crash_at, "worker": 1, "kind": "crash"},           # os._exit in its actor; Ray restarts it
        {"step": kill_at, "worker": 4, "kind": "kill"},             # ray.kill, no restart: gone for good
        {"worker": 3, "kind": "straggle", "factor": 5},             # 5x slower for the whole run
        {"step": 70, "worker": 2, "kind": "leave", "duration": 10},  # leaves and rejoins
        {"step": 80, "worker": 5, "kind": "delay", "seconds": 4},   # 4 simulated seconds: past the deadline
        {"step": 90, "worker": 0, "kind": "corrupt"},               # a byte flipped on the wire
        {"step": 91, "worker": 0, "kind": "lose"},                  # payload lost
    ]
    summary, run_dir = train_run([
        "trainer=volunteer", "workers=6", "max_steps=150", "batch_size=16", "volunteer.target_batch_size=192",
        "volunteer.sample_time_s=0.01", "volunteer.round_timeout_s=3", "faults.restart_s=3", "eval_every=25",
        "report_every=25", f"faults.events={json.dumps(events)}"])

    # The run completed without a restart, to the accuracy bar (>= 0.90 on digits' held-out 360 images).
    assert summary["step"] == 150 and summary["eval/accuracy"] >= 0.90
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(150))

    log = read_events(run_dir)
    seen = {(e["event"], e["step"], e["worker"]) for e in log}
    # Every injected event, with its step and worker ...
    assert {("crash", crash_at, 1), ("kill", kill_at, 4), ("straggle", 0, 3), ("leave", 70, 2), ("delay", 80, 5),
            ("corrupt", 90, 0), ("lose", 91, 0)} <= seen
    # ... and what followed: the crash detected, the actor restarted and the peer back; the leaver back;
    # the delayed payload late past the round's (simulated) deadline and dropped; the damaged ones dropped.
    assert ("down", crash_at, 1) in seen and ("late", 80, 5) in seen and ("lost", 91, 0) in seen
    restart = next(e for e in log if e["event"] == "restart" and e["worker"] == 1)
    back = next(e for e in log if e["event"] == "rejoin" and e["worker"] == 1)
    assert crash_at < restart["step"] <= back["step"]
    assert ("rejoin", 80, 2) in seen
    assert any(e["event"] == "dropped" and e["worker"] == 0 and e["step"] == 90 and "checksum" in e["detail"] for e in log)
    assert any(e["event"] == "dropped" and e["worker"] == 5 and "round 80" in e["detail"] for e in log)

    # Who contributed: the killed peer never again, the crashed one again after it came back, the straggler
    # with about a fifth of a normal peer's samples (weighted by samples in the average).
    after = [r for r in rounds if r["round"] > back["step"]]
    assert all("4" not in r["samples"] for r in rounds if r["round"] >= kill_at)
    assert sum(r["samples"].get("1", 0) for r in after) > 0
    strag = [r["samples"]["3"] for r in rounds if "3" in r["samples"]]
    normal = [r["samples"]["0"] for r in rounds if "0" in r["samples"]]
    assert strag and 0.1 < (sum(strag) / len(strag)) / (sum(normal) / len(normal)) < 0.4

    # The figures of the run.
    assert summary["volunteer/alive"] == 5 and summary["volunteer/alive_min"] >= 3
    assert 0 < summary["volunteer/utilisation"] < 1 and summary["volunteer/wasted_samples"] > 0
    assert summary["recovery/restart_s"] >= 3 and summary["volunteer/staleness_max"] >= 10
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("faults/events/text_summary")]
    assert any(f"step {kill_at}" in t and "worker 4" in t and "kill" in t for t in texts)
    assert {"faults/crash", "faults/kill", "faults/down", "faults/restart", "volunteer/utilisation",
            "volunteer/alive", "eval/accuracy"} <= set(acc.Tags()["scalars"])


@pytest.mark.slow
@pytest.mark.ray
def test_volunteer_40_from_the_cli_reports_utilisation_and_time_to_accuracy(ray_session, tmp_path, capsys):
    from rayq.launch.cli import main

    code = main(["train", "-c", "clusters/volunteer-40.yaml", "--output-dir", str(tmp_path), "--name", "v40"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((tmp_path / "v40" / "summary.json").read_text())
    assert summary["workers"] == 40 and summary["volunteer/peers"] == 40
    assert 0.2 < summary["volunteer/utilisation"] < 1.0
    assert summary["sim/time_to_accuracy_s"] > 0 and summary["eval/accuracy"] >= summary["volunteer/target_accuracy"]
    assert "utilisation (useful compute / online)" in out and "time to accuracy 0.95 (simulated)" in out
    assert "event  step" in out  # fault events (profile stragglers, churn, packets) are printed as they happen
    assert math.isfinite(summary["volunteer/samples_per_s"]) and summary["volunteer/samples_per_s"] > 0
