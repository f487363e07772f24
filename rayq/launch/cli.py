"""``rayq``: the command line. The launch layer is the only one that prints; the runtime logs."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Any

from rayq import __version__

#: Modules that add their own subcommands: each has ``add_commands(subparsers)``.
COMMAND_MODULES: list[str] = ["rayq.launch.bench", "rayq.launch.bench_methods", "rayq.launch.bench_schedules", "rayq.launch.bench_overhead", "rayq.launch.bench_links", "rayq.launch.jobs", "rayq.launch.leak", "rayq.launch.tune"]


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="run config YAML (defaults < file < --set)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set compression.codec=none (repeatable)")
    p.add_argument("--data-dir", help="directory with the task's data files (same as --set data_dir=...)")
    p.add_argument("--name", help="run name (default: <task>-<codec>-<timestamp>)")
    p.add_argument("--output-dir", help="where runs are written (default: runs/)")
    p.add_argument("--resume", metavar="CHECKPOINT_DIR", help="continue from a checkpoint directory")
    p.add_argument("--address", help="Ray cluster address to drive (default: start a local Ray)")


def _extra(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for key in ("data_dir", "name", "output_dir", "resume"):
        value = getattr(args, key, None)
        if value is not None:
            extra[key] = value
    return extra


def cmd_train(args: argparse.Namespace) -> int:
    from rayq.config import load_config
    from rayq.errors import TrainingError
    from rayq.launch.console import console_line, summary_table
    from rayq.launch.driver import train
    from rayq.schema import ConfigError
    from rayq.tasks import DataError

    try:
        cfg = load_config(args.config, args.sets, extra=_extra(args))
    except ConfigError as err:
        print(f"rayq: config error: {err}", file=sys.stderr)
        return 2
    print(f"rayq: training {cfg.task} with {cfg.workers} workers, codec {cfg.compression.codec}"
          f"{' + error feedback' if cfg.compression.error_feedback else ''} (starting Ray...)", flush=True)
    started = time.perf_counter()

    def on_progress(m: dict[str, Any]) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {console_line(m)}", flush=True)

    try:
        summary = train(cfg, on_progress=on_progress, address=args.address)
    except (ConfigError, DataError) as err:
        print(f"rayq: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"rayq: training failed: {err}", file=sys.stderr)
        return 1
    print(summary_table(summary))
    return 0


def cmd_codecs(args: argparse.Namespace) -> int:
    import dataclasses

    import compressors
    from rayq.launch.console import table

    if args.matrix:
        return _matrix(args)
    rows = []
    for name, cls in compressors.REGISTRY.items():
        params = ", ".join(
            f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name for f in cls.params()
        ) or "-"
        source = f"  ({cls.source})" if cls.source else ""
        rows.append((name, f"{cls.kind.value:<6}  {params}  | {cls.summary}{source}"))
    print(table(rows, title="codecs (compression.codec, kind, compression.params)"))
    print("compression.error_feedback: true wraps any codec that loses less than its input (a contractive one) with "
          "error feedback; `rayq codecs --matrix` shows what works with what.")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    """Every codec (± error feedback) × schedule × strategy × fault, allowed or refused, from the config's rules."""
    from collections import Counter

    from rayq.matrix import MATRIX_FAULTS, MATRIX_SCHEDULES, STRATEGIES, matrix

    cells = matrix(args.codec or None)
    if args.full:
        for cell, reason in cells:
            verdict = "ok" if reason is None else f"refused: {reason}"
            print(f"{cell.codec:10} ef={'yes' if cell.error_feedback else 'no ':3} {cell.schedule:10} {cell.strategy:9} "
                  f"{cell.fault:17} {verdict}")
    else:
        schedules, faults = list(MATRIX_SCHEDULES), list(MATRIX_FAULTS)
        print("cells allowed out of the 4 strategies (auto, allreduce, allgather, two_phase); "
              "--full lists every cell with its reason")
        header = ["codec", "ef"] + [f"{s}" for s in schedules]
        print("  ".join(f"{h:<12}" for h in header))
        by = Counter((c.codec, c.error_feedback, c.schedule) for c, r in cells if r is None)
        seen = sorted({(c.codec, c.error_feedback) for c, _ in cells}, key=lambda k: (k[0], k[1]))
        per = len(STRATEGIES) * len(faults)
        for codec, ef in seen:
            row = [codec, "yes" if ef else "no"] + [f"{by[(codec, ef, s)]}/{per}" for s in schedules]
            print("  ".join(f"{v:<12}" for v in row))
    reasons = Counter(r.split(":")[0] for _, r in cells if r is not None)
    allowed = sum(r is None for _, r in cells)
    print(f"{len(cells)} cells: {allowed} allowed, {len(cells) - allowed} refused; the refusals, by what they name:")
    for r, n in reasons.most_common():
        print(f"  {n:5}  {r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayq", description="Data-parallel training on Ray with compressed gradient exchange: train, tune, "
        "benchmark, measure leakage, and submit any of these as a Ray job. `rayq COMMAND --help` for each.")
    parser.add_argument("--version", action="version", version=f"rayq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a task with compressed data-parallel SGD on Ray")
    _config_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the summary")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("codecs", help="list the codecs with their kind and parameters")
    p.add_argument("--matrix", action="store_true", help="what works with what: codec x error feedback x schedule x "
                   "strategy x fault, allowed or refused (from the config's own rules)")
    p.add_argument("--full", action="store_true", help="with --matrix: every cell and its reason")
    p.add_argument("--codec", action="append", default=[], help="with --matrix: only this codec (repeatable)")
    p.set_defaults(func=cmd_codecs)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
