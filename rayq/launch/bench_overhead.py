"""``rayq bench overhead``: what rayq's exchange costs per step, against PyTorch DDP's own all-reduce.

One Ray Train worker group runs, back to back on the same workers, the same task and model:
``ddp-allreduce`` (DDP with its plain all-reduce hook, overlapped with backward as DDP does), rayq's path
with ``codec: none`` (plain, and overlapped in flat buckets), and rayq with qsgd, top-k + error feedback
and PowerSGD. From every step's trace record (its wall time, compute, encode, decode and the
communication it waited for) it reports median step times, the ratio to DDP's, and each codec's shares.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from rayq.launch.bench import bench_commands, output_dir

#: name -> config overrides (on top of --set and the common settings).
RUNS: dict[str, list[str]] = {
    "ddp-allreduce": ["trainer=ddp", "ddp.hook=allreduce", "ddp.native_overlap=true"],
    "rayq-none": ["compression.codec=none"],
    "rayq-none-overlap": ["compression.codec=none", "compression.overlap=true", "compression.bucket_mb=1",
                          "compression.min_numel=0"],
    "rayq-qsgd": ["compression.codec=qsgd"],
    "rayq-topk-ef": ["compression.codec=topk", "compression.error_feedback=true"],
    "rayq-powersgd": ["compression.codec=powersgd"],
}


def steps_of(trace: Path, skip: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r and "wall_s" in r][skip:]


def summarize(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in rows)

    return {"run": name, "steps": len(rows), "step_ms": 1e3 * med("wall_s"), "compute_ms": 1e3 * med("compute_s"),
            "encode_ms": 1e3 * med("encode_s"), "decode_ms": 1e3 * med("decode_s"),
            "exposed_comm_ms": 1e3 * med("exposed_s"),
            "step_ms_p10": 1e3 * sorted(r["wall_s"] for r in rows)[len(rows) // 10],
            "step_ms_p90": 1e3 * sorted(r["wall_s"] for r in rows)[9 * len(rows) // 10]}


def markdown(rows: list[dict[str, Any]], base: float) -> str:
    out = ["| run | median step (p10–p90) | × DDP all-reduce | compute | encode | decode | exposed comm |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['run']} | {r['step_ms']:.2f} ms ({r['step_ms_p10']:.1f}–{r['step_ms_p90']:.1f}) | "
                   f"{r['step_ms'] / base:.3f} | {r['compute_ms']:.2f} ms | {r['encode_ms']:.2f} ms | "
                   f"{r['decode_ms']:.2f} ms | {r['exposed_comm_ms']:.2f} ms |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["run"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in (("compute_ms", "compute"), ("encode_ms", "encode"), ("decode_ms", "decode"),
                       ("exposed_comm_ms", "exposed communication")):
        vals = [r[key] for r in rows]
        ax.barh(names, vals, left=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter([r["step_ms"] for r in rows], names, color="black", marker="|", s=200, label="median step (wall)")
    ax.set_xlabel("milliseconds per step (medians)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from rayq.config import load_config
    from rayq.launch.driver import train_many

    out = output_dir(args.out, "overhead").resolve()
    names = args.runs.split(",") if args.runs else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"rayq bench overhead: unknown run(s) {unknown}; choose from: {', '.join(RUNS)}")
        return 2
    common = [f"task={args.task}", f"workers={args.workers}", f"max_steps={args.steps}", "report_every=1000000",
              "eval_every=0", "checkpoint_every=0", "privacy.membership=false", *(args.set or [])]
    cfgs = [load_config(None, common + RUNS[n], extra={"name": n, "output_dir": str(out / "runs")}) for n in names]
    print(f"rayq bench overhead: {names} on {args.task}, {args.workers} workers, {args.steps} steps each "
          "(one worker group, back to back)", flush=True)
    summaries = train_many(cfgs)
    rows, failed = [], []
    for n, s in zip(names, summaries):
        if "error" in s:
            print(f"  {n} failed: {s['error']}")
            failed.append(n)
            continue
        steps = steps_of(Path(s["run_dir"]) / "trace.jsonl", args.skip)
        if not steps:
            print(f"  {n}: no step after the {args.skip} warm-up steps (--steps {args.steps}); raise --steps")
            failed.append(n)
            continue
        rows.append(summarize(n, steps))
    if not rows:
        print("rayq bench overhead: no run gave figures; nothing written")
        return 1
    base = next((r["step_ms"] for r in rows if r["run"] == "ddp-allreduce"), rows[0]["step_ms"])
    md = markdown(rows, base)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"rows": rows, "task": args.task, "workers": args.workers,
                                                    "steps": args.steps}, indent=1))
    (out / "overhead.md").write_text(md + "\n")
    plot(rows, out / "overhead.png")
    print(md)
    print(f"wrote {out / 'overhead.json'}, {out / 'overhead.md'} and {out / 'overhead.png'}")
    if failed:
        print(f"rayq bench overhead: {len(failed)} run(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def add_commands(sub: Any) -> None:
    sub_bench = bench_commands(sub)
    if sub_bench is None:
        return
    p = sub_bench.add_parser("overhead", help="median step time of rayq's exchange vs DDP's all-reduce, same workers")
    p.add_argument("--task", default="digits-wide")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the medians")
    p.add_argument("--runs", help=f"comma-separated subset of: {', '.join(RUNS)}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra config override for every run")
    p.add_argument("--out", help="output directory (default bench_out/overhead-<time>)")
    p.set_defaults(func=cmd_bench_overhead)
