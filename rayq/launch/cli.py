"""``rayq``: the command line. The launch layer is the only one that prints; the runtime logs."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Any

from rayq import __version__

#: Modules that add their own subcommands: each has ``add_commands(subparsers)``.
COMMAND_MODULES: list[str] = ["rayq.launch.bench", "rayq.launch.jobs", "rayq.launch.tune"]


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

    rows = []
    for name, cls in compressors.REGISTRY.items():
        params = ", ".join(
            f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name for f in cls.params()
        ) or "-"
        rows.append((name, f"{cls.kind.value:<6}  {params}  | {cls.summary}"))
    print(table(rows, title="codecs (compression.codec, kind, compression.params)"))
    print("compression.error_feedback: true wraps any codec with error feedback.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rayq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a task with compressed data-parallel SGD on Ray")
    _config_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the summary")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("codecs", help="list the codecs with their kind and parameters")
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
