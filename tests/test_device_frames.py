"""Frames that never leave the device: a tensor CRC-32, fixed-layout parsing, and an exchange that reads
nothing back to the host. On this CPU machine the device paths run on CPU tensors under a guard that fails
on every host read (tests/host_reads.py); the CUDA runs of the same checks are at the end (skipped here)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import compressors
from compressors import (FrameLayout, Kind, Packet, TensorInfo, frame_tensor, layout_tag, make_codec, pack_frame,
                         read_frames, unpack_frame)
from compressors.crc import RESIDUE, combine, crc32, frame_crc
from compressors.policy import Policy
from compressors.sparse_index import top_magnitudes
from compressors.staging import device_kernels
from rayq.collective import CompressedGroup, Ledger
from rayq.faults import FaultKind, tamper
from rayq.transport import run_local
from tests.host_reads import HostRead, no_host_reads

ALL_CODECS = sorted(compressors.REGISTRY)
FIXED = [n for n in ALL_CODECS if make_codec(n).fixed_layout]
#: Codecs whose layout depends on the values only in a corner case (exact zeros), and whose decoders read
#: nothing back: their frames are checked and sliced on the device whenever the layouts agree, and decoded there.
AGREEING = ["ef_sign", "sign"]
#: Parameter sets a fixed-layout claim must hold for (each codec's claim may depend on them).
VARIANTS = {
    "int8": [{}, {"bits": 4, "mode": "affine", "block": 100}, {"rounding": "stochastic"}],
    "laq": [{}, {"bits": 2}, {"bits": 12}],
    "qsgd": [{}, {"levels": 3, "bucket": 100}],
    "terngrad": [{}],
    "topk": [{}, {"density": 0.3}],
    "vqsgd": [{}, {"points": "simplex", "block": 64}, {"points": "hadamard", "block": 24},
              {"points": "cross", "block": 3, "reps": 5}],
}


@pytest.fixture
def gpu_kernels():
    """Codecs take the code paths they take off the CPU (the compiled CPU passes read arrays back)."""
    with device_kernels():
        yield


# ---------------------------------------------------------------------------------------- CRC-32


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 33, 255, 256, 1000, 4097, 70_001])
def test_the_tensor_crc_equals_zlib_for_every_length_and_row(n):
    rows = torch.randint(0, 256, (3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    want = [zlib.crc32(r.numpy().tobytes()) for r in rows]
    assert crc32(rows).tolist() == want
    assert int(crc32(rows[1])) == want[1]
    assert crc32(rows, chunk_blocks=3).tolist() == want  # the memory bound changes nothing


def test_crc_shift_tables_stay_right_when_worker_threads_build_them_at_once(monkeypatch):
    """Workers of one process (the in-process hub, the overlap thread) may need a new power of the
    zero-byte map at the same moment; squaring the last entry twice would put a wrong power in the list
    (seen as every frame of a step failing its check). The squaring is slowed down to make the race likely."""
    import threading
    import time

    import compressors.crc as crc_module

    square = crc_module._apply

    def slow(cols, values):
        time.sleep(0.002)
        return square(cols, values)

    monkeypatch.setattr(crc_module, "_POWERS", crc_module._POWERS[:1])
    monkeypatch.setattr(crc_module, "_apply", slow)
    start = threading.Barrier(6)

    def build():
        start.wait()
        crc_module._power(12)

    threads = [threading.Thread(target=build) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    powers = crc_module._POWERS
    assert len(powers) == 13
    assert all(np.array_equal(powers[j + 1], square(powers[j], powers[j])) for j in range(12))


def test_crc_combination_and_the_intact_frame_value():
    a, b = b"rayq packet one" * 5, b"two" * 11
    assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    packets = [p + zlib.crc32(p).to_bytes(4, "little") for p in (a, b, b"")]
    assert all(zlib.crc32(p) == RESIDUE for p in packets)
    assert frame_crc(tuple(len(p) for p in packets)) == zlib.crc32(b"".join(packets))


def test_the_crc_reads_nothing_back_and_refuses_other_dtypes():
    rows = torch.randint(0, 256, (2, 300), dtype=torch.uint8)
    with no_host_reads():
        out = crc32(rows)
    assert out.dtype == torch.int64 and out.shape == (2,)
    with pytest.raises(TypeError, match="uint8"):
        crc32(rows.to(torch.int32))


def test_the_guard_itself_fails_on_host_reads():
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: bool(t.any()), lambda: t.tolist(), lambda: t.nonzero()):
        with pytest.raises(HostRead), no_host_reads():
            read()
    assert t.tolist() == [1.0, 1.0, 1.0]  # restored


# ---------------------------------------------------------------------------------------- frames


def _packets(name: str, n: int = 3000, seed: int = 0, params: dict | None = None) -> list[Packet]:
    codec = make_codec(name, params or {})
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate([(n,), (40, 25), (7,)]):
        x = torch.randn(shape, generator=g)
        info = TensorInfo(f"t{i}", shape, worker=0, world=1, step=seed, seed=1)
        out.append(codec.encode(x.reshape(-1), info))
    return out


@pytest.mark.parametrize("name", ALL_CODECS)
def test_a_frame_with_the_crc_computed_by_tensor_operations_is_byte_identical_to_to_bytes(name):
    packets = _packets(name)
    with no_host_reads():
        frame = frame_tensor(packets, device_crc=True, spare=5)
    assert bytes(frame.numpy()[:-5]) == pack_frame(packets)
    assert not frame[-5:].any()


@pytest.mark.parametrize("name", FIXED)
def test_fixed_layout_codecs_write_one_header_for_any_values_and_decode_without_host_reads(name):
    """The claim behind ``Codec.fixed_layout``: receivers may take their own header for every peer's."""
    n = 2000
    inputs = [torch.randn(n), torch.zeros(n), torch.full((n,), 3.0), torch.randn(n) * 1e30, torch.randn(n) * 1e-30,
              torch.randn(n).sign(), torch.arange(n, dtype=torch.float32)]
    for params in VARIANTS[name]:
        codec = make_codec(name, params)
        assert codec.fixed_layout
        headers = set()
        for step, x in enumerate(inputs):
            info = TensorInfo("w", (n,), step=step, seed=3)
            packet = codec.encode(x, info)
            headers.add(packet._header())
            with no_host_reads():
                out = codec.decode(packet, info)
            torch.testing.assert_close(out, codec.decode(Packet.from_bytes(packet.to_bytes()), info),
                                       rtol=0, atol=0, equal_nan=True)  # 1e30 overflows qsgd's norm: NaN
        assert len(headers) == 1, (name, params)


