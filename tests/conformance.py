"""The conformance harness: one cell of the combination matrix, run for a few steps on in-process workers
through the real schedules, compressed group, fault injector and transport, then checked by an oracle
that knows only the codec contract (encode, decode, aggregate) and the rules.

Invariants (a cell passes when every one holds):

* **bytes** — the ledger's wire bytes of each worker equal the bytes it handed to the transport's
  primitives, counted underneath the transport's own accounting (padding and control included);
* **replicas** — every worker holds the same model after every step (after every sync for local SGD);
* **applied** — each exchange's result is the codec's aggregate (the weighted mean, or its own rule) of the
  decoded contributions that were used: weight > 0 and the frame arrived (a PowerSGD exchange: its error
  memory plus the applied approximation is the compensated input, E + P̂Qᵀ = M);
* **memory** — per worker and tensor, error feedback conserves: e_after + (what was applied from it) =
  e_before + its input; a worker that offered nothing (weight 0) keeps e_before; the two-phase owners' memory
  conserves the same way for the shards they re-encode;
* **laq** — LAQ's aggregate equals the sum of every worker's reference on every worker.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressors import Codec, Packet, TensorInfo
from compressors.base import mix_seed
from compressors.error_feedback import ErrorFeedback
from compressors.policy import Policy
from rayq import schedules
from rayq.collective import CompressedGroup, shard_bounds
from rayq.config import RunConfig
from rayq.faults import CollectiveFaults, FaultPlan, StepFaults
from rayq.run import build_optimizer, build_policy
from rayq.schedules import Replica
from rayq.transport import LocalHub, run_local

WORKERS = 3  # the default world of a cell (cell_config(cell, workers=...) sets another)
STEPS = 4


def make_model() -> nn.Module:
    """24·16 = 384 weights (compressed: ≥ min_numel 256) and three small tensors (the dense bucket)."""
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))


torch.manual_seed(1234)
INIT = make_model().state_dict()


@dataclass
class Exchange:
    """One call of ``allreduce_mean`` as a worker made it."""

    step: int
    tensors: dict[str, torch.Tensor]
    weights: list[float] | None
    output: dict[str, torch.Tensor]
    before: dict[str, Any]   # policy state
    after: dict[str, Any]
    dropped: list[int]


@dataclass
class Record:
    step: int
    view: StepFaults | None
    params: dict[str, torch.Tensor]
    synced: bool
    wire_up: int
    counted: int
    laq: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Trace:
    records: list[Record] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)


def _spy(group: CompressedGroup, trace: Trace) -> None:
    real = group.allreduce_mean

    def spied(tensors, step, measure=False, weights=None):
        before = copy.deepcopy(group.policy.state_dict())
        inputs = {k: v.detach().clone() for k, v in tensors.items()}
        out, ledger = real(tensors, step, measure=measure, weights=weights)
        ledger.resolve()  # the device path's frame checks are read here (as the trainer does at the step's end)
        trace.exchanges.append(Exchange(step, inputs, None if weights is None else list(weights),
                                        {k: v.detach().clone() for k, v in out.items()}, before,
                                        copy.deepcopy(group.policy.state_dict()), [w for w, _ in ledger.dropped]))
        return out, ledger

    group.allreduce_mean = spied  # type: ignore[method-assign]


def _worker(transport, cfg: RunConfig, counted: list[int], run_dir: str, device_frames: bool) -> Trace:
    rank = transport.rank
    model = make_model()
    model.load_state_dict(INIT)
    replica = Replica(model, build_optimizer(cfg, model), "raise", rank)
    plan = FaultPlan.from_config(cfg, None)
    faults = None if plan.empty else CollectiveFaults(plan, rank, cfg.workers, run_dir, 0, None, cfg.faults.deadline)
    group = CompressedGroup(build_policy(cfg), transport, seed=cfg.seed, strategy=cfg.compression.strategy,
                            lossy=plan.damages_payloads, device_frames=device_frames)
    schedule = schedules.build(cfg, replica, group, steps_per_epoch=2)
    trace = Trace()
    _spy(group, trace)
    for step in range(STEPS):
        start = counted[rank]
        view = faults.begin(step, None, transport) if faults is not None else None
        if view is not None:
            schedule.resync(view)
            if rank in view.resync:
                group.reset()
            if view.resync and view.source is not None:
                transport.broadcast([p.data for p in model.parameters()], view.source)
        g = torch.Generator().manual_seed(mix_seed(rank, step, 77))
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.1
        outcome = schedule.step(step, view, measure=False)
        outcome.ledger.wire.extend(transport.take_records())
        laq = None
        if isinstance(schedule, schedules.LAQ):
            laq = (schedule.state.refs.clone(), schedule.state.aggregate.clone())
        trace.records.append(Record(step, view, {n: p.detach().clone() for n, p in model.named_parameters()},
                                    outcome.synced, outcome.ledger.wire_up, counted[rank] - start, laq))
    return trace


def simulate(cfg: RunConfig, ops: set[str] | None = None, device_frames: bool = False) -> list[Trace]:
    """Every worker's trace of the cell; ``ops`` (when given) collects the primitives the transport ran.
    ``device_frames``: gathered frames are checked, sliced and decoded by tensor operations, as on a GPU
    (where it is the default), instead of parsed on the host."""
    counted = [0] * cfg.workers

    def on_primitive(rank: int, op: str, nbytes: int) -> None:
        counted[rank] += nbytes
        if ops is not None:
            ops.add(op)

    with tempfile.TemporaryDirectory() as run_dir:
        hub = LocalHub(cfg.workers, timeout_s=60, on_primitive=on_primitive)
        return run_local(cfg.workers, _worker, cfg, counted, run_dir, device_frames, hub=hub,
                         gather=cfg.compression.gather)


# ---------------------------------------------------------------------------------------- the oracle


def _base(codec: Codec) -> Codec:
    return codec.inner if isinstance(codec, ErrorFeedback) else codec  # the test is the spec: it may look inside


def _residuals(state: dict[str, Any], spec: str) -> dict[str, torch.Tensor]:
    return state.get(spec, {}).get("residuals", {})


def _own(codec: Codec, x: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    base = _base(codec)
    return base.decode(Packet.from_bytes(base.encode(x, info).to_bytes()), info).to(torch.float32)


def check(cfg: RunConfig, traces: list[Trace]) -> list[str]:
    """Every invariant the cell breaks (empty: the cell conforms)."""
    problems: list[str] = []
    periodic = cfg.sync.schedule in ("periodic", "adaptive")
    for w, t in enumerate(traces):
        for r in t.records:
            if r.wire_up != r.counted:
                problems.append(f"bytes: worker {w} step {r.step}: ledger {r.wire_up} B, transport moved {r.counted} B")
    for s in range(STEPS):
        recs = [t.records[s] for t in traces]
        if periodic and not recs[0].synced:
            continue
        for n in recs[0].params:
            if not all(torch.equal(r.params[n], recs[0].params[n]) for r in recs[1:]):
                problems.append(f"replicas: {n} differs between workers after step {s}")
                break
        if recs[0].laq is not None:
            for w, r in enumerate(recs):
                refs, aggregate = r.laq  # type: ignore[misc]
                if not torch.allclose(refs.sum(0), aggregate, atol=1e-5) or not torch.equal(aggregate, recs[0].laq[1]):
                    problems.append(f"laq: worker {w} step {s}: aggregate is not the sum of the references everywhere")
            view = recs[0].view
            if view is not None and s > 0:  # who could not upload (late, away, frame lost) kept its reference
                before = traces[0].records[s - 1].laq[0]  # type: ignore[index]
                after = recs[0].laq[0]  # type: ignore[index]
                for w in range(cfg.workers):
                    silent = view.weights[w] == 0 or w in view.damaged
                    if silent and w not in view.left and not torch.equal(before[w], after[w]):
                        problems.append(f"laq: step {s}: worker {w} could not upload (weight 0 or lost) "
                                        "but its reference changed")
    n_ex = len(traces[0].exchanges)
    if any(len(t.exchanges) != n_ex for t in traces):
        return problems + ["exchanges: workers made different numbers of exchanges"]
    for i in range(n_ex):
        problems += _check_exchange(cfg, [t.exchanges[i] for t in traces])
    return problems


def _check_exchange(cfg: RunConfig, ex: list[Exchange]) -> list[str]:
    step, weights = ex[0].step, ex[0].weights
    wts = weights or [1.0] * cfg.workers
    policy = build_policy(cfg)
    shapes = {k: tuple(v.shape) for k, v in ex[0].tensors.items()}
    dtypes = {k: v.dtype for k, v in ex[0].tensors.items()}
    entries = policy.plan(shapes, dtypes)
    dropped = set(ex[0].dropped)
    problems = []
    for e in entries:
        flat = [torch.cat([x.tensors[m].reshape(-1) for m in e.members]).to(e.dtype) for x in ex]
        out = [torch.cat([x.output[m].reshape(-1) for m in e.members]).to(torch.float32) for x in ex]
        ef = isinstance(e.codec, ErrorFeedback)
        spec = e.codec.spec
        where = f"step {step} {e.key} ({spec})"
        if cfg.compression.strategy == "two_phase":
            problems += _check_two_phase(cfg, e, ex, flat, out, wts, where)
            continue
        if e.codec.multi_round:  # PowerSGD: E_after + applied = M for every contributing worker
            for w, x in enumerate(ex):
                e_before = x.before.get(spec, {}).get("e", {}).get(e.key)
                e_after = x.after.get(spec, {}).get("e", {}).get(e.key)
                if e_after is None or wts[w] == 0:
                    continue
                m = flat[w].view(e_after.shape) + (e_before if e_before is not None else 0)
                if not torch.allclose(e_after + out[w].view(e_after.shape), m, atol=1e-5, rtol=1e-4):
                    problems.append(f"memory: {where}: worker {w}: E + applied != M")
            continue
        used = [w for w in range(cfg.workers) if wts[w] > 0 and w not in dropped]
        decoded = {}
        for w in range(cfg.workers):
            info = TensorInfo(e.key, e.shape, worker=w, world=cfg.workers, step=step, seed=cfg.seed, weight=wts[w],
                              weight_sum=None if weights is None else float(sum(wts)))
            e_before = _residuals(ex[w].before, spec).get(e.key) if ef else None
            u = flat[w].to(torch.float32) + (e_before if e_before is not None else 0) if ef else flat[w]
            if wts[w] > 0:
                decoded[w] = _own(e.codec, u, info)
            if ef:
                e_after = _residuals(ex[w].after, spec).get(e.key)
                if wts[w] == 0:
                    if not _same(e_before, e_after):
                        problems.append(f"memory: {where}: worker {w} offered nothing but its residual changed")
                    continue
                applied = decoded[w] if w in used else torch.zeros_like(u)
                if e_after is None or not torch.allclose(e_after + applied, u, atol=1e-5, rtol=1e-5):
                    problems.append(f"memory: {where}: worker {w}: e_after + applied != e_before + input")
        if not used:
            continue
        base = _base(e.codec)
        if base.kind.value == "linear" and not cfg.compression.strategy == "allgather" and not _lossy(cfg):
            expected = _linear_mean(base, e, ex, flat, wts, step, cfg, decoded)
        else:
            expected = base.aggregate([decoded[w] for w in used], [wts[w] for w in used])
        for w in range(cfg.workers):
            if not torch.allclose(out[w], expected.to(torch.float32), atol=1e-6, rtol=1e-5):
                problems.append(f"applied: {where}: worker {w}'s result is not the aggregate of the used contributions "
                                f"(max diff {float((out[w] - expected).abs().max()):.3g})")
                break
    return problems


def _lossy(cfg: RunConfig) -> bool:
    return FaultPlan.from_config(cfg, None).damages_payloads


def _linear_mean(base: Codec, e, ex, flat, wts, step, cfg, decoded) -> torch.Tensor:
    """A single-round linear codec's all-reduce: fields scaled by the weights, summed in rank order, decoded."""
    total = None
    for w in range(cfg.workers):
        info = TensorInfo(e.key, e.shape, worker=w, world=cfg.workers, step=step, seed=cfg.seed)
        e_before = _residuals(ex[w].before, base.spec + "+ef").get(e.key)
        u = flat[w].to(torch.float32) + e_before if e_before is not None else flat[w]
        fields = base.encode(u, info).fields
        if wts[w] != 1.0:
            fields = tuple(f * wts[w] for f in fields)
        total = fields if total is None else tuple(a + b for a, b in zip(total, fields))
    info = TensorInfo(e.key, e.shape, worker=0, world=cfg.workers, step=step, seed=cfg.seed)
    return base.decode(Packet(base.name, e.numel, total), info).to(torch.float32) / float(sum(wts))


