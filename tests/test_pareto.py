"""rayq.launch.tune.pareto on hand-made points: dominance, the front, the best point per objective, table and plot."""

from __future__ import annotations

import math

import pytest

from rayq.launch.tune.pareto import Objective, best_index, dominates, format_table, pareto_front, plot_front

ACC = Objective("acc", "max", "accuracy")
BITS = Objective("bits", "min", "bits", log=True)
TIME = Objective("time", "min", "time")


def pts(*rows: tuple[float, ...]) -> list[dict[str, float]]:
    return [dict(zip(("acc", "bits", "time"), r)) for r in rows]


def test_dominance_needs_no_worse_everywhere_and_better_somewhere():
    a, b, c = pts((0.9, 100, 1), (0.8, 200, 1), (0.9, 100, 1))
    assert dominates(a, b, [ACC, BITS, TIME])
    assert not dominates(b, a, [ACC, BITS, TIME])
    assert not dominates(a, c, [ACC, BITS, TIME]) and not dominates(c, a, [ACC, BITS, TIME])  # equal points


def test_front_of_two_objectives_on_hand_made_points():
    points = pts(
        (0.95, 1000, 0),   # 0: most accurate
        (0.90, 100, 0),    # 1: trade-off
        (0.80, 10, 0),     # 2: fewest bits
        (0.85, 200, 0),    # 3: dominated by 1 (less accurate, more bits)
        (0.95, 2000, 0),   # 4: dominated by 0 (same accuracy, more bits)
        (0.70, 10, 0),     # 5: dominated by 2 (same bits, less accurate)
        (0.90, 100, 0),    # 6: duplicate of 1: duplicates do not dominate each other
    )
    assert pareto_front(points, [ACC, BITS]) == [0, 1, 2, 6]


def test_a_third_objective_brings_dominated_points_back_to_the_front():
    points = pts((0.95, 1000, 10.0), (0.85, 200, 1.0), (0.90, 100, 5.0))
    assert pareto_front(points, [ACC, BITS]) == [0, 2]
    assert pareto_front(points, [ACC, BITS, TIME]) == [0, 1, 2]  # 1 is the fastest


def test_modes_flip_the_front():
    points = pts((0.9, 100, 0), (0.8, 10, 0))
    assert pareto_front(points, [ACC]) == [0]
    assert pareto_front(points, [Objective("acc", "min")]) == [1]
    assert pareto_front(points, [Objective("bits", "max")]) == [0]


def test_points_with_missing_or_non_finite_objectives_are_left_out():
    points = pts((0.9, 100, 0), (math.nan, 1, 0), (0.99, math.inf, 0)) + [{"acc": 0.99}]
    assert pareto_front(points, [ACC, BITS]) == [0]


def test_best_per_objective_breaks_ties_by_the_other_objectives():
    points = pts((0.95, 1000, 3), (0.95, 500, 9), (0.80, 10, 1))
    assert best_index(points, ACC, [ACC, BITS, TIME]) == 1      # tie on accuracy → fewer bits
    assert best_index(points, BITS, [ACC, BITS, TIME]) == 2
    assert best_index(points, TIME, [ACC, BITS, TIME]) == 2
    assert best_index([], ACC) is None


def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode='maximum'"):
        Objective("acc", "maximum")  # type: ignore[arg-type]


def test_table_aligns_columns_and_shows_missing_values_as_dashes():
    text = format_table([[1, "*", 0.9512345, 1.5e7], [12, "", math.nan, None]], ["#", "front", "acc", "bits"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "0.9512" in text and "1.5e+07" in text and "| -" in text.replace("  ", " ")


def test_plot_writes_a_png(tmp_path):
    points = pts((0.95, 1000, 3), (0.9, 100, 2), (0.8, 10, 1), (0.7, 500, 4))
    out = plot_front(points, [ACC, BITS, TIME], pareto_front(points, [ACC, BITS, TIME]), tmp_path / "p.png",
                     labels=["a", "b", "c", "d"], extra=pts((0.5, 5, 0.5)))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
