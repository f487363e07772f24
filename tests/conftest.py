"""One local Ray per test session, shared by every integration test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from rayq.launch import init_ray

    # Logical CPUs: 4 workers × 0.5 CPU plus the controller and the progress queue fit on 2 cores.
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def train_run(ray_session, tmp_path):
    """Run ``rayq.launch.train`` with config overrides; return (summary, run directory)."""
    from rayq.config import load_config
    from rayq.launch import train

    def run(sets: list[str] | None = None, **extra: Any) -> tuple[dict[str, Any], Path]:
        extra.setdefault("output_dir", str(tmp_path / "runs"))
        cfg = load_config(None, sets or [], extra=extra)
        summary = train(cfg)
        return summary, Path(summary["run_dir"])

    return run


def pytest_configure(config):
    import torch

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Two cores: torch's intra-op threads only wait on each other (measured: 161 s → 35 s for the codec tests).
    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter):
    """The conformance suite's figures: cells checked against the invariants, cells refused by the config."""
    import sys

    module = sys.modules.get("tests.test_conformance")
    summary = getattr(module, "SUMMARY", None)
    if summary:
        terminalreporter.write_line(
            f"conformance matrix: {summary['checked']} cells checked against the invariants, {summary['refused']} "
            f"refused by the config ({summary['reasons']} distinct reasons), {summary['failed']} failed; "
            f"{summary['device']} on the device path of gathered frames")
