"""Network model: collective times against hand-computed values, DeDLOC load balancing (T15), clock."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.optimize import linprog

from rayq.collective import Ledger
from rayq.balance import apportion, load_balance, optimize_shares
from rayq.netsim import (Link, Traffic, VirtualClock, butterfly_time, collective_seconds, payload_links, ps_time,
                         ring_allgather_time, ring_allreduce_time, step_comm_seconds, time_to_accuracy, transfer_seconds,
                         tree_broadcast_time, two_phase_time, wire_bytes)
from rayq.transport import WireRecord

GBIT, MBIT = 1e9, 1e6


def links(n: int, bps: float = GBIT, latency: float = 0.0) -> list[Link]:
    return [Link(bps, bps, latency) for _ in range(n)]


# ---------------------------------------------------------------------------------------- ring all-reduce


def test_ring_allreduce_matches_hand_computed_value():
    # 4 workers, 1 Gbit/s, 1 ms, 4 MB: 2·3/4·4e6·8/1e9 s of bandwidth + 2·3 hops of 1 ms
    assert ring_allreduce_time(4e6, links(4, GBIT, 1e-3)) == pytest.approx(2 * 3 / 4 * 4e6 * 8 / 1e9 + 6 * 1e-3,
                                                                         rel=1e-12)
    assert ring_allreduce_time(4e6, links(4, GBIT, 1e-3)) == pytest.approx(0.054, rel=1e-12)


def test_ring_allreduce_is_bounded_by_the_slowest_link():
    ring = links(4, GBIT, 1e-3)
    ring[2] = Link(100 * MBIT, GBIT, 1e-3)  # a slow uplink on the hop 2 → 3
    assert ring_allreduce_time(4e6, ring) == pytest.approx(1.5 * 4e6 * 8 / 1e8 + 6e-3)
    ring[2] = Link(GBIT, 10 * MBIT, 1e-3)  # a slow downlink on the hop 1 → 2
    assert ring_allreduce_time(4e6, ring) == pytest.approx(1.5 * 4e6 * 8 / 1e7 + 6e-3)


def test_hop_latency_is_the_mean_of_its_endpoints_and_rounds_multiply_it():
    ring = links(4, GBIT, 1e-3)
    ring[1] = Link(GBIT, GBIT, 10e-3)
    # hops 0→1 and 1→2 cost (1 + 10)/2 ms; the bandwidth term does not change with rounds
    assert ring_allreduce_time(0, ring) == pytest.approx(6 * 5.5e-3)
    assert ring_allreduce_time(4e6, ring, rounds=2) == pytest.approx(0.048 + 12 * 5.5e-3)


def test_one_worker_communicates_nothing():
    one = links(1, GBIT, 1e-3)
    assert ring_allreduce_time(4e6, one) == ring_allgather_time([4e6], one) == two_phase_time([4e6], one) == 0.0
    assert butterfly_time(4e6, one) == transfer_seconds("allreduce", [4e6], [4e6], one) == 0.0


# ---------------------------------------------------------------------------------------- all-gather, two-phase


def test_ring_allgather_equal_payloads_hand_value():
    # (N−1)·(8P/b + L) = 3·(8e6/1e9 + 1e-3)
    assert ring_allgather_time([1e6] * 4, links(4, GBIT, 1e-3)) == pytest.approx(3 * (8e-3 + 1e-3))


def test_ring_allgather_variable_payloads_through_a_slow_hop():
    ring = links(3, GBIT)
    ring[0] = Link(100 * MBIT, GBIT, 0.0)  # hop 0 → 1 carries 100 Mbit/s
    # step 0: worker 0 forwards its own 1 MB (0.08 s, slowest); step 1: worker 0 forwards worker 2's 3 MB (0.24 s)
    assert ring_allgather_time([1e6, 2e6, 3e6], ring) == pytest.approx(0.08 + 0.24)


def test_allgather_volume_grows_with_workers_while_two_phase_stays_flat():
    p = 1e6
    for n in range(2, 9):
        gather = wire_bytes("allgather", [p] * n)
        two = wire_bytes("two_phase", [p] * n)
        assert all(t.received == pytest.approx((n - 1) * p) for t in gather)
        assert all(t.sent == pytest.approx(2 * (n - 1) / n * p) and t.sent < 2 * p for t in two)
        assert all(t.received == pytest.approx(2 * (n - 1) / n * p) for t in two)
    t_gather = [ring_allgather_time([p] * n, links(n)) for n in (2, 8)]
    t_two = [two_phase_time([p] * n, links(n)) for n in (2, 8)]
    assert t_gather[1] / t_gather[0] == pytest.approx(7.0)
    assert t_two[1] / t_two[0] == pytest.approx(1.75)  # 2(N−1)/N: from 1 to 1.75, never above 2


def test_two_phase_equal_links_equal_a_ring_allreduce_of_the_payload():
    # 2(N−1)/N·8P/b + 2(N−1)·L, whether from payloads or from the wire bytes a ledger records
    ring = links(5, GBIT, 2e-3)
    expected = 2 * 4 / 5 * 8e6 / 1e9 + 8 * 2e-3
    assert two_phase_time([1e6] * 5, ring) == pytest.approx(expected)
    assert ring_allreduce_time(1e6, ring) == pytest.approx(expected)
    wire = wire_bytes("two_phase", [1e6] * 5)
    assert transfer_seconds("two_phase", [t.sent for t in wire], [t.received for t in wire], ring) == \
        pytest.approx(expected)


def test_allgather_wire_bytes_forward_all_but_the_successor_payload():
    assert wire_bytes("allgather", [1, 2, 3]) == [Traffic(4, 5), Traffic(3, 4), Traffic(5, 3)]


# ---------------------------------------------------------------------------------------- parameter server


def test_parameter_server_hand_values():
    workers = [Link(100 * MBIT, GBIT, 1e-3) for _ in range(4)]
    server = Link(GBIT, GBIT, 1e-3)
    # push: max(8e6/1e8, 4·8e6/1e9) = 0.08; pull: max(8e6/1e9, 4·8e6/1e9) = 0.032; + 2 hops of 1 ms
    assert ps_time([1e6] * 4, [1e6] * 4, workers, server) == pytest.approx(0.08 + 0.032 + 2e-3)
    # 40 workers: the server's downlink is the bottleneck of the push (40·8e6/1e9 = 0.32 s)
    many = [Link(100 * MBIT, GBIT, 1e-3) for _ in range(40)]
    assert ps_time([1e6] * 40, [1e6] * 40, many, server) == pytest.approx(0.32 + 0.32 + 2e-3)
    # no server link: only the workers' links count
    assert ps_time([1e6] * 4, [1e6] * 4, workers) == pytest.approx(0.08 + 0.008 + 2e-3)


# ---------------------------------------------------------------------------------------- ledger → seconds


def test_transfer_seconds_dispatches_on_the_collective_kind():
    ring = links(4, GBIT, 1e-3)
    assert transfer_seconds("allreduce", [4e6] * 4, [4e6] * 4, ring) == pytest.approx(0.054)
    assert transfer_seconds("allgather", [1e6] * 4, [3e6] * 4, ring) == pytest.approx(0.027)
    assert transfer_seconds("ps", [1e6] * 4, [1e6] * 4, ring) == pytest.approx(0.008 + 0.008 + 2e-3)
    assert transfer_seconds("butterfly", [4e6] * 4, [4e6] * 4, ring) == pytest.approx(6 / 4 * 32e6 / 1e9 + 2e-3)
    with pytest.raises(ValueError, match="collective kind 'ring' is unknown; choose one of: allreduce, allgather"):
        transfer_seconds("ring", [1] * 4, [1] * 4, ring)
    with pytest.raises(ValueError, match="bytes_up has 3 entries for 4 links"):
        transfer_seconds("allreduce", [1] * 3, [1] * 4, ring)


# ---------------------------------------------------------------------------------------- broadcast, framing
# Measured on tc-shaped links (clusters/netns-cluster.sh, 4 nodes at 100 Mbit/s, gloo): a 4.4 MB broadcast took
# 1.00–1.02 s, three times the 0.35 s of the pipelined chain the model used before; gloo's broadcast is a
# binomial tree whose source starts its sends at once, so they share its uplink.


@pytest.mark.parametrize("n, hops_of_v", [(2, 1), (3, 2), (4, 3), (8, 6)])
def test_broadcast_is_gloos_binomial_tree_whose_sends_share_the_senders_uplink(n, hops_of_v):
    v = 1e6  # 8 Mbit: 0.08 s at 100 Mbit/s
    assert tree_broadcast_time(v, links(n, 100 * MBIT)) == pytest.approx(hops_of_v * 0.08, rel=1e-12)


def test_broadcast_latency_is_the_trees_depth_of_hops():
    # 4 workers: source → worker 1 → worker 3 is two hops; 1 ms each, twice with two rounds
    assert tree_broadcast_time(1e6, links(4, 100 * MBIT, 1e-3)) == pytest.approx(3 * 0.08 + 2e-3)
    assert tree_broadcast_time(1e6, links(4, 100 * MBIT, 1e-3), rounds=2) == pytest.approx(3 * 0.08 + 4e-3)


def test_broadcast_from_another_source_is_bounded_by_that_sources_uplink():
    net = links(4, 100 * MBIT)
    net[2] = Link(50 * MBIT, 100 * MBIT)  # worker 2's uplink is half as fast
    up = [0, 0, 1e6, 0]
    # source 2 feeds workers 3 and 0 at 25 Mbit/s each (0.32 s), then worker 3 feeds worker 1 (0.08 s)
    assert transfer_seconds("broadcast", up, [1e6, 1e6, 0, 1e6], net) == pytest.approx(0.40)
    assert step_comm_seconds([WireRecord("broadcast", 1, (0, 0, 1_000_000, 0))], net) == pytest.approx(0.40)


def test_broadcast_wire_bytes_follow_the_tree():
    wire = wire_bytes("broadcast", [0, 5, 0, 0, 0])  # source 1 of 5: it feeds 2 and 3 and 5 mod 5 = 0
    assert wire == [Traffic(0.0, 5.0), Traffic(15.0, 0.0), Traffic(5.0, 5.0), Traffic(0.0, 5.0), Traffic(0.0, 5.0)]
    assert sum(t.sent for t in wire) == sum(t.received for t in wire) == 4 * 5


def test_payload_links_carry_tcp_payload_at_1448_of_every_1514_frame_bytes():
    (lk,) = payload_links([Link(100 * MBIT, 1000 * MBIT, 1e-3)])
    assert lk.up_bps == pytest.approx(95.64 * MBIT, rel=1e-4) and lk.down_bps == pytest.approx(956.4 * MBIT, rel=1e-4)
    assert lk.latency_s == 1e-3
    # a 4.4 MB ring all-reduce at 100 Mbit/s: 0.528 s of frames, 0.552 s of payload (measured on tc: 0.558)
    assert ring_allreduce_time(4.4e6, payload_links(links(4, 100 * MBIT))) == pytest.approx(0.5520, rel=1e-3)
    with pytest.raises(ValueError, match=r"efficiency=1.5 is invalid; expected payload bytes per frame byte in \(0, 1\]"):
        payload_links(links(2), 1.5)


def test_collective_seconds_reads_the_ledgers_bytes_and_rounds():
    ring = links(4, GBIT, 1e-3)
    ledgers = [Ledger(bytes_up=2_000_000, bytes_down=2_000_000, rounds=2) for _ in range(4)]
    # a two-round all-reduce (PowerSGD's P then Q): bandwidth of the total, latency of both rounds
    assert collective_seconds("allreduce", ledgers, ring) == pytest.approx(1.5 * 16e6 / 1e9 + 12e-3)


# ---------------------------------------------------------------------------------------- T15: DeDLOC load balancing


def _lp_xi(b: list[float]) -> float:
    """Reference LP (hivemind optimize_parts_lp) over the peers with b > 0: variables (w_1..w_N, ξ)."""
    n = len(b)
    active = [i for i in range(n) if b[i] > 0]
    c = np.zeros(n + 1)
    c[-1] = 1.0
    a_ub, b_ub = [], []
    for i in active:  # (1 + (N−2)w_i)/b_i ≤ ξ  ⇔  (N−2)/b_i·w_i − ξ ≤ −1/b_i
        row = np.zeros(n + 1)
        row[i], row[-1] = (n - 2) / b[i], -1.0
        a_ub.append(row)
        b_ub.append(-1.0 / b[i])
    a_eq = [np.r_[np.ones(n), 0.0]]
    bounds = [(0, None) if b[i] > 0 else (0, 0) for i in range(n)] + [(0, None)]
    res = linprog(c, A_ub=np.array(a_ub), b_ub=b_ub, A_eq=np.array(a_eq), b_eq=[1.0], bounds=bounds)
    assert res.success
    return float(res.x[-1])


def _feasible(w: tuple[float, ...], b: list[float], xi: float) -> bool:
    n = len(b)
    return (all(wi >= -1e-12 for wi in w) and math.isclose(sum(w), 1.0, abs_tol=1e-9)
            and all((1 + (n - 2) * w[i]) / b[i] <= xi * (1 + 1e-9) for i in range(n) if b[i] > 0))


@pytest.mark.parametrize("n", [3, 4, 7, 40])
def test_equal_bandwidth_gives_equal_shares_and_the_closed_form_xi(n):
    shares = optimize_shares([100 * MBIT] * n)
    assert shares.weights == pytest.approx([1 / n] * n, abs=1e-6)
    assert shares.xi == pytest.approx((2 * n - 2) / (n * 100 * MBIT), rel=1e-6)


def test_water_filling_matches_the_lp_optimum_on_random_bandwidths():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(3, 12)
        b = [math.exp(rng.uniform(math.log(10), math.log(1000))) for _ in range(n)]
        shares = optimize_shares(b)
        closed = max(shares.xi_fill, 1 / min(b))
        assert shares.xi == pytest.approx(closed, rel=1e-6)
        assert shares.xi == pytest.approx(_lp_xi(b), rel=1e-6)
        assert _feasible(shares.weights, b, shares.xi)


@pytest.mark.parametrize("b, xi, water", [
    ([100, 80, 60, 50, 40], 0.025, (0.47, 0.31, 0.15, 0.07, 0.0)),
    ([1000, 100, 100, 10], 0.1, (1.0, 0.0, 0.0, 0.0)),
])
def test_degenerate_examples_agree_on_xi_and_feasibility(b, xi, water):
    shares = optimize_shares(b)
    assert shares.xi == pytest.approx(xi, rel=1e-6)
    assert _lp_xi(b) == pytest.approx(xi, rel=1e-6)
    assert _feasible(shares.weights, b, xi)
    assert shares.weights == pytest.approx(water, abs=0.006)  # our water-filling solution of the LP


def test_client_mode_peers_get_no_share():
    shares = optimize_shares([100, 0, 100, 100], client_mode=[False, False, True, False])
    assert shares.weights[1] == 0.0 and shares.weights[2] == 0.0
    assert sum(shares.weights) == pytest.approx(1.0)
    assert shares.xi == pytest.approx(_lp_xi([100, 0, 0, 100]), rel=1e-6)
    with pytest.raises(ValueError, match="every peer is in client mode"):
        optimize_shares([0, 0, 0])


def test_unknown_bandwidth_takes_the_mean_of_the_known_ones():
    assert optimize_shares([100, None, 300, float("nan")]).weights == \
        pytest.approx(optimize_shares([100, 200, 300, 200]).weights)


def test_two_peers_split_equally_and_any_split_costs_one_vector():
    shares = optimize_shares([100, 50])
    assert shares.weights == (0.5, 0.5) and shares.xi == pytest.approx(1 / 50)


def test_hagenbach_bischoff_apportionment_sums_to_the_vector_size():
    assert apportion([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert apportion([1, 1, 1], 10) == [4, 3, 3]
    rng = random.Random(1)
    for _ in range(50):
        scores = [rng.random() for _ in range(rng.randint(1, 40))]
        total = rng.randint(0, 10**7)
        parts = apportion(scores, total)
        assert sum(parts) == total and all(p >= 0 for p in parts)


def test_load_balance_gives_integer_shards_and_zeroes_tiny_shares():
    sizes = load_balance([100, 80, 60, 50, 40], 1_000_003)
    assert sum(sizes) == 1_000_003 and sizes[-1] == 0
    sizes = load_balance([100, 80, 60, 50, 40], 1000, min_size=100)  # the 0.07 share falls under 100 elements
    assert sum(sizes) == 1000 and sizes[3] == sizes[4] == 0


def test_butterfly_time_is_xi_times_the_vector_plus_two_hops():
    ring = [Link(b * MBIT, b * MBIT, 10e-3) for b in (100, 80, 60, 50, 40)]
    assert butterfly_time(1e6, ring) == pytest.approx(0.025 / MBIT * 8e6 + 2 * 10e-3)
    nat = [Link(100 * MBIT, 100 * MBIT, 0.0, client_mode=c) for c in (False, True, False)]
    with pytest.raises(ValueError, match="client-mode peer cannot aggregate"):
        butterfly_time(1e6, nat, shares=[0.5, 0.5, 0.0])


# ---------------------------------------------------------------------------------------- virtual clock


def test_synchronous_step_waits_for_the_slowest_worker_then_communicates():
    clock = VirtualClock(3, speed_factors=[1.0, 2.0, 0.5])
    assert clock.step(0.1, comm_s=0.054) == pytest.approx(0.2 + 0.054)
    assert clock.step([0.1, 0.05, 0.5], comm_s=0.0) == pytest.approx(0.254 + 0.25)
    assert clock.steps == 2 and clock.comm_s == pytest.approx(0.054)
    assert clock.utilisation() == pytest.approx([0.2 / 0.504, 0.3 / 0.504, 0.3 / 0.504])


def test_absent_workers_do_not_hold_the_barrier():
    clock = VirtualClock(3, speed_factors=[1.0, 1.0, 10.0])
    clock.step(0.1, comm_s=0.01, active=[True, True, False])
    assert clock.now == pytest.approx(0.11) and clock.times[2] == 0.0
    assert clock.join(2) == pytest.approx(0.11)


def test_asynchronous_workers_advance_alone_and_meet_at_the_barrier():
    clock = VirtualClock(3, speed_factors=[1.0, 4.0, 1.0])
    clock.compute(0, 1.0)
    clock.compute(1, 1.0)
    clock.advance_worker(2, 0.5)
    assert clock.times == pytest.approx([1.0, 4.0, 0.5]) and clock.now == pytest.approx(4.0)
    assert clock.barrier(comm_s=0.25) == pytest.approx(4.25)
    assert clock.times == pytest.approx([4.25] * 3)


def test_clock_state_round_trips():
    clock = VirtualClock(2, speed_factors=[1.0, 3.0])
    clock.step([0.2, 0.1], comm_s=0.05)
    clock.advance_worker(0, 1.0)
    restored = VirtualClock(2)
    restored.load_state_dict(clock.state_dict())
    assert restored.state_dict() == clock.state_dict()
    assert restored.step(0.1) == pytest.approx(clock.step(0.1))
    with pytest.raises(ValueError, match="clock state holds 2 workers; this clock has 3"):
        VirtualClock(3).load_state_dict(clock.state_dict())


# ---------------------------------------------------------------------------------------- time to accuracy


def test_time_to_accuracy_is_the_first_time_at_or_above_target():
    points = [(3.0, 0.91), (1.0, 0.5), (2.0, 0.90), (4.0, 0.95)]
    assert time_to_accuracy(points, 0.90) == 2.0
    assert time_to_accuracy(points, 0.95) == 4.0
    assert time_to_accuracy(points, 0.99) is None
    assert time_to_accuracy([], 0.5) is None


def test_replaying_a_trace_keeps_its_stragglers_and_what_a_deadline_dropped():
    from rayq.netsim import TraceStep, replay

    links = [Link(1e9, 1e9, 0.0)] * 4
    wire = (("allreduce", 1, (1_000_000,) * 4),)
    plain = [TraceStep(s + 1, 0.1, wire) for s in range(10)]
    slow = [TraceStep(s + 1, 0.1, wire, (1.0, 1.0, 1.0, 5.0), (True,) * 4) for s in range(10)]
    cut = [TraceStep(s + 1, 0.1, wire, (1.0, 1.0, 1.0, 5.0), (True, True, True, False)) for s in range(10)]
    comm = ring_allreduce_time(1_000_000, links)
    assert replay(plain, links)[10] == pytest.approx(10 * (0.1 + comm))
    assert replay(slow, links)[10] == pytest.approx(10 * (0.5 + comm))
    assert replay(cut, links)[10] == pytest.approx(10 * (0.1 + comm))
