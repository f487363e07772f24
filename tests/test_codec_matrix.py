"""Every codec, and sampled cells of every schedule under faults, train digits on Ray Train with 4 workers.

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


#: Sampled cells of the combination matrix (name -> config, bar): each schedule, lossy codecs, faults.
CELLS: dict[str, tuple[list[str], float]] = {
    "periodic-qsgd-ef": (["compression.codec=qsgd", "compression.params.levels=15", "compression.error_feedback=true",
                          "sync.schedule=periodic",
                          "sync.period=4"], 0.88),
    "diloco-int8": (["compression.codec=int8", "sync.schedule=periodic", "sync.period=4", "sync.outer_lr=0.7",
                     "sync.outer_momentum=0.5"], 0.88),
    "adaptive-topk-ef": (["compression.codec=topk", "compression.params={density: 0.05}", "compression.error_feedback=true",
                          "sync.schedule=adaptive", "sync.period=2", "sync.p_max=16"], 0.85),
    "laq-laq-deadline": (["compression.codec=laq", "sync.schedule=laq", "faults.deadline=2",
                          "faults.events=[{step: 40, worker: 3, kind: straggle, factor: 5, duration: 20}]"], 0.85),
    "topk-ef-leave-lose": (["compression.codec=topk", "compression.params={density: 0.05}", "compression.error_feedback=true",
                            "optimizer.lr=0.03", "faults.events=[{step: 30, worker: 2, kind: leave, duration: 10}, "
                            "{step: 80, worker: 1, kind: lose, duration: 8}, {step: 120, worker: 3, kind: corrupt}]"], 0.85),
    # frames sent unpadded to each peer (all-to-all) instead of a padded all-gather: LAQ's skips are header-only
    "laq-direct-lose": (["compression.codec=laq", "sync.schedule=laq", "compression.gather=direct",
                         "faults.events=[{step: 30, worker: 2, kind: lose, duration: 10}]"], 0.85),
    "two-phase-qsgd-ef": (["compression.codec=qsgd", "compression.params.levels=15", "compression.error_feedback=true",
                           "compression.strategy=two_phase"],
                          0.85),
    "powersgd-deadline": (["compression.codec=powersgd", "faults.deadline=2",
                           "faults.events=[{step: 20, worker: 0, kind: straggle, factor: 4, duration: 30}]"], 0.88),
    # the training-side methods, through the same exchange
    "qrda-threshold": (["task=sparse-logistic", "optimizer.name=qrda_adagrad", "optimizer.l1=0.02", "optimizer.lr=0.5",
                        "compression.codec=threshold"], 0.78),
    "fewbit-gelu-2bit": (["task=digits-gelu", "model.fewbit_bits=2"], 0.92),
    "blaq-binary": (["optimizer.name=blaq", "optimizer.lr=0.01", "compression.codec=none"], 0.9),
}


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    from rayq.config import load_config
    from rayq.launch import train_many

    out = tmp_path_factory.mktemp("matrix")
    common = ["epochs=20", "report_every=110", "eval_every=0", "checkpoint_every=0", "compression.min_numel=0"]
    cfgs = [load_config(None, common + [f"compression.codec={codec}"] + extra,
                        extra={"name": f"matrix-{codec}", "output_dir": str(out)})
            for codec, (extra, _) in MATRIX.items()]
    cfgs += [load_config(None, common + ["cluster=cloud-1g"] + sets, extra={"name": f"cell-{name}", "output_dir": str(out)})
             for name, (sets, _) in CELLS.items()]
    return train_many(cfgs)


def test_the_matrix_names_every_registered_codec():
    assert set(MATRIX) == set(compressors.REGISTRY)


def test_sampled_cells_of_every_schedule_under_faults_train_digits_to_their_bar(sweep):
    cells = {s["run"].removeprefix("cell-"): s for s in sweep if s["run"].startswith("cell-")}
    assert list(cells) == list(CELLS)
    failures = {n: s.get("error") or round(s["eval/accuracy"], 4) for n, s in cells.items()
                if "error" in s or s["eval/accuracy"] < CELLS[n][1]}
    assert not failures, f"below their bar: {failures}"
    for name, s in cells.items():
        assert s["step"] == s["steps_total"] and s["sim/time_s"] > 0  # (220 on digits, 240 on sparse-logistic)
        assert s["comm/control_bytes"] > 0  # loss means, evaluation sums, size exchanges: on the wire, counted
        if name not in ("powersgd-deadline", "blaq-binary"):  # frames: packets, padding, control (an all-reduce sums
            assert s["comm/bytes_up_wire"] >= s["comm/bytes_up"] > 0  # bare fields, so its headers never travel)
    from rayq.telemetry import read_trace

    steps, _ = read_trace(Path(cells["laq-direct-lose"]["run_dir"]) / "trace.jsonl")
    payload = [w for st in steps for w in st.wire if w[4] == "payload"]
    assert payload and {w[0] for w in payload} == {"alltoall"}  # no frame went through a padded all-gather
    assert any(len(set(w[2])) > 1 for w in payload)  # skipping and uploading workers in one round, unpadded
    assert cells["qrda-threshold"]["model/sparsity"] > 0.9  # the l1 dual average keeps the uninformative weights at 0
    assert cells["blaq-binary"]["comm/bits_per_element"] > 2 * 32  # two gradient evaluations, each exchanged


def test_every_codec_trains_digits_to_its_bar(sweep):
    summaries = [s for s in sweep if s["run"].startswith("matrix-")]
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
