"""Few-Bit Backward (Novikov et al., arXiv 2202.00441): the optimal step approximation of f′, the packed
codes autograd keeps, and the drop-in modules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressors.bits import pack_bits
from rayq.fewbit import (FewBitGELU, FewBitHardshrink, FewBitHardsigmoid, FewBitHardtanh, FewBitLeakyReLU,
                         FewBitReLU, FewBitReLU6, FewBitSiLU, FewBitSoftshrink,
                         FewBitThreshold, few_bit, gelu_mlp, pack_codes,
                         saved_activation_bytes, swap_activations, unpack_codes)
from rayq.fewbit_dp import (BITS, SMOOTH, TABLE_GRID, Grid, StepFunction, approximation_error, derivative,
                            load_tables, solve_dp, solve_lloyd, table)

# The authors' shipped GELU tables (skolai/fewbit, fewbit/data/builtin.npz).
LIBRARY_GELU_3BIT = (-2.4166, -0.7100, -0.3258, 0.0001, 0.3261, 0.7102, 2.4145)
LIBRARY_GELU_3BIT_LEVELS = (-0.0002, -0.0883, 0.1257, 0.3723, 0.6279, 0.8745, 1.0883, 1.0002)
LIBRARY_GELU_2BIT = (-0.4536, 0.0, 0.4536)
LIBRARY_GELU_2BIT_LEVELS = (-0.0015, 0.3251, 0.6749, 1.0015)
GRID = Grid(lo=-8.0, hi=8.0, cells=1024)


@pytest.fixture(scope="module")
def gelu_dp() -> dict[int, StepFunction]:
    return {bits: solve_dp("gelu", bits, GRID) for bits in (1, 2, 3)}


def _gaussian(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


# ---------------------------------------------------------------- the dynamic program


def test_dp_reproduces_library_gelu_3bit_borders(gelu_dp):
    assert torch.allclose(torch.tensor(gelu_dp[3].borders), torch.tensor(LIBRARY_GELU_3BIT), atol=0.03)


def test_dp_reproduces_library_gelu_2bit_borders(gelu_dp):
    assert torch.allclose(torch.tensor(gelu_dp[2].borders), torch.tensor(LIBRARY_GELU_2BIT), atol=0.03)


def test_dp_error_falls_about_3_5x_per_bit(gelu_dp):
    # Unweighted ∫(f′ − q)² on [−8, 8], recomputed independently: 1.41e-1, 3.93e-2, 1.19e-2.
    errors = [gelu_dp[b].error for b in (1, 2, 3)]
    assert errors == pytest.approx([1.41e-1, 3.93e-2, 1.19e-2], rel=0.01)
    assert all(3.0 < a / b < 4.0 for a, b in zip(errors, errors[1:]))


def test_levels_are_the_mean_of_the_derivative_on_their_interval(gelu_dp):
    step = gelu_dp[3]
    edges = torch.tensor([GRID.lo, *step.borders, GRID.hi], dtype=torch.float64)
    f = F.gelu(edges)
    means = (f[1:] - f[:-1]) / (edges[1:] - edges[:-1])
    assert torch.allclose(torch.tensor(step.levels, dtype=torch.float64), means, atol=1e-9)


def test_derivative_at_each_border_is_the_mean_of_the_adjacent_levels(gelu_dp):
    # On a grid the condition f′(b) = (y_left + y_right)/2 holds up to one grid step times max|f″| (< 0.8).
    for bits in (2, 3):
        step = gelu_dp[bits]
        fprime = derivative(F.gelu)(torch.tensor(step.borders, dtype=torch.float64))
        levels = torch.tensor(step.levels, dtype=torch.float64)
        mid = (levels[:-1] + levels[1:]) / 2
        assert (fprime - mid).abs().max() <= 0.8 * GRID.step


def test_moving_any_border_one_grid_step_does_not_lower_the_error(gelu_dp):
    step = gelu_dp[3]
    for k in range(len(step.borders)):
        for shift in (-GRID.step, GRID.step):
            moved = list(step.borders)
            moved[k] += shift
            edges = torch.tensor([GRID.lo, *moved, GRID.hi], dtype=torch.float64)
            f = F.gelu(edges)
            levels = tuple(((f[1:] - f[:-1]) / (edges[1:] - edges[:-1])).tolist())
            assert approximation_error("gelu", StepFunction(tuple(moved), levels, 0.0), GRID) >= step.error - 1e-12


def test_reported_error_is_the_integrated_squared_error(gelu_dp):
    assert approximation_error("gelu", gelu_dp[3], GRID) == pytest.approx(gelu_dp[3].error, rel=1e-9)


@pytest.mark.parametrize("name", ["gelu", "tanh", "sigmoid"])
def test_dp_error_is_at_most_the_iterative_solvers(name):
    for bits in (2, 3):
        dp, lloyd = solve_dp(name, bits, GRID), solve_lloyd(name, bits, GRID)
        assert dp.error <= lloyd.error + 1e-12


def test_gaussian_weight_pulls_the_borders_in():
    # With w = N(0, 1) pdf the GELU 3-bit borders are ±0.219, ±0.469, ±0.781, 0 (recomputed independently).
    step = solve_dp("gelu", 3, GRID, weight=_gaussian)
    expected = torch.tensor([-0.781, -0.469, -0.219, 0.0, 0.219, 0.469, 0.781])
    assert torch.allclose(torch.tensor(step.borders, dtype=torch.float32), expected, atol=GRID.step)
    assert step.error == pytest.approx(1.9e-3, rel=0.02)


def test_invalid_bits_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"bits=5 is invalid for FewBitGELU; choose one of 1, 2, 3, 4"):
        FewBitGELU(5)
    with pytest.raises(ValueError, match="bits=0 is invalid for solve_dp"):
        solve_dp("gelu", 0, GRID)


# ---------------------------------------------------------------- shipped tables


def test_shipped_gelu_tables_match_the_library_tables():
    for bits, borders, levels in ((2, LIBRARY_GELU_2BIT, LIBRARY_GELU_2BIT_LEVELS),
                                  (3, LIBRARY_GELU_3BIT, LIBRARY_GELU_3BIT_LEVELS)):
        step = table("gelu", bits)
        assert torch.allclose(torch.tensor(step.borders), torch.tensor(borders), atol=0.01)
        assert torch.allclose(torch.tensor(step.levels), torch.tensor(levels), atol=0.002)


def test_shipped_tables_cover_every_smooth_activation_and_width():
    tables = load_tables()
    assert set(tables) == set(SMOOTH)
    for name, per_bits in tables.items():
        assert set(per_bits) == set(BITS)
        for bits, step in per_bits.items():
            assert len(step.levels) == 2 ** bits
            assert list(step.borders) == sorted(step.borders)


def test_shipped_table_is_the_dp_solution_on_the_table_grid():
    assert solve_dp("silu", 2, TABLE_GRID) == table("silu", 2)


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_forward_is_exact_and_backward_is_grad_times_level_of_code(name):
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(37, 29, generator=gen)).requires_grad_(True)
    grad_out = torch.randn(37, 29, generator=gen)
    for bits in BITS:
        x.grad = None
        y = few_bit(x, name, bits)
        assert torch.equal(y, SMOOTH[name](x.detach()))
        y.backward(grad_out)
        step = table(name, bits)
        codes = torch.bucketize(x.detach(), torch.tensor(step.borders))
        assert torch.equal(x.grad, grad_out * torch.tensor(step.levels)[codes])


@pytest.mark.parametrize(("few", "exact"), [
    (FewBitReLU(), nn.ReLU()),
    (FewBitLeakyReLU(0.2), nn.LeakyReLU(0.2)),
    (FewBitHardtanh(-2.0, 1.5), nn.Hardtanh(-2.0, 1.5)),
    (FewBitReLU6(), nn.ReLU6()),
    (FewBitHardsigmoid(), nn.Hardsigmoid()),
    (FewBitThreshold(0.5, -1.0), nn.Threshold(0.5, -1.0)),
    (FewBitHardshrink(0.5), nn.Hardshrink(0.5)),
    (FewBitSoftshrink(0.5), nn.Softshrink(0.5)),
], ids=lambda m: type(m).__name__)
def test_piecewise_linear_activations_get_their_exact_gradient_from_one_bit(few, exact):
    gen = torch.Generator().manual_seed(2)
    kinks = torch.tensor([-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0, 6.0])
    x = torch.cat([4 * torch.randn(500, generator=gen), kinks])
    grad_out = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = few(xa), exact(xb)
    assert torch.equal(ya, yb)
    ya.backward(grad_out)
    yb.backward(grad_out)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-6, atol=0)
    assert saved_activation_bytes(few, xa) == math.ceil(x.numel() / 8)


def test_codes_far_outside_the_grid_use_the_outer_levels():
    x = torch.tensor([-500.0, 500.0], requires_grad=True)
    few_bit(x, "gelu", 2).sum().backward()
    levels = table("gelu", 2).levels
    assert x.grad.tolist() == pytest.approx([levels[0], levels[-1]])


# ---------------------------------------------------------------- packing and memory


@pytest.mark.parametrize("bits", BITS)
def test_codes_pack_into_ceil_n_bits_over_8_bytes_and_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 1001):
        codes = torch.randint(0, 2 ** bits, (n,), generator=gen)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(packed, pack_bits(codes, bits))  # the shared LSB-first bit-stream layout
        assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
def test_autograd_keeps_only_the_packed_codes(bits):
    x = torch.randn(64, 1000, requires_grad=True)
    few, exact = saved_activation_bytes(FewBitGELU(bits), x), saved_activation_bytes(nn.GELU(), x)
    assert few == math.ceil(x.numel() * bits / 8)
    assert exact == 4 * x.numel()


def test_mlp_saves_less_with_fewer_bits():
    torch.manual_seed(0)
    model, x = gelu_mlp(), torch.randn(128, 64)
    exact = saved_activation_bytes(model, x)
    act = 2 * 128 * 256  # elements entering the two GELUs
    # The Linear layers keep their fp32 inputs (128·64 + act floats); the GELUs keep act·4 bytes or act·b/8.
    assert exact == 4 * (128 * 64 + act) + 4 * act
    sizes = [saved_activation_bytes(swap_activations(copy.deepcopy(model), b), x) for b in BITS]
    assert sizes == [4 * (128 * 64 + act) + act * b // 8 for b in BITS]
    assert sizes == sorted(sizes) and sizes[-1] < exact


# ---------------------------------------------------------------- modules


def test_swap_activations_keeps_the_forward_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 10))
    x = torch.randn(16, 64)
    expected = model(x)
    swapped = swap_activations(copy.deepcopy(model), 2)
    assert torch.equal(swapped(x), expected)
    kinds = [type(m).__name__ for m in swapped if not isinstance(m, nn.Linear)]
    assert kinds == ["FewBitGELU", "FewBitSiLU", "FewBitTanh", "FewBitReLU", "FewBitSigmoid"]


@pytest.mark.parametrize("bits", [None, 0])
def test_swap_activations_without_bits_leaves_the_model_exact(bits):
    model = gelu_mlp(activation="silu")
    assert swap_activations(model, bits) is model
    assert isinstance(model[1], nn.SiLU)


def test_swap_activations_keeps_non_default_elu_exact():
    model = nn.Sequential(nn.Linear(4, 4), nn.ELU(alpha=0.5), nn.ELU())
    swap_activations(model, 3)
    assert type(model[1]) is nn.ELU and type(model[2]).__name__ == "FewBitELU"


def test_three_bit_gelu_mlp_trains_like_the_exact_one_on_digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    losses = {}
    for bits in (None, 3):
        torch.manual_seed(0)
        model = gelu_mlp(hidden=64, bits=bits)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        losses[bits] = loss.item()
    assert losses[None] < 0.1
    assert losses[3] == pytest.approx(losses[None], rel=0.25, abs=0.01)
    assert isinstance(gelu_mlp(bits=3)[1], FewBitGELU)
    assert isinstance(gelu_mlp(activation="silu", bits=1)[1], FewBitSiLU)
