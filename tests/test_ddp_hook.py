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


def _all_cases(rank: int, world: int) -> dict:
    cases = [("rayq", "qsgd"), ("rayq", "qsgd", "direct"), ("rayq", "none"), ("torch-powersgd", None)]
    if "powersgd" in REGISTRY:
        cases.append(("rayq", "powersgd"))
    return {case: _train(rank, *case) for case in cases}


def test_ddp_hooks_keep_replicas_identical_train_and_count_real_bytes():
    results = run_workers(2, _all_cases)
    dense = sum(p.numel() for p in results[0][("rayq", "none")]["params"]) * 4
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
