"""`rayq bench codecs` runs on a small size and its figures are sane (speed itself is not asserted)."""

from __future__ import annotations

import json
import math

import torch

import compressors
from rayq.launch.cli import main


def test_bench_codecs_writes_json_markdown_and_plot_with_sane_figures(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "codecs", "--sizes", "20000", "--repeat", "1", "--cpu-only", "--out", str(out)]) == 0
    report = json.loads((out / "codecs.json").read_text())
    rows, refs = report["results"], report["references"]
    assert report["environment"]["threads"] == 1 and len(report["environment"]["load_average"]) == 3
    # which vector kernels ran (results differ in their last bits between them)
    assert report["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {r["codec"] for r in rows} == set(compressors.REGISTRY)
    assert {r["data"] for r in rows} == {"gaussian", "gradient"}
    assert [(r["device"], r["numel"]) for r in refs] == [("cpu", 20000)]
    ref = refs[0]
    assert ref["copy_bytes_per_s"] > 1e7 and ref["fresh_write_bytes_per_s"] > 1e6 and ref["elementwise_elems_per_s"] > 1e6
    by = {(r["codec"], r["data"]): r for r in rows}
    for data in ("gaussian", "gradient"):
        assert by[("none", data)]["distortion"] == 0.0
        assert 32 < by[("none", data)]["bits_per_element"] < 32.1
        assert 16 < by[("fp16", data)]["bits_per_element"] < 16.1
        assert by[("fp16", data)]["distortion"] < 1e-6
        assert by[("powersgd", data)]["bits_per_element"] < 4  # rank 2 on a 20×1000 matrix: ~2.1 bits
        assert by[("powersgd", data)]["decode_elems_per_s"] is None  # multi-round: the exchange is timed whole
    for r in rows:
        assert 0 < r["bits_per_element"] < 40, r
        assert r["bytes"] == round(r["bits_per_element"] * r["numel"] / 8)
        assert r["encode_elems_per_s"] and r["encode_elems_per_s"] > 0
        assert r["encode_fraction_of_pass"] == r["encode_elems_per_s"] / ref["elementwise_elems_per_s"]
        assert r["encode_cpu_s"] >= 0 and r["bytes_per_s"] > 0
        if r["protocol"] == "packet":
            assert r["decode_elems_per_s"] > 0 and r["serialize_s"] > 0 and r["parse_s"] > 0
        assert math.isfinite(r["distortion"]) and r["distortion"] >= 0
    md = (out / "codecs.md").read_text()
    references, codecs = md.split("\n\n")
    assert references.count("\n") == len(refs) + 1 and codecs.count("\n") == len(rows) + 2
    assert "| cpu | gaussian | 20,000 | qsgd |" in codecs and "| cpu | 20,000 |" in references
    assert (out / "codecs.png").stat().st_size > 10_000


def test_bench_e2e_replays_one_run_per_configuration_on_each_network(ray_session, tmp_path):
    out = tmp_path / "e2e"
    argv = ["bench", "e2e", "--task", "digits-wide", "--configs", "dense,qsgd,ddp-powersgd-hook", "--workers", "2", "--max-steps", "40",
            "--eval-every", "10", "--target", "0.5", "--profiles", "volunteer-100m,datacenter-10g", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "e2e.json").read_text())
    rows = {r["config"]: r for r in data["results"]}
    assert set(rows) == {"dense", "qsgd", "ddp-powersgd-hook"} and data["command"].startswith("rayq bench e2e")
    assert "error" not in rows["ddp-powersgd-hook"]  # PyTorch's own PowerSGD hook, bytes counted from its tensors
    assert 32 < rows["dense"]["bits_per_element"] < 33 and rows["qsgd"]["bits_per_element"] < 8
    params = 64 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10   # digits-wide's MLP
    assert 4 * params <= rows["dense"]["payload_bytes_per_step"] < 4.04 * params  # fp32 plus headers
    assert rows["dense"]["wire_bytes_per_step"] >= rows["dense"]["payload_bytes_per_step"]
    # a gather codec's frames differ in length: the size exchange (and any padding) is on the wire too
    assert rows["qsgd"]["wire_bytes_per_step"] > rows["qsgd"]["payload_bytes_per_step"] > 0
    for r in (rows["dense"], rows["qsgd"]):
        slow, fast = r["profiles"]["volunteer-100m"], r["profiles"]["datacenter-10g"]
        assert slow["total_sim_s"] > fast["total_sim_s"] > 0  # same steps, slower network
        assert [p[2] for p in slow["points"]] == [10, 20, 30, 40]
    # 1.1 M parameters at 100 Mb/s: the dense run spends longer on the wire than the 8× smaller QSGD run
    assert rows["dense"]["profiles"]["volunteer-100m"]["total_sim_s"] > rows["qsgd"]["profiles"]["volunteer-100m"]["total_sim_s"]
    assert (out / "e2e.png").stat().st_size > 10_000 and "| dense |" in (out / "e2e.md").read_text()


