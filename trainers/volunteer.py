"""Trainer ``volunteer``: DeDLOC collaborative training over unreliable volunteer peers (Diskin et al., NeurIPS 2021).

It runs in the driver: ``rayq.launch`` calls :func:`run` instead of fitting a TorchTrainer, and the run never
restarts because a peer died. The peers live on Ray host actors (:mod:`rayq.swarm`, :mod:`rayq.peer_host`);
one round (a global step) is

    swarm.begin         the round's faults, churn, restarts → a slot per peer that can compute
    plan_round          the round on the peers' simulated clocks: who computes how many micro-batches
    swarm.jobs/exchange the hosts compute, encode and reply with the packets' bytes
    swarm.receive       lost, late (simulated deadline), damaged or accepted
    average by samples → optimizer step
    swarm.finish        the averaging's simulated time from the real frames; laggards download the state

Every decision is taken on the simulated clock: for a fixed ``volunteer.sample_time_s`` a run is reproducible.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rayq import checkpoint as ckpt
from rayq.config import RunConfig
from rayq.dedloc import (Aggregator, RoundResult, Verdict, averaging_seconds, float_buffers, load_buffers, plan_round,
                         state_nbytes)
from rayq.errors import NonFiniteGradientError
from rayq.peer_host import PeerHost, RayHosts
from rayq.run import build_model, build_optimizer, build_policy
from rayq.swarm import Swarm
from rayq.tasks import Split, get_task
from rayq.telemetry import EventLog, TensorBoardLog


@dataclass
class Window:
    """The figures of the rounds since the last report."""

    rounds: int = 0
    samples: int = 0
    loss: float = 0.0
    bytes_up: int = 0
    payloads: int = 0
    wall: float = 0.0
    stragglers: int = 0


def run(cfg: RunConfig, run_dir: Path, on_progress=None, *, host_cls: type[PeerHost] = PeerHost) -> dict[str, Any]:
    """Train ``cfg`` in volunteer mode; return the final metrics (the launcher writes summary.json).
    ``host_cls`` is the host actor's class (tests inject a slower one)."""
    torch.set_num_threads(1)
    v = cfg.volunteer
    micro = v.microbatch or cfg.batch_size
    task = get_task(cfg.task)
    train, test = task.load(cfg.data_dir)
    rounds = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / v.target_batch_size))  # type: ignore[operator]

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task)
    optimizer = build_optimizer(cfg, model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    aggregator = Aggregator(build_policy(cfg), {n: tuple(p.shape) for n, p in params}, cfg.seed, cfg.workers,
                            buffers=sum(b.numel() for _, b in float_buffers(model)))
    elements = sum(p.numel() for _, p in params)
    sample_s = v.sample_time_s or _measure_sample_time(model, train, micro)

    tb = TensorBoardLog(run_dir / "tensorboard")
    events = EventLog(run_dir, tb, on_progress)
    with RayHosts(cfg, host_cls) as pool, open(run_dir / "rounds.jsonl", "a") as rounds_log:
        swarm = Swarm(cfg, events, pool)
        window, total, shown = Window(), Window(), Window()
        r, last, last_eval, tta, wall0 = 0, {}, {}, None, time.perf_counter()
        while r < rounds:
            round_wall, start, stragglers = time.perf_counter(), swarm.now, swarm.totals.stragglers
            slots = swarm.begin(r, sample_s, lambda: state_nbytes(model, optimizer))
            plan = plan_round(slots, v.target_batch_size, micro, v.matchmaking_s)
            if plan is None:  # nobody can compute: wait for the next arrival
                swarm.wait(r)
                continue

            # ---- the hosts compute their peers' micro-batches; the payloads are judged on the simulated clock
            payloads = swarm.exchange(r, swarm.jobs(r, slots, plan), model.state_dict())
            result = swarm.receive(r, plan, payloads, aggregator)
            _check_finite(cfg, r, result)

            # ---- DeDLOC step: the sample-weighted mean of the accepted contributions
            applied = False
            if result.accepted:
                mean = aggregator.average([d for _, d in result.accepted], result.samples)
                applied = _step(optimizer, params, mean)
                if applied and aggregator.buffers:
                    load_buffers(model, aggregator.average_buffers([d for _, d in result.accepted], result.samples))
                if not applied:
                    _check_finite(cfg, r, result, "the sample-weighted mean of the finite contributions overflowed")
                    events.log(r, "nonfinite", None, "the averaged gradient is not finite: step skipped")

            # ---- simulated time: the averaging group combines its frames; everyone else lags
            comm = averaging_seconds(result.frames, swarm.links)
            swarm.finish(r, slots, plan, result, applied, end=result.averaging_at + comm)
            rounds_log.write(json.dumps({
                "round": r, "start_s": start, "close_s": plan.close, "end_s": swarm.now, "comm_s": comm,
                "alive": swarm.totals.alive[-1], "samples": {pl.peer: pl.samples for pl, _ in result.accepted},
                "scheduled": {s.peer: plan.microbatches[s.peer] * micro for s in slots},
                "slowdown": {s.peer: f for s in slots if (f := swarm.plan.slowdown(s.peer, r)) != 1.0},
            }) + "\n")
            if v.sample_time_s is None:  # measured compute time per sample (EMA)
                for pl, _ in result.accepted:
                    sample_s = 0.9 * sample_s + 0.1 * pl.compute_s / pl.samples
            for w in (window, total):
                w.rounds += 1
                w.samples += sum(result.samples)
                w.loss += sum(pl.loss * pl.samples for pl, _ in result.accepted)
                w.bytes_up += result.bytes_up
                w.payloads += len(result.frames)
                w.wall += time.perf_counter() - round_wall
                w.stragglers += swarm.totals.stragglers - stragglers
            r += 1

            # ---- evaluation and reports
            report = r % max(cfg.report_every, 1) == 0 or r == rounds
            evaluate = r == rounds or bool(cfg.eval_every and r % cfg.eval_every == 0)
            if evaluate:
                acc, loss = _evaluate(model, test)
                last_eval = {"eval/accuracy": acc, "eval/loss": loss}
                if v.target_accuracy is not None and tta is None and acc >= v.target_accuracy:
                    tta = (swarm.now, r)
                    events.log(r, "target", None, f"accuracy {acc:.4f} >= {v.target_accuracy} at simulated "
                               f"{swarm.now:.1f} s (wall {time.perf_counter() - wall0:.1f} s)", time_s=swarm.now)
            if report or evaluate:
                last = _metrics(r, len(train), elements, swarm, window, total, time.perf_counter() - wall0,
                                last_eval, tta, events)
                tb.scalars(last, r)
                if report and on_progress is not None:
                    on_progress({**last, "total_steps": rounds})
                window, shown = Window(), window
            if tta is not None and v.stop_at_target:
                break

    final = {**_metrics(r, len(train), elements, swarm, shown, total, time.perf_counter() - wall0, last_eval,
                        tta, events), "train/loss": last.get("train/loss", float("nan"))}
    final_dir = run_dir / "checkpoint_final"
    ckpt.save(final_dir, 0, model_state={"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "rng": torch.get_rng_state()}, worker_state={},
              meta={"step": r, "world": cfg.workers, "task": cfg.task, "codec": cfg.compression.codec,
                    "sim_time_s": swarm.now})
    if swarm.totals.staleness:
        tb.writer.add_histogram("volunteer/staleness", torch.tensor(swarm.totals.staleness, dtype=torch.float32), r)
    tb.hparams(cfg.to_dict(), {k: val for k, val in final.items() if k.startswith(("eval/", "sim/", "volunteer/u"))})
    events.close()
    tb.close()
    return {**final, "steps_total": rounds, "checkpoint": str(final_dir)}


def _check_finite(cfg: RunConfig, r: int, result: RoundResult, overflow: str | None = None) -> None:
    """``on_nonfinite=raise``: stop at a peer's NaN/Inf contribution (or an overflowing mean). ``skip`` drops the
    contribution alone (the peer resynchronises) or, for an overflowing mean, the step."""
    bad = {p: result.notes[p] for p, v in result.verdicts.items() if v is Verdict.NONFINITE}
    if cfg.on_nonfinite != "raise" or not (bad or overflow):
        return
    what = overflow or "; ".join(f"peer {p}: {note}" for p, note in sorted(bad.items()))
    raise NonFiniteGradientError(f"round {r}: a contribution is not finite (NaN/Inf): {what}. Lower optimizer.lr, "
                                 "or set on_nonfinite=skip (drops a non-finite contribution; its peer resynchronises)")


def _step(optimizer: torch.optim.Optimizer, params: list[tuple[str, torch.nn.Parameter]],
          mean: dict[str, torch.Tensor]) -> bool:
    """Apply the averaged gradient; False (no step) when it is not finite."""
    if not all(bool(torch.isfinite(g).all()) for g in mean.values()):
        return False
    for n, p in params:
        p.grad = mean[n].clone()
    optimizer.step()
    return True


def _metrics(r: int, n_train: int, elements: int, swarm: Swarm, window: Window, total: Window, wall: float,
             last_eval: dict[str, float], tta: tuple[float, int] | None, events: EventLog) -> dict[str, Any]:
    v = swarm.cfg.volunteer
    bpe = 8.0 * total.bytes_up / (elements * total.payloads) if total.payloads else 0.0
    m: dict[str, Any] = {
        "step": r, "epoch": swarm.totals.used_samples / n_train,
        "train/loss": window.loss / window.samples if window.samples else float("nan"),
        "comm/bits_per_element": bpe,
        "comm/compression_ratio": 32.0 / bpe if bpe else 0.0,
        "comm/bytes_up": window.bytes_up / max(window.rounds, 1),
        "comm/bytes_up_total": total.bytes_up / len(swarm.peers),
        "comm/bytes_up_all": float(total.bytes_up),
        "time/step_s": window.wall / max(window.rounds, 1),
        "time/wall_s": wall,
        "sim/time_s": swarm.now,
        **swarm.figures(),
        "faults/events": sum(events.counts.values()),
        "faults/stragglers": window.stragglers,
    }
    if v.target_accuracy is not None:
        m["volunteer/target_accuracy"] = v.target_accuracy
        m["sim/time_to_accuracy_s"] = tta[0] if tta else None
        m["volunteer/rounds_to_accuracy"] = tta[1] if tta else None
    return {**m, **last_eval}


def _evaluate(model: torch.nn.Module, test: Split) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(test.x)
        acc = float((out.argmax(1) == test.y).float().mean())
        loss = float(F.cross_entropy(out, test.y))
    model.train()
    return acc, loss


def _measure_sample_time(model: torch.nn.Module, train: Split, micro: int) -> float:
    """Seconds per sample of forward + backward on this machine (the reference, speed factor 1)."""
    x, y = train.x[:micro], train.y[:micro]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad()
    return sorted(times)[len(times) // 2] / micro
