"""Every codec trains digits through the sync trainer on Ray Train with 4 workers (issue 3).

All runs share one worker group (trainer ``sweep``) to spend Ray Train's start-up once; each run is the
``sync`` trainer's loop, unchanged, with its own config. Bars are per codec: tighter where the codec is
near-lossless. Learning rates follow each method's needs (sign-based updates have unit magnitude).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import compressors

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# codec -> (extra config, test-accuracy bar)
MATRIX: dict[str, tuple[list[str], float]] = {
    "none": ([], 0.93),
    "fp16": ([], 0.93),
    "bf16": ([], 0.92),
    "int8": ([], 0.92),
    "qsgd": ([], 0.90),
    "terngrad": ([], 0.88),
    "sign": (["optimizer.lr=0.002"], 0.85),
    "ef_sign": (["compression.error_feedback=true"], 0.88),
    "threshold": ([], 0.88),
    "topk": (["compression.error_feedback=true", "optimizer.lr=0.03"], 0.88),
    "gaussiank": (["compression.error_feedback=true", "optimizer.lr=0.03"], 0.85),
    "randomk": (["optimizer.lr=0.03"], 0.88),
    "powersgd": ([], 0.90),
    "vqsgd": ([], 0.85),
    "rcfed": ([], 0.88),
    "laq": ([], 0.88),
}


def test_the_matrix_names_every_registered_codec():
    assert set(MATRIX) == set(compressors.REGISTRY)


def test_every_codec_trains_digits_to_its_bar(ray_session, tmp_path):
    from rayq.config import load_config
    from rayq.launch import train_many

    common = ["epochs=20", "report_every=110", "eval_every=0", "checkpoint_every=0", "compression.min_numel=0"]
    cfgs = [load_config(None, common + [f"compression.codec={codec}"] + extra,
                        extra={"name": f"matrix-{codec}", "output_dir": str(tmp_path)})
            for codec, (extra, _) in MATRIX.items()]
    summaries = train_many(cfgs)
    assert [s["codec"] for s in summaries] == list(MATRIX)
    failures = {s["codec"]: s.get("error") or round(s["eval/accuracy"], 4) for s in summaries
                if "error" in s or s["eval/accuracy"] < MATRIX[s["codec"]][1]}
    assert not failures, f"below their bar: {failures}"
    nominal = {"none": 32, "fp16": 16, "bf16": 16, "int8": 8.125, "sign": 1, "terngrad": 2}
    for s in summaries:
        assert s["step"] == 220
        assert 0 < s["comm/bits_per_element"] < 33
        if s["codec"] in nominal:  # packet headers (and sign's zero positions) add up to ~1 bit/element
            assert nominal[s["codec"]] <= s["comm/bits_per_element"] < nominal[s["codec"]] * 1.05 + 1.0, s
        run_dir = Path(s["run_dir"])
        assert json.loads((run_dir / "summary.json").read_text())["eval/accuracy"] == s["eval/accuracy"]
        assert f"codec: {s['codec']}" in (run_dir / "config.yaml").read_text()