@pytest.mark.parametrize("name", AGREEING)
def test_codecs_whose_layouts_usually_agree_decode_without_host_reads(name):
    """Inputs without exact zeros: one header for all, and decoding reads nothing back (sign's zero
    count is implied by an empty list of zero positions)."""
    n, codec = 2000, make_codec(name)
    headers = set()
    for step, x in enumerate([torch.randn(n), torch.full((n,), 3.0), torch.randn(n) * 1e-30,
                              torch.arange(1, n + 1, dtype=torch.float32)]):
        info = TensorInfo("w", (n,), step=step, seed=3)
        packet = codec.encode(x, info)
        headers.add(packet._header())
        with no_host_reads():
            out = codec.decode(packet, info)
        torch.testing.assert_close(out, codec.decode(Packet.from_bytes(packet.to_bytes()), info), rtol=0, atol=0)
    assert len(headers) == 1, name
    assert not make_codec(name).fixed_layout  # exact zeros change sign's header


def test_layout_tags_tell_layouts_apart_from_shapes_alone():
    same = [_packets("sign", seed=s) for s in range(3)]
    assert len({layout_tag(p) for p in same}) == 1 and 0 < layout_tag(same[0]) < 1 << 31
    zeros = make_codec("sign").encode(torch.tensor([1.0, 0.0, -2.0]), TensorInfo("z", (3,)))
    assert layout_tag(same[0][:2] + [zeros]) != layout_tag(same[0])
    assert layout_tag(_packets("threshold", seed=0)) != layout_tag(_packets("threshold", seed=1))
    assert layout_tag([]) == layout_tag([]) != 0


def test_every_gather_codec_says_whether_it_has_a_fixed_layout():
    assert set(VARIANTS) == set(FIXED)
    assert make_codec("qsgd", {"coding": "elias"}).fixed_layout is False  # variable-length levels
    assert make_codec("rcfed").fixed_layout is False                       # an entropy-coded stream
    assert Policy("topk", error_feedback=True).default.fixed_layout       # error feedback keeps the layout


