"""``rayq bench qadagrad | fewbit | blaq``: the training-side methods, each over several seeds.

qadagrad  QCMD / QRDA AdaGrad (Xu, Wangni, Zhang, Ye, Wu, Zhao, 2022): the threshold quantiser vs stochastic
          TernGrad vs dense exchange, on ℓ1-logistic regression and the digits MLP: accuracy, sparsity of x, bits.
fewbit    Few-Bit Backward (Novikov et al., 2022): bytes autograd keeps for the digits-gelu model at 1–4 bits vs
          exact (and CUDA's peak allocation when a GPU is present), and the loss curves of real runs.
blaq      BLAQ (Ma, Zhou, Ma, Yu, Li, AAAI 2024) vs LAQ-weights (Hou & Kwok, ICLR 2018), 1-bit and 2-bit weights,
          at equal steps and at equal gradient evaluations (BLAQ evaluates twice per step).

Every run is an ordinary rayq run (run directory, TensorBoard, trace); all runs of one command share one worker
group (``train_many``). Figures are the mean ± sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from rayq.launch.bench import bench_commands, environment, output_dir
from rayq.schema import ConfigError


@dataclass(frozen=True)
class Spread:
    """Mean ± sample standard deviation of one figure over seeds, with its range."""

    mean: float
    std: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
        if not v:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        return cls(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, min(v), max(v), len(v))

    def fmt(self, digits: int = 3) -> str:
        return "–" if not self.n else f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Arm:
    """One configuration of a comparison, trained once per seed; ``tags`` are its table columns."""

    name: str
    sets: tuple[str, ...]
    tags: tuple[tuple[str, Any], ...] = ()

    def tag(self, key: str) -> Any:
        return dict(self.tags)[key]


@dataclass
class ArmResult:
    """An arm's runs (one summary per seed, or the error of a failed run) and their spreads."""

    arm: Arm
    runs: list[dict[str, Any]]
    stats: dict[str, Spread] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.arm.name, **dict(self.arm.tags), "sets": list(self.arm.sets),
                "stats": {k: asdict(s) for k, s in self.stats.items()}, "runs": self.runs}


#: The per-run figures kept from each summary (and averaged over seeds).
FIGURES = ("eval/accuracy", "train/loss", "model/sparsity", "comm/bits_per_element", "mbit_uploaded", "step",
           "optim/zigzag_negative_fraction", "optim/zigzag_mean_cosine", "optim/gradient_evaluations", "wall_s")


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    if "error" in summary:
        return {"run": summary.get("run"), "error": summary["error"]}
    out = {k: summary[k] for k in FIGURES if isinstance(summary.get(k), (int, float))}
    out["mbit_uploaded"] = 8e-6 * summary.get("comm/bytes_up_total", 0) * summary.get("workers", 1)
    return {"run": summary["run"], "run_dir": summary.get("run_dir"), **out}


def train_arms(arms: Sequence[Arm], seeds: Sequence[int], runs_dir: Path, address: str | None = None) -> list[ArmResult]:
    """Train every arm at every seed, back to back in one worker group (they must share workers and CPUs);
    group the summaries by arm."""
    from rayq.config import load_config
    from rayq.launch.driver import init_ray, train_many

    cfgs = [load_config(None, [*arm.sets, f"seed={seed}"],
                        extra={"name": f"{arm.name}-seed{seed}", "output_dir": str(runs_dir)})
            for arm in arms for seed in seeds]
    first = cfgs[0]
    # Logical CPUs: the workers' shares plus a core for the controller; several bench runs may share the cores.
    init_ray(address, num_cpus=max(os.cpu_count() or 1, math.ceil(first.workers * first.cpus_per_worker) + 1))
    summaries = iter(train_many(cfgs, address=address))
    results = []
    for arm in arms:
        runs = [{**_figures(next(summaries)), "seed": seed} for seed in seeds]
        ok = [r for r in runs if "error" not in r]
        results.append(ArmResult(arm, runs, {k: Spread.of(r[k] for r in ok if k in r) for k in FIGURES}))
    return results


