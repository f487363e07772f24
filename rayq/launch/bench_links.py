"""``rayq bench links``: the network model held against real shaped links.

Starts ``clusters/netns-cluster.sh`` (a head in the root network namespace, ``--workers`` worker nodes each
in its own namespace behind a veth pair, links shaped both ways with tc), and for every ``--profile``
re-shapes the links from that profile and:

1. times gloo's collectives (all-reduce, all-gather, all-to-all, broadcast; the sizes the benchmark's runs
   move) on one Ray actor per worker node, against :func:`rayq.netsim.transfer_seconds` on the profile;
2. trains the e2e benchmark's configurations (dense, fp16, QSGD, top-k + error feedback, PowerSGD, local SGD)
   back to back in one Ray Train worker group, one worker per node, every rank recording its step times;
3. replays each run's trace through ``rayq.netsim`` with the same profile and compares real and simulated
   seconds per step and to ``--target`` accuracy (:mod:`rayq.launch.links_compare`).

``--partition NODE:STEP:SECONDS`` adds fault runs: the node's link goes down after that step for that long,
once under the default collective timeout (the run stalls) and once with ``--partition-timeout`` seconds
and one allowed failure (gloo times out and Ray Train restarts the group from the last checkpoint).
Writes ``links.json``, ``links.md`` and ``links.png`` under ``--out``. Needs root (``sudo``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rayq.launch.bench import E2E_CONFIGS, bench_commands, environment, output_dir

#: The e2e benchmark's configurations this benchmark runs (their overrides come from ``E2E_CONFIGS``).
LINKS_CONFIGS = ["dense", "fp16", "qsgd", "topk+ef", "powersgd", "local-sgd"]
#: Collective sizes probed (bytes per worker): control messages, then what digits-wide's runs move.
PROBES: dict[str, list[int]] = {"allreduce": [8, 100_000, 2_252_820, 4_505_640], "allgather": [8, 100_000, 600_000],
                                "alltoall": [100_000, 1_000_000], "broadcast": [4_505_640]}


# ---------------------------------------------------------------------------------- in the Ray Train workers


def links_sweep(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Trainer ``sweep`` (the ``sync`` loop of every run, unchanged) with each rank's step times recorded.

    The run harness writes rank 0's trace only; a synchronous step waits for the slowest rank, so the
    comparison needs every rank's time outside the collectives. ``Run.end`` is wrapped in this worker
    process to append ``{step, t, compute_s, comm_s, n_wire}`` to ``<run>/ranks/rank<r>.jsonl``.
    """
    from rayq.run import Run
    from trainers import sweep

    if not getattr(Run.end, "records_ranks", False):
        Run.end = _recording(Run.end)
    return sweep.train_loop(loop_config)


def _recording(end: Any) -> Any:
    """``Run.end`` that also appends this rank's step record (whatever else the trainer passes it)."""
    def recorded(run: Any, step: int, loss: Any, outcome: Any, *args: Any, **kwargs: Any) -> None:
        n_wire = len(outcome.ledger.wire)  # the step's exchange; booking it adds reports and evaluations
        end(run, step, loss, outcome, *args, **kwargs)  # books the step: its device times are read by now
        path = run.run_dir / "ranks" / f"rank{run.rank}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": step + 1, "t": time.perf_counter(), "compute_s": outcome.compute_s,
                                "comm_s": outcome.ledger.comm_s, "n_wire": n_wire}) + "\n")

    recorded.records_ranks = True  # type: ignore[attr-defined]
    return recorded


