"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): the two-round linear exchange, warm start, built-in error feedback.

Linearity across workers, the EF invariant, exact rank-r recovery (tolerance 1e-5).
Workers are simulated in one process by :func:`run_linear_exchange`, which plays the all-reduce.
"""

from __future__ import annotations

import logging

import pytest
import torch

from compressors import Packet, PacketError, Stateful, TensorInfo, make_codec
from compressors.base import Codec
from compressors.policy import Policy
from compressors.powersgd import PowerSGD, orthonormalize

log = logging.getLogger(__name__)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_linear_exchange(codecs: list[Codec], xs: list[torch.Tensor], infos: list[TensorInfo],
                        wire: bool = False) -> tuple[list[torch.Tensor], list[list[Packet]]]:
    """Run every worker's ``exchange`` generator in lockstep, handing each the field-wise sum of the
    round's packets (what all-reduce does). Returns each worker's result and the packets per round;
    ``wire`` sends every packet through ``to_bytes``/``from_bytes`` first."""
    gens = [c.exchange(x, i) for c, x, i in zip(codecs, xs, infos)]
    packets = [next(g) for g in gens]
    rounds = []
    while True:
        rounds.append(packets)
        if wire:
            packets = [Packet.from_bytes(p.to_bytes()) for p in packets]
        shapes = {tuple(tuple(f.shape) for f in p.fields) for p in packets}
        assert len(shapes) == 1, f"workers sent differently shaped fields: {shapes}"
        assert all(f.is_floating_point() for p in packets for f in p.fields)
        total = Packet(packets[0].codec, packets[0].numel,
                       tuple(torch.stack(fs).sum(0) for fs in zip(*(p.fields for p in packets))))
        results, nxt = [], []
        for g in gens:
            try:
                nxt.append(g.send(total))
            except StopIteration as stop:
                results.append(stop.value)
        if results:
            assert len(results) == len(gens), "workers disagree on the number of rounds"
            return results, rounds
        packets = nxt


def workers(world: int, shape: tuple[int, ...], step: int = 0, name: str = "layer.weight", **params):
    codecs = [make_codec("powersgd", params) for _ in range(world)]
    infos = [TensorInfo(name, shape, worker=w, world=world, step=step, seed=7) for w in range(world)]
    return codecs, infos


def at_step(infos: list[TensorInfo], step: int) -> list[TensorInfo]:
    return [TensorInfo(i.name, i.shape, i.role, i.worker, i.world, step, i.seed) for i in infos]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_worker_starts_from_the_same_q():
    codec = make_codec("powersgd")
    a = codec.initial_q(TensorInfo("w", (64, 32), worker=0, world=4, step=3), 32, 2, torch.device("cpu"))
    b = codec.initial_q(TensorInfo("w", (64, 32), worker=3, world=4, step=3), 32, 2, torch.device("cpu"))
    assert torch.equal(a, b)


def test_aggregate_is_the_projection_of_the_mean_matrix():
    world, n, m = 4, 48, 40
    codecs, infos = workers(world, (n, m))
    mats = [torch.randn(n, m, generator=gen(w)) for w in range(world)]
    results, rounds = run_linear_exchange(codecs, mats, infos)
    assert [tuple(p.fields[0].shape) for p in (rounds[0][0], rounds[1][0])] == [(n, 2), (m, 2)]
    q0 = codecs[0].initial_q(infos[0], m, 2, torch.device("cpu"))
    p_hat = orthonormalize(sum(mat @ q0 for mat in mats))
    mean = sum(mats) / world
    expected = p_hat @ p_hat.t() @ mean
    for r in results:
        assert torch.equal(r, results[0])  # identical on every worker
    assert rel((results[0] / world).view(n, m), expected) <= 1e-5


def test_projection_never_grows_the_matrix():
    for seed in range(10):
        g = gen(100 + seed)
        n, m = int(torch.randint(3, 40, (), generator=g)), int(torch.randint(3, 40, (), generator=g))
        codecs, infos = workers(1, (n, m), step=seed, rank=1, min_compression_rate=0.0)
        mat = torch.randn(n, m, generator=g) * torch.rand(n, 1, generator=g)
        (out,), _ = run_linear_exchange(codecs, [mat], infos)
        assert float((mat.reshape(-1) - out).norm()) <= float(mat.norm()) * (1 + 1e-6)


def test_error_feedback_invariant_holds_every_step():
    world, n, m = 3, 30, 50
    codecs, infos = workers(world, (n, m))
    memory = [torch.zeros(n, m) for _ in range(world)]
    for step in range(4):
        grads = [torch.randn(n, m, generator=gen(10 * step + w)) for w in range(world)]
        results, _ = run_linear_exchange(codecs, grads, at_step(infos, step))
        approx = (results[0] / world).view(n, m)
        for w in range(world):
            mat = grads[w] + memory[w]
            memory[w] = codecs[w].state_dict()["e"]["layer.weight"]
            assert rel(memory[w] + approx, mat) <= 1e-5


def test_rank_r_matrices_are_recovered_exactly_with_warm_start():
    world, n, m, r = 4, 64, 40, 2
    codecs, infos = workers(world, (n, m), rank=r)
    cols = torch.randn(n, r, generator=gen(1))
    grads = [cols @ torch.randn(r, m, generator=gen(2 + w)) for w in range(world)]  # mean has rank r
    mean = sum(grads) / world
    errors = []
    for step in range(5):
        results, _ = run_linear_exchange(codecs, grads, at_step(infos, step))
        errors.append(rel((results[0] / world).view(n, m), mean))
    log.info("rank-%d recovery, relative error per step: %s", r, ["%.1e" % e for e in errors])
    assert max(errors) <= 1e-5
    # Each worker's memory holds its own deviation from the mean (the reference code's convention);
    # nothing of the mean is left behind.
    memory = sum(c.state_dict()["e"]["layer.weight"] for c in codecs)
    assert float(memory.norm()) <= 1e-5 * float(mean.norm()) * world


def test_error_feedback_delivers_a_full_rank_gradient_on_average():
    """Σ_t output_t = T·G − E_T with E_T bounded: what one step leaves out is sent later, so the
    running mean of the rank-1 outputs approaches a full-rank G like 1/T."""
    n, m = 24, 16
    codecs, infos = workers(1, (n, m), rank=1)
    grad = torch.randn(n, m, generator=gen(3))
    total, errors = torch.zeros(n * m), {}
    for step in range(1, 401):
        (out,), _ = run_linear_exchange(codecs, [grad], at_step(infos, step))
        total += out
        if step in (100, 400):
            memory = codecs[0].state_dict()["e"]["layer.weight"]
            assert rel(total.view(n, m) + memory, step * grad) <= 1e-4
            assert float(memory.norm()) <= 12 * float(grad.norm())
            assert codecs[0].residual_norm() == pytest.approx(float(memory.norm()), rel=1e-6)
            errors[step] = rel(total.view(n, m) / step, grad)
    log.info("rank-1 EF on a full-rank 24x16 matrix: running-mean error %s", errors)
    assert errors[400] <= 0.03 and errors[400] <= 0.3 * errors[100]


def test_state_dict_round_trip_gives_an_identical_next_step():
    world, shape = 2, (32, 24)
    codecs, infos = workers(world, shape)
    grads = lambda step: [torch.randn(shape, generator=gen(50 * step + w)) for w in range(world)]  # noqa: E731
    for step in range(3):
        run_linear_exchange(codecs, grads(step), at_step(infos, step))
    states = [c.state_dict() for c in codecs]
    expected, _ = run_linear_exchange(codecs, grads(3), at_step(infos, 3))

    restored = [make_codec("powersgd") for _ in range(world)]
    for c, s in zip(restored, states):
        assert isinstance(c, Stateful)
        c.load_state_dict(s)
    again, _ = run_linear_exchange(restored, grads(3), at_step(infos, 3))
    for a, b in zip(again, expected):
        assert torch.equal(a, b)

    for c in restored:
        c.reset()
    fresh = [make_codec("powersgd") for _ in range(world)]
    after_reset, _ = run_linear_exchange(restored, grads(3), at_step(infos, 3))
    from_scratch, _ = run_linear_exchange(fresh, grads(3), at_step(infos, 3))
    assert torch.equal(after_reset[0], from_scratch[0])


def test_a_reset_worker_is_back_on_the_shared_q_after_one_step():
    world, shape = 3, (32, 24)
    codecs, infos = workers(world, shape)
    grads = lambda step: [torch.randn(shape, generator=gen(70 * step + w)) for w in range(world)]  # noqa: E731
    for step in range(3):
        run_linear_exchange(codecs, grads(step), at_step(infos, step))
    codecs[1].reset()  # worker 1 rejoins with a fresh Q and no memory
    results, _ = run_linear_exchange(codecs, grads(3), at_step(infos, 3))
    assert all(torch.equal(r, results[0]) for r in results)
    qs = [c.state_dict()["q"]["layer.weight"] for c in codecs]
    assert all(torch.equal(q, qs[0]) for q in qs)


def test_state_dict_is_a_detached_cpu_copy():
    codecs, infos = workers(1, (20, 30))
    run_linear_exchange(codecs, [torch.randn(20, 30, generator=gen(4))], infos)
    state = codecs[0].state_dict()
    state["q"]["layer.weight"].zero_()
    assert codecs[0].state_dict()["q"]["layer.weight"].abs().sum() > 0
    assert state["e"]["layer.weight"].device.type == "cpu"


@pytest.mark.parametrize("shape,params", [
    ((100,), {}),                                   # 1-D: biases, norms
    ((4, 3), {}),                                   # 12 floats vs 2·(4+3): rate 0.86 < 2
    ((64, 64), {"min_compression_rate": 20.0}),     # rate 16 < 20
    ((64, 64), {"start_iter": 10}),                 # before compression starts
])
def test_dense_tensors_take_one_exact_round(shape, params):
    world = 3
    codecs, infos = workers(world, shape, step=5, **params)
    xs = [torch.randn(shape, generator=gen(w)) for w in range(world)]
    results, rounds = run_linear_exchange(codecs, xs, infos)
    assert len(rounds) == 1 and rounds[0][0].fields[0].numel() == xs[0].numel()
    assert torch.allclose(results[0], sum(xs).reshape(-1), atol=1e-6)
    assert codecs[0].state_dict() == {"q": {}, "e": {}}


def test_compression_starts_at_start_iter():
    codecs, infos = workers(1, (64, 64), step=10, start_iter=10)
    _, rounds = run_linear_exchange(codecs, [torch.randn(64, 64, generator=gen(5))], infos)
    assert len(rounds) == 2


def test_conv_weights_are_viewed_as_out_by_rest():
    codecs, infos = workers(2, (16, 8, 3, 3))
    _, rounds = run_linear_exchange(codecs, [torch.randn(16, 8, 3, 3, generator=gen(w)) for w in range(2)], infos)
    assert [tuple(r[0].fields[0].shape) for r in rounds] == [(16, 2), (72, 2)]


def test_wire_round_trip_changes_nothing():
    world, shape = 3, (40, 30)
    xs = [torch.randn(shape, generator=gen(w)) for w in range(world)]
    codecs, infos = workers(world, shape)
    plain, _ = run_linear_exchange(codecs, xs, infos)
    codecs, infos = workers(world, shape)
    wired, _ = run_linear_exchange(codecs, xs, infos, wire=True)
    assert torch.equal(plain[0], wired[0])

    codec, info = make_codec("powersgd"), infos[0]
    packet = codec.encode(xs[0], info)
    assert torch.equal(codec.decode(Packet.from_bytes(packet.to_bytes()), info), codec.decode(packet, info))


def test_corrupted_or_misshapen_packets_raise():
    codec, info = make_codec("powersgd"), TensorInfo("w", (40, 30))
    data = bytearray(codec.encode(torch.randn(40, 30, generator=gen(6)), info).to_bytes())
    data[len(data) // 2] ^= 0x01
    with pytest.raises(PacketError):
        Packet.from_bytes(bytes(data))
    gen_ = codec.exchange(torch.randn(40, 30, generator=gen(6)), info)
    next(gen_)
    with pytest.raises(PacketError):
        gen_.send(Packet("powersgd", 1200, (torch.zeros(40, 3),)))


def test_single_worker_encode_matches_a_one_worker_exchange():
    shape = (50, 20)
    x = torch.randn(shape, generator=gen(7))
    codecs, infos = workers(1, shape)
    encoded = codecs[0].encode(x, infos[0])
    assert len(encoded.fields) == 2
    (out,), _ = run_linear_exchange(codecs, [x], infos)
    assert torch.allclose(codecs[0].decode(encoded, infos[0]), out, atol=1e-5)


def test_bits_per_element_for_a_256_by_1024_matrix():
    codecs, infos = workers(1, (256, 1024))
    _, rounds = run_linear_exchange(codecs, [torch.randn(256, 1024, generator=gen(8))], infos)
    bits = 8 * sum(len(r[0].to_bytes()) for r in rounds)
    bpe = bits / (256 * 1024)
    log.info("powersgd rank 2, 256x1024: %d bytes in 2 rounds, %.4f bits/element", bits // 8, bpe)
    assert 32 * 2 * (256 + 1024) / (256 * 1024) < bpe <= 0.315  # r(n+m) fp32 floats + two small headers


@pytest.mark.parametrize("shape", [(1,), (2,), (1, 1), (2, 1), (1, 2), (2, 2)])
def test_tiny_tensors(shape):
    codecs, infos = workers(2, shape)
    xs = [torch.randn(shape, generator=gen(w)) for w in range(2)]
    results, _ = run_linear_exchange(codecs, xs, infos)
    assert torch.allclose(results[0], (xs[0] + xs[1]).reshape(-1), atol=1e-6)


def test_float16_input():
    shape = (64, 48)
    codecs, infos = workers(2, shape)
    xs = [torch.randn(shape, generator=gen(w)).half() for w in range(2)]
    results, rounds = run_linear_exchange(codecs, xs, infos)
    assert results[0].dtype == torch.float32 and torch.isfinite(results[0]).all()
    assert all(f.dtype == torch.float32 for r in rounds for p in r for f in p.fields)


def test_zero_gradients_give_zero_without_nans():
    codecs, infos = workers(2, (32, 16))
    results, _ = run_linear_exchange(codecs, [torch.zeros(32, 16)] * 2, infos)
    assert torch.equal(results[0], torch.zeros(32 * 16))


def test_policy_does_not_stack_error_feedback_on_powersgd():
    policy = Policy("powersgd", {"rank": 4}, error_feedback=True)
    assert isinstance(policy.default, PowerSGD) and policy.default.rank == 4
    assert set(policy.state_dict()) == {"powersgd(rank=4,min_compression_rate=2.0,start_iter=0)"}  # keyed by spec


def test_invalid_parameters_are_refused():
    from compressors import CodecError
    with pytest.raises(CodecError):
        make_codec("powersgd", {"rank": 0})
    with pytest.raises(CodecError):
        make_codec("powersgd", {"rank": 1.5})


# -- 4 simulated workers train sklearn digits ------------------------------------------------------

@pytest.fixture
def one_thread():
    """Many tiny ops: a second intra-op thread only adds contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_four_workers_train_digits_with_default_parameters(one_thread):
    """MLP 64-128-10, SGD momentum 0.9 applied after aggregation, every tensor through PowerSGD
    (both weight matrices compressed at rank 2, biases dense)."""
    from sklearn.datasets import load_digits

    world, batch, lr = 4, 32, 0.05
    data, target = load_digits(return_X_y=True)
    x, y = torch.tensor(data / 16.0, dtype=torch.float32), torch.tensor(target)
    perm = torch.randperm(len(x), generator=gen(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    params = list(model.named_parameters())
    momentum = [torch.zeros_like(p) for _, p in params]
    codecs = [make_codec("powersgd") for _ in range(world)]
    shards = [(x[:1400][w::world], y[:1400][w::world]) for w in range(world)]
    step = 0
    for _ in range(15):
        for b in range(len(shards[0][0]) // batch):
            grads = []
            for xs, ys in shards:
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(xs[b * batch:(b + 1) * batch]),
                                                  ys[b * batch:(b + 1) * batch]).backward()
                grads.append([p.grad.clone() for _, p in params])
            with torch.no_grad():
                for j, (name, p) in enumerate(params):
                    infos = [TensorInfo(name, tuple(p.shape), worker=w, world=world, step=step) for w in range(world)]
                    results, _ = run_linear_exchange(codecs, [g[j] for g in grads], infos)
                    momentum[j].mul_(0.9).add_(results[0].view_as(p) / world)
                    p.sub_(momentum[j], alpha=lr)
            step += 1
    with torch.no_grad():
        acc = float((model(x[1400:]).argmax(1) == y[1400:]).float().mean())
    log.info("digits, 4 workers, powersgd defaults, lr=%g: test accuracy %.3f", lr, acc)
    assert acc >= 0.85
