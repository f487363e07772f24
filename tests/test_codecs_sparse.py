"""Sparsifying codecs: top-k and Gaussian_k (Shi et al., 2019), shared-seed random-k, and their index code.

The contraction bounds, the Gaussian_k count, wire round trips, and a 4-worker training sanity check.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from compressors import Kind, Packet, PacketError, TensorInfo, make_codec
from compressors.error_feedback import ErrorFeedback
from compressors.sparse_index import decode_indices, encode_indices, layout

log = logging.getLogger(__name__)

SPARSE = {
    "topk": ("topk", {}),
    "gaussiank": ("gaussiank", {}),
    "randomk": ("randomk", {"density": 0.01}),
    "randomk-uniform": ("randomk", {"density": 0.01, "sampling": "uniform"}),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def laplace(d: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    return torch.empty(d).exponential_(generator=g) - torch.empty(d).exponential_(generator=g)


def sum_packets(packets: list[Packet]) -> Packet:
    """What all-reduce hands a linear codec: the field-wise sum over workers."""
    fields = tuple(torch.stack(fs).sum(0) for fs in zip(*(p.fields for p in packets)))
    return Packet(packets[0].codec, packets[0].numel, fields)


# -- index code ---------------------------------------------------------------------------------

@pytest.mark.parametrize("d,k", [(1, 1), (2, 1), (2, 2), (7, 0), (64, 64), (1000, 3), (1000, 500),
                                 (100_003, 1_000), (1_000_000, 10_000)])
def test_index_code_round_trips_random_sets(d, k):
    idx = torch.randperm(d, generator=gen(d + k))[:k].sort().values
    code = encode_indices(idx, d)
    assert code.dtype == torch.uint8 and code.numel() == layout(k, d).nbytes
    assert torch.equal(decode_indices(code, k, d), idx)


def test_index_code_round_trips_clustered_and_extreme_sets():
    d = 100_000
    for idx in (torch.arange(1000), torch.arange(d - 1000, d), torch.cat([torch.arange(500), torch.arange(d - 500, d)]),
                torch.arange(0, d, 100), torch.tensor([0]), torch.tensor([d - 1])):
        code = encode_indices(idx, d)
        assert code.numel() == layout(idx.numel(), d).nbytes  # size depends on (k, d) only
        assert torch.equal(decode_indices(code, idx.numel(), d), idx)


@pytest.mark.parametrize("k", [1_000, 10_000, 100_000])
def test_index_code_costs_within_a_bit_of_the_set_entropy(k):
    d = 1_000_000
    bits_per_index = 8 * layout(k, d).nbytes / k
    entropy = (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2) / k
    log.info("Elias-Fano k=%d of d=%d: %.3f bits/index, log2 C(d,k)/k = %.3f", k, d, bits_per_index, entropy)
    assert entropy <= bits_per_index <= entropy + 0.75
    assert bits_per_index <= math.log2(d / k) + 2.6


def test_index_code_uses_a_bitmap_when_dense():
    assert layout(500, 1000).bitmap and layout(500, 1000).nbytes == 125
    assert not layout(10, 1000).bitmap


# -- T12: top-k contraction ---------------------------------------------------------------------

def topk_residual_ratio(u: torch.Tensor, density: float) -> tuple[float, int]:
    codec = make_codec("topk", {"density": density})
    info = TensorInfo("u", tuple(u.shape))
    approx = codec.decode(codec.encode(u, info), info)
    k = max(1, int(density * u.numel()))
    return float(((u - approx) ** 2).sum() / (u ** 2).sum()), k


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("dist", ["gaussian", "laplace", "uniform"])
def test_topk_meets_the_bell_shaped_bound(dist, density):
    d = 100_000
    u = {"gaussian": lambda: torch.randn(d, generator=gen(1)),
         "laplace": lambda: laplace(d, 2),
         "uniform": lambda: torch.rand(d, generator=gen(3)) * 2 - 1}[dist]()
    ratio, k = topk_residual_ratio(u, density)
    assert ratio <= 1 - k / d
    assert ratio <= (1 - k / d) ** 2
    if dist == "gaussian" and density == 0.01:
        assert ratio == pytest.approx(0.916, abs=0.003)  # recomputed independently


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_topk_violates_the_tighter_bound_on_equal_magnitudes(density):
    d = 100_000
    u = torch.where(torch.rand(d, generator=gen(4)) < 0.5, -1.0, 1.0)
    ratio, k = topk_residual_ratio(u, density)
    assert ratio == pytest.approx(1 - k / d, abs=1e-6)  # the always-bound is tight here
    assert ratio > (1 - k / d) ** 2


def test_topk_always_bound_holds_on_arbitrary_vectors():
    for seed in range(20):
        g = gen(100 + seed)
        d = int(torch.randint(1, 5000, (), generator=g))
        u = torch.randn(d, generator=g) ** 3 * torch.rand(d, generator=g)
        ratio, k = topk_residual_ratio(u, 0.05)
        assert ratio <= 1 - k / d + 1e-6


def test_topk_sends_exactly_the_k_largest_magnitudes():
    d, codec = 10_000, make_codec("topk", {"density": 0.01})
    u = torch.randn(d, generator=gen(5))
    info = TensorInfo("u", (d,))
    out = codec.decode(codec.encode(u, info), info)
    expected = u.abs().topk(100).indices.sort().values
    assert torch.equal(out.nonzero().reshape(-1), expected)
    assert torch.equal(out[expected], u[expected])


# -- T13: Gaussian_k threshold --------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_gaussiank_needs_no_refinement_on_gaussian_input(density):
    d = 1_000_000
    u = torch.randn(d, generator=gen(6))
    codec = make_codec("gaussiank", {"density": density, "trim": False})
    k = int(density * d)
    _, steps = codec.threshold(u)
    count = codec.select(u).numel()
    log.info("gaussiank Gaussian d=%d rho=%g: %d selected for k=%d (%d loops)", d, density, count, k, int(steps))
    assert int(steps) == 0
    assert 2 * k / 3 <= count <= 4 * k / 3
    assert abs(count - k) <= 4 * math.sqrt(k)  # binomial spread around k, the threshold itself is exact


def test_gaussiank_overshoots_on_laplace_input_unless_trimmed():
    d, density = 1_000_000, 0.01
    k = int(density * d)
    u = laplace(d, 7)
    loose = make_codec("gaussiank", {"density": density, "trim": False})
    _, steps = loose.threshold(u)
    count = loose.select(u).numel()
    log.info("gaussiank Laplace d=%d rho=%g: %d selected = %.3fk after %d loops (realised density %.5f)",
             d, density, count, count / k, int(steps), count / d)
    assert int(steps) == 3
    assert 1.5 * k <= count <= 1.8 * k  # recomputed independently: ≈1.65k, the ×0.5/×1.5 steps overshoot

    trimmed = make_codec("gaussiank", {"density": density})
    idx = trimmed.select(u)
    assert torch.equal(idx, u.abs().topk(k).indices.sort().values)


@pytest.mark.parametrize("loops", [0, 1, 3, 16])
@pytest.mark.parametrize("trim", [True, False])
def test_gaussiank_compiled_cpu_passes_match_the_tensor_path(loops, trim):
    """The CPU's compiled refinement and selection against the tensor code other devices run, from the
    same starting threshold: the same threshold, steps and indices, on Gaussian, Laplace and rounded
    (tied) inputs."""
    from statistics import NormalDist

    from compressors.gaussiank import _above

    codec = make_codec("gaussiank", {"density": 0.01, "loops": loops, "trim": trim})
    for u in (torch.randn(30_000, generator=gen(9)), laplace(30_000, 10), laplace(30_000, 11).round(decimals=1)):
        std, mean = torch.std_mean(u, correction=0)
        start = mean + std * NormalDist().inv_cdf(1.0 - 0.01 / 2.0)
        fast, slow = codec._refine_compiled(u, start, 300), codec._refine_tensor(u, start, 300)
        assert torch.equal(fast[0], slow[0]) and int(fast[1]) == int(slow[1])
        assert torch.equal(torch.from_numpy(_above(u.numpy(), fast[0].numpy()[()])),
                           (u.abs() > slow[0]).nonzero().reshape(-1))


def test_gaussiank_selection_is_a_threshold_set():
    u = torch.randn(50_000, generator=gen(8))
    idx = make_codec("gaussiank", {"density": 0.01, "trim": False}).select(u)
    mask = torch.zeros(u.numel(), dtype=torch.bool)
    mask[idx] = True
    assert u.abs()[mask].min() > u.abs()[~mask].max()


# -- random-k: shared support, linear, unbiased ---------------------------------------------------

@pytest.mark.parametrize("sampling", ["stratified", "uniform"])
def test_randomk_workers_draw_the_same_support(sampling):
    codec = make_codec("randomk", {"density": 0.01, "sampling": sampling})
    info = TensorInfo("layer.weight", (300, 100), worker=0, world=4, step=17, seed=3)
    other = TensorInfo("layer.weight", (300, 100), worker=3, world=4, step=17, seed=3)
    a, b = codec.support(info, torch.device("cpu"))[0], codec.support(other, torch.device("cpu"))[0]
    assert torch.equal(a, b) and a.numel() == 300
    assert a.unique().numel() == 300 and int(a.min()) >= 0 and int(a.max()) < 30_000
    later = TensorInfo("layer.weight", (300, 100), worker=0, world=4, step=18, seed=3)
    assert not torch.equal(a, codec.support(later, torch.device("cpu"))[0])


def test_randomk_sum_of_packets_decodes_to_the_sum_of_decodes():
    codec = make_codec("randomk", {"density": 0.05})
    assert codec.kind is Kind.LINEAR
    xs = [torch.randn(2000, generator=gen(20 + w)) for w in range(4)]
    infos = [TensorInfo("g", (2000,), worker=w, world=4, step=5) for w in range(4)]
    packets = [codec.encode(x, i) for x, i in zip(xs, infos)]
    total = codec.decode(sum_packets(packets), infos[0])
    separate = sum(codec.decode(p, i) for p, i in zip(packets, infos))
    assert torch.allclose(total, separate, atol=1e-5)


@pytest.mark.parametrize("sampling", ["stratified", "uniform"])
def test_randomk_is_unbiased(sampling):
    d, n = 10, 4000
    codec = make_codec("randomk", {"density": 0.3, "sampling": sampling})  # k = 3: strata of 3, 3, 4
    x = torch.randn(d, generator=gen(9))
    draws = torch.stack([codec.decode(codec.encode(x, TensorInfo("x", (d,), step=s)), TensorInfo("x", (d,), step=s))
                         for s in range(n)])
    se = draws.std(0) / math.sqrt(n)
    assert ((draws.mean(0) - x).abs() <= 4 * se + 1e-7).all()
    assert not torch.allclose(draws.mean(0), x, atol=1e-3)  # it is a Monte-Carlo mean, not the identity


def test_randomk_without_rescale_contracts_by_one_minus_k_over_d_in_expectation():
    d, n = 40, 4000
    codec = make_codec("randomk", {"density": 0.25, "rescale": False, "sampling": "uniform"})
    x = torch.randn(d, generator=gen(10))
    errs = torch.stack([((x - codec.decode(codec.encode(x, TensorInfo("x", (d,), step=s)),
                                           TensorInfo("x", (d,), step=s))) ** 2).sum() for s in range(n)])
    expected = (1 - 10 / d) * float((x ** 2).sum())
    assert abs(float(errs.mean()) - expected) <= 4 * float(errs.std()) / math.sqrt(n)


# -- every sparse codec: wire round trip, corruption, bits, edge inputs ------------------------------

@pytest.mark.parametrize("key", SPARSE)
def test_bytes_round_trip_decodes_identically(key):
    codec = make_codec(*SPARSE[key])
    x = torch.randn(64, 500, generator=gen(11))
    info = TensorInfo("w", (64, 500), step=3)
    packet = codec.encode(x, info)
    again = Packet.from_bytes(packet.to_bytes())
    assert torch.equal(codec.decode(again, info), codec.decode(packet, info))


@pytest.mark.parametrize("key", SPARSE)
def test_corrupted_or_truncated_bytes_raise(key):
    codec = make_codec(*SPARSE[key])
    info = TensorInfo("w", (4000,))
    data = bytearray(codec.encode(torch.randn(4000, generator=gen(12)), info).to_bytes())
    for pos in (len(data) // 2, len(data) - 10):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(PacketError):
            codec.decode(Packet.from_bytes(bytes(bad)), info)
    with pytest.raises(PacketError):
        Packet.from_bytes(bytes(data[:-1]))


@pytest.mark.parametrize("key", SPARSE)
def test_packet_for_another_tensor_or_density_is_refused(key):
    name, params = SPARSE[key]
    codec = make_codec(name, params)
    packet = codec.encode(torch.randn(4000, generator=gen(13)), TensorInfo("w", (4000,)))
    with pytest.raises(PacketError):
        codec.decode(packet, TensorInfo("w", (4001,)))
    with pytest.raises(PacketError):
        make_codec("fp16").decode(packet, TensorInfo("w", (4000,)))
    if name != "gaussiank":  # gaussiank's count travels with the packet
        with pytest.raises(PacketError):
            make_codec(name, {**params, "density": 0.03}).decode(packet, TensorInfo("w", (4000,)))


@pytest.mark.parametrize("key,low,high", [("topk", 0.40, 0.42), ("gaussiank", 0.36, 0.46),
                                          ("randomk", 0.32, 0.33), ("randomk-uniform", 0.32, 0.33)])
def test_bits_per_element_at_one_percent_density(key, low, high):
    # topk: 1% x (32 value bits + ~8.6 Elias-Fano bits); randomk: 1% x 32 value bits; plus the header
    d = 100_000
    codec = make_codec(*SPARSE[key])
    packet = codec.encode(torch.randn(d, generator=gen(14)), TensorInfo("g", (d,)))
    bpe = 8 * len(packet.to_bytes()) / d
    assert packet.nbytes == len(packet.to_bytes())
    assert low <= bpe <= high, bpe


@pytest.mark.parametrize("key", SPARSE)
@pytest.mark.parametrize("numel", [1, 2])
def test_tiny_tensors(key, numel):
    codec = make_codec(*SPARSE[key])
    x = torch.tensor([3.0, -5.0][:numel])
    info = TensorInfo("b", (numel,))
    out = codec.decode(Packet.from_bytes(codec.encode(x, info).to_bytes()), info)
    assert out.shape == (numel,) and out.dtype == torch.float32
    if not key.startswith("randomk"):
        assert float(out.abs().max()) == float(x.abs().max())  # the largest entry is always sent
    else:
        assert torch.count_nonzero(out) == 1


@pytest.mark.parametrize("key", SPARSE)
def test_float16_input(key):
    codec = make_codec(*SPARSE[key])
    x = torch.randn(3000, generator=gen(15)).half()
    info = TensorInfo("h", (3000,))
    out = codec.decode(codec.encode(x, info), info)
    assert out.dtype == torch.float32 and out.shape == (3000,)
    sent = out != 0
    assert 0 < int(sent.sum()) < 3000
    if key in ("topk", "gaussiank"):
        assert torch.equal(out[sent], x.float()[sent])


def test_zero_vector_sends_nothing_and_decodes_to_zero():
    info = TensorInfo("z", (1000,))
    codec = make_codec("gaussiank")
    packet = codec.encode(torch.zeros(1000), info)
    assert torch.equal(codec.decode(Packet.from_bytes(packet.to_bytes()), info), torch.zeros(1000))


def test_invalid_parameters_are_refused():
    from compressors import CodecError
    for name in ("topk", "gaussiank", "randomk"):
        with pytest.raises(CodecError):
            make_codec(name, {"density": 0.0})
    with pytest.raises(CodecError):
        make_codec("randomk", {"sampling": "blocks"})


# -- 4 simulated workers train sklearn digits ------------------------------------------------------

def train_digits(make, lr: float, epochs: int = 15, workers: int = 4, batch: int = 32) -> float:
    """Each worker's gradient goes through its own codec; the average is applied by SGD with
    momentum 0.9 (after aggregation, as TopK-SGD does). Returns the held-out accuracy."""
    from sklearn.datasets import load_digits

    data, target = load_digits(return_X_y=True)
    x, y = torch.tensor(data / 16.0, dtype=torch.float32), torch.tensor(target)
    perm = torch.randperm(len(x), generator=gen(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    params = list(model.named_parameters())
    momentum = [torch.zeros_like(p) for _, p in params]
    codecs = [make() for _ in range(workers)]
    shards = [(x[:1400][w::workers], y[:1400][w::workers]) for w in range(workers)]
    step = 0
    for _ in range(epochs):
        for b in range(len(shards[0][0]) // batch):
            grads = []
            for xs, ys in shards:
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(xs[b * batch:(b + 1) * batch]),
                                                  ys[b * batch:(b + 1) * batch]).backward()
                grads.append([p.grad.clone() for _, p in params])
            with torch.no_grad():
                for j, (name, p) in enumerate(params):
                    infos = [TensorInfo(name, tuple(p.shape), worker=w, world=workers, step=step)
                             for w in range(workers)]
                    packets = [c.encode(g[j], i) for c, g, i in zip(codecs, grads, infos)]
                    if codecs[0].kind is Kind.LINEAR:
                        mean = codecs[0].decode(sum_packets(packets), infos[0]) / workers
                    else:
                        mean = codecs[0].aggregate([c.decode(pk, i) for c, pk, i in zip(codecs, packets, infos)],
                                                   [1.0] * workers)
                    for c, i in zip(codecs, infos):  # every contribution was applied: error feedback commits
                        c.settle(i, True)
                    momentum[j].mul_(0.9).add_(mean.view_as(p))
                    p.sub_(momentum[j], alpha=lr)
            step += 1
    with torch.no_grad():
        return float((model(x[1400:]).argmax(1) == y[1400:]).float().mean())


@pytest.fixture
def one_thread():
    """Many tiny ops: a second intra-op thread only adds contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name,error_feedback,lr", [("topk", True, 0.03), ("gaussiank", True, 0.03),
                                                    ("randomk", False, 0.03)])
def test_four_workers_train_digits_with_default_parameters(one_thread, name, error_feedback, lr):
    def make():
        codec = make_codec(name)
        return ErrorFeedback(codec) if error_feedback else codec

    acc = train_digits(make, lr)
    log.info("digits, 4 workers, %s ef=%s lr=%g: test accuracy %.3f", name, error_feedback, lr, acc)
    assert acc >= 0.85
