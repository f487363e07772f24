"""Real against simulated: a run on shaped links, step by step, and the network model's account of it.

A run's ``trace.jsonl`` (rank 0: each step's wall time, compute, the wall time of its collectives and every
collective's record) and one ``ranks/rank<r>.jsonl`` per worker (written by ``rayq bench links``: each
rank's step end time, compute and collective time) give, for every step ``s`` after the first (which holds
Ray Train's start-up and the initial broadcast):

* ``real(s)`` — rank 0's wall time of the step;
* ``local(s) = max_r (wall_r(s) − comm_r(s))`` — the slowest worker's time outside the step's collectives
  (forward/backward, encode, decode, optimizer, reporting, evaluation): what a synchronous step waits for
  before it can communicate, measured, so the comparison is like with like on a CPU shared by four workers
  (a step without any collective adds its time to the next one that has: the ranks only meet there);
* ``comm(s) = min_r comm_r(s)`` — the collectives' wall time on the worker that arrived last (the others
  also waited for it), i.e. what the network took;
* ``sim(s) = local(s) + netsim(s)``, where ``netsim(s)`` is :func:`rayq.netsim.step_comm_seconds` of the
  step's own collective records on the profile's links (at TCP's payload rate, :func:`payload_links`);
* ``netsim(s)`` also charges every collective call ``call_s``, its fixed software cost, fitted by
  :func:`fit_call_seconds` on one profile's runs (and checked on the others');
* ``wire(s) = local(s) + netsim`` as before those two: the wire's latency (RTT/2) and no cost per call;
* ``naive(s)`` — what ``rayq bench e2e`` replays: rank 0's compute plus every record on the nominal profile.

Time to a target accuracy sums them up to the first evaluation at or above it.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rayq.netsim import Link, payload_links, step_comm_seconds
from rayq.transport import WireRecord


@dataclass(frozen=True)
class StepTimes:
    step: int
    real: float
    local: float
    comm: float
    netsim: float
    naive: float
    wire: float = 0.0
    calls: int = 0

    @property
    def sim(self) -> float:
        return self.local + self.netsim


@dataclass(frozen=True)
class Comparison:
    """One run on shaped links against the model: per-step times, evaluations, and the time to ``target``."""

    config: str
    profile: str
    steps: list[StepTimes]
    evals: dict[int, float]
    target: float

    @property
    def step_to_target(self) -> int | None:
        return next((k for k, acc in sorted(self.evals.items()) if acc >= self.target), None)

    def upto(self, step: int | None) -> list[StepTimes]:
        return [s for s in self.steps if step is None or s.step <= step]

    def total(self, field: str, step: int | None = None) -> float:
        return sum(getattr(s, field) for s in self.upto(step))

    def curve(self, field: str) -> list[tuple[float, float]]:
        """``(cumulative seconds after the first step, accuracy)`` at each evaluation."""
        out = []
        for k, acc in sorted(self.evals.items()):
            if k > 1 and any(s.step == k for s in self.steps):
                out.append((self.total(field, k), acc))
        return out

    def summary(self) -> dict[str, Any]:
        k = self.step_to_target
        real, sim, naive, wire = (self.total(f, k) if k else None for f in ("real", "sim", "naive", "wire"))
        n = max(len(self.steps), 1)
        comm, netsim, wall = self.total("comm"), self.total("netsim"), self.total("real")
        return {
            "config": self.config, "profile": self.profile, "target": self.target, "step_to_target": k,
            "real_s": real, "sim_s": sim, "error": (sim - real) / real if real else None,
            "naive_s": naive, "naive_error": (naive - real) / real if real else None,
            "wire_s": wire, "wire_error": (wire - real) / real if real and wire else None,
            "real_step_s": wall / n, "sim_step_s": self.total("sim") / n,
            "real_comm_step_s": comm / n, "sim_comm_step_s": netsim / n,
            "comm_error": (netsim - comm) / comm if comm else None,
            "comm_share": comm / wall if wall else 0.0,
            "residual_step_s": (wall - self.total("local") - comm) / n,
            "final_accuracy": self.evals[max(self.evals)] if self.evals else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "steps": [asdict(s) for s in self.steps], "evals": self.evals}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(run_dir: Path, links: list[Link], config: str, profile: str, target: float,
            nominal: list[Link] | None = None, wire_links: list[Link] | None = None, call_s: float = 0.0) -> Comparison:
    """Read a run's trace and its ranks' records and time every step both ways (see the module docstring);
    ``nominal``: the profile as written (default ``links``), ``wire_links``: with the wire's latency."""
    rows = _lines(run_dir / "trace.jsonl")
    evals = {r["eval_step"]: r["eval/accuracy"] for r in rows if "eval_step" in r}
    trace = {r["step"]: r for r in rows if "step" in r and "eval_step" not in r}
    ranks = [{r["step"]: r for r in _lines(p)} for p in sorted((run_dir / "ranks").glob("rank*.jsonl"))]
    if len(ranks) != len(links):
        raise ValueError(f"{run_dir}: {len(ranks)} rank records for {len(links)} workers")
    payload, wired = payload_links(links), payload_links(wire_links) if wire_links else None
    steps, pending = [], [0.0] * len(ranks)
    for s in sorted(trace):
        if s < 2 or any(s not in r or s - 1 not in r for r in ranks):
            continue
        walls = [r[s]["t"] - r[s - 1]["t"] for r in ranks]
        comms = [r[s]["comm_s"] for r in ranks]
        wire = [WireRecord.from_json(w) for w in trace[s]["wire"]]
        own = wire[:ranks[0][s]["n_wire"]]  # the step's exchange; reports and evaluations come after it
        # Ranks only wait for each other where they meet (any collective): between, each runs on alone
        # (local SGD), so the slowest rank's time since the last meeting is charged where they meet next.
        pending = [p + w - c for p, w, c in zip(pending, walls, comms)]
        local = max(pending) if wire else 0.0
        pending = [0.0] * len(ranks) if wire else pending
        steps.append(StepTimes(s, trace[s]["wall_s"], local, min(comms), step_comm_seconds(own, payload, call_s),
                               trace[s]["compute_s"] + step_comm_seconds(wire, nominal or links),
                               local + step_comm_seconds(own, wired) if wired else 0.0, len(own)))
    return Comparison(config, profile, steps, evals, target)


