"""Every codec × error feedback × schedule × strategy × fault is either refused by the config, naming both
halves, or conforms to the invariants of :mod:`tests.conformance` on in-process workers.

The suite must also be able to fail: the last tests put known defects back (by monkeypatching) and check
that the cells they break are reported.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib

import pytest
import torch

from rayq.matrix import Cell, cells
from rayq.schema import ConfigError
from tests.conformance import WORKERS, cell_config, check, simulate

#: Filled by the matrix test, printed in pytest's terminal summary (tests/conftest.py).
SUMMARY: dict[str, object] = {}

HALVES = ("compression.codec", "codec '", "compression.error_feedback", "sync.schedule", "compression.strategy",
          "strategy '", "faults.", "trainer")


def on_device(cell: Cell) -> bool:
    """Half of the cells, spread over every dimension of the matrix, take the device path of gathered frames
    (the GPU's default: checks, slicing and decoding by tensor operations); the others parse on the host.
    Both sweeps use it, so each path meets each gather mode in about half of the cells."""
    return bool(zlib.crc32(str(cell).encode()) & 1)


def _run(cell: Cell) -> tuple[str | None, list[str]]:
    """(the refusal, or None) and the invariants the cell breaks."""
    try:
        cfg = cell_config(cell)
    except ConfigError as err:
        return str(err), []
    return None, check(cfg, simulate(cfg, device_frames=on_device(cell)))


def test_every_cell_of_the_matrix_is_refused_by_name_or_conforms():
    refused, failed, ran, device = collections.Counter(), [], 0, 0
    for cell in cells():
        reason, problems = _run(cell)
        if reason is not None:
            named = {h for h in HALVES if h in reason}
            assert len(named) >= 2 or ("codec '" in reason and "strategy '" in reason), \
                f"{cell}: the refusal does not name both halves: {reason}"
            refused[reason.split(":")[0][:60]] += 1
            continue
        ran += 1
        device += on_device(cell)
        if problems:
            failed.append((cell, problems[:3]))
    SUMMARY.update(checked=ran, refused=sum(refused.values()), reasons=len(refused), failed=len(failed), device=device)
    assert not failed, "\n".join(f"{c}: {p}" for c, p in failed[:20])
    assert ran > 900 and sum(refused.values()) > 1500  # the matrix is the whole matrix
    assert 0.4 * ran < device < 0.6 * ran


def test_the_refusals_are_for_reasons_not_tastes():
    """Spot checks: the combinations the issue tracker found broken are refused with their reason."""
    def reason(**kw) -> str:
        return _run(Cell(**{"codec": "qsgd", "error_feedback": False, "schedule": "every_step", "strategy": "auto",
                            "fault": "none", **kw}))[0] or ""

    assert "decodes to ±1 without the delta's scale" in reason(codec="sign", schedule="periodic")
    assert "built-in error feedback" in reason(codec="powersgd", error_feedback=True)
    assert "every worker owns a shard" in reason(strategy="two_phase", fault="leave")
    assert "without a per-step barrier" in reason(schedule="adaptive", fault="straggle+deadline")
    assert "already carry the quantisation error" in reason(codec="laq", schedule="laq", error_feedback=True)
    assert "needs a contractive codec" in reason(error_feedback=True)  # qsgd at 7 levels loses more than its input
    assert "summed in flight" in reason(codec="none", fault="lose")
    assert reason(codec="none", fault="lose", strategy="allgather") == ""  # in frames, a lost one is dropped


def test_a_single_worker_conforms_on_both_paths_of_gathered_frames():
    """One worker (a single GPU on NCCL, where the device path is the default) exchanges with itself: every
    cell without faults conforms, with its frames parsed on the host and handled on the device. (Frames stacked
    into one row broke the device path's field views twice: at odd byte offsets, and for empty fields.)"""
    ran, failed = 0, []
    for cell in cells():
        if cell.fault != "none":
            continue
        try:
            cfg = cell_config(cell, workers=1)
        except ConfigError:
            continue
        for device in (False, True):
            problems = check(cfg, simulate(cfg, device_frames=device))
            ran += 1
            if problems:
                failed.append((cell, device, problems[:3]))
    assert not failed, "\n".join(f"{c} (device path: {d}): {p}" for c, d, p in failed[:20])
    assert ran > 600


def test_direct_gather_conforms_in_every_cell_that_gathers_frames():
    """``compression.gather=direct``: every cell that all-gathers frames (gather codecs, LAQ, two-phase shards)
    sends them by all-to-all instead, unpadded, and conforms, on the host or the device path (each cell on the
    one the padded sweep did not take); the config refuses the others by name."""
    ran, failed, device = 0, [], 0
    for cell in cells():
        try:
            cfg = cell_config(cell, compression={"gather": "direct"})
        except ConfigError as err:
            assert "compression.gather" in str(err) or _run(cell)[0] is not None, f"{cell}: {err}"
            continue
        ops: set[str] = set()
        problems = check(cfg, simulate(cfg, ops, device_frames=not on_device(cell)))  # the other path than padded's
        if "all_to_all" not in ops:
            problems.append("no frame went by all-to-all")
        ran += 1
        device += not on_device(cell)
        if problems:
            failed.append((cell, problems[:3]))
    assert not failed, "\n".join(f"{c}: {p}" for c, p in failed[:20])
    assert ran > 500 and 0.4 * ran < device < 0.6 * ran


@pytest.mark.parametrize("cell", [
    Cell("topk", True, "every_step", "auto", "lose"), Cell("laq", False, "laq", "auto", "leave"),
    Cell("rcfed", False, "every_step", "allgather", "straggle+deadline"), Cell("int8", True, "diloco", "two_phase", "none"),
], ids=str)
def test_direct_and_padded_gathers_train_the_same_model(cell):
    """The frames are the same bytes either way, so every worker's model is bit-identical after every step."""
    padded = simulate(cell_config(cell))
    direct = simulate(cell_config(cell, compression={"gather": "direct"}))
    for a, b in zip(padded, direct):
        for ra, rb in zip(a.records, b.records):
            assert ra.params.keys() == rb.params.keys()
            assert all(torch.equal(ra.params[n], rb.params[n]) for n in ra.params), (cell, ra.step)


# ---------------------------------------------------------------------------------------- the suite can fail


def _broken(cells_: list[Cell]) -> list[str]:
    found = []
    for c in cells_:
        reason, problems = _run(c)
        assert reason is None, f"{c} is refused: {reason}"
        found += problems
    return found


def test_it_catches_error_feedback_consuming_a_contribution_that_was_lost(monkeypatch):
    from compressors.error_feedback import ErrorFeedback

    real = ErrorFeedback.settle
    monkeypatch.setattr(ErrorFeedback, "settle", lambda self, info, applied: real(self, info, True))
    found = _broken([Cell("topk", True, "every_step", "auto", "lose"), Cell("int8", True, "every_step", "auto", "corrupt")])
    assert any(p.startswith("memory:") for p in found), found


def test_it_catches_powersgd_dividing_by_the_world_instead_of_the_weights(monkeypatch):
    from compressors.base import TensorInfo

    monkeypatch.setattr(TensorInfo, "total_weight", property(lambda self: float(self.world)))
    found = _broken([Cell("powersgd", False, "every_step", "auto", "leave")])
    assert any("E + applied != M" in p for p in found), found


def test_it_catches_a_gather_mean_with_the_wrong_weights(monkeypatch):
    from rayq.collective import CompressedGroup

    real = CompressedGroup._combine
    monkeypatch.setattr(CompressedGroup, "_combine",
                        lambda self, codec, decoded, mean, weights: real(self, codec, decoded, mean,
                                                                         [w * (i + 1) for i, w in enumerate(weights)]))
    found = _broken([Cell("qsgd", False, "every_step", "auto", "none")])
    assert any(p.startswith("applied:") for p in found), found


def test_it_catches_a_size_exchange_the_ledger_does_not_count(monkeypatch):
    from rayq.transport import Transport

    def sizes(self, n, tag=0):
        size = torch.tensor([n], dtype=torch.int64, device=self.device)
        return [int(s.item()) for s in self._all_gather(size)], [0] * self.world  # moved, but not recorded

    monkeypatch.setattr(Transport, "_sizes", sizes)
    found = _broken([Cell("qsgd", False, "every_step", "auto", "none")])
    assert any(p.startswith("bytes:") for p in found), found


def test_it_catches_laq_letting_a_late_worker_upload(monkeypatch):
    from rayq import schedules

    real = schedules.LAQ.step

    def ignores_deadline(self, step, faults, measure):
        if faults is not None:
            faults = dataclasses.replace(faults, weights=[1.0 if p else 0.0 for p in faults.present])
        return real(self, step, faults, measure)

    monkeypatch.setattr(schedules.LAQ, "step", ignores_deadline)
    found = _broken([Cell("laq", False, "laq", "auto", "straggle+deadline")])
    assert any("could not upload" in p for p in found), found


def test_it_catches_replicas_that_drift_apart(monkeypatch):
    from rayq.schedules import Replica

    real = Replica.apply

    def skewed(self, update, local, step, what="averaged gradient"):
        if self.rank == WORKERS - 1:
            update = {k: v * 1.001 for k, v in update.items()}
        return real(self, update, local, step, what)

    monkeypatch.setattr(Replica, "apply", skewed)
    found = _broken([Cell("none", False, "every_step", "auto", "none")])
    assert any(p.startswith("replicas:") for p in found), found


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cell", [
    Cell("qsgd", False, "every_step", "auto", "none"), Cell("topk", True, "every_step", "auto", "lose"),
    Cell("int8", True, "every_step", "allgather", "straggle+deadline"), Cell("rcfed", True, "periodic", "auto", "none"),
    Cell("laq", False, "laq", "auto", "leave"), Cell("ef_sign", True, "every_step", "two_phase", "none"),
    Cell("randomk", False, "every_step", "auto", "leave"), Cell("none", False, "diloco", "allreduce", "none"),
], ids=str)
def test_flat_buckets_conform_too(cell):
    """``compression.bucket_mb``: every tensor, biases included, laid end to end into a few packets."""
    from tests.conformance import cell_config

    cfg = cell_config(cell, compression={"bucket_mb": 0.001, "min_numel": 0, "codec": cell.codec,
                                         "error_feedback": cell.error_feedback, "strategy": cell.strategy})
    from rayq.run import build_policy

    plan = build_policy(cfg).plan({"0.weight": (24, 16), "0.bias": (24,), "2.weight": (4, 24), "2.bias": (4,)})
    assert all(e.key.startswith("__bucket") for e in plan) and len(plan) >= 2  # several buckets, no dense tensors
    assert check(cfg, simulate(cfg)) == []
