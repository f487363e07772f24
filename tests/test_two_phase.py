"""Reduce strategies chosen by codec kind (rayq.collective): all-reduce, all-gather and the
two-phase re-encoding reduce; exact means for lossless codecs, unbiased means for QSGD, per-worker
volume flat in N for two-phase, forbidden codec/strategy pairs refused by name."""

from __future__ import annotations

import pytest
import torch

from compressors import REGISTRY
from compressors.policy import Policy
from rayq.collective import CompressedGroup, check_strategy
from rayq.transport import TorchTransport, run_local
from rayq.config import CompressionConfig, ConfigError, from_dict
from rayq.netsim import Link, step_comm_seconds, transfer_seconds
from tests.distributed import run_workers

SHAPES = {"fc1.weight": (64, 32), "fc1.bias": (64,), "fc2.weight": (10, 64), "fc2.bias": (10,)}
STRATEGIES = ("auto", "allreduce", "allgather", "two_phase")


def _grads(rank: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _true_mean(world: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    grads = [_grads(r, shapes) for r in range(world)]
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in shapes}


def _reduce(transport, codec: str, strategy: str, seed: int = 7, steps: int = 1, params=None,
            error_feedback: bool = False, shapes=SHAPES, mean: bool = True):
    group = CompressedGroup(Policy(codec, params, error_feedback=error_feedback, min_numel=0), transport,
                            seed=seed, strategy=strategy)
    fn = group.allreduce_mean if mean else group.allreduce_sum
    return [fn(_grads(transport.rank, shapes), step) for step in range(steps)]


def _rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    return num / sum(float((b[k] ** 2).sum()) for k in b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_exact_mean_of_a_lossless_codec_identically_on_every_worker(strategy):
    world = 4
    mean = _true_mean(world)
    results = run_local(world, _reduce, "none", strategy)
    for r in results:
        avg, _ = r[0]
        for k in SHAPES:
            torch.testing.assert_close(avg[k], mean[k], rtol=0, atol=1e-6)
            assert torch.equal(avg[k], results[0][0][0][k])


@pytest.mark.parametrize("strategy", ("allreduce", "allgather", "two_phase"))
def test_allreduce_sum_is_the_exact_sum_of_a_lossless_codec(strategy):
    world = 3
    total = {k: v * world for k, v in _true_mean(world).items()}
    results = run_local(world, _reduce, "none", strategy, 7, 1, None, False, SHAPES, False)
    for k in SHAPES:
        torch.testing.assert_close(results[1][0][0][k], total[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", ("allgather", "two_phase"))
def test_qsgd_mean_is_unbiased_over_seeds_and_lossy_in_one_draw(strategy):
    """E[result] = mean: the error of the average of K independent draws is ≈ 1/K of one draw's."""
    world, draws = 4, 48
    shapes = {"w": (2048,)}
    mean = _true_mean(world, shapes)
    outs = [run_local(world, _reduce, "qsgd", strategy, seed, 1, {"levels": 7}, False, shapes)[0][0][0]
            for seed in range(draws)]
    single = sum(_rel_err(o, mean) for o in outs) / draws
    average = {"w": torch.stack([o["w"] for o in outs]).mean(0)}
    assert single > 0.05  # QSGD with 7 levels is lossy...
    assert _rel_err(average, mean) < 2.0 * single / draws  # ...and unbiased (expected ratio 1/K)


def test_two_phase_qsgd_error_is_about_twice_all_gathers_one_encoding_per_hop():
    world, draws = 4, 16
    shapes = {"w": (4096,)}
    mean = _true_mean(world, shapes)
    err = {s: sum(_rel_err(run_local(world, _reduce, "qsgd", s, seed, 1, {"levels": 15}, False, shapes)[0][0][0],
                           mean) for seed in range(draws)) / draws for s in ("allgather", "two_phase")}
    assert 1.3 < err["two_phase"] / err["allgather"] < 3.0


def _bytes_per_worker(transport, strategy: str, d: int):
    group = CompressedGroup(Policy("qsgd", min_numel=0), transport, seed=3, strategy=strategy)
    x = torch.randn(d, generator=torch.Generator().manual_seed(transport.rank))
    _, ledger = group.allreduce_mean({"w": x}, 0)
    return ledger


def test_two_phase_per_worker_bytes_stay_flat_from_2_to_8_workers_while_all_gathers_grow():
    d = 2**16
    volume: dict[str, dict[int, int]] = {"two_phase": {}, "allgather": {}}
    for strategy in volume:
        for world in (2, 4, 8):
            ledgers = run_local(world, _bytes_per_worker, strategy, d)
            volume[strategy][world] = max(lg.bytes_up + lg.bytes_down for lg in ledgers)
            payload = [r for r in ledgers[0].wire if r.purpose == "payload"]
            # what crossed the transport: phase 1 is an all-to-all, phase 2 an all-gather of the re-encoded shards
            assert [r.kind for r in payload] == (["alltoall", "allgather"] if strategy == "two_phase" else ["allgather"])
            assert all(len(r.bytes_up) == world for r in payload)
            assert all(lg.wire == ledgers[0].wire for lg in ledgers)  # every worker knows every worker's bytes
            if strategy == "two_phase":  # every byte sent in phase 1 is received by someone
                assert sum(payload[0].bytes_up) == sum(payload[0].bytes_down)
    tp, ag = volume["two_phase"], volume["allgather"]
    one = ag[2] / 2  # P: one worker's qsgd frame of d elements
    for n in (2, 4, 8):
        # two-phase: up (N−1)/N·P + P/N, down 2(N−1)/N·P → bounded by 3P; all-gather: P up, (N−1)P down.
        assert tp[n] == pytest.approx(one * (1 + 2 * (n - 1) / n), rel=0.03)
        assert ag[n] == pytest.approx(one * n, rel=0.03)
    assert tp[8] < 1.5 * tp[2] and tp[8] < 3 * one
    assert ag[8] > 3.5 * ag[2]


def test_two_phase_wire_record_feeds_the_network_model_with_real_down_bytes():
    world = 4
    ledgers = run_local(world, _bytes_per_worker, "two_phase", 2**14)
    rec = next(r for r in ledgers[0].wire if r.kind == "alltoall")
    links = [Link(1e8, 1e8, 0.0)] * world
    assert rec.bytes_down is not None
    expected = max(8 * max(u, dn) / 1e8 for u, dn in zip(rec.bytes_up, rec.bytes_down))
    assert step_comm_seconds([rec], links) == pytest.approx(expected)
    assert step_comm_seconds([rec], links) == pytest.approx(
        transfer_seconds("alltoall", rec.bytes_up, rec.bytes_down, links))
    # the whole call: size exchanges, the all-to-all and the padded all-gather, one after another
    assert step_comm_seconds(ledgers[0].wire, links) == pytest.approx(sum(
        transfer_seconds(r.kind, r.bytes_up, [r.down(w) for w in range(world)], links) for r in ledgers[0].wire))


def _ef_steps(transport, resume_state):
    """Two steps of two-phase top-k with error feedback; optionally restart from step 1's state."""
    def make():
        return CompressedGroup(Policy("topk", {"density": 0.05}, error_feedback=True, min_numel=0), transport,
                               seed=1, strategy="two_phase")

    group = make()
    out0, _ = group.allreduce_mean(_grads(transport.rank), 0)
    state = group.state_dict()
    if resume_state:
        group = make()
        group.load_state_dict(state)
    out1, _ = group.allreduce_mean(_grads(transport.rank), 1)
    return out0, out1, state


def test_two_phase_owner_error_feedback_is_kept_per_shard_and_resumes_bit_exactly():
    if "topk" not in REGISTRY:
        pytest.skip("topk codec not available")
    world = 3
    straight = run_local(world, _ef_steps, False)
    resumed = run_local(world, _ef_steps, True)
    for w in range(world):
        owners = [v for k, v in straight[w][2].items() if k.startswith("owner:")]  # the owners' own codec memory
        assert len(owners) == 1
        owner = owners[0]["residuals"]
        assert sorted(owner) == [f"{k}#{w}/{world}@owner" for k in sorted(SHAPES)]
        for k in SHAPES:
            assert torch.equal(straight[w][1][k], resumed[w][1][k])


def test_forbidden_codec_strategy_pairs_are_errors_that_name_both():
    with pytest.raises(ValueError, match="codec 'qsgd' is gather-kind.*strategy 'allreduce' is not allowed"):
        check_strategy("qsgd", "allreduce")
    with pytest.raises(ValueError, match="'qsgd'.*'allreduce'"):
        CompressedGroup(Policy("qsgd"), type("T", (), {"rank": 0, "world": 2})(), strategy="allreduce")
    with pytest.raises(ConfigError, match="codec 'qsgd'.*strategy 'allreduce'"):
        from_dict(CompressionConfig, {"codec": "qsgd", "strategy": "allreduce"}, "compression")
    with pytest.raises(ValueError, match="strategy='ring' is not a strategy"):
        check_strategy("none", "ring")
    for codec in ("none", "qsgd"):
        for strategy in ("auto", "allgather", "two_phase"):
            check_strategy(codec, strategy)
    check_strategy("none", "allreduce")
    if "powersgd" in REGISTRY:
        with pytest.raises(ValueError, match="codec 'powersgd' is a multi-round.*strategy 'two_phase' is not allowed"):
            check_strategy("powersgd", "two_phase")
        with pytest.raises(ConfigError, match="'powersgd'.*'two_phase'"):
            from_dict(CompressionConfig, {"codec": "none", "strategy": "two_phase",
                                          "overrides": [{"pattern": "fc*", "codec": "powersgd"}]}, "compression")
        with pytest.raises(ValueError, match="codec 'powersgd' is a multi-round.*strategy 'allgather' is not allowed"):
            check_strategy("powersgd", "allgather")
        check_strategy("powersgd", "allreduce")


def _gloo_strategies(rank: int, world: int) -> dict:
    transport = TorchTransport()
    cases = [("none", s) for s in ("allreduce", "allgather", "two_phase")] + [("qsgd", "two_phase")]
    return {case: _reduce(transport, *case)[0] for case in cases}


def test_strategies_on_real_gloo_processes_match_the_in_process_hub():
    world = 3
    gloo = run_workers(world, _gloo_strategies)
    mean = _true_mean(world)
    for w in range(world):
        for s in ("allreduce", "allgather", "two_phase"):
            for k in SHAPES:
                torch.testing.assert_close(gloo[w][("none", s)][0][k], mean[k], rtol=0, atol=1e-6)
    local = run_local(world, _reduce, "qsgd", "two_phase")
    for w in range(world):
        avg, ledger = gloo[w][("qsgd", "two_phase")]
        for k in SHAPES:
            assert torch.equal(avg[k], local[w][0][0][k])
        assert ledger.bytes_up == local[w][0][1].bytes_up and ledger.bytes_down == local[w][0][1].bytes_down
        assert ledger.wire == local[w][0][1].wire
