"""The matrix of combinations: every codec (with and without error feedback) × schedule × strategy × fault,
each either allowed or refused by the run config's validation with the reason (:mod:`rayq.compat`).

``rayq codecs --matrix`` prints it and the conformance tests run every allowed cell, so the table users
read is generated from the same rules that refuse their configs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rayq.compat import STRATEGIES
from rayq.config import load_config
from rayq.schema import ConfigError, merge



#: Schedules of the matrix: the name shown and the ``sync`` section.
MATRIX_SCHEDULES: dict[str, dict[str, Any]] = {
    "every_step": {"schedule": "every_step"},
    "periodic": {"schedule": "periodic", "period": 2},
    "diloco": {"schedule": "periodic", "period": 2, "outer_lr": 0.7, "outer_momentum": 0.5},
    "adaptive": {"schedule": "adaptive", "period": 2, "p_max": 4, "warmup_steps": 2},
    "laq": {"schedule": "laq"},
}
#: Faults of the matrix: the name shown and the ``faults`` section (3 workers).
MATRIX_FAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "leave": {"events": [{"step": 1, "worker": 1, "kind": "leave", "duration": 2}]},
    "straggle+deadline": {"events": [{"step": 1, "worker": 2, "kind": "straggle", "factor": 5, "duration": 2}],
                          "deadline": 2.0},
    "lose": {"events": [{"step": 1, "worker": 1, "kind": "lose", "duration": 2}]},
    "corrupt": {"events": [{"step": 2, "worker": 2, "kind": "corrupt"}]},
}


@dataclass(frozen=True)
class Cell:
    codec: str
    error_feedback: bool
    schedule: str
    strategy: str
    fault: str

    def config(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run-config mapping of this cell (over ``base``)."""
        cell = {"compression": {"codec": self.codec, "error_feedback": self.error_feedback,
                                "strategy": self.strategy},
                "sync": dict(MATRIX_SCHEDULES[self.schedule]), "faults": dict(MATRIX_FAULTS[self.fault])}
        return merge(base or {}, cell)


def cells(codecs: list[str] | None = None) -> Iterator[Cell]:
    """Every cell: each registered codec (with and without error feedback) × schedule × strategy (``auto``, the
    default, included) × fault."""
    from compressors import codec_names

    for codec, ef, schedule, strategy, fault in itertools.product(
            codecs or codec_names(), (False, True), MATRIX_SCHEDULES, STRATEGIES, MATRIX_FAULTS):
        yield Cell(codec, ef, schedule, strategy, fault)


def verdict(cell: Cell, base: dict[str, Any] | None = None) -> str | None:
    """None when the cell runs; otherwise the config error that refuses it."""
    try:
        load_config(extra=cell.config({"workers": 3, **(base or {})}))
    except ConfigError as err:
        return str(err)
    return None


def matrix(codecs: list[str] | None = None) -> list[tuple[Cell, str | None]]:
    """``[(cell, None or the reason it is refused)]`` for every cell of :func:`cells`."""
    return [(c, verdict(c)) for c in cells(codecs)]