@pytest.mark.parametrize("name", FIXED)
def test_read_frames_slices_every_intact_frame_and_replaces_a_corrupted_one_with_the_own_frame(name):
    workers = [_packets(name, seed=s) for s in range(4)]
    frames = torch.stack([frame_tensor(p, device_crc=True) for p in workers])
    own = frames[0].clone()
    layout = FrameLayout.of(workers[0])
    assert layout.nbytes == frames.shape[1] and layout.crc == zlib.crc32(bytes(own.numpy()))
    bad = frames.clone()
    positions = [0, layout.header_at[-1], layout.nbytes // 2, layout.nbytes - 1]  # header, fields, checksum
    for w, pos in zip((1, 2, 3), positions[1:]):
        bad[w, pos] ^= 0x41
    bad[0, positions[0]] ^= 0x01
    with no_host_reads():
        ok, parsed = read_frames(frames, own, layout)
        ok_bad, parsed_bad = read_frames(bad, own, layout)
    assert ok.tolist() == [True] * 4 and ok_bad.tolist() == [False] * 4
    for w in range(4):
        for got, want in zip(parsed[w], unpack_frame(bytes(frames[w].numpy()), 3)):
            assert got.codec == want.codec and got.numel == want.numel
            assert all(torch.equal(a, b) for a, b in zip(got.fields, want.fields))
        for got, want in zip(parsed_bad[w], workers[0]):  # what is decoded in its place is always valid
            assert all(torch.equal(a, b.reshape(a.shape)) for a, b in zip(got.fields, want.fields))


@pytest.mark.parametrize("d,k", [(1, 1), (100, 1), (100, 37), (4096, 41), (5000, 4999)])
def test_topk_selection_off_the_cpu_reads_nothing_back_and_picks_the_same_set(d, k):
    g = torch.Generator().manual_seed(d + k)
    for x in (torch.randn(d, generator=g), torch.randn(d, generator=g).round(), torch.zeros(d)):  # ties at the cut
        with no_host_reads():
            got = top_magnitudes(x, k, sync_free=True)
        assert torch.equal(got, top_magnitudes(x, k))


# ---------------------------------------------------------------------------------------- the exchange

SHAPES = {"fc1.weight": (64, 32), "fc1.bias": (64,), "fc2.weight": (10, 64)}


def _grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _train_exchange(transport, codec: str, ef: bool, on_device: bool, damage, weights, guard: bool, zero_at=None,
                    fault: FaultKind = FaultKind.CORRUPT):
    """Three steps of an exchange; worker ``damage[0]``'s frame is corrupted (or lost: ``fault``) at step
    ``damage[1]``; worker ``zero_at[0]``'s gradients have exact zeros at step ``zero_at[1]``."""
    group = CompressedGroup(Policy(codec, error_feedback=ef, min_numel=0), transport, seed=1,
                            device_frames=on_device)
    out, dropped, residuals, checked = [], [], [], []
    for step in range(3):
        transport.tamper = (tamper(fault, 0, transport.rank, step)
                            if damage is not None and (transport.rank, step) == damage else None)
        grads = _grads(transport.rank, step)
        if (transport.rank, step) == zero_at:
            grads = {k: v.masked_fill(v.abs() < 0.1, 0.0) for k, v in grads.items()}
        if guard:
            with no_host_reads():
                avg, ledger = group.allreduce_mean(grads, step, weights=weights)
        else:
            avg, ledger = group.allreduce_mean(grads, step, weights=weights)
        checked.append(len(ledger.unchecked))  # frame checks made on the device, read at the step's end
        ledger.resolve()
        out.append(avg)
        dropped.append(sorted(w for w, _ in ledger.dropped))
        codec_state = group.policy.default
        residuals.append({k: v.clone() for k, v in getattr(codec_state, "residuals", {}).items()})
    return out, dropped, residuals, checked


@pytest.mark.parametrize("codec,ef", [("int8", False), ("topk", True), ("sign", False)])
def test_a_lost_frame_takes_the_host_parse_for_its_step_and_is_dropped_like_there(codec, ef):
    """Worker 2's frame is lost at step 1 (nothing arrives): its length differs from every other, so that step
    is parsed on the host, which drops it; the steps before and after stay on the device."""
    host = run_local(4, _train_exchange, codec, ef, False, (2, 1), None, False, None, FaultKind.LOSE)
    device = run_local(4, _train_exchange, codec, ef, True, (2, 1), None, False, None, FaultKind.LOSE)
    for (h_out, h_drop, h_res, _), (d_out, d_drop, d_res, checked) in zip(host, device):
        assert checked == [1, 0, 1] and h_drop == d_drop == [[], [2], []]
        for step in range(3):
            for k in SHAPES:
                torch.testing.assert_close(d_out[step][k], h_out[step][k], rtol=1e-6, atol=1e-7)
            for k in h_res[step]:
                torch.testing.assert_close(d_res[step][k], h_res[step][k], rtol=1e-6, atol=1e-7)


def _guard_receiving(monkeypatch) -> None:
    """Fail on host reads from the gathered frames on: checking, slicing, decoding, aggregating, settling."""
    receive = CompressedGroup._gather_on_device

    def guarded(*args, **kwargs):
        with no_host_reads():
            return receive(*args, **kwargs)

    monkeypatch.setattr(CompressedGroup, "_gather_on_device", guarded)


@pytest.mark.parametrize("codec,ef,guard", [
    ("int8", False, "exchange"), ("qsgd", False, "exchange"), ("terngrad", False, "exchange"),
    ("topk", True, "exchange"), ("qsgd", True, "exchange"), ("vqsgd", False, "exchange"),
    ("laq", False, "exchange"), ("sign", False, "receive"), ("ef_sign", True, "receive")])
def test_the_device_exchange_reads_nothing_back_and_matches_the_host_parse_with_a_corrupted_frame(codec, ef, guard,
                                                                                                  monkeypatch,
                                                                                                  gpu_kernels):
    """Worker 2's frame is corrupted at step 1: both paths drop it on every worker, keep its sender's error
    feedback memory, and give the same averages; the device path does it without one host read, encoding
    included (the codecs take the paths they take off the CPU: the compiled CPU passes read arrays). sign and ef_sign read one value each when encoding (whether there are exact zeros), which
    decides their layout; from the gathered frames on they read nothing either."""
    world, damage = 4, (2, 1)
    host = run_local(world, _train_exchange, codec, ef, False, damage, None, False)
    if guard == "receive":
        _guard_receiving(monkeypatch)
    device = run_local(world, _train_exchange, codec, ef, True, damage, None, guard == "exchange")
    for (h_out, h_drop, h_res, h_checked), (d_out, d_drop, d_res, d_checked) in zip(host, device):
        assert h_checked == [0, 0, 0] and d_checked == [1, 1, 1]
        assert h_drop == d_drop == [[], [2], []]
        for step in range(3):
            for k in SHAPES:
                torch.testing.assert_close(d_out[step][k], h_out[step][k], rtol=1e-6, atol=1e-7)
            assert h_res[step].keys() == d_res[step].keys()
            for k in h_res[step]:
                torch.testing.assert_close(d_res[step][k], h_res[step][k], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(device[0][0][s][k], d[0][s][k]) for d in device for s in range(3) for k in SHAPES)


@pytest.mark.parametrize("codec,ef", [("qsgd", False), ("int8", False), ("topk", True), ("sign", False),
                                      ("vqsgd", False)])
def test_a_single_workers_device_exchange_matches_the_host_parse(codec, ef):
    """One worker (one GPU on NCCL): the stack of frames has one row, so its field slices are contiguous at
    odd byte offsets; they must be copied before being viewed as wider dtypes (this crashed before)."""
    host = run_local(1, _train_exchange, codec, ef, False, None, None, False)
    device = run_local(1, _train_exchange, codec, ef, True, None, None, False)
    (h_out, _, h_res, h_checked), (d_out, d_drop, d_res, d_checked) = host[0], device[0]
    assert h_checked == [0, 0, 0] and d_checked == [1, 1, 1] and d_drop == [[], [], []]
    for step in range(3):
        for k in SHAPES:
            torch.testing.assert_close(d_out[step][k], h_out[step][k], rtol=1e-6, atol=1e-7)
        for k in h_res[step]:
            torch.testing.assert_close(d_res[step][k], h_res[step][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("codec,ef", [("int8", False), ("topk", True), ("laq", False)])
def test_the_device_exchange_under_direct_gather_reads_nothing_back_and_matches_padded(codec, ef, gpu_kernels):
    """compression.gather=direct hands the device path one unpadded frame per peer (from an all-to-all)
    instead of rows of one all-gather: same checks, same drop of the corrupted frame, bit-identical
    averages and memories, and still no host read in the whole exchange."""
    world, damage = 4, (2, 1)
    padded = run_local(world, _train_exchange, codec, ef, True, damage, None, False)
    direct = run_local(world, _train_exchange, codec, ef, True, damage, None, True, gather="direct")
    for (p_out, p_drop, p_res, p_checked), (d_out, d_drop, d_res, d_checked) in zip(padded, direct):
        assert p_checked == d_checked == [1, 1, 1]
        assert p_drop == d_drop == [[], [2], []]
        for step in range(3):
            assert all(torch.equal(d_out[step][k], p_out[step][k]) for k in SHAPES)
            assert p_res[step].keys() == d_res[step].keys()
            assert all(torch.equal(d_res[step][k], p_res[step][k]) for k in p_res[step])


@pytest.mark.parametrize("codec,ef", [("none", False), ("fp16", False), ("bf16", False), ("powersgd", False),
                                      ("randomk", True)])
def test_the_all_reduce_path_reads_nothing_back(codec, ef):
    """Linear codecs sum their fields by all-reduce (PowerSGD in its two rounds): nothing in three steps
    reads tensor data back to the host or copies host values over, error feedback included."""
    host = run_local(2, _train_exchange, codec, ef, False, None, None, False)
    guarded = run_local(2, _train_exchange, codec, ef, True, None, None, True)
    for (h_out, _, _, _), (d_out, _, _, checked) in zip(host, guarded):
        assert checked == [0, 0, 0]
        assert all(torch.equal(d_out[s][k], h_out[s][k]) for s in range(3) for k in SHAPES)


def _sum_exchange(transport, on_device: bool):
    transport.tamper = tamper(FaultKind.CORRUPT, 0, 1, 0) if transport.rank == 1 else None
    group = CompressedGroup(Policy("int8", min_numel=0), transport, seed=1, device_frames=on_device)
    total, ledger = group.allreduce_sum(_grads(transport.rank, 0), 0)
    ledger.resolve()
    return total, sorted(w for w, _ in ledger.dropped)


def test_the_device_exchange_sums_like_the_host_parse_without_the_dropped_frame():
    host, device = run_local(4, _sum_exchange, False), run_local(4, _sum_exchange, True)
    for (h_sum, h_drop), (d_sum, d_drop) in zip(host, device):
        assert h_drop == d_drop == [1]
        for k in SHAPES:
            torch.testing.assert_close(d_sum[k], h_sum[k], rtol=1e-6, atol=1e-6)


def test_the_device_exchange_weights_workers_like_the_host_parse():
    weights = [1.0, 2.0, 0.5, 1.0]
    host = run_local(4, _train_exchange, "int8", True, False, None, weights, False)
    device = run_local(4, _train_exchange, "int8", True, True, None, weights, True)
    for (h_out, _, _, _), (d_out, _, _, checked) in zip(host, device):
        assert checked == [1, 1, 1]
        for step in range(3):
            for k in SHAPES:
                torch.testing.assert_close(d_out[step][k], h_out[step][k], rtol=1e-6, atol=1e-7)


def test_a_worker_that_offers_nothing_or_a_layout_of_its_own_takes_the_host_parse():
    """An empty frame (weight 0) or frames whose layouts differ (threshold's and rcfed's sizes follow the
    values) cannot use the own frame's layout: the exchange falls back to the host parse, with the same
    result."""
    weights = [1.0, 0.0, 1.0, 1.0]
    for codec, w in (("int8", weights), ("rcfed", None), ("threshold", None)):
        host = run_local(4, _train_exchange, codec, False, False, None, w, False)
        device = run_local(4, _train_exchange, codec, False, True, None, w, False)
        for (h_out, _, _, _), (d_out, _, _, checked) in zip(host, device):
            assert checked == [0, 0, 0]
            for step in range(3):
                for k in SHAPES:
                    assert torch.equal(d_out[step][k], h_out[step][k])


@pytest.mark.parametrize("codec", ["sign", "ef_sign"])
def test_a_step_whose_layouts_disagree_takes_the_host_parse_and_the_next_one_the_device(codec):
    """Worker 1's gradients have exact zeros at step 1: its header differs that step only, so every worker
    parses step 1 on the host and steps 0 and 2 on the device, with the results of the host parse (without
    error feedback, whose memory would fill the zeros in)."""
    host = run_local(4, _train_exchange, codec, False, False, None, None, False, (1, 1))
    device = run_local(4, _train_exchange, codec, False, True, None, None, False, (1, 1))
    for (h_out, h_drop, _, _), (d_out, d_drop, _, checked) in zip(host, device):
        assert checked == [1, 0, 1] and h_drop == d_drop == [[], [], []]
        for step in range(3):
            for k in SHAPES:
                torch.testing.assert_close(d_out[step][k], h_out[step][k], rtol=1e-6, atol=1e-7)


def test_the_ledger_reads_device_checks_once_and_merges_them():
    a, b = Ledger(rank=0), Ledger(rank=0)
    a.unchecked.append(torch.tensor([True, False, True]))
    b.unchecked.append(torch.tensor([False, True, True]))
    a.add(b)
    a.resolve()
    assert [w for w, _ in a.dropped] == [1, 0] and a.unchecked == []
    assert "CRC-32" in a.dropped[0][1]


class _Event:
    """Stands for a CUDA timing event: a device timestamp in milliseconds, readable once synchronised."""

    def __init__(self, ms: float) -> None:
        self.ms, self.done = ms, False

    def synchronize(self) -> None:
        self.done = True

    def elapsed_time(self, end: _Event) -> float:
        assert end.done, "read before the end event was waited for"
        return end.ms - self.ms


def test_stage_spans_recorded_on_the_device_are_read_into_the_times_at_resolve():
    ledger, other = Ledger(rank=0), Ledger(rank=0)
    ledger.spans += [("encode_s", _Event(1.0), _Event(3.5)), ("comm_s", _Event(3.5), _Event(10.0))]
    other.spans.append(("encode_s", _Event(0.0), _Event(0.5)))
    ledger.add(other)
    assert ledger.encode_s == 0.0  # nothing is read before the step's end
    ledger.resolve()
    assert ledger.encode_s == pytest.approx(0.003) and ledger.comm_s == pytest.approx(0.0065)
    assert ledger.spans == []


class _Ticking(_Event):
    """A CUDA timing event whose timestamp is the number of events recorded so far (in milliseconds)."""

    recorded = 0

    def __init__(self, enable_timing: bool = True) -> None:
        super().__init__(0.0)

    def record(self) -> None:
        _Ticking.recorded += 1
        self.ms = float(_Ticking.recorded)


def _one_step(transport, overlap: bool):
    from rayq.ledger import Clock
    from rayq.replica import Replica
    from rayq.schedules import EveryStep

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    replica = Replica(model, torch.optim.SGD(model.parameters(), lr=0.1))
    replica.clock = Clock(torch.device("cuda"))  # marks are (ticking) CUDA events; the tensors stay on the CPU
    group = CompressedGroup(Policy("int8", min_numel=0), transport, seed=1)

    def backward():
        model.zero_grad()
        loss = model(torch.randn(5, 8)).square().mean()
        loss.backward()
        return loss

    outcome = EveryStep(replica, group, overlap=overlap).step(0, None, False, backward)
    pending = (outcome.compute_s, outcome.exposed_s, [name for name, _, _ in outcome.spans])
    outcome.resolve()
    return pending, (outcome.compute_s, outcome.exposed_s, outcome.spans)


@pytest.mark.parametrize("overlap", [False, True])
def test_on_cuda_a_steps_compute_and_exposed_times_are_device_spans_read_at_its_end(overlap, monkeypatch):
    """Forward and backward, then the exchange and update, are each one span of CUDA events, read when the
    step is booked (:meth:`Outcome.resolve`), not host time between marks."""
    monkeypatch.setattr(torch.cuda, "Event", _Ticking)
    _Ticking.recorded = 0
    (pending, resolved), = run_local(1, _one_step, overlap)
    assert pending == (0.0, 0.0, ["compute_s", "exposed_s"])
    assert resolved == (pytest.approx(0.001), pytest.approx(0.001), [])  # one tick each
    # marks before and after backward, the exposed span's start (with overlap: backward's end), its end
    assert _Ticking.recorded == (3 if overlap else 4)


# ---------------------------------------------------------------------------------------- torch.distributed


def _sizes_over_host_control(rank: int, world: int) -> list:
    from rayq.transport import TorchTransport

    t = TorchTransport(host_control=True)
    t.open_control()  # made before any exchange (as the DDP hook's state does), then used by it
    made = t._control
    frame = torch.full((10 + 7 * rank,), rank, dtype=torch.uint8)
    frames, tags = t.all_gather_tagged(frame, (1 << 31) - 1 - rank)
    chunks = [torch.full((3 * rank + dst,), 10 * rank + dst, dtype=torch.uint8) for dst in range(world)]
    got = t.all_to_all_frames(chunks)  # its size matrix goes over the host group too
    return [f.tolist() for f in frames] + [tags, made is not None and t._control is made, [g.tolist() for g in got]]


def test_frame_sizes_and_layout_tags_travel_on_a_host_control_group_beside_the_data_group():
    from tests.distributed import run_workers

    results = run_workers(2, _sizes_over_host_control)
    for rank, got in enumerate(results):
        assert got[:2] == [[0] * 10, [1] * 17]
        assert got[2] == [(1 << 31) - 1, (1 << 31) - 2] and got[3] is True
        assert got[4] == [[10 * src + rank] * (3 * src + rank) for src in range(2)]


def _words(transport):
    n = [5, 0, (1 << 32) - 1, 6 << 32][transport.rank]
    return transport._sizes(n, 7 * transport.rank)


def test_each_frame_length_and_its_tag_share_one_eight_byte_word():
    """A tag rides above the 32-bit length; a frame of 4 GiB or more goes as its negated length, untagged."""
    for lengths, tags in run_local(4, _words):
        assert lengths == [5, 0, (1 << 32) - 1, 6 << 32] and tags == [0, 7, 14, 0]


# ---------------------------------------------------------------------------------------- CUDA (skipped here)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", ALL_CODECS)
def test_cuda_frames_are_byte_identical_and_agreeing_layouts_are_received_without_a_sync(name):
    dev = torch.device("cuda")
    packets = [Packet(p.codec, p.numel, tuple(f.to(dev) for f in p.fields)) for p in _packets(name)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        frame = frame_tensor(packets, dev)
        if (make_codec(name).fixed_layout or name in AGREEING) and make_codec(name).kind is Kind.GATHER:
            ok, parsed = read_frames(torch.stack([frame, frame]), frame, FrameLayout.of(packets))
            info = TensorInfo("t0", (3000,), worker=0, world=1, step=0, seed=1)
            make_codec(name).decode(parsed[1][0], info)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bytes(frame.cpu().numpy()) == pack_frame(packets)


@cuda
def test_cuda_exchange_stages_are_timed_by_events_without_a_synchronize():
    world = 2
    hub_results = run_local(world, _cuda_exchange)
    for spans, encode_s, comm_s in hub_results:
        assert spans > 0 and encode_s > 0 and comm_s >= 0


def _cuda_exchange(transport):
    transport.device = torch.device("cuda")
    group = CompressedGroup(Policy("int8", min_numel=0), transport, seed=1)
    grads = {k: v.cuda() for k, v in _grads(transport.rank, 0).items()}
    _, ledger = group.allreduce_mean(grads, 0)
    spans = len(ledger.spans)
    ledger.resolve()
    return spans, ledger.encode_s, ledger.comm_s


def _cuda_steps(transport, codec: str, ef: bool, barrier):
    """Step 0 warms up (CUDA context, generators, cached tables); the exchanges of steps 1 and 2 run with
    every synchronizing CUDA call an error, on both workers (the mode is global: the workers meet at
    ``barrier`` around it). Inputs are put on the device before, and results read after."""
    transport.device = torch.device("cuda")
    group = CompressedGroup(Policy(codec, error_feedback=ef, min_numel=0), transport, seed=1)
    inputs = [{k: v.cuda() for k, v in _grads(transport.rank, step).items()} for step in range(3)]
    torch.cuda.synchronize()
    out = []
    for step in range(3):
        strict = step > 0
        if strict:
            if barrier.wait() == 0:
                torch.cuda.set_sync_debug_mode("error")
            barrier.wait()
        try:
            avg, ledger = group.allreduce_mean(inputs[step], step)
        finally:
            if strict:
                if barrier.wait() == 0:
                    torch.cuda.set_sync_debug_mode("default")
                barrier.wait()
        checked = len(ledger.unchecked)
        ledger.resolve()
        out.append(({k: v.cpu() for k, v in avg.items()}, checked))
    return out


@cuda
@pytest.mark.parametrize("codec,ef", [("int8", False), ("qsgd", False), ("terngrad", False), ("topk", True),
                                      ("vqsgd", False)])
def test_cuda_exchanges_of_agreeing_layouts_never_synchronize_and_match_the_cpu(codec, ef):
    import threading

    world = 2
    try:
        on_cuda = run_local(world, _cuda_steps, codec, ef, threading.Barrier(world, timeout=60))
    finally:  # a failed step leaves the (global) mode as it was set
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = run_local(world, _train_exchange, codec, ef, False, None, None, False)
    for steps, (cpu_out, _, _, _) in zip(on_cuda, on_cpu):
        assert [checked for _, checked in steps] == [1, 1, 1]
        if codec == "int8":  # the others draw from CUDA's generators, or select on another code path
            for (avg, _), want in zip(steps, cpu_out):
                for k in SHAPES:
                    torch.testing.assert_close(avg[k], want[k], rtol=1e-5, atol=1e-6)


def _cuda_host_parse(transport, codec: str):
    transport.device = torch.device("cuda")
    group = CompressedGroup(Policy(codec, min_numel=0), transport, seed=1)
    out = []
    for step in range(3):
        avg, ledger = group.allreduce_mean({k: v.cuda() for k, v in _grads(transport.rank, step).items()}, step)
        ledger.resolve()
        out.append(({k: v.cpu() for k, v in avg.items()}, len(ledger.dropped)))
    return out


@cuda
@pytest.mark.parametrize("codec", ["threshold", "gaussiank", "rcfed"])
def test_cuda_frames_of_differing_layouts_come_back_in_one_copy_and_decode_like_the_cpu(codec):
    frames = [torch.arange(n, dtype=torch.uint8, device="cuda") for n in (5, 0, 9)]
    assert [f.tolist() for f in compressors.to_host(frames)] == [f.cpu().tolist() for f in frames]
    on_cuda = run_local(2, _cuda_host_parse, codec)
    on_cpu = run_local(2, _train_exchange, codec, False, False, None, None, False)
    for steps, (cpu_out, _, _, _) in zip(on_cuda, on_cpu):
        assert [dropped for _, dropped in steps] == [0, 0, 0]
        if codec == "threshold":  # deterministic; gaussiank and rcfed draw or refine on other code paths
            for (avg, _), want in zip(steps, cpu_out):
                for k in SHAPES:
                    torch.testing.assert_close(avg[k], want[k], rtol=1e-5, atol=1e-6)


def _cuda_overlap(transport, codec: str, overlap: bool, init: dict):
    """Four steps of a wide model on the GPU (backward long enough for the exchange to run beside it)."""
    import torch.nn.functional as F

    from rayq.replica import Replica
    from rayq.schedules import EveryStep

    transport.device = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(256, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                torch.nn.ReLU(), torch.nn.Linear(2048, 10))
    model.load_state_dict(init)
    model.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    group = CompressedGroup(Policy(codec, error_feedback=codec == "topk", min_numel=0, bucket_mb=4), transport,
                            seed=3)
    schedule = EveryStep(Replica(model, opt), group, overlap=overlap)
    g = torch.Generator().manual_seed(transport.rank)
    x, y = torch.randn(512, 256, generator=g).cuda(), torch.randint(10, (512,), generator=g).cuda()
    for step in range(4):
        def backward():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        schedule.step(step, None, measure=False, backward=backward).resolve()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


@cuda
@pytest.mark.parametrize("codec", ["none", "int8", "topk"])
def test_cuda_an_exchange_on_its_side_stream_beside_backward_gives_the_same_model(codec):
    """The side stream waits for each bucket's gradients and the update waits for the side stream: a missing
    wait reads gradients backward has not written yet (or updates with results not yet written)."""
    torch.manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Linear(256, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                               torch.nn.ReLU(), torch.nn.Linear(2048, 10)).state_dict()
    plain = run_local(2, _cuda_overlap, codec, False, init)
    overlapped = run_local(2, _cuda_overlap, codec, True, init)
    for a, b in zip(plain, overlapped):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(overlapped[0], overlapped[1], rtol=0, atol=0)