def test_bench_codecs_cuda_only_excludes_cpu_only_and_needs_cuda(tmp_path, capsys):
    import torch

    assert main(["bench", "codecs", "--cuda-only", "--cpu-only", "--out", str(tmp_path)]) == 2
    assert "exclude each other" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["bench", "codecs", "--cuda-only", "--out", str(tmp_path)]) == 2
        assert "--cuda-only needs a CUDA device" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_bench_overhead_times_rayq_and_ddp_in_one_worker_group(ray_session, tmp_path):
    out = tmp_path / "overhead"
    runs = ["ddp-allreduce", "rayq-none", "rayq-none-overlap", "rayq-qsgd"]
    argv = ["bench", "overhead", "--task", "digits", "--workers", "2", "--steps", "10", "--skip", "2",
            "--runs", ",".join(runs), "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "overhead.json").read_text())
    rows = {r["run"]: r for r in data["rows"]}
    assert list(rows) == runs and (data["task"], data["workers"], data["steps"]) == ("digits", 2, 10)
    for r in rows.values():
        assert r["steps"] == 8 and r["step_ms_p10"] <= r["step_ms"] <= r["step_ms_p90"], r
        assert r["compute_ms"] > 0 and r["exposed_comm_ms"] >= 0 and r["encode_ms"] >= 0 and r["decode_ms"] >= 0
    assert rows["rayq-qsgd"]["encode_ms"] > 0 and rows["rayq-qsgd"]["decode_ms"] > 0  # stages timed per step
    md = (out / "overhead.md").read_text()
    assert md.count("\n") == len(runs) + 2 and "| 1.000 |" in md.splitlines()[2]  # DDP's row is the base
    assert (out / "overhead.png").stat().st_size > 10_000
    assert main(["bench", "overhead", "--runs", "rayq-none,bogus", "--out", str(tmp_path / "x")]) == 2


def test_bench_schedules_matches_cpsgd_to_adpsgd_syncs_over_seeds(tmp_path, capsys):
    out = tmp_path / "schedules"
    argv = ["bench", "schedules", "--codecs", "none;qsgd:levels=3", "--seeds", "2", "--steps", "24", "--workers", "2",
            "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "schedules.json").read_text())
    assert [(r["codec"], r["seed"], r["schedule"]) for r in rows] == [
        (c, s, k) for c in ("none", "qsgd") for s in (0, 1) for k in ("adaptive", "periodic")]
    for adaptive, periodic in zip(rows[::2], rows[1::2]):
        assert periodic["period"] == max(1, round(24 / adaptive["syncs"]))  # the same sync budget
        assert abs(periodic["syncs"] - adaptive["syncs"]) <= max(2, adaptive["syncs"] // 4)
        for r in (adaptive, periodic):
            assert math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 and r["bytes_up"] > 0
    none_bytes = sum(r["bytes_up"] / r["syncs"] for r in rows if r["codec"] == "none")
    qsgd_bytes = sum(r["bytes_up"] / r["syncs"] for r in rows if r["codec"] == "qsgd")
    assert qsgd_bytes < none_bytes / 4  # 3 levels: 3 bits per element against 32
    md = (out / "schedules.md").read_text()
    assert md.count("\n") == 2 + 4 and "| qsgd | ADPSGD" in md
    capsys.readouterr()
    assert main(["bench", "schedules", "--codecs", "none;qsgd:levels", "--out", str(out)]) == 2
    assert main(["bench", "schedules", "--codecs", "qsgd:level=3", "--out", str(out)]) == 2
    said = capsys.readouterr().out
    assert "'levels' in 'qsgd:levels' is not key=value" in said and "compression.params.level" in said
