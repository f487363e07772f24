"""The CLI as a user types it (README quick start), end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayq.tasks import FASHION_DIR

RAYQ = [sys.executable, "-m", "rayq"]


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(RAYQ + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_config_exits_2_with_the_named_error_before_ray_starts(tmp_path):
    out = _run(["train", "--set", "compression.codec=qsdg"], tmp_path, timeout=120)
    assert out.returncode == 2
    assert "compression.codec='qsdg' is not a codec; choose one of:" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_codecs_lists_every_registered_codec_with_its_kind(tmp_path):
    import compressors

    out = _run(["codecs"], tmp_path, timeout=120)
    assert out.returncode == 0
    for name, cls in compressors.REGISTRY.items():
        assert f"| {name}" in out.stdout and cls.kind.value in out.stdout


@pytest.mark.slow
def test_readme_first_command_trains_digits_with_4_workers_and_qsgd(tmp_path):
    out = _run(["train"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rayq summary" in out.stdout and "digits / qsgd" in out.stdout
    assert "step 330/330" in out.stdout  # progress lines while training
    (summary_file,) = (tmp_path / "runs").glob("digits-qsgd-*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["workers"] == 4 and summary["eval/accuracy"] >= 0.90
    assert 3 < summary["comm/bits_per_element"] < 8


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.extended  # a minute on 2 cores; the loader and the CNN are covered by tests/test_tasks.py
@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_cnn_reaches_080_in_one_epoch_with_4_workers(train_run):
    summary, _ = train_run(["task=fashion-mnist", "report_every=50", "eval_every=0", "checkpoint_every=0"])
    assert summary["epoch"] == pytest.approx(1.0)
    assert summary["eval/accuracy"] >= 0.80, summary
