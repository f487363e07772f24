"""``rayq submit`` and ``rayq jobs``: the commands (parsing, printing, exit codes) over the Jobs client."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rayq.launch.jobs.client import (
    DEFAULT_ADDRESS,
    EXCLUDES,
    TERMINAL,
    Cluster,
    JobsError,
    connect,
    duration_s,
    follow,
    job_name,
    list_jobs,
    logs,
    prepare,
    status,
    stop,
    submit,
    wait,
)

def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"the head's dashboard address (default: RAY_API_SERVER_ADDRESS, an http "
                                     f"RAY_ADDRESS, or {DEFAULT_ADDRESS})")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the dashboard to answer before giving up (default 10)")


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "submit", help="run a rayq command as a Ray job on a cluster (the project is shipped as working_dir)",
        description="Submit `rayq <command>` through Ray's Job Submission API, e.g. "
                    "rayq submit --address http://HEAD:8265 --follow -- train --set workers=2")
    _add_connection_args(p)
    p.add_argument("-f", "--follow", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="the command's --output-dir, a path on the cluster (default: the command's own default, "
                        "e.g. runs/, made absolute here: right when the cluster shares this filesystem; use "
                        "shared storage on a multi-node cluster)")
    p.add_argument("--working-dir", type=Path, default=None, help="project directory to ship (default: this rayq's)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out files matching this gitignore-style pattern (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--python", default="python",
                   help="the cluster's Python, with torch and ray installed (default: python on the head's PATH)")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks raysubmit_...)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then a rayq command: train ..., tune ..., codecs")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs on a cluster")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("list", help="every job the cluster knows, oldest first")
    _add_connection_args(q)
    q.set_defaults(func=cmd_jobs_list)
    q = actions.add_parser("status", help="a job's status and message")
    _add_connection_args(q)
    q.add_argument("job_id")
    q.set_defaults(func=cmd_jobs_status)
    q = actions.add_parser("logs", help="a job's output so far (--follow: until it ends)")
    _add_connection_args(q)
    q.add_argument("job_id")
    q.add_argument("-f", "--follow", action="store_true",
                   help="keep streaming until the job ends; exit with its status")
    q.set_defaults(func=cmd_jobs_logs)
    q = actions.add_parser("stop", help="stop a running job and wait until it has stopped")
    _add_connection_args(q)
    q.add_argument("job_id")
    q.add_argument("--no-wait", action="store_true", help="return once the stop was requested")
    q.set_defaults(func=cmd_jobs_stop)


def _error(err: Exception) -> int:
    print(f"rayq: error: {err}", file=sys.stderr)
    return 2


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _final(info: Any) -> int:
    state = str(info.status)
    took = duration_s(info)
    line = f"rayq: job {job_name(info)} {state}" + (f" after {took:.1f} s" if took is not None else "")
    if state == "SUCCEEDED":
        print(line, flush=True)
        return 0
    print(f"{line}: {info.message or ''}".rstrip(": "), file=sys.stderr, flush=True)
    return 1


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {item!r} must look like KEY=VALUE")
        env[key] = value
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        spec = prepare(list(args.command), working_dir=args.working_dir,
                       output_dir=args.output_dir, python=args.python,
                       excludes=tuple(args.exclude), env=_parse_env(args.env))
        cluster = connect(args.address, args.timeout)
        job_id = submit(cluster, spec, args.submission_id)
    except JobsError as err:
        return _error(err)
    import ray

    if cluster.ray_version != ray.__version__:
        print(f"rayq: note: the cluster runs Ray {cluster.ray_version}, this client Ray {ray.__version__}",
              file=sys.stderr)
    where = f" --address {cluster.address}"
    print(f"rayq: submitted job {job_id} to {cluster.address} (Ray {cluster.ray_version})", flush=True)
    print(f"rayq:   entrypoint: {spec.entrypoint}", flush=True)
    print(f"rayq:   working_dir: {spec.working_dir} (without {', '.join(EXCLUDES[:8])}, ...)", flush=True)
    if spec.output_dir:
        print(f"rayq:   outputs on the cluster under {spec.output_dir}", flush=True)
    if not args.follow:
        print(f"rayq: follow it with: rayq jobs logs {job_id} --follow{where}", flush=True)
        return 0
    return _follow(cluster, job_id, where)


def _follow(cluster: Cluster, job_id: str, where: str) -> int:
    try:
        info = follow(cluster, job_id, _write)
    except KeyboardInterrupt:
        print(f"\nrayq: stopped following; job {job_id} keeps running (stop it: rayq jobs stop {job_id}{where})",
              file=sys.stderr)
        return 130
    except JobsError as err:
        return _error(err)
    return _final(info)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    try:
        cluster = connect(args.address, args.timeout)
        jobs = list_jobs(cluster)
    except JobsError as err:
        return _error(err)
    if not jobs:
        print(f"no jobs on {cluster.address}")
        return 0
    rows = [("JOB", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")]
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        took = duration_s(j)
        rows.append((job_name(j), str(j.status), started, f"{took:.1f} s" if took is not None else "-",
                     (j.entrypoint or "")[:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    try:
        info = status(connect(args.address, args.timeout), args.job_id)
    except JobsError as err:
        return _error(err)
    took = duration_s(info)
    print(f"{job_name(info)}: {info.status}" + (f" ({took:.1f} s)" if took is not None else ""))
    if info.message:
        print(info.message)
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    try:
        cluster = connect(args.address, args.timeout)
        if args.follow:
            status(cluster, args.job_id)
            return _follow(cluster, args.job_id, f" --address {cluster.address}")
        _write(logs(cluster, args.job_id))
    except JobsError as err:
        return _error(err)
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    try:
        cluster = connect(args.address, args.timeout)
        was_running = stop(cluster, args.job_id)
        info = status(cluster, args.job_id) if args.no_wait else wait(cluster, args.job_id, timeout=60)
    except JobsError as err:
        return _error(err)
    if not was_running:
        print(f"rayq: job {args.job_id} was not running ({info.status})")
        return 0
    print(f"rayq: job {args.job_id} {info.status}")
    return 0 if args.no_wait or str(info.status) in TERMINAL else 1
