"""``rayq tune``: the command (arguments, progress lines, the results); the sweep itself is in :mod:`.sweep`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from rayq import resources
from rayq.errors import TrainingError
from rayq.launch.tune.grammar import load_space
from rayq.launch.tune.objectives import LEAKAGE_METRICS
from rayq.launch.tune.sweep import run_sweep
from rayq.schema import ConfigError
from rayq.tasks import DataError


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "tune", help="Ray Tune sweep over run-config keys; Pareto front of accuracy, bits and simulated time",
        description="Sweep a search space (tune_spaces/*.yaml, grammar in tune_spaces/README.md) on Ray Tune, "
                    "then print the Pareto front and write pareto.png and best_<objective>.yaml "
                    "(each runs as is with `rayq train -c`).")
    p.add_argument("-s", "--space", required=True,
                   help="search space: a YAML file (e.g. tune_spaces/rate_thresholds.yaml) or the name of a shipped "
                        f"one ({', '.join(resources.names('tune_spaces')) or 'none shipped'})")
    p.add_argument("-c", "--config", help="base run config YAML for every trial (over the space's base:)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one base config key for every trial (repeatable)")
    p.add_argument("--samples", type=int, help="Tune num_samples (default: the space's tune.samples, else 8); "
                                               "with grid entries each sample repeats the whole grid")
    p.add_argument("--mode", choices=("asha", "multi"),
                   help="asha: random/grid search with ASHA early stopping on the score; "
                        "multi: Optuna multi-objective (accuracy, bits, sim time). Default: the space's tune.mode")
    p.add_argument("--max-concurrent", type=int, help="trials at a time (default 2)")
    p.add_argument("--seed", type=int, help="seed of the search (random/Optuna sampling); trials keep the config's seed")
    p.add_argument("--leakage", choices=("none", *LEAKAGE_METRICS),
                   help="a fourth objective, what each trial leaks (min): the membership loss attack's AUC, the "
                        "correctness attack, or split learning's decoder SSIM / PSNR or dCor (default: the space's "
                        "tune.leakage, else none)")
    p.add_argument("--output-dir", default="runs/sweeps", help="where sweep directories go (default: runs/sweeps)")
    p.add_argument("--name", help="sweep name (default: <space>-<timestamp>)")
    p.add_argument("--address", help="Ray cluster address to drive (default: start a local Ray)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-trial lines, only the results")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    settings = {"samples": args.samples, "mode": args.mode, "max_concurrent": args.max_concurrent, "seed": args.seed,
                "leakage": args.leakage}
    try:
        space = load_space(args.space, args.config, args.sets, settings)
    except ConfigError as err:
        print(f"rayq: search space error: {err}", file=sys.stderr)
        return 2
    s = space.settings
    print(f"rayq: sweep {space.name}: {space.trial_count()} trials ({s.mode}, {s.max_concurrent} at a time) "
          f"of {space.base_full['task']}, objectives: {', '.join(o.name for o in space.objectives())} "
          "(starting Ray...)", flush=True)
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # failed trials are listed with their error below
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        result = run_sweep(space, args.output_dir, args.name, args.address,
                           on_event=None if args.quiet else (lambda line: print(line, flush=True)))
    except (ConfigError, DataError) as err:
        print(f"rayq: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"rayq: sweep failed: {err}", file=sys.stderr)
        return 1
    print(result.table)
    counts = {k: sum(t.status == k for t in result.trials) for k in ("done", "stopped", "error")}
    print(f"{len(result.trials)} trials in {result.wall_s:.0f} s: {counts['done']} finished, "
          f"{counts['stopped']} stopped early by ASHA, {counts['error']} failed")
    for t in result.trials:
        if t.status == "error":
            print(f"trial #{t.number} failed: {t.error}" + (f"\n  full trace: {t.trace}" if t.trace else ""))
    print(f"sweep directory: {result.sweep_dir}")
    if result.plot:
        print(f"Pareto plot:     {result.plot}")
    for label, path in result.best.items():
        print(f"best {label + ':':<20} rayq train -c {path}")
    print(f"tensorboard:     tensorboard --logdir {result.sweep_dir / 'trials'}  (HParams tab compares trials)")
    if not counts["done"]:
        print("rayq: no trial ran to the end: no Pareto front, no best configs", file=sys.stderr)
        return 1
    return 0
