"""``rayq leak``: how much of a worker's batch gradient-inversion attacks rebuild from its compressed update.

Runs :func:`rayq.privacy.run_leak` (fresh LeNet-sigmoid or MLP victims, real images of the task, every
update through the real codecs and packets) and writes ``leak.json``, ``leak.md``, one PNG grid per
attack and TensorBoard images under ``--out``. ``--sweep`` adds ``psnr_vs_bits.png``: median PSNR
against bits per coordinate, one point per codec or pattern, for the compressor-aware and the adaptive
attacker.

Codec specs (``--codec``, repeatable)::

    none | fp16 | int8:bits=4,mode=affine | qsgd:levels=3 | topk:density=0.01,ef=first
    mixed:0.*=int8/bits=2/per_channel;7.*=int8/bits=2/per_channel;*=int8/bits=8
    random:bits=2/4/8/16,modes=symmetric/affine,per_channel=true

``CODEC:k=v,...`` sets the codec's parameters; ``ef`` (first | steady), ``warmup``, ``messages`` and
``label`` are options of the spec. ``mixed:`` lists per-layer rules (glob on the victim's parameter
names, ``rayq leak --list-layers``; first match wins), ``/``-separated parameters and the flag
``per_channel``; a rule ``*=...`` is the default (else fp32). ``random:`` draws bits and mode per
layer and per round (2..8: integer quantiser, 16: fp16, 32: fp32).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

#: Codecs of ``--preset sweep``: every family along the bits axis, mixed-precision patterns, random precision.
SWEEP = ("none", "fp16", "int8:bits=8", "int8:bits=6", "int8:bits=4", "int8:bits=3", "int8:bits=2",
         "int8:bits=2,mode=affine", "qsgd:levels=15", "qsgd:levels=1", "topk:density=0.1", "topk:density=0.01",
         "topk:density=0.01,ef=steady", "sign", "rcfed:rate=2.0", "powersgd:rank=2",
         "mixed:0.*=int8/bits=2/per_channel;7.*=int8/bits=2/per_channel;*=int8/bits=8",
         "mixed:0.*=int8/bits=8;7.*=int8/bits=8;*=int8/bits=2",
         "random:bits=2/4/8/16")
SPEC_OPTIONS = {"ef": "error_feedback", "warmup": "warmup_rounds", "messages": "messages", "label": "label"}


class SpecError(ValueError):
    """A ``--codec`` spec that does not parse, or names a codec or parameter that does not exist."""


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _pairs(text: str, sep: str, spec: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(sep)):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(f"--codec {spec!r}: {item!r} is not key=value")
        out[key.strip()] = _value(value.strip())
    return out


def _short(codec: str, params: dict[str, Any]) -> str:
    """A layer's codec in a mixed spec's label: ``2b`` for a 2-bit int8, else ``codec(k=v)``."""
    if codec == "int8" and set(params) <= {"bits", "mode"}:
        return f"{params.get('bits', 8)}b" + ("a" if params.get("mode") == "affine" else "")
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{codec}({inner})" if inner else codec


def parse_codec(spec: str) -> Any:
    """A :class:`rayq.privacy.CodecSpec` from its command-line form (see the module docstring)."""
    from rayq.privacy import CodecSpec, LayerRule, RandomPrecision

    kind, _, rest = spec.partition(":")
    try:
        if kind == "mixed":
            rules, default = [], ("none", {})
            for part in filter(None, rest.split(";")):
                pattern, eq, body = part.partition("=")
                if not eq:
                    raise SpecError(f"--codec {spec!r}: rule {part!r} is not PATTERN=CODEC[/k=v...]")
                codec, *items = body.split("/")
                flags = [i for i in items if "=" not in i]
                if any(f != "per_channel" for f in flags):
                    raise SpecError(f"--codec {spec!r}: unknown flag in {part!r}; the only flag is per_channel")
                params = _pairs("/".join(i for i in items if "=" in i), "/", spec)
                if pattern == "*" and not flags:
                    default = (codec, params)
                else:
                    rules.append(LayerRule(pattern, codec, tuple(sorted(params.items())), per_channel=bool(flags)))
            if not rules:
                raise SpecError(f"--codec {spec!r}: a mixed spec needs at least one PATTERN=CODEC rule for a layer "
                                "pattern other than '*' (a '*=' rule alone is a plain spec, e.g. int8:bits=2)")
            label = ",".join([f"{r.pattern}:{_short(r.codec, dict(r.params))}{'/pc' if r.per_channel else ''}"
                              for r in rules] + ([] if rules[-1].pattern == "*" else [f"*:{_short(*default)}"]))
            return CodecSpec(codec=default[0], params=tuple(sorted(default[1].items())), rules=tuple(rules),
                             label=f"mixed({label})")
        if kind == "random":
            opts = _pairs(rest, ",", spec)
            for key in ("bits", "probs", "modes"):
                if key in opts:
                    opts[key] = tuple(_value(v) for v in str(opts[key]).split("/"))
            label = opts.pop("label", "")
            return CodecSpec(random_precision=RandomPrecision(**opts), label=label)
        params = _pairs(rest, ",", spec)
        own = {SPEC_OPTIONS[k]: params.pop(k) for k in list(params) if k in SPEC_OPTIONS}
        return CodecSpec.of(kind, **own, **params)
    except SpecError:
        raise
    except (ValueError, TypeError) as err:
        raise SpecError(f"--codec {spec!r}: {err}") from err


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "leak", help="gradient-inversion attacks (DLG, Inverting Gradients) on compressed updates: PSNR/SSIM vs bits",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits", help="image task: digits (default), fashion-mnist, mnist")
    p.add_argument("--victim", default="lenet", choices=("lenet", "mlp"), help="LeNet-sigmoid (default) or an MLP")
    p.add_argument("--codec", action="append", default=[], metavar="SPEC", help="a codec spec (repeatable; see above)")
    p.add_argument("--preset", choices=("default", "report", "sweep"),
                   help="codec set when no --codec is given: default (7 codecs), report (every family, error "
                        "feedback, mixed and random precision), sweep (the bits axis; the default with --sweep)")
    p.add_argument("--attack", action="append", choices=("dlg", "ig", "analytic"), help="attacks (default dlg, ig)")
    p.add_argument("--knowledge", action="append", choices=("naive", "aware", "adaptive"),
                   help="attacker knowledge (default aware, adaptive: compressor-aware and adaptive)")
    p.add_argument("--labels", default="idlg", choices=("idlg", "optimise", "true"), help="how labels are known")
    p.add_argument("--trials", type=int, default=2, help="victims and batches (default 2)")
    p.add_argument("--batch-size", type=int, default=1, help="images per victim batch (default 1)")
    p.add_argument("--dlg-steps", type=int, default=30, help="DLG's L-BFGS .step() calls (default 30)")
    p.add_argument("--dlg-max-iter", type=int, default=20, help="inner L-BFGS iterations per step (default 20)")
    p.add_argument("--dlg-restarts", type=int, default=2, help="DLG restarts, best kept (default 2)")
    p.add_argument("--ig-iterations", type=int, default=300, help="Inverting Gradients' Adam steps (default 300)")
    p.add_argument("--ig-restarts", type=int, default=1, help="Inverting Gradients restarts (default 1)")
    p.add_argument("--ig-tv", type=float, default=1e-4, help="total-variation weight (default 1e-4)")
    p.add_argument("--step", type=int, default=10, help="the training round the update belongs to (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="directory with the task's data files")
    p.add_argument("--sweep", action="store_true", help="also plot PSNR against bits per coordinate (psnr_vs_bits.png)")
    p.add_argument("--list-layers", action="store_true", help="print the victim's parameter names and exit")
    p.add_argument("--out", help="output directory (default runs/leak/<task>-<time>)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the table")
    p.set_defaults(func=cmd_leak)


def build_config(args: argparse.Namespace) -> Any:
    from rayq.privacy import DLGBudget, IGBudget, Knowledge, LeakConfig, default_codecs, report_codecs

    preset = args.preset or ("sweep" if args.sweep else "default")
    if args.codec:
        codecs = tuple(parse_codec(c) for c in args.codec)
    elif preset == "sweep":
        codecs = tuple(parse_codec(c) for c in SWEEP)
    else:
        codecs = report_codecs() if preset == "report" else default_codecs()
    knowledge = tuple(args.knowledge or (Knowledge.AWARE.value, Knowledge.ADAPTIVE.value))
    return LeakConfig(task=args.task, victim=args.victim, codecs=codecs, attacks=tuple(args.attack or ("dlg", "ig")),
                      knowledge=knowledge, labels=args.labels, trials=args.trials, batch_size=args.batch_size,
                      dlg=DLGBudget(steps=args.dlg_steps, max_iter=args.dlg_max_iter, restarts=args.dlg_restarts),
                      ig=IGBudget(iterations=args.ig_iterations, restarts=args.ig_restarts, tv=args.ig_tv),
                      step=args.step, seed=args.seed, data_dir=args.data_dir)


class _Progress(logging.Handler):
    """Prints the experiment's per-cell log lines as progress."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.started = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {record.getMessage()}", flush=True)