def fit_call_seconds(comparisons: list[Comparison]) -> float:
    """The fixed cost of one collective call that closes the gap between real and modelled communication over
    these runs (compared with ``call_s=0``): ``Σ_s (comm(s) − netsim(s)) / Σ_s calls(s)``, at least 0."""
    calls = sum(s.calls for c in comparisons for s in c.steps)
    gap = sum(s.comm - s.netsim for c in comparisons for s in c.steps)
    return max(0.0, gap / calls) if calls else 0.0


# ------------------------------------------------------------------------------------------------- report


def _s(x: float | None, digits: int = 1) -> str:
    return "not reached" if x is None else f"{x:.{digits}f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def markdown(rows: list[dict[str, Any]], target: float) -> str:
    """One table per profile: time to ``target`` real and simulated, per-step and communication figures."""
    out = []
    for profile in dict.fromkeys(r["profile"] for r in rows):
        out += [f"**{profile}**, time to {target:.2f} test accuracy (after the first step)", "",
                "| configuration | steps | real | simulated | error | real s/step (comm share) | sim s/step | "
                "real comm s/step | sim comm s/step | comm error | before: wire latency, no call cost (error) | "
                "e2e-style replay (error) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["profile"] == profile):
            out.append(f"| {r['config']} | {r['step_to_target'] or '-'} | {_s(r['real_s'])} | {_s(r['sim_s'])} | "
                       f"{_pct(r['error'])} | {r['real_step_s']:.3f} ({100 * r['comm_share']:.0f}%) | "
                       f"{r['sim_step_s']:.3f} | {r['real_comm_step_s']:.3f} | {r['sim_comm_step_s']:.3f} | "
                       f"{_pct(r['comm_error'])} | {_s(r['wire_s'])} ({_pct(r['wire_error'])}) | "
                       f"{_s(r['naive_s'])} ({_pct(r['naive_error'])}) |")
        out.append("")
    return "\n".join(out)


def speedups(rows: list[dict[str, Any]], profile: str) -> dict[str, float]:
    """Real seconds to target of dense over each configuration's, on one profile (> 1: faster than dense)."""
    dense = next((r["real_s"] for r in rows if r["profile"] == profile and r["config"] == "dense"), None)
    return {r["config"]: dense / r["real_s"] for r in rows if r["profile"] == profile and dense and r["real_s"]}


def collectives_markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| profile | collective | bytes per worker | real (median, max over workers) | netsim | error |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['profile']} | {r['op']} | {r['nbytes']:,} | {1e3 * r['real_s']:.1f} ms | "
                   f"{1e3 * r['sim_s']:.1f} ms | {_pct((r['sim_s'] - r['real_s']) / r['real_s'])} |")
    return "\n".join(out)


def plot(comparisons: list[Comparison], path: Path) -> None:
    """Left: real vs simulated seconds to target, every configuration on every profile (y = x is a perfect
    model; the band is ±15 %). Right: accuracy against real (solid) and simulated (dashed) seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    marks = dict(zip(dict.fromkeys(c.profile for c in comparisons), "os^Dv"))
    pts = []
    for i, c in enumerate(comparisons):
        r = c.summary()
        color = f"C{sorted(dict.fromkeys(x.config for x in comparisons)).index(c.config)}"
        if r["real_s"]:
            ax1.scatter(r["real_s"], r["sim_s"], marker=marks[c.profile], color=color,
                        label=f"{c.config} ({c.profile})")
            pts += [r["real_s"], r["sim_s"]]
        if c.profile == comparisons[0].profile:
            for field, style in (("real", "-"), ("sim", "--")):
                xs, ys = zip(*c.curve(field)) if c.curve(field) else ((), ())
                ax2.plot(xs, ys, style, color=color, label=c.config if field == "real" else None)
    if pts:
        lo, hi = min(pts) * 0.8, max(pts) * 1.25
        ax1.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax1.fill_between([lo, hi], [0.85 * lo, 0.85 * hi], [1.15 * lo, 1.15 * hi], color="grey", alpha=0.15)
        ax1.set_xscale("log")
        ax1.set_yscale("log")
    target = comparisons[0].target if comparisons else 0
    ax1.set_xlabel(f"real seconds to {target:.2f} accuracy")
    ax1.set_ylabel("simulated seconds (rayq.netsim)")
    if pts:
        ax1.legend(fontsize=7)
    ax2.axhline(target, color="grey", lw=0.8, ls=":")
    ax2.set_xlabel(f"seconds on {comparisons[0].profile if comparisons else ''} (solid real, dashed simulated)")
    ax2.set_ylabel("test accuracy")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle("rayq bench links: real shaped links against the network model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