def loss_curve(run_dir: str | Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """One scalar of a run, read back from its TensorBoard event files: [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags().get("scalars", []) else []


def eval_curve(run_dir: str | Path) -> list[tuple[int, float]]:
    """Test accuracy at every evaluation of a run, from its trace."""
    from rayq.telemetry import read_trace

    _, evals = read_trace(Path(run_dir) / "trace.jsonl")
    return sorted(evals.items())


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """[(step, mean, min, max)] over seeds at the steps every curve has."""
    if not curves:
        return []
    common = set.intersection(*({s for s, _ in c} for c in curves))
    values = [dict(c) for c in curves]
    return [(s, statistics.fmean(v[s] for v in values), min(v[s] for v in values), max(v[s] for v in values))
            for s in sorted(common)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write(out: Path, stem: str, payload: dict[str, Any], markdown: str) -> None:
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'} and {out / f'{stem}.png'}")


# ---------------------------------------------------------------- QCMD / QRDA AdaGrad

#: Per task: the learning rate η, the ℓ1 weight λ and the epochs (chosen once so that every arm trains).
QADAGRAD_TASKS: dict[str, tuple[str, ...]] = {
    "sparse-logistic": ("optimizer.lr=0.5", "optimizer.l1=0.01", "epochs=20"),
    "digits": ("optimizer.lr=0.05", "optimizer.l1=0.001", "epochs=20"),
}
QADAGRAD_CODECS = ("threshold", "terngrad", "none")


def qadagrad_arms(tasks: Sequence[str], optimizers: Sequence[str], codecs: Sequence[str]) -> list[Arm]:
    return [Arm(f"{task}-{opt.removesuffix('_adagrad')}-{codec}",
                (f"task={task}", *QADAGRAD_TASKS[task], f"optimizer.name={opt}", f"compression.codec={codec}"),
                (("task", task), ("optimizer", opt), ("codec", codec)))
            for task in tasks for opt in optimizers for codec in codecs]


def qadagrad_markdown(results: Sequence[ArmResult]) -> str:
    lines = [("| task | optimizer | codec | test accuracy | sparsity of x | ‖Q(g)−g‖²/‖g‖² | bits/element | Mbit uploaded "
             "| steps |"), "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r.stats
        lines.append(f"| {r.arm.tag('task')} | {r.arm.tag('optimizer')} | {r.arm.tag('codec')} | "
                     f"{s['eval/accuracy'].fmt()} | {s['model/sparsity'].fmt()} | {s['distortion'].fmt()} | "
                     f"{s['comm/bits_per_element'].fmt(2)} | "
                     f"{s['mbit_uploaded'].fmt(2)} | {s['step'].mean:.0f} |")
    return "\n".join(lines)


def plot_qadagrad(results: Sequence[ArmResult], path: Path) -> None:
    plt = _plt()
    tasks = list(dict.fromkeys(r.arm.tag("task") for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results if r.arm.tag("task") == task]
        for i, r in enumerate(rows):
            sp, acc = r.stats["model/sparsity"], r.stats["eval/accuracy"]
            ax.bar(i, sp.mean, yerr=sp.std, capsize=3, color=f"C{QADAGRAD_CODECS.index(r.arm.tag('codec')) % 10}"
                   if r.arm.tag("codec") in QADAGRAD_CODECS else "grey")
            ax.text(i, sp.mean + sp.std + 0.02, f"acc\n{acc.mean:.3f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(rows)), [f"{r.arm.tag('optimizer').split('_')[0]}\n{r.arm.tag('codec')}" for r in rows],
                      fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("sparsity of x (fraction of exact zeros)")
        ax.set_title(task)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("QCMD / QRDA AdaGrad: sparsity (bars, ± std over seeds) and test accuracy, by quantiser")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan_qadagrad(args: argparse.Namespace) -> list[Arm]:
    tasks = _list(args.tasks)
    unknown = [t for t in tasks if t not in QADAGRAD_TASKS]
    if unknown:
        raise ConfigError(f"task(s) {unknown} have no settings here; choose from: {', '.join(QADAGRAD_TASKS)}")
    common = _common(args) + (["compression.min_numel=0"] if args.compress_all else [])
    return _complete(args, common, qadagrad_arms(tasks, _list(args.optimizers), _list(args.codecs)))


def report_qadagrad(args: argparse.Namespace, results: list[ArmResult], out: Path) -> None:
    for r in results:  # the quantisation error of every reporting step, read back from TensorBoard
        for run in r.runs:
            if "error" not in run:
                run["distortion"] = statistics.fmean([v for _, v in loss_curve(run["run_dir"], "comm/distortion")] or [0])
        r.stats["distortion"] = Spread.of(run["distortion"] for run in r.runs if "distortion" in run)
    payload = {**_meta(args), "tasks": {t: list(QADAGRAD_TASKS[t]) for t in _list(args.tasks)},
               "results": [r.to_json() for r in results]}
    plot_qadagrad(results, out / "qadagrad.png")
    _write(out, "qadagrad", payload, qadagrad_markdown(results))


# ---------------------------------------------------------------- Few-Bit Backward


@dataclass(frozen=True)
class MemoryRow:
    """Bytes autograd keeps for one forward pass of the digits-gelu model (saved tensors, parameters excluded)."""

    device: str
    batch: int
    bits: int | None
    model_saved_bytes: int
    activation_saved_bytes: int
    cuda_peak_bytes: int | None = None


def _activation_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Each activation (a leaf module without parameters) with the input it sees in ``model(x)``, as a leaf
    that requires grad, so that the activation alone records what it saves for the backward pass."""
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, _out: seen.append((mod, inp[0].detach().requires_grad_())))
             for m in model.modules() if not list(m.children()) and not list(m.parameters(recurse=False))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def cuda_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak bytes the CUDA allocator handed out during ``model(x)`` above what was allocated before
    (saved tensors, the output and transient buffers)."""
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    out = model(x)
    torch.cuda.synchronize(x.device)
    peak = torch.cuda.max_memory_allocated(x.device) - before
    del out
    return int(peak)


def activation_memory(bits: Sequence[int], batches: Sequence[int], devices: Sequence[str]) -> list[MemoryRow]:
    """Saved bytes of the digits-gelu model (and of its activations alone) on a batch of real digits, exact and at
    each few-bit width; on CUDA also the allocator's peak."""
    from rayq.fewbit import saved_activation_bytes, swap_activations
    from rayq.tasks import get_task, load_digits_split

    train, _ = load_digits_split()
    rows = []
    for device in devices:
        for batch in batches:
            x = train.x.repeat(-(-batch // len(train.x)), 1)[:batch].clone().to(device)  # its own storage
            for b in (None, *bits):
                torch.manual_seed(0)
                model = swap_activations(get_task("digits-gelu").build_model(), b).to(device)
                acts = sum(saved_activation_bytes(m, inp) for m, inp in _activation_inputs(model, x))
                peak = cuda_peak_bytes(model, x) if device.startswith("cuda") else None
                rows.append(MemoryRow(device, batch, b, saved_activation_bytes(model, x), acts, peak))
    return rows


def memory_markdown(rows: Sequence[MemoryRow]) -> str:
    lines = [("| device | batch | activation backward | saved by the model | saved by the GELUs | GELU memory saved | "
             "model memory saved | CUDA peak (forward) |"), "|---|---:|---|---:|---:|---:|---:|---:|"]
    exact = {(r.device, r.batch): r for r in rows if r.bits is None}
    for r in rows:
        e = exact[(r.device, r.batch)]
        peak = "–" if r.cuda_peak_bytes is None else f"{r.cuda_peak_bytes:,} B"
        lines.append(f"| {r.device} | {r.batch} | {'exact' if r.bits is None else f'{r.bits}-bit'} | "
                     f"{r.model_saved_bytes:,} B | {r.activation_saved_bytes:,} B | "
                     f"{1 - r.activation_saved_bytes / e.activation_saved_bytes:.1%} | "
                     f"{1 - r.model_saved_bytes / e.model_saved_bytes:.1%} | {peak} |")
    return "\n".join(lines)


def fewbit_arms(bits: Sequence[int]) -> list[Arm]:
    return [Arm("gelu-exact", (), (("bits", None),))] + [
        Arm(f"gelu-{b}bit", (f"model.fewbit_bits={b}",), (("bits", b),)) for b in bits]


def fewbit_markdown(results: Sequence[ArmResult]) -> str:
    lines = ["| GELU backward | final train loss | test accuracy | steps |", "|---|---:|---:|---:|"]
    for r in results:
        b = r.arm.tag("bits")
        lines.append(f"| {'exact' if b is None else f'{b}-bit'} | {r.stats['train/loss'].fmt(4)} | "
                     f"{r.stats['eval/accuracy'].fmt()} | {r.stats['step'].mean:.0f} |")
    return "\n".join(lines)


def plot_fewbit(results: Sequence[ArmResult], curves: dict[str, list], memory: Sequence[MemoryRow], path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        c = curves[r.arm.name]
        if not c:
            continue
        b = r.arm.tag("bits")
        ax1.plot([p[0] for p in c], [p[1] for p in c], color=f"C{i}", label="exact" if b is None else f"{b}-bit")
        ax1.fill_between([p[0] for p in c], [p[2] for p in c], [p[3] for p in c], color=f"C{i}", alpha=0.15)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (mean over seeds; band: min–max)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    rows = [r for r in memory if r.device == "cpu" and r.batch == max(m.batch for m in memory)]
    labels = ["exact" if r.bits is None else f"{r.bits}-bit" for r in rows]
    ax2.bar(labels, [r.model_saved_bytes / 1024 for r in rows], label="whole model", color="C7")
    ax2.bar(labels, [r.activation_saved_bytes / 1024 for r in rows], label="GELUs", color="C0")
    ax2.set_ylabel(f"KiB autograd keeps for the backward (batch {rows[0].batch if rows else '?'})")
    ax2.legend()
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle("Few-Bit Backward on digits-gelu: loss curves at 1–4 bits vs exact, and activation memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan_fewbit(args: argparse.Namespace) -> list[Arm]:
    return _complete(args, ["task=digits-gelu", "compression.codec=none", *_common(args)],
                     fewbit_arms([int(b) for b in _list(args.bits)]))


def report_fewbit(args: argparse.Namespace, results: list[ArmResult], out: Path) -> None:
    cuda = torch.cuda.is_available() and not args.cpu_only
    memory = activation_memory([int(b) for b in _list(args.bits)], [int(b) for b in _list(args.batches)],
                               ["cpu"] + (["cuda"] if cuda else []))
    curves = {r.arm.name: mean_curve([loss_curve(run["run_dir"]) for run in r.runs if "error" not in run])
              for r in results}
    payload = {**_meta(args), "memory": [asdict(m) for m in memory],
               "cuda": "measured" if cuda else "not measured: no CUDA device on this machine",
               "results": [{**r.to_json(), "loss_curve": curves[r.arm.name]} for r in results]}
    plot_fewbit(results, curves, memory, out / "fewbit.png")
    note = "" if cuda else "\n\nCUDA peak memory: not measured (no CUDA device on this machine)."
    _write(out, "fewbit", payload, memory_markdown(memory) + note + "\n\n" + fewbit_markdown(results))


# ---------------------------------------------------------------- BLAQ vs LAQ-weights

#: Weight sets by name: (config overrides, bits per weight as the table shows them).
WEIGHTS: dict[str, tuple[tuple[str, ...], str]] = {
    "binary": (("optimizer.projection=binary",), "1 bit: α·{−1, 1}"),
    "ternary": (("optimizer.projection=ternary",), "2 bits: α·{−1, 0, 1}"),
    "mbit2": (("optimizer.projection=mbit", "optimizer.weight_bits=2"), "2 bits: m-bit, m = 2 (α·{−1, 0, 1})"),
}


def blaq_arms(weights: Sequence[str], steps: int) -> list[Arm]:
    arms = []
    for w in weights:
        sets = WEIGHTS[w][0]
        arms += [Arm(f"blaq-{w}", ("optimizer.name=blaq", *sets, f"max_steps={steps}"),
                     (("method", "blaq"), ("weights", w), ("steps", steps))),
                 Arm(f"laq-{w}", ("optimizer.name=laq_weights", *sets, f"max_steps={steps}"),
                     (("method", "laq_weights"), ("weights", w), ("steps", steps))),
                 Arm(f"laq-{w}-2x", ("optimizer.name=laq_weights", *sets, f"max_steps={2 * steps}"),
                     (("method", "laq_weights"), ("weights", w), ("steps", 2 * steps)))]
    return arms


def blaq_markdown(results: Sequence[ArmResult]) -> str:
    by = {r.arm.name: r for r in results}
    lines = [("| weights | compared at | method | steps | gradient evaluations | test accuracy | zig-zag fraction | "
             "mean cos(Δw_t, Δw_t−1) | final train loss |"), "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for w in dict.fromkeys(r.arm.tag("weights") for r in results):
        for label, names in (("equal steps", (f"blaq-{w}", f"laq-{w}")),
                             ("equal gradient evaluations", (f"blaq-{w}", f"laq-{w}-2x"))):
            for name in names:
                r = by[name]
                s = r.stats
                lines.append(f"| {WEIGHTS[w][1]} | {label} | {r.arm.tag('method')} | {s['step'].mean:.0f} | "
                             f"{s['optim/gradient_evaluations'].mean:.0f} | {s['eval/accuracy'].fmt()} | "
                             f"{s['optim/zigzag_negative_fraction'].fmt()} | {s['optim/zigzag_mean_cosine'].fmt()} | "
                             f"{s['train/loss'].fmt(4)} |")
    return "\n".join(lines)


def plot_blaq(results: Sequence[ArmResult], curves: dict[str, list], path: Path) -> None:
    plt = _plt()
    weights = list(dict.fromkeys(r.arm.tag("weights") for r in results))
    fig, axes = plt.subplots(len(weights), 2, figsize=(12, 4 * len(weights)), squeeze=False)
    for row, w in zip(axes, weights):
        for i, r in enumerate(x for x in results if x.arm.tag("weights") == w):
            c = curves[r.arm.name]
            per_step = 2 if r.arm.tag("method") == "blaq" else 1
            label = f"{r.arm.tag('method')} ({r.arm.tag('steps')} steps)"
            short = r.arm.name.startswith("laq") and not r.arm.name.endswith("-2x")  # the 2x run's first half
            for ax, scale in ((row[0], 1), (row[1], per_step)):
                ax.plot([p[0] * scale for p in c], [p[1] for p in c], color=f"C{i}", marker=".", label=label,
                        ls="--" if short else "-", zorder=3 if short else 2)
                ax.fill_between([p[0] * scale for p in c], [p[2] for p in c], [p[3] for p in c], color=f"C{i}",
                                alpha=0.15)
        for ax, xlabel in ((row[0], "steps"), (row[1], "gradient evaluations")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"test accuracy ({WEIGHTS[w][1].split(':')[0]} weights)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("BLAQ vs LAQ-weights on digits: accuracy vs steps and vs gradient evaluations (mean; band min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan_blaq(args: argparse.Namespace) -> list[Arm]:
    weights = _list(args.weights)
    unknown = [w for w in weights if w not in WEIGHTS]
    if unknown:
        raise ConfigError(f"weight set(s) {unknown} are unknown; choose from: {', '.join(WEIGHTS)}")
    every = args.eval_every or max(1, args.steps // 10)
    common = ["task=digits", "compression.codec=none", f"optimizer.lr={args.lr}", *_common(args),
              f"eval_every={every}", f"report_every={every}"]
    return _complete(args, common, blaq_arms(weights, args.steps))


def report_blaq(args: argparse.Namespace, results: list[ArmResult], out: Path) -> None:
    curves = {r.arm.name: mean_curve([eval_curve(run["run_dir"]) for run in r.runs if "error" not in run])
              for r in results}
    payload = {**_meta(args), "results": [{**r.to_json(), "accuracy_curve": curves[r.arm.name]} for r in results]}
    plot_blaq(results, curves, out / "blaq.png")
    _write(out, "blaq", payload, blaq_markdown(results))


# ---------------------------------------------------------------- shared command plumbing

#: ``rayq bench <name>``: what it trains (arms with their whole config) and how it reports them.
METHODS = {"qadagrad": (plan_qadagrad, report_qadagrad), "fewbit": (plan_fewbit, report_fewbit),
           "blaq": (plan_blaq, report_blaq)}


def cmd_bench_method(args: argparse.Namespace) -> int:
    """Plan the command's arms, train them at every seed in one worker group, report."""
    plan, report = METHODS[args.bench]
    try:
        arms = plan(args)
        out = _out(args, args.bench)
        print(f"rayq bench {args.bench}: {len(arms)} configurations x {args.seeds} seeds, {args.workers} workers x "
              f"{args.cpus_per_worker} CPU -> {out}", flush=True)
        # a fresh runs directory per invocation: TensorBoard files of an earlier run of the same name never mix in
        results = train_arms(arms, range(args.seeds), out / f"runs-{datetime.now():%Y%m%d-%H%M%S}", args.address)
    except ConfigError as err:
        print(f"rayq bench {args.bench}: {err}")
        return 2
    report(args, results, out)
    failed = [r for res in results for r in res.runs if "error" in r]
    for r in failed:
        print(f"  run {r['run']} failed: {r['error']}")
    return 1 if failed else 0


def _complete(args: argparse.Namespace, common: list[str], arms: list[Arm]) -> list[Arm]:
    """Each arm's whole config: the command's settings < the arm's own < ``--set``."""
    return [replace(a, sets=(*common, *a.sets, *(args.set or []))) for a in arms]


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _out(args: argparse.Namespace, stem: str) -> Path:
    out = output_dir(args.out, stem).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _common(args: argparse.Namespace) -> list[str]:
    sets = [f"workers={args.workers}", f"cpus_per_worker={args.cpus_per_worker}", "checkpoint_every=0",
            "keep_checkpoints=1"]
    if getattr(args, "report_every", None):
        sets += [f"report_every={args.report_every}", f"eval_every={args.report_every}"]
    if args.max_steps:
        sets.append(f"max_steps={args.max_steps}")
    return sets


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {"environment": environment(), "command": "rayq " + " ".join(getattr(args, "argv", []) or []),
            "seeds": list(range(args.seeds)), "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
            "spread": "mean ± sample standard deviation over seeds (lo/hi: range)"}


def _shared(p: argparse.ArgumentParser, workers: int, cpus: float, max_steps: bool = True) -> None:
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per configuration (default 3)")
    p.add_argument("--workers", type=int, default=workers, help=f"Ray Train workers (default {workers})")
    p.add_argument("--cpus-per-worker", type=float, default=cpus, help=f"CPU share per worker (default {cpus})")
    if max_steps:
        p.add_argument("--max-steps", type=int, help="cap every run at this many steps (default: the epochs)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra config override for every run")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--out", help="output directory")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``qadagrad``, ``fewbit`` and ``blaq`` under ``rayq bench`` (created by rayq.launch.bench)."""
    bsub = bench_commands(sub)
    if bsub is None:
        return
    p = bsub.add_parser("qadagrad", help="QCMD / QRDA AdaGrad: threshold vs TernGrad vs dense; accuracy, sparsity, bits")
    _shared(p, workers=8, cpus=0.25)
    p.add_argument("--tasks", default=",".join(QADAGRAD_TASKS), help=f"subset of: {', '.join(QADAGRAD_TASKS)}")
    p.add_argument("--optimizers", default="qcmd_adagrad,qrda_adagrad")
    p.add_argument("--codecs", default=",".join(QADAGRAD_CODECS), help="codecs compared (default threshold,terngrad,none)")
    p.add_argument("--report-every", type=int, default=20, help="steps between reports and evaluations")
    p.add_argument("--compress-all", action="store_true", help="compress small tensors too (compression.min_numel=0)")
    p.set_defaults(func=cmd_bench_method)

    p = bsub.add_parser("fewbit", help="Few-Bit Backward: activation memory at 1-4 bits vs exact, and loss curves")
    _shared(p, workers=4, cpus=0.5)
    p.add_argument("--bits", default="1,2,3,4")
    p.add_argument("--batches", default="32,1024", help="batch sizes of the memory measurement")
    p.add_argument("--report-every", type=int, default=10, help="steps between loss points")
    p.add_argument("--cpu-only", action="store_true", help="skip the CUDA measurement even when a GPU is present")
    p.set_defaults(func=cmd_bench_method)

    p = bsub.add_parser("blaq", help="BLAQ vs LAQ-weights at equal steps and equal gradient evaluations")
    _shared(p, workers=4, cpus=0.5, max_steps=False)
    p.add_argument("--weights", default="binary,mbit2", help=f"weight sets, subset of: {', '.join(WEIGHTS)}")
    p.add_argument("--steps", type=int, default=150, help="BLAQ's steps (LAQ-weights runs this and twice this)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam's step size for both methods")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default steps/10)")
    p.set_defaults(func=cmd_bench_method, max_steps=None)
