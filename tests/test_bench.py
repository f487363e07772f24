"""`rayq bench codecs` runs on a small size and its figures are sane (speed itself is not asserted)."""

from __future__ import annotations

import json
import math

import compressors
from rayq.launch.cli import main


def test_bench_codecs_writes_json_markdown_and_plot_with_sane_figures(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "codecs", "--sizes", "20000", "--repeat", "1", "--cpu-only", "--out", str(out)]) == 0
    report = json.loads((out / "codecs.json").read_text())
    rows, refs = report["results"], report["references"]
    assert report["environment"]["threads"] == 1 and len(report["environment"]["load_average"]) == 3
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