def cmd_leak(args: argparse.Namespace) -> int:
    from rayq.privacy import IMAGE_FORMATS, build_victim, run_leak, write_all
    from rayq.privacy.victims import VictimKind

    if args.list_layers:
        spec = IMAGE_FORMATS.get(args.task, IMAGE_FORMATS["digits"])[0]
        for name, p in build_victim(VictimKind(args.victim), spec, 0).named_parameters():
            print(f"{name:12} {tuple(p.shape)}")
        return 0
    try:
        cfg = build_config(args)
    except ValueError as err:
        print(f"rayq: leak config error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/leak/{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}")
    cells = len(cfg.codecs) * len(cfg.attacks) * len(cfg.knowledge) * cfg.trials
    print(f"rayq: leak on {cfg.task} ({cfg.victim.value} victim, {cfg.trials} trial(s) x batch {cfg.batch_size}): "
          f"{len(cfg.codecs)} codecs x {', '.join(a.value for a in cfg.attacks)} x "
          f"{', '.join(k.value for k in cfg.knowledge)} (up to {cells} attacks)", flush=True)
    logger = logging.getLogger("rayq.privacy.leak")
    handler, level = _Progress(), logger.level
    if not args.quiet:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        report = run_leak(cfg)
    except ValueError as err:
        print(f"rayq: leak error: {err}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    written = write_all(report, out)
    from rayq.privacy import markdown_table

    print(markdown_table(report))
    print(f"json:        {written.json}\nmarkdown:    {written.markdown}")
    for png in written.png:
        print(f"grid:        {png}")
    if args.sweep:
        plot = write_psnr_vs_bits(report, out / "psnr_vs_bits.png")
        (out / "psnr_vs_bits.md").write_text(bits_table(report))
        print(bits_table(report))
        print(f"PSNR vs bits: {plot}")
    print(f"tensorboard: tensorboard --logdir {written.tensorboard}")
    return 0


def bits_table(report: Any) -> str:
    """Median PSNR (dB) per codec and attacker, one line per codec in order of bits per coordinate."""
    keys = sorted({(r.attack.value, r.knowledge.value) for r in report.rows})
    codecs = sorted({r.codec: r.bits_per_coordinate for r in report.rows}.items(), key=lambda kv: -kv[1])
    lines = ["| codec | bits/coord | " + " | ".join(f"{a} {k}: PSNR / SSIM" for a, k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for codec, bits in codecs:
        cells = []
        for a, k in keys:
            row = next((r for r in report.rows if r.codec == codec and r.attack.value == a and r.knowledge.value == k),
                       None)
            cells.append("–" if row is None else
                         ("∞" if math.isinf(row.psnr_median) else f"{row.psnr_median:.1f}") + f" / {row.ssim_median:.2f}")
        lines.append(f"| {codec} | {bits:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_psnr_vs_bits(report: Any, path: Path) -> Path:
    """One panel per attack: median PSNR against bits per coordinate, a marker per codec, one series per attacker
    (lossless codecs, whose PSNR can be infinite, are drawn at the top of the axis)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r.attack for r in report.rows))
    fig, axes = plt.subplots(1, len(attacks), figsize=(6.5 * len(attacks), 4.8), squeeze=False)
    finite = [min(r.psnr_median, 80.0) for r in report.rows]
    top = max(finite) + 5 if finite else 60.0
    for ax, attack in zip(axes[0], attacks):
        named: set[str] = set()
        for knowledge, marker in (("naive", "s"), ("aware", "o"), ("adaptive", "^")):
            rows = sorted((r for r in report.rows if r.attack is attack and r.knowledge.value == knowledge),
                          key=lambda r: r.bits_per_coordinate)
            if not rows:
                continue
            xs = [r.bits_per_coordinate for r in rows]
            ys = [top if math.isinf(r.psnr_median) else r.psnr_median for r in rows]
            ax.scatter(xs, ys, marker=marker, label=f"{knowledge} attacker", zorder=3)
            for r, x, y in zip(rows, xs, ys):
                if r.codec not in named:
                    named.add(r.codec)
                    ax.annotate(r.codec, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(20.0, color="grey", linestyle="--", linewidth=0.8, label="success: 20 dB")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per coordinate (from packet bytes)")
        ax.set_ylabel("median PSNR of reconstructions (dB)")
        ax.set_title(f"{attack.value}: {report.config.task}, {report.config.victim.value} victim, "
                     f"{report.config.trials} trial(s)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
