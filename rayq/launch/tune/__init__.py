"""``rayq tune``: Ray Tune sweeps over any run-config key; Pareto front of accuracy, bits and simulated time.

``space`` (the search space as data) ← ``grammar`` (its YAML form, :func:`load_space`) and ``solver``
(checks before Ray starts); ``sweep`` runs it on Ray Tune; ``report`` writes the front, table, plot and
best configs; ``command`` is ``rayq tune``. tune_spaces/README.md has the grammar for users.
"""

from rayq.launch.tune.command import add_commands, cmd_tune
from rayq.launch.tune.grammar import TUNE_BASE, Parser, find_space, load_space
from rayq.launch.tune.objectives import ACCURACY, BITS, SCORE, SIM_TIME, objective_metrics
from rayq.launch.tune.pareto import Objective, best_index, dominates, format_table, pareto_front, plot_front
from rayq.launch.tune.report import SweepResult, TrialOutcome, sweep_table, write_best, write_report
from rayq.launch.tune.space import DISTRIBUTIONS, Condition, Dist, Entry, Space, SpaceError, SweepSettings
from rayq.launch.tune.sweep import (
    TRIAL_CPU,
    PlacementGroupReaper,
    TrialPlan,
    actor_bundles,
    run_sweep,
    run_trial,
    trial_resources,
)

__all__ = [
    "ACCURACY", "BITS", "DISTRIBUTIONS", "SCORE", "SIM_TIME", "TRIAL_CPU", "TUNE_BASE", "Condition", "Dist", "Entry",
    "Objective", "Parser", "PlacementGroupReaper", "Space", "SpaceError", "SweepResult", "SweepSettings",
    "TrialOutcome", "TrialPlan", "actor_bundles", "add_commands", "best_index", "cmd_tune", "dominates",
    "find_space", "format_table", "load_space", "objective_metrics", "pareto_front", "plot_front", "run_sweep",
    "run_trial", "sweep_table", "trial_resources", "write_best", "write_report",
]
