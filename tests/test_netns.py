"""Real shaped links: the tc plan, the real-vs-simulated arithmetic, and (extended) the netns cluster itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rayq.launch.links_compare import Comparison, StepTimes, compare, fit_call_seconds, markdown, speedups
from rayq.launch.netns import NetnsCluster, existing_links, existing_namespaces, plan, timed_transfer, unavailable
from rayq.netsim import Link, payload_links, ring_allreduce_time

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ pure Python


def test_plan_shapes_every_node_from_the_profile():
    shapes = plan("shaped-100m", 3)
    assert [s.node for s in shapes] == [1, 2, 3]
    assert all(s.up_bps == s.down_bps == 100e6 for s in shapes)
    assert plan("shaped-1g", 2)[1].up_bps == 1e9


def test_plan_command_prints_one_line_per_node_for_the_script():
    r = subprocess.run([sys.executable, "-m", "rayq.launch.netns", "plan", "shaped-1g", "2"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln.split() for ln in r.stdout.splitlines()]
    assert [ln[:3] for ln in lines] == [["1", "1000000000", "1000000000"], ["2", "1000000000", "1000000000"]]
    bad = subprocess.run([sys.executable, "-m", "rayq.launch.netns", "plan", "no-such-profile", "2"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "netns plan:" in bad.stderr


def _write_run(run_dir: Path, walls: list[list[float]], comms: list[list[float]], nbytes: int) -> None:
    """A run of len(walls[0]) steps on len(walls) ranks: each rank's step times, one all-reduce per step."""
    (run_dir / "ranks").mkdir(parents=True)
    n = len(walls)
    rows = []
    for s in range(1, len(walls[0]) + 1):
        wire = [["allreduce", 1, [nbytes] * n, None, "payload", None]]
        rows.append({"step": s, "wall_s": walls[0][s - 1], "compute_s": 0.05, "wire": wire})
        if s % 2 == 0:
            rows.append({"eval_step": s, "eval/accuracy": 0.5 + 0.1 * s})
    (run_dir / "trace.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for r in range(n):
        t, lines = 0.0, []
        for s in range(1, len(walls[r]) + 1):
            t += walls[r][s - 1]
            lines.append(json.dumps({"step": s, "t": t, "compute_s": 0.05, "comm_s": comms[r][s - 1], "n_wire": 1}))
        (run_dir / "ranks" / f"rank{r}.jsonl").write_text("\n".join(lines) + "\n")


def test_compare_waits_for_the_slowest_rank_and_counts_the_network_from_the_last_to_arrive(tmp_path):
    links = [Link(100e6, 100e6)] * 2
    # rank 1 spends 0.3 s outside the collective, rank 0 0.1 s; the collective took 0.2 s on rank 1.
    _write_run(tmp_path, walls=[[1.0, 0.5, 0.5, 0.5], [1.0, 0.5, 0.5, 0.5]],
               comms=[[0.5, 0.4, 0.4, 0.4], [0.5, 0.2, 0.2, 0.2]], nbytes=1_000_000)
    c = compare(tmp_path, links, "dense", "shaped-100m", target=0.85)
    assert [s.step for s in c.steps] == [2, 3, 4]  # the first step (start-up) is left out
    net = ring_allreduce_time(1_000_000, payload_links(links))
    for s in c.steps:
        assert s.local == pytest.approx(0.3) and s.comm == pytest.approx(0.2)
        assert s.netsim == pytest.approx(net) and s.sim == pytest.approx(0.3 + net)
    assert c.step_to_target == 4  # accuracy 0.9 at step 4
    r = c.summary()
    assert r["real_s"] == pytest.approx(1.5) and r["sim_s"] == pytest.approx(3 * (0.3 + net))
    assert r["error"] == pytest.approx((r["sim_s"] - 1.5) / 1.5)
    assert r["comm_share"] == pytest.approx(0.2 / 0.5)


def test_compare_charges_a_call_cost_per_collective_and_fits_it_from_the_gap(tmp_path):
    links = [Link(100e6, 100e6)] * 2
    _write_run(tmp_path, walls=[[1.0, 0.5, 0.5, 0.5]] * 2, comms=[[0.5, 0.2, 0.2, 0.2]] * 2, nbytes=1_000_000)
    plain = compare(tmp_path, links, "dense", "p", 0.85)
    call_s = fit_call_seconds([plain])
    assert call_s == pytest.approx(0.2 - ring_allreduce_time(1_000_000, payload_links(links)))
    fitted = compare(tmp_path, links, "dense", "p", 0.85, call_s=call_s)
    assert all(s.netsim == pytest.approx(s.comm) and s.calls == 1 for s in fitted.steps)


def test_ranks_that_do_not_meet_in_a_step_are_charged_where_they_next_meet(tmp_path):
    # local SGD: no collective in step 2; rank 0 is slow in step 2, rank 1 in step 3: they meet at step 3.
    _write_run(tmp_path, walls=[[1.0, 0.4, 0.2, 0.2], [1.0, 0.1, 0.5, 0.2]], comms=[[0.5, 0, 0.1, 0.1]] * 2,
               nbytes=1000)
    rows = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines()]
    for r in rows:
        if r.get("step") == 2:
            r["wire"] = []
    (tmp_path / "trace.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = compare(tmp_path, [Link(1e9, 1e9)] * 2, "local-sgd", "p", 0.85)
    assert [s.local for s in c.steps] == pytest.approx([0.0, 0.5, 0.1])  # max(0.4+0.1, 0.1+0.4), then 0.1


def test_compare_refuses_a_run_without_every_ranks_record(tmp_path):
    _write_run(tmp_path, walls=[[1.0, 0.5]] * 2, comms=[[0.5, 0.2]] * 2, nbytes=10)
    with pytest.raises(ValueError, match="2 rank records for 4 workers"):
        compare(tmp_path, [Link(1e8, 1e8)] * 4, "dense", "p", 0.9)


def test_the_partition_watcher_sees_evaluations_and_skips_a_half_written_line(tmp_path):
    from rayq.launch.bench_links import _steps_done

    trace = tmp_path / "trace.jsonl"
    assert _steps_done(trace) == []
    trace.write_text('{"step": 9, "wall_s": 0.5}\n{"eval_step": 10, "eval/accuracy": 0.8}\n{"step": 10, "wa')
    assert _steps_done(trace) == [9, 10]


def test_the_rank_recorder_wraps_run_end_as_the_trainers_call_it(tmp_path):
    """``bench links`` wraps ``Run.end`` in every worker: the wrapper must take what the trainers pass
    (``run.end(step, loss, outcome, faults)``), record the step's own collectives (booking adds reports and
    evaluations) and the times the booking resolved (on a GPU they are device spans read there)."""
    import inspect
    from types import SimpleNamespace

    from rayq.launch.bench_links import _recording
    from rayq.ledger import Ledger
    from rayq.replica import Outcome
    from rayq.run import Run

    inspect.signature(Run.end).bind(object(), 3, None, None, None)  # the trainers' call
    booked = []

    def end(run, step, loss, outcome, faults=None):
        booked.append((step, loss, faults))
        outcome.compute_s, outcome.ledger.comm_s = 0.25, 0.125  # resolved by the booking
        outcome.ledger.wire.append("report")

    ledger = Ledger(rank=1)
    ledger.wire.extend(["gather", "allreduce"])
    run = SimpleNamespace(run_dir=tmp_path, rank=1)
    _recording(end)(run, 3, "loss", Outcome(ledger, True, True), "faults")
    assert booked == [(3, "loss", "faults")]
    row = json.loads((tmp_path / "ranks" / "rank1.jsonl").read_text())
    assert (row["step"], row["compute_s"], row["comm_s"], row["n_wire"]) == (4, 0.25, 0.125, 2)


def _comparison(config: str, real: float, reached: bool = True) -> Comparison:
    steps = [StepTimes(s, real / 2, real / 4, real / 4, real / 4, real / 2) for s in (2, 3)]
    return Comparison(config, "p", steps, {3: 0.95 if reached else 0.5}, 0.9)


def test_speedups_are_dense_time_over_each_and_skip_runs_that_missed_the_target():
    rows = [_comparison("dense", 10.0).summary(), _comparison("qsgd", 4.0).summary(),
            _comparison("fp16", 1.0, reached=False).summary()]
    assert speedups(rows, "p") == pytest.approx({"dense": 1.0, "qsgd": 2.5})
    table = markdown(rows, 0.9)
    assert "| qsgd | 3 | 4.0 s | 4.0 s | +0% |" in table and "| fp16 | - | not reached |" in table


SCRIPT = REPO / "clusters" / "netns-cluster.sh"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop to another user")
def test_the_script_refuses_without_root_before_making_anything(tmp_path):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(SCRIPT), "start"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "RAYQ_NETNS_DIR": str(tmp_path)})
    assert r.returncode == 1 and "needs root" in r.stderr, r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_script_refuses_without_ip_or_tc(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id"):  # what the script needs before its checks; no ip, no tc
        (bin_dir / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([str(bin_dir / "bash"), str(SCRIPT), "start"], capture_output=True, text=True, timeout=60,
                       env={"PATH": str(bin_dir), "RAYQ_NETNS_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)})
    assert r.returncode == 1, r.stdout + r.stderr
    want = "needs root" if os.geteuid() != 0 else "the 'ip' command (iproute2) is missing"
    assert want in r.stderr and not (tmp_path / "state").exists()


# ------------------------------------------------------------------------------------------ real cluster


def _alive(pid: int) -> bool:
    """A process that still runs (an exited one its parent has not reaped yet is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.fixture(scope="module")
def shaped_cluster():
    why = unavailable()
    if why:
        pytest.skip(f"shaped links unavailable: {why}")
    cluster = NetnsCluster(workers=2, profile="shaped-100m", state_dir=Path(tempfile.mkdtemp(prefix="rqt", dir="/tmp")),
                           prefix="rqt", net="10.78.0", gcs_port=6393, dashboard_port=8269)
    before_ns, before_links = existing_namespaces(), existing_links()
    try:
        cluster.start()
        made = cluster.made()
        pids = cluster.pids()
        yield cluster
    finally:
        out = cluster.stop()
        again = cluster.stop()
    assert {n for k, n in made if k == "netns"} == {"rqtw1", "rqtw2"} and pids, (made, pids)
    left_pids = [p for p in pids if _alive(p)]
    assert not left_pids, (out, left_pids)
    assert existing_namespaces() == before_ns and existing_links() == before_links
    assert "nothing running" in again and not cluster.made() and not cluster.pids()
    shutil.rmtree(cluster.state_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.extended
def test_links_are_shaped_to_the_profile(shaped_cluster):
    up, down = shaped_cluster.qdiscs(1)
    assert "tbf" in up and "tbf" in down
    t = timed_transfer(shaped_cluster, 1, 2, nbytes=6_000_000)
    # 100 Mbit/s frames carry 96.6 Mbit/s of TCP payload; slow start and the ack cost a little more.
    assert 80e6 < t.bps < 100e6, t


def _veth_bytes(cluster: NetnsCluster, node: int) -> int:
    """Bytes through node ``node``'s link, both ways (counted on the bridge side of its veth pair)."""
    stats = Path(f"/sys/class/net/{cluster.prefix}v{node}/statistics")
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


@pytest.mark.slow
@pytest.mark.extended
def test_a_training_job_runs_across_the_shaped_nodes(shaped_cluster, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    before = [_veth_bytes(shaped_cluster, i) for i in (1, 2)]
    r = subprocess.run([sys.executable, "-m", "rayq", "train", "--address", shaped_cluster.address,
                        "--set", "workers=2", "--set", "cpus_per_worker=1", "--set", "max_steps=12",
                        "--set", "report_every=6", "--set", "eval_every=6", "--set", "checkpoint_every=0",
                        "--output-dir", str(tmp_path / "runs"), "--name", "shaped"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "shaped" / "summary.json").read_text())
    assert summary["step"] == 12
    trace = [json.loads(x) for x in (tmp_path / "runs" / "shaped" / "trace.jsonl").read_text().splitlines()]
    gradients = sum(max(w[2]) for row in trace if "wire" in row for w in row["wire"])
    # both ranks ran in the namespaces: their gradients crossed each node's shaped link
    assert all(_veth_bytes(shaped_cluster, i) - b > gradients for i, b in zip((1, 2), before))