class _Prober:
    """One per worker node: a gloo process group of its own, timing collectives after a barrier."""

    def setup(self, rank: int, world: int, addr: str, port: int) -> str:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        return os.environ.get("GLOO_SOCKET_IFNAME", "")

    def address(self) -> tuple[str, int]:
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def time(self, op: str, nbytes: int, reps: int) -> list[float]:
        import torch
        import torch.distributed as dist

        world, out = dist.get_world_size(), []
        for rep in range(reps + 1):  # the first one warms up
            if op == "allreduce":
                t = torch.zeros(max(nbytes // 4, 1))
                args: tuple = (dist.all_reduce, t)
            elif op == "allgather":
                t = torch.zeros(nbytes, dtype=torch.uint8)
                args = (lambda x, outs: dist.all_gather(outs, x), t, [torch.empty_like(t) for _ in range(world)])
            elif op == "alltoall":
                t = torch.zeros(nbytes * world, dtype=torch.uint8)
                args = (lambda x, o: dist.all_to_all_single(o, x), t, torch.empty_like(t))
            else:
                t = torch.zeros(nbytes, dtype=torch.uint8)
                args = (lambda x: dist.broadcast(x, 0), t)
            dist.barrier()
            t0 = time.perf_counter()
            args[0](*args[1:])
            if rep:
                out.append(time.perf_counter() - t0)
        return out


def real_links(cluster: Any, profile: str) -> tuple[list[Any], dict[str, Any]]:
    """The profile's links as the cluster really has them, and the shaping check behind that.

    The rate is the profile's (tc's tbf); the latency is the profile's where netem adds it, and otherwise
    (a kernel without netem) half the round trip measured between two nodes: the path's own latency.
    """
    from dataclasses import replace as with_

    from rayq.launch.netns import timed_transfer
    from rayq.profiles import load_profile

    links = load_profile(profile, cluster.workers, 0).links
    t = timed_transfer(cluster, 1, 2, nbytes=int(min(links[0].up_bps, links[1].down_bps) / 8 / 2))
    check = {"profile": profile, "nbytes": t.nbytes, "seconds": t.seconds, "bps": t.bps, "rtt_s": t.rtt_s,
             "netem": cluster.netem}
    print(f"  shaping check: {t.nbytes / 1e6:.1f} MB node 1 -> 2 at {t.bps / 1e6:.1f} Mbit/s, RTT "
          f"{1e3 * (t.rtt_s or 0):.3f} ms" + ("" if cluster.netem else " (no netem: latency = RTT/2)"), flush=True)
    if not cluster.netem and t.rtt_s is not None:
        links = [with_(lk, latency_s=t.rtt_s / 2) for lk in links]
    return links, check


def per_message_latency(links: list[Any], profile: str, reps: int) -> tuple[list[Any], dict[str, Any]]:
    """The links with the latency a gloo message really costs: an 8-byte ring all-reduce takes ``2(N−1)`` hops
    of pure latency, so ``L = t / (2(N−1))`` (the α of the α-β model: the wire's RTT/2 plus the sender's and
    receiver's stacks and scheduling, which on a shared CPU dwarf the wire). Kept where the profile says more."""
    from dataclasses import replace as with_

    row = probe_collectives(links, profile, max(reps, 5), {"allreduce": [8]})[0]
    alpha = row["real_s"] / (2 * (len(links) - 1))
    print(f"  per-message latency: 8-byte all-reduce {1e3 * row['real_s']:.2f} ms -> {1e3 * alpha:.3f} ms a hop",
          flush=True)
    return [with_(lk, latency_s=max(lk.latency_s, alpha)) for lk in links], {**row, "latency_s": alpha}


def probe_collectives(links: list[Any], profile: str, reps: int,
                      probes: dict[str, list[int]] = PROBES) -> list[dict[str, Any]]:
    """Median over ``reps`` of each collective's time (the slowest worker's), real and simulated."""
    import ray

    from rayq.netsim import payload_links, transfer_seconds

    workers = len(links)
    links = payload_links(links)
    actor = ray.remote(num_cpus=1)(_Prober)
    probers = [actor.remote() for _ in range(workers)]
    addr, port = ray.get(probers[0].address.remote())
    ray.get([p.setup.remote(r, workers, addr, port) for r, p in enumerate(probers)], timeout=120)
    rows = []
    try:
        for op, sizes in probes.items():
            for n in sizes:
                per = [max(ts) for ts in zip(*ray.get([p.time.remote(op, n, reps) for p in probers], timeout=300))]
                up = {"allreduce": [n] * workers, "allgather": [n] * workers,
                      "alltoall": [(workers - 1) * n] * workers, "broadcast": [n] + [0] * (workers - 1)}[op]
                down = [(workers - 1) * n] * workers if op != "broadcast" else [0] + [n] * (workers - 1)
                rows.append({"profile": profile, "op": op, "nbytes": n, "real_s": statistics.median(per),
                             "real_min_s": min(per), "sim_s": transfer_seconds(op, up, down, links)})
                print(f"  {op:9} {n:>10,} B  real {1e3 * rows[-1]['real_s']:8.1f} ms  netsim "
                      f"{1e3 * rows[-1]['sim_s']:8.1f} ms", flush=True)
    finally:
        for p in probers:
            ray.kill(p)
    return rows


# ---------------------------------------------------------------------------------- driver side


def sweep(cfgs: list[Any], address: str) -> list[dict[str, Any]]:
    """Train ``cfgs`` back to back in one worker group (like ``train_many``) with :func:`links_sweep`."""
    from rayq.errors import TrainingError
    from rayq.launch.driver import DriverResult, describe_failure, init_ray, make_trainer, prepare, summarize

    prepared = [prepare(c) for c in cfgs]
    first = prepared[0][0]
    init_ray(address)
    sweep_cfg = replace(first, trainer=f"{__name__}:links_sweep", name=f"{first.name}-sweep")
    trainer = make_trainer(sweep_cfg, prepared[0][1].parent / str(sweep_cfg.name), loop_config={
        "runs": [{"config": c.to_dict(), "run_dir": str(d)} for c, d in prepared]})
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray Train's terminal errors
        raise TrainingError(describe_failure(err)) from err
    return [{"run": c.name, "error": final["error"]} if "error" in final else
            summarize(c, d, DriverResult(final), final.get("time/wall_s", 0.0))
            for (c, d), final in zip(prepared, result.return_value or [])]


def common_sets(args: argparse.Namespace) -> list[str]:
    return [f"task={args.task}", f"workers={args.workers}", "cpus_per_worker=1", f"max_steps={args.max_steps}",
            f"eval_every={args.eval_every}", f"report_every={args.eval_every}", "checkpoint_every=0",
            f"seed={args.seed}", *(args.set or [])]


def run_profile(args: argparse.Namespace, profile: str, links: list[Any], wire_links: list[Any],
                out: Path) -> list[dict[str, Any]]:
    """Train every configuration on the cluster as shaped now; what :func:`compare` needs for each run."""
    from rayq.config import load_config
    from rayq.profiles import load_profile

    tag = profile.replace("/", "_").replace(".yaml", "")
    cfgs = [load_config(None, common_sets(args) + E2E_CONFIGS[n], extra={
        "name": f"{tag}-{n}", "output_dir": str(out / "runs")}) for n in args.configs]
    print(f"- training {', '.join(args.configs)} on {profile} (one worker group, back to back)", flush=True)
    runs = []
    for name, summary in zip(args.configs, sweep(cfgs, args.address)):
        if "error" in summary:
            print(f"  {name} failed: {summary['error']}")
            continue
        print(f"  {name:10} final accuracy {summary['eval/accuracy']:.3f}", flush=True)
        runs.append({"run_dir": Path(summary["run_dir"]), "links": links, "config": name, "profile": profile,
                     "target": args.target, "nominal": load_profile(profile, args.workers, 0).links,
                     "wire_links": wire_links})
    return runs


def replay_runs(runs: list[dict[str, Any]], call_s: float | None) -> tuple[list[Any], float]:
    """Every run against the model; the cost per collective call is fitted on the first profile's runs
    (``call_s=None``), so the other profiles check it out of sample."""
    from rayq.launch.links_compare import compare, fit_call_seconds

    if not runs:
        return [], call_s or 0.0
    if call_s is None:
        first = [r for r in runs if r["profile"] == runs[0]["profile"]] if runs else []
        call_s = fit_call_seconds([compare(**r) for r in first])
        print(f"- cost per collective call fitted on {runs[0]['profile'] if runs else '-'}: "
              f"{1e3 * call_s:.2f} ms", flush=True)
    comparisons = [compare(**r, call_s=call_s) for r in runs]
    for c in comparisons:
        r = c.summary()
        print(f"  {c.profile:12} {c.config:10} to {c.target:.2f}: real {_fmt(r['real_s'])} simulated "
              f"{_fmt(r['sim_s'])}  per step real {r['real_step_s']:.3f} s sim {r['sim_step_s']:.3f} s (comm real "
              f"{r['real_comm_step_s']:.3f} sim {r['sim_comm_step_s']:.3f})", flush=True)
    return comparisons, call_s


def _fmt(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f} s"


def _steps_done(trace: Path) -> list[int]:
    """The steps a run's trace shows so far, evaluations included (it is flushed at each evaluation, whose
    line is written as its step ends); a line still being written is left for the next look."""
    if not trace.exists():
        return []
    lines = trace.read_text().split("\n")[:-1]  # the text after the last newline is incomplete
    return [max(r.get("step", 0), r.get("eval_step", 0)) for r in (json.loads(x) for x in lines if x.strip())]


def partition_run(args: argparse.Namespace, cluster: Any, out: Path, timeout_s: float,
                  max_failures: int, label: str) -> dict[str, Any]:
    """A dense run whose worker node ``node`` loses its link after ``step`` for ``seconds``: what happened."""
    from rayq.config import load_config
    from rayq.errors import TrainingError
    from rayq.launch.driver import train

    node, at, seconds = (float(x) for x in args.partition.split(":"))
    sets = common_sets(args) + ["compression.codec=none", f"collective_timeout_s={timeout_s:g}",
                                f"max_failures={max_failures}", "checkpoint_every=5", "report_every=5",
                                "eval_every=10", f"max_steps={args.partition_steps}"]
    cfg = load_config(None, sets, extra={"name": f"partition-{label}", "output_dir": str(out / "runs")})
    trace = out / "runs" / f"partition-{label}" / "trace.jsonl"
    timeline: list[tuple[float, int]] = []
    events: list[tuple[float, str]] = []
    stop = threading.Event()
    started = time.perf_counter()

    def watch() -> None:
        cut = False
        while not stop.is_set():
            steps = _steps_done(trace)
            now = time.perf_counter() - started
            if steps and (not timeline or timeline[-1][1] != len(steps)):
                timeline.append((now, len(steps)))
            if not cut and steps and steps[-1] >= at:
                cut = True
                cluster.cut(int(node))
                events.append((time.perf_counter() - started, f"node {int(node)} cut after step {steps[-1]}"))
                time.sleep(seconds)
                cluster.heal(int(node))
                events.append((time.perf_counter() - started, f"node {int(node)} healed"))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary: dict[str, Any] = train(cfg, address=args.address)
        outcome = f"finished: {summary['step']} steps, accuracy {summary['eval/accuracy']:.4f}"
    except TrainingError as err:
        summary, outcome = {}, f"failed: {err}"
    finally:
        stop.set()
        watcher.join()
        cluster.heal(int(node))
    rows = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    steps = [r for r in rows if "wall_s" in r]
    restarts = [b["step"] for a, b in zip(steps, steps[1:]) if b["step"] <= a["step"]]
    slow = sorted(steps, key=lambda r: -r["wall_s"])[:3]
    return {"label": label, "collective_timeout_s": timeout_s, "max_failures": max_failures, "node": int(node),
            "after_step": int(at), "seconds": seconds, "outcome": outcome, "events": events,
            "restarted_at_steps": restarts, "slowest_steps": [(r["step"], r["wall_s"]) for r in slow],
            "wall_s": time.perf_counter() - started, "progress": timeline,
            "median_step_s": statistics.median(r["wall_s"] for r in steps) if steps else None}


def cmd_bench_links(args: argparse.Namespace) -> int:
    from rayq.launch.driver import init_ray
    from rayq.launch.links_compare import collectives_markdown, markdown, plot, speedups
    from rayq.launch.netns import NetnsCluster, unavailable

    args.configs = args.configs.split(",") if args.configs else list(LINKS_CONFIGS)
    unknown = [n for n in args.configs if n not in E2E_CONFIGS]
    if unknown:
        print(f"rayq bench links: unknown configuration(s) {unknown}; choose from: {', '.join(LINKS_CONFIGS)}")
        return 2
    if args.workers < 2:
        print(f"rayq bench links: --workers {args.workers} is too few; at least 2 worker nodes share a link")
        return 2
    why = unavailable()
    if why:
        print(f"rayq bench links: cannot shape links here: {why}")
        return 2
    profiles = args.profile.split(",")
    out = output_dir(args.out, "links").resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = NetnsCluster(workers=args.workers, profile=profiles[0])
    args.address = cluster.address
    load = os.getloadavg()
    print(f"rayq bench links: {args.workers} worker nodes in network namespaces, profiles {profiles}, "
          f"{len(args.configs)} configurations on {args.task}, target {args.target} -> {out} "
          f"(load average {load[0]:.1f})", flush=True)
    runs, probes, faults, checks = [], [], [], []
    if not args.reuse:
        print(cluster.start(), flush=True)
    try:
        init_ray(cluster.address)  # the probes' actors and the training runs go to the shaped nodes
        for profile in profiles:
            cluster.shape(profile)
            links, check = real_links(cluster, profile)
            wire_links = links
            if args.latency == "measured":
                links, check["per_message"] = per_message_latency(links, profile, args.probe_reps)
            checks.append(check)
            if args.probe_reps:
                print(f"- collectives on {profile} (median of {args.probe_reps})", flush=True)
                probes += probe_collectives(links, profile, args.probe_reps)
            if args.configs and args.max_steps:
                runs += run_profile(args, profile, links, wire_links, out)
        if args.partition:
            cluster.shape(profiles[0])
            for label, timeout_s, failures in (("stall", 60.0, 0), ("failover", args.partition_timeout, 1)):
                print(f"- partition ({label}): node:step:seconds {args.partition}, collective timeout {timeout_s:g} s, "
                      f"max_failures {failures}", flush=True)
                faults.append(partition_run(args, cluster, out, timeout_s, failures, label))
                print(f"  {faults[-1]['outcome']}; events {faults[-1]['events']}; restarts at steps "
                      f"{faults[-1]['restarted_at_steps']}; slowest steps {faults[-1]['slowest_steps']}", flush=True)
    finally:
        import ray

        ray.shutdown()
        if not args.reuse:
            print(cluster.stop(), flush=True)
    comparisons, call_s = replay_runs(runs, args.call_s)
    rows = [c.summary() for c in comparisons]
    meta = {"environment": environment(), "load_average_start": load, "load_average_end": os.getloadavg(),
            "workers": args.workers, "profiles": profiles, "call_s": call_s, "target": args.target, "task": args.task,
            "command": "rayq " + " ".join(args.argv)}
    (out / "links.json").write_text(json.dumps({**meta, "results": [c.to_dict() for c in comparisons],
                                                "collectives": probes, "shaping": checks, "partition": faults}, indent=1))
    md = markdown(rows, args.target) + ("\n" + collectives_markdown(probes) + "\n" if probes else "")
    for p in profiles:
        sp = speedups(rows, p)
        if sp:
            md += f"\nreal time to target vs dense on {p}: " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items()) + "\n"
    for f in faults:
        md += (f"\npartition ({f['label']}, collective timeout {f['collective_timeout_s']:g} s, max_failures "
               f"{f['max_failures']}): {f['events']}; {f['outcome']}; restarted at steps {f['restarted_at_steps']}; "
               f"wall {f['wall_s']:.1f} s, median step {f['median_step_s']:.3f} s, slowest {f['slowest_steps']}\n")
    (out / "links.md").write_text(md)
    if comparisons:
        plot(comparisons, out / "links.png")
    print(md)
    print(f"load average at the end {os.getloadavg()[0]:.1f}; wrote {out / 'links.json'}, {out / 'links.md'}"
          + (f" and {out / 'links.png'}" if comparisons else ""))
    return 0


def add_commands(sub: Any) -> None:
    sub_bench = bench_commands(sub)
    if sub_bench is None:
        return
    p = sub_bench.add_parser("links", help="real shaped links (network namespaces + tc) against the network model")
    p.add_argument("--profile", default="shaped-100m", help="comma-separated profiles to shape the links from")
    p.add_argument("--workers", type=int, default=4, help="worker nodes, one namespace and one worker each")
    p.add_argument("--task", default="digits-wide")
    p.add_argument("--configs", help=f"comma-separated subset of: {', '.join(LINKS_CONFIGS)}")
    p.add_argument("--target", type=float, default=0.9, help="target test accuracy")
    p.add_argument("--max-steps", type=int, default=80, help="steps per run (0: no training runs)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-reps", type=int, default=5, help="repeats per collective probe (0: no probes)")
    p.add_argument("--latency", choices=["measured", "wire"], default="measured",
                   help="link latency of the replay: a gloo message's measured cost (default) or the wire's RTT/2")
    p.add_argument("--call-s", type=float, help="cost of one collective call in the replay, seconds "
                   "(default: fitted on the first profile's runs)")
    p.add_argument("--partition", metavar="NODE:STEP:SECONDS", help="also run the partition scenarios")
    p.add_argument("--partition-timeout", type=float, default=5.0, help="collective timeout of the failover run")
    p.add_argument("--partition-steps", type=int, default=40)
    p.add_argument("--reuse", action="store_true", help="use the running netns-cluster.sh cluster (default settings)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra config override for every run")
    p.add_argument("--out", help="output directory (default bench_out/links-<time>)")
    p.set_defaults(func=cmd_bench_links)
