"""DDP with rayq's communication hook (and PyTorch's PowerSGD hook, counted) on real gloo processes."""

from __future__ import annotations

import pickle

import torch
import torch.nn.functional as F
from torch import nn

from compressors import REGISTRY
from compressors.policy import Policy
from tests.distributed import run_workers

STEPS = 15


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linearly separable 4-class problem; each rank holds its own samples."""
    w = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, 20, generator=torch.Generator().manual_seed(1 + rank))
    return x, (x @ w).argmax(1)


def _train(rank: int, hook: str, codec: str | None, gather: str = "padded") -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rayq.ddp_hook import AllReduceCounter, RayqHookState, register

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    ddp = DDP(model, bucket_cap_mb=0.01)  # several buckets
    counter, state = AllReduceCounter(), None
    if hook == "rayq":
        state = register(ddp, Policy(codec, error_feedback=codec != "powersgd", min_numel=0), seed=3, gather=gather)
    else:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        ddp.register_comm_hook(psgd.PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=3),
                               counter.wrap(psgd.powerSGD_hook))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.5)
    x, y = _data(rank)
    losses, step_bytes, kinds = [], [], set()
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        with counter:
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        ledger = state.take_ledger() if state else counter.take_ledger(2, sum(p.numel() for p in model.parameters()))
        step_bytes.append(ledger.bytes_up)
        kinds |= {w.kind for w in ledger.wire if w.purpose == "payload"}
        assert ledger.comm_s > 0 and ledger.rounds >= 1
    out = {"params": [p.detach().clone() for p in model.parameters()], "losses": losses, "bytes": step_bytes,
           "kinds": kinds}
    if state is not None:
        clone = pickle.loads(pickle.dumps(state))
        out["state_roundtrip"] = (clone.step == state.step and clone.state_dict().keys() == state.state_dict().keys()
                                  and clone.gather == gather)
    return out


def _bucketed_memories(rank: int) -> dict[str, int]:
    """rayq's hook with flat buckets (compression.bucket_mb) and error feedback over several DDP buckets: the
    error-feedback memory of each flat bucket, by key, after DDP has rebuilt its buckets."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rayq.ddp_hook import register

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    ddp = DDP(model, bucket_cap_mb=0.001)
    policy = Policy("topk", {"density": 0.1}, error_feedback=True, min_numel=0, bucket_mb=25)
    register(ddp, policy, seed=3)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = _data(rank)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    (state,) = policy.state_dict().values()
    return {k: r.numel() for k, r in state["residuals"].items()}


def _all_cases(rank: int, world: int) -> dict:
    cases = [("rayq", "qsgd"), ("rayq", "qsgd", "direct"), ("rayq", "none"), ("torch-powersgd", None)]
    if "powersgd" in REGISTRY:
        cases.append(("rayq", "powersgd"))
    return {**{case: _train(rank, *case) for case in cases}, "bucketed": _bucketed_memories(rank)}


def test_ddp_hooks_keep_replicas_identical_train_and_count_real_bytes():
    results = run_workers(2, _all_cases)
    dense = sum(p.numel() for p in results[0][("rayq", "none")]["params"]) * 4
    # each DDP bucket is planned apart: its flat buckets' memories have their own keys and cover every parameter
    # (under one key per plan, "__bucket0__", the DDP buckets' memories overwrote or dropped one another)
    memories = results[0].pop("bucketed")
    results[1].pop("bucketed")
    assert len(memories) >= 2 and all(k.startswith("__bucket:") for k in memories), memories
    assert sum(memories.values()) == sum(p.numel() for p in results[0][("rayq", "none")]["params"])
    for case, r0 in results[0].items():
        r1 = results[1][case]
        for a, b in zip(r0["params"], r1["params"]):
            assert torch.equal(a, b), f"{case}: replicas diverged"
        assert r0["losses"][-1] < 0.6 * r0["losses"][0], f"{case}: did not train ({r0['losses']})"
        assert all(b > 0 for b in r0["bytes"]), case
        assert r0.get("state_roundtrip", True)
    for a, b in zip(results[0][("rayq", "qsgd")]["params"], results[0][("rayq", "qsgd", "direct")]["params"]):
        assert torch.equal(a, b)  # the same frames, sent unpadded to each peer instead of all-gathered
    assert results[0][("rayq", "qsgd")]["kinds"] == {"allgather"}
    assert results[0][("rayq", "qsgd", "direct")]["kinds"] == {"alltoall"}
    assert results[0][("rayq", "none")]["bytes"][-1] >= dense
    assert results[0][("rayq", "qsgd")]["bytes"][-1] < dense / 4
    torch_psgd = results[0][("torch-powersgd", None)]["bytes"]
    assert torch_psgd[0] == dense and torch_psgd[-1] < dense / 2  # plain until start_powerSGD_iter, then P, Q
    if ("rayq", "powersgd") in results[0]:
        assert results[0][("rayq", "powersgd")]["bytes"][-1] < dense / 2


def test_a_skipped_non_finite_step_drops_pytorch_powersgd_state_where_it_holds_nan():
    """trainer ddp with PyTorch's PowerSGD hook: after a step skipped for NaN/Inf, a bucket's error memory that
    holds them is dropped, and a NaN warm-start Q (all-reduced: the same on every worker) is dropped with its P,
    so the hook draws a new Q for that bucket; finite buckets keep their state."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from trainers.ddp import HookState

    state = PowerSGDState(None, matrix_approximation_rank=1)
    nan = torch.tensor([1.0, float("nan")])
    state.error_dict = {0: nan.clone(), 1: torch.ones(2)}
    state.p_memory_dict = {0: torch.ones(2), 1: torch.ones(2)}
    state.q_memory_dict = {0: torch.ones(2), 1: nan.clone()}
    dropped = HookState(state).drop_nonfinite()
    assert dropped == ["powersgd error of bucket 0", "powersgd warm start of bucket 1"]
    assert list(state.error_dict) == [1] and list(state.q_memory_dict) == [0] and list(state.p_memory_dict) == [0]
    assert HookState(state).drop_nonfinite() == [] and HookState(None).drop_nonfinite() == []
