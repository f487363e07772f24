"""``rayq bench schedules``: ADPSGD against CPSGD at equal communication, over several seeds and codecs.

Each seed runs ADPSGD first; CPSGD then gets the constant period that spends the same number of syncs
(``round(steps / syncs)``), so the comparison is at an equal sync budget. The runs are the real schedules,
compressed group and codecs of :mod:`rayq.schedules`, on in-process workers (threads joined by a
``LocalHub``: the same code as on Ray, without Ray's start-up, since no timing is measured). The figures
are the final full-training-set loss and test accuracy, reported as mean ± standard deviation over seeds,
with the per-seed difference (ADPSGD − CPSGD) and its standard error: a difference smaller than two
standard errors is not evidence either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compressors.policy import Policy
from rayq.collective import CompressedGroup
from rayq.launch.bench import bench_commands
from rayq.schedules import Adaptive, Periodic, Replica
from rayq.tasks import load_digits_split, mlp
from rayq.transport import run_local


@dataclass(frozen=True)
class Outcome:
    codec: str
    seed: int
    schedule: str
    period: int
    syncs: int
    loss: float
    accuracy: float
    bytes_up: int


def _run(transport, adaptive: bool, period: int, codec: str, params: dict[str, Any], seed: int, steps: int,
         init: dict[str, torch.Tensor], kappa: float, lr: float, batch: int) -> tuple[int, float, float, int]:
    train, test = load_digits_split()
    model = mlp()
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    replica = Replica(model, opt)
    group = CompressedGroup(Policy(codec, params, min_numel=256), transport, seed=seed)
    schedule = (Adaptive(replica, group, period, 1, 64, kappa, 1.0, steps // 6, seed=seed) if adaptive
                else Periodic(replica, group, period, seed=seed))
    x, y = train.x[transport.rank::transport.world], train.y[transport.rank::transport.world]
    g = torch.Generator().manual_seed(1000 * seed + transport.rank)
    sent = 0
    for step in range(steps):
        decay = (0.5 if step >= steps // 2 else 1.0) * (0.5 if step >= 3 * steps // 4 else 1.0)
        for pg in opt.param_groups:
            pg["lr"] = lr * decay  # the LR schedule counts global steps
        idx = torch.randint(len(y), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        sent += schedule.step(step, None, measure=False).ledger.bytes_up
    schedule.averager.sync(steps, measure=False)  # end on a common model
    with torch.no_grad():
        loss = float(F.cross_entropy(model(train.x), train.y))
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
    return schedule.syncs, loss, acc, sent


def compare(codecs: list[tuple[str, dict[str, Any]]], seeds: list[int], steps: int = 600, workers: int = 4,
            p0: int = 4, kappa: float = 1.0, lr: float = 0.1, batch: int = 16) -> list[Outcome]:
    torch.set_num_threads(1)
    out = []
    for codec, params in codecs:
        for seed in seeds:
            torch.manual_seed(seed)
            init = mlp().state_dict()
            syncs, loss, acc, sent = run_local(workers, _run, True, p0, codec, params, seed, steps, init, kappa, lr,
                                               batch)[0]
            out.append(Outcome(codec, seed, "adaptive", p0, syncs, loss, acc, sent))
            period = max(1, round(steps / syncs))
            syncs, loss, acc, sent = run_local(workers, _run, False, period, codec, params, seed, steps, init, kappa,
                                               lr, batch)[0]
            out.append(Outcome(codec, seed, "periodic", period, syncs, loss, acc, sent))
    return out


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(outcomes: list[Outcome]) -> str:
    rows = ["| codec | schedule | syncs | final train loss | test accuracy | loss ADPSGD − CPSGD (± s.e.) |",
            "|---|---|---:|---:|---:|---:|"]
    for codec in dict.fromkeys(o.codec for o in outcomes):
        by = {s: [o for o in outcomes if o.codec == codec and o.schedule == s] for s in ("adaptive", "periodic")}
        diffs = [a.loss - c.loss for a, c in zip(by["adaptive"], by["periodic"])]
        d, sd = _mean_sd(diffs)
        se = sd / len(diffs) ** 0.5 if diffs else 0.0
        for s, name in (("adaptive", "ADPSGD (p₀=4, κ=1)"), ("periodic", "CPSGD (matched period)")):
            loss, lsd = _mean_sd([o.loss for o in by[s]])
            acc, asd = _mean_sd([o.accuracy for o in by[s]])
            syncs, ssd = _mean_sd([float(o.syncs) for o in by[s]])
            extra = f"{d:+.4f} ± {se:.4f}" if s == "adaptive" else ""
            rows.append(f"| {codec} | {name} | {syncs:.1f} ± {ssd:.1f} | {loss:.4f} ± {lsd:.4f} | "
                        f"{acc:.4f} ± {asd:.4f} | {extra} |")
    return "\n".join(rows)


def _codec(spec: str) -> tuple[str, dict[str, Any]]:
    """``qsgd`` or ``qsgd:levels=15`` → (name, params)."""
    import yaml

    name, _, rest = spec.partition(":")
    pairs = [kv for kv in rest.split(",") if kv]
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise ValueError(f"{bad[0]!r} in {spec!r} is not key=value (e.g. qsgd:levels=15)")
    return name, {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def cmd_bench_schedules(args: argparse.Namespace) -> int:
    from compressors import CodecError, make_codec

    try:
        codecs = [_codec(c) for c in args.codecs.split(";")]
        for name, params in codecs:
            make_codec(name, params)
    except (CodecError, ValueError) as err:
        print(f"rayq bench schedules: --codecs {args.codecs!r}: {err}")
        return 2
    if args.seeds < 1 or args.steps < 6 or args.workers < 1:
        print(f"rayq bench schedules: needs --seeds >= 1, --steps >= 6 and --workers >= 1 (got {args.seeds}, "
              f"{args.steps}, {args.workers})")
        return 2
    seeds = list(range(args.seeds))
    print(f"rayq bench schedules: ADPSGD vs CPSGD at equal syncs, {args.steps} steps, {args.workers} in-process workers, "
          f"codecs {[c for c, _ in codecs]}, seeds {seeds}", flush=True)
    outcomes = compare(codecs, seeds, args.steps, args.workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "schedules.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    md = table(outcomes)
    (out / "schedules.md").write_text(md + "\n")
    print(md)
    print(f"wrote {out / 'schedules.json'} and {out / 'schedules.md'}")
    return 0


def add_commands(sub: Any) -> None:
    sub_bench = bench_commands(sub)
    if sub_bench is None:
        return
    p = sub_bench.add_parser("schedules", help="ADPSGD vs CPSGD at equal syncs: several seeds, dense and lossy codecs")
    p.add_argument("--codecs", default="none;qsgd", help="codecs separated by ';' (name or name:key=value,...)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--out", default="bench_out/schedules")
    p.set_defaults(func=cmd_bench_schedules)