def _check_two_phase(cfg: RunConfig, e, ex, flat, out, wts, where) -> list[str]:
    """Phase 1: each worker's shard memories conserve; owners: their memory conserves for the aggregate of
    the decoded phase-1 shards they re-encode, and everyone's result is the decoded re-encoding."""
    problems: list[str] = []
    ef = isinstance(e.codec, ErrorFeedback)
    spec, step = e.codec.spec, ex[0].step
    base = _base(e.codec)
    for j, (lo, hi) in enumerate(shard_bounds(e.numel, cfg.workers)):
        if hi == lo:
            continue
        name = f"{e.key}#{j}/{cfg.workers}"
        decoded = []
        for w in range(cfg.workers):
            info = TensorInfo(name, (hi - lo,), worker=w, world=cfg.workers, step=step, seed=cfg.seed, weight=wts[w],
                              weight_sum=float(sum(wts)))
            e_before = _residuals(ex[w].before, spec).get(name) if ef else None
            x = flat[w][lo:hi].to(torch.float32)
            u = x + e_before if e_before is not None else x
            d = _own(e.codec, u, info)
            if wts[w] > 0:
                decoded.append((d, wts[w]))
            if ef:
                e_after = _residuals(ex[w].after, spec).get(name)
                if e_after is None or not torch.allclose(e_after + d, u, atol=1e-5, rtol=1e-5):
                    problems.append(f"memory: {where}: worker {w} shard {j}: e_after + applied != e_before + input")
        reduced = base.aggregate([d for d, _ in decoded], [wt for _, wt in decoded])
        owner_info = TensorInfo(f"{name}@owner", (hi - lo,), worker=j, world=cfg.workers, step=step, seed=cfg.seed)
        o_before = _residuals(ex[j].before, "owner:" + spec).get(owner_info.name) if ef else None
        u = reduced + o_before if o_before is not None else reduced
        applied = _own(e.codec, u, owner_info)
        if ef:
            o_after = _residuals(ex[j].after, "owner:" + spec).get(owner_info.name)
            if o_after is None or not torch.allclose(o_after + applied, u, atol=1e-5, rtol=1e-5):
                problems.append(f"memory: {where}: owner {j}: e_after + applied != e_before + aggregate")
        for w in range(cfg.workers):
            if not torch.allclose(out[w][lo:hi], applied, atol=1e-6, rtol=1e-5):
                problems.append(f"applied: {where}: worker {w}'s shard {j} is not the owner's decoded re-encoding")
                break
    return problems


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def cell_config(cell, **extra: Any) -> RunConfig:
    from rayq.config import load_config

    base = {"workers": WORKERS, "seed": 3, "optimizer": {"lr": 0.1}, "batch_size": 8, "max_steps": STEPS, **extra}
    return load_config(extra=cell.config(base))


def policy_of(cfg: RunConfig) -> Policy:
    return build_policy(cfg)
