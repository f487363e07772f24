"""``rayq bench``: speed and rate-distortion figures, written as JSON, a Markdown table and a plot.

``rayq bench codecs``: every codec on flat vectors of 1 M and 11 M elements (ResNet-18 size), on
Gaussian vectors and on real gradients (ResNet-18, CIFAR stem, on real images), on CPU (``--threads``
torch threads, 1 by default) and on CUDA when available. Per codec: encode and decode throughput
(elements/s, median of repeats after a warm-up; the codec alone, synchronised on the device, wall and
thread CPU time), the packet's serialisation to and from bytes apart, bits per element from the packets'
bytes, and relative distortion ‖C(g)−g‖²/‖g‖². Measured in the same run on the same data: the device's
copy bandwidth (``dst.copy_(x)``), a write to a freshly allocated buffer (page faults included), and one
element-wise pass ``x.abs().sum()``; each codec's throughput as a fraction of that pass, and the bytes it
touches per element (input, packet, output) divided by its time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from compressors import REGISTRY, Codec, Kind, Packet, TensorInfo, make_codec
from compressors.base import ExchangeGen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def real_gradient(numel: int, seed: int = 0) -> torch.Tensor:
    """A real gradient: ResNet-18 (CIFAR stem) on a batch of real images (digits, upsampled to 32×32×3).

    The model has 11.2 M parameters; smaller sizes take its first ``numel`` gradient entries, larger
    ones repeat it.
    """
    import torch.nn.functional as F

    from rayq.tasks import load_digits_split, resnet18_cifar

    torch.manual_seed(seed)
    train, _ = load_digits_split()
    x = train.x[:32].view(-1, 1, 8, 8)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    model = resnet18_cifar()
    F.cross_entropy(model(x), train.y[:32]).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    reps = -(-numel // g.numel())
    return g.repeat(reps)[:numel].clone()


def _matrix_shape(numel: int) -> tuple[int, ...]:
    """A matrix view for low-rank codecs (PowerSGD): 1000 or 1024 columns when one divides the size."""
    for cols in (1000, 1024, 100):
        if numel % cols == 0 and numel >= 2 * cols:
            return (numel // cols, cols)
    return (numel,)


def _single_worker_exchange(codec: Codec, x: torch.Tensor, info: TensorInfo) -> tuple[torch.Tensor, int]:
    """Run a linear codec's (possibly multi-round) exchange as the only worker (the sum is its own
    packet); return the decoded tensor and the bytes of every packet it uploaded."""
    gen: ExchangeGen = codec.exchange(x, info)
    packet, nbytes = next(gen), 0
    while True:
        nbytes += len(packet.to_bytes())
        try:
            packet = gen.send(packet)
        except StopIteration as stop:
            return stop.value, nbytes


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds (synchronised on ``device``) and this thread's CPU seconds."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0, time.thread_time() - c0


def reference(x: torch.Tensor, repeat: int) -> dict[str, float]:
    """The device's own figures on ``x``: copy bandwidth (bytes read + written per second), a write to a
    fresh buffer, and one element-wise pass ``x.abs().sum()`` (elements per second); medians."""
    device, n, size = x.device, x.numel(), x.element_size()
    dst = torch.empty_like(x)
    figures: dict[str, list[float]] = {"copy": [], "fresh": [], "pass": []}
    for i in range(repeat + 1):
        for key, fn in (("copy", lambda: dst.copy_(x)), ("fresh", lambda: torch.empty_like(x).fill_(1.0)),
                        ("pass", lambda: x.abs().sum())):
            _, wall, _ = _timed(fn, device)
            if i:
                figures[key].append(wall)
    copy, fresh, elementwise = (statistics.median(figures[k]) for k in ("copy", "fresh", "pass"))
    return {"copy_bytes_per_s": 2 * size * n / copy, "fresh_write_bytes_per_s": size * n / fresh,
            "elementwise_elems_per_s": n / elementwise}


def bench_codec(name: str, params: dict[str, Any], x: torch.Tensor, repeat: int) -> dict[str, Any]:
    codec = make_codec(name, params)
    info = TensorInfo("bench", _matrix_shape(x.numel()), seed=1)
    device, n = x.device, x.numel()
    multi_round = codec.kind is Kind.LINEAR and type(codec).exchange is not Codec.exchange
    times: dict[str, list[float]] = {k: [] for k in ("encode", "decode", "encode_cpu", "decode_cpu", "serialize", "parse")}
    for i in range(repeat + 1):  # the first run warms up caches, kernels and lazily built tables
        info_i = TensorInfo(info.name, info.shape, seed=1, step=i)
        if multi_round:
            (decoded, nbytes), enc, enc_cpu = _timed(lambda: _single_worker_exchange(codec, x, info_i), device)
            dec = dec_cpu = ser = par = float("nan")
        else:
            packet, enc, enc_cpu = _timed(lambda: codec.encode(x, info_i), device)
            data, ser, _ = _timed(packet.to_bytes, device)
            back, par, _ = _timed(lambda: Packet.from_bytes(data).to(device), device)
            decoded, dec, dec_cpu = _timed(lambda: codec.decode(back, info_i), device)
            nbytes = len(data)
        if i:
            for key, value in zip(times, (enc, dec, enc_cpu, dec_cpu, ser, par)):
                times[key].append(value)
    err = float(((decoded.double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
    t = {k: statistics.median(v) for k, v in times.items()}

    def rate(seconds: float) -> float | None:
        return n / seconds if seconds > 0 else None   # NaN (not measured) is not > 0

    touched = x.element_size() * n + nbytes + (0 if multi_round else 4 * n)   # input, packet, fp32 output
    return {
        "codec": name, "params": params, "kind": codec.kind.value, "numel": n,
        "bits_per_element": 8.0 * nbytes / n, "bytes": nbytes,
        "encode_elems_per_s": rate(t["encode"]),
        "decode_elems_per_s": None if multi_round else rate(t["decode"]),
        "encode_s": t["encode"], "decode_s": None if multi_round else t["decode"],
        "encode_cpu_s": t["encode_cpu"], "decode_cpu_s": None if multi_round else t["decode_cpu"],
        "serialize_s": None if multi_round else t["serialize"], "parse_s": None if multi_round else t["parse"],
        "bytes_per_s": touched / (t["encode"] + (0 if multi_round else t["decode"])),
        "distortion": err, "protocol": "multi-round exchange (encode = whole exchange)" if multi_round else "packet",
    }


def run_codecs(sizes: list[int], devices: list[str], codecs: list[str], repeat: int, data: list[str],
               on_row: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Every codec on every (device, data, size), and the device's reference figures for each (device, size);
    ``on_row`` sees each result as soon as it is measured."""
    rows, refs = [], []
    cache: dict[tuple[str, int], torch.Tensor] = {}
    for kind in data:
        for n in sizes:
            cache[(kind, n)] = real_gradient(n) if kind == "gradient" else torch.randn(
                n, generator=torch.Generator().manual_seed(n))
    for device in devices:
        for n in sizes:
            ref = reference(cache[(data[0], n)].to(device), repeat)
            refs.append({"device": device, "numel": n, **ref})
            for kind in data:
                x = cache[(kind, n)].to(device)
                for name in codecs:
                    row = bench_codec(name, {}, x, repeat)
                    row.update(device=device, data=kind)
                    for way in ("encode", "decode"):
                        r = row[f"{way}_elems_per_s"]
                        row[f"{way}_fraction_of_pass"] = r / ref["elementwise_elems_per_s"] if r else None
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows, refs


def codec_line(row: dict[str, Any]) -> str:
    """One measured codec as a progress line."""
    return (f"  {row['device']:4} {row['data']:8} {row['numel']:>11,} {row['codec']:10} "
            f"{row['bits_per_element']:7.3f} bits/elem  enc {_rate(row['encode_elems_per_s']):>10}  "
            f"dec {_rate(row['decode_elems_per_s']):>10}  distortion {row['distortion']:.4g}")


def _rate(r: float | None, unit: str = "/s") -> str:
    if r is None:
        return "-"
    for prefix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if r >= div:
            return f"{r / div:.2f} {prefix}{unit}"
    return f"{r:.0f} {unit}"


def _fraction(f: float | None) -> str:
    return "-" if f is None else f"{f:.2f}"


def codecs_markdown(rows: list[dict], refs: list[dict]) -> str:
    """The reference figures of each (device, size), then one line per codec."""
    lines = ["| device | elements | copy | fresh write | element-wise pass x.abs().sum() |", "|---|---:|---:|---:|---:|"]
    for r in refs:
        lines.append(f"| {r['device']} | {r['numel']:,} | {_rate(r['copy_bytes_per_s'], 'B/s')} | "
                     f"{_rate(r['fresh_write_bytes_per_s'], 'B/s')} | {_rate(r['elementwise_elems_per_s'])} |")
    lines += ["", "| device | data | elements | codec | kind | bits/elem | ratio | encode | decode | "
              "enc / pass | dec / pass | bytes touched / time | serialize | distortion |",
              "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ser = "-" if r["serialize_s"] is None else f"{1e3 * (r['serialize_s'] + r['parse_s']):.1f} ms"
        lines.append(f"| {r['device']} | {r['data']} | {r['numel']:,} | {r['codec']} | {r['kind']} | "
                     f"{r['bits_per_element']:.3f} | {32 / r['bits_per_element']:.1f}x | "
                     f"{_rate(r['encode_elems_per_s'])} | {_rate(r['decode_elems_per_s'])} | "
                     f"{_fraction(r['encode_fraction_of_pass'])} | {_fraction(r['decode_fraction_of_pass'])} | "
                     f"{_rate(r['bytes_per_s'], 'B/s')} | {ser} | {r['distortion']:.3g} |")
    return "\n".join(lines)


def plot_codecs(rows: list[dict], refs: list[dict], data: str, path: Path) -> None:
    """Encode and decode throughput per codec on ``data``, one panel per (device, size), against the
    element-wise pass and the copy rate (elements/s at 8 bytes moved per element) of the same run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(refs), figsize=(6 * len(refs), 0.28 * len(rows) / max(1, len(refs)) + 2.5),
                             squeeze=False)
    for ax, ref in zip(axes[0], refs):
        mine = [r for r in rows if r["device"] == ref["device"] and r["numel"] == ref["numel"] and r["data"] == data]
        y = range(len(mine))
        for offset, way in ((-0.2, "encode"), (0.2, "decode")):
            ax.barh([i + offset for i in y], [(r[f"{way}_elems_per_s"] or 0) / 1e6 for r in mine], height=0.4, label=way)
        ax.axvline(ref["elementwise_elems_per_s"] / 1e6, color="black", ls="--", lw=1, label="x.abs().sum()")
        ax.axvline(ref["copy_bytes_per_s"] / 8 / 1e6, color="grey", ls=":", lw=1, label="copy (fp32)")
        ax.set_yticks(list(y), [r["codec"] for r in mine])
        ax.set_xscale("log")
        ax.set_xlabel("M elements/s")
        ax.set_title(f"{ref['device']}, {ref['numel']:,} elements, {data}")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_model() -> str | None:
    """The CPU's model name (Linux), recorded because float kernels, hence chaotic runs, differ by CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def environment() -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
           platform.machine(), "cpu_model": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "when": datetime.now().isoformat(timespec="seconds"),
           "load_average": os.getloadavg(), "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def cmd_bench_codecs(args: argparse.Namespace) -> int:
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.cuda_only and args.cpu_only:
        print("rayq bench codecs: --cpu-only and --cuda-only exclude each other; give one or neither")
        return 2
    if args.cuda_only and not torch.cuda.is_available():
        print("rayq bench codecs: --cuda-only needs a CUDA device, and torch sees none")
        return 2
    devices = ([] if args.cuda_only else ["cpu"]) + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    codecs = args.codecs.split(",") if args.codecs else list(REGISTRY)
    unknown = [c for c in codecs if c not in REGISTRY]
    if unknown:
        print(f"rayq bench: unknown codec(s) {unknown}; choose from: {', '.join(REGISTRY)}")
        return 2
    data = args.data.split(",")
    out = output_dir(args.out, "codecs")
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        before = environment()
        print(f"rayq bench codecs: sizes {sizes}, devices {devices}, {len(codecs)} codecs, data {data}, "
              f"{args.threads} thread(s), load {before['load_average'][0]:.2f} -> {out}")
        rows, refs = run_codecs(sizes, devices, codecs, args.repeat, data, on_row=lambda r: print(codec_line(r), flush=True))
        env = {**environment(), "load_average_at_start": before["load_average"]}
    finally:
        torch.set_num_threads(threads)
    (out / "codecs.json").write_text(json.dumps({"environment": env, "references": refs, "results": rows}, indent=2))
    table = codecs_markdown(rows, refs)
    (out / "codecs.md").write_text(table + "\n")
    plot_codecs(rows, refs, data[0], out / "codecs.png")
    print(table)
    print(f"load average {env['load_average_at_start'][0]:.2f} at start, {env['load_average'][0]:.2f} at the end")
    print(f"wrote {out / 'codecs.json'}, {out / 'codecs.md'} and {out / 'codecs.png'}")
    return 0


# ---------------------------------------------------------------- end to end: time to accuracy

#: name → config overrides. Every configuration trains the same task; only what crosses the wire differs.
E2E_CONFIGS: dict[str, list[str]] = {
    "dense": ["compression.codec=none"],
    "fp16": ["compression.codec=fp16"],
    "qsgd": ["compression.codec=qsgd"],
    "topk+ef": ["compression.codec=topk", "compression.error_feedback=true"],
    "powersgd": ["compression.codec=powersgd"],
    "rcfed": ["compression.codec=rcfed"],
    # LAQ's skip rule is specified for gradient descent; under momentum its stale aggregate can diverge.
    "laq": ["compression.codec=laq", "sync.schedule=laq", "optimizer.momentum=0", "optimizer.lr=0.2"],
    "local-sgd": ["compression.codec=none", "sync.schedule=periodic", "sync.period=8"],
    "ddp-powersgd-hook": ["trainer=ddp", "ddp.hook=powersgd"],
    # worker 1 computes 5x slower for the whole run; with a deadline of 2x the median step the group stops
    # waiting for it at the barrier (its gradient is left out, it rejoins with the current model)
    "dense+straggler": ["compression.codec=none", "faults.events=[{kind: straggle, worker: 1, factor: 5}]"],
    "dense+straggler+deadline": ["compression.codec=none", "faults.events=[{kind: straggle, worker: 1, factor: 5}]",
                                 "faults.deadline=2"],
}
E2E_PROFILES = ["volunteer-100m", "cloud-1g", "datacenter-10g"]


def curve(trace_path: Path, profile: str, workers: int, seed: int) -> dict[str, Any]:
    """Replay a run's trace on a network profile: accuracy against simulated time and against bits."""
    from rayq.netsim import replay
    from rayq.profiles import load_profile
    from rayq.telemetry import read_trace

    steps, evals = read_trace(trace_path)
    prof = load_profile(profile, workers, seed)
    times = replay(steps, prof.links, prof.speed_factors)
    cumulative, bits = 0, {}
    for s in steps:
        cumulative += sum(sum(w[2]) for w in s.wire) * 8  # w = [kind, rounds, bytes_up, ...]
        bits[s.step] = cumulative
    points = [(times[k], bits[k], k, acc) for k, acc in sorted(evals.items()) if k in times]
    return {"profile": profile, "points": points, "total_sim_s": times[steps[-1].step] if steps else 0.0}


def bytes_per_step(trace_path: Path, workers: int) -> tuple[float, float]:
    """Mean bytes one worker hands to the transport per step: the codecs' payload (padding excluded) and
    everything on the wire (payload, padding, size exchanges, skip flags, state resyncs, evaluation)."""
    from rayq.telemetry import read_trace
    from rayq.transport import Purpose, WireRecord

    steps, _ = read_trace(trace_path)
    payload = wire = 0
    for s in steps:
        for rec in map(WireRecord.from_json, s.wire):
            up = sum(rec.bytes_up)
            wire += up
            if rec.purpose == Purpose.PAYLOAD.value:
                payload += up - sum(rec.pad(w) for w in range(len(rec.bytes_up)))
    n = max(1, len(steps)) * workers
    return payload / n, wire / n


def time_to_target(points: list, target: float) -> tuple[float | None, float | None, int | None]:
    for t, b, k, acc in points:
        if acc >= target:
            return t, b, k
    return None, None, None


def cmd_bench_e2e(args: argparse.Namespace) -> int:
    from rayq.config import load_config
    from rayq.errors import TrainingError
    from rayq.launch.driver import train, train_many

    names = args.configs.split(",") if args.configs else list(E2E_CONFIGS)
    unknown = [n for n in names if n not in E2E_CONFIGS]
    if unknown:
        print(f"rayq bench e2e: unknown configuration(s) {unknown}; choose from: {', '.join(E2E_CONFIGS)}")
        return 2
    profiles = args.profiles.split(",")
    out = output_dir(args.out, "e2e").resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"task={args.task}", f"workers={args.workers}", f"eval_every={args.eval_every}",
              f"report_every={args.eval_every}", "checkpoint_every=0", f"seed={args.seed}"]
    if args.max_steps:
        common.append(f"max_steps={args.max_steps}")
    print(f"rayq bench e2e: {len(names)} configurations on {args.task} with {args.workers} workers, "
          f"profiles {profiles}, target accuracy {args.target} -> {out}")
    cfgs = {name: load_config(None, common + E2E_CONFIGS[name] + list(args.set or []),
                              extra={"name": f"e2e-{name}", "output_dir": str(out / "runs")}) for name in names}
    # Configurations of the sync trainer share one worker group (one Ray Train start-up); others run alone.
    shared = [n for n in names if cfgs[n].trainer == "sync"]
    summaries: dict[str, dict[str, Any] | str] = {}
    if shared:
        print(f"- training {', '.join(shared)} (one worker group, back to back)", flush=True)
        try:
            for n, summary in zip(shared, train_many([cfgs[n] for n in shared])):
                summaries[n] = summary["error"] if "error" in summary else summary
        except TrainingError as err:
            summaries.update({n: str(err) for n in shared})
    for name in names:
        if name not in summaries:
            print(f"- training {name} ({' '.join(E2E_CONFIGS[name])})", flush=True)
            try:
                summaries[name] = train(cfgs[name])
            except TrainingError as err:
                summaries[name] = str(err)
    results = []
    for name in names:
        summary = summaries[name]
        if isinstance(summary, str):
            print(f"  {name} failed: {summary}")
            results.append({"config": name, "error": summary})
            continue
        print(f"- {name}: accuracy {summary['eval/accuracy']:.4f}", flush=True)
        trace = Path(summary["run_dir"]) / "trace.jsonl"
        row: dict[str, Any] = {"config": name, "sets": E2E_CONFIGS[name], "final_accuracy": summary["eval/accuracy"],
                               "steps": summary["step"], "wall_s": summary["wall_s"],
                               "bits_per_element": summary.get("comm/bits_per_element"), "profiles": {}}
        row["payload_bytes_per_step"], row["wire_bytes_per_step"] = bytes_per_step(trace, args.workers)
        for profile in profiles:
            c = curve(trace, profile, args.workers, args.seed)
            t, b, k = time_to_target(c["points"], args.target)
            row["profiles"][profile] = {"time_to_target_s": t, "bits_to_target": b, "step_to_target": k,
                                        "total_sim_s": c["total_sim_s"], "points": c["points"]}
            print(f"  {profile:15} time to {args.target:.2f}: {_fmt_s(t)}  (run: {_fmt_s(c['total_sim_s'])} simulated)")
        results.append(row)
    dense = next((r for r in results if r["config"] == "dense" and "error" not in r), None)
    for r in results:
        if "error" in r or dense is None:
            continue
        for p in profiles:
            td, tr = dense["profiles"][p]["time_to_target_s"], r["profiles"][p]["time_to_target_s"]
            r["profiles"][p]["speedup_vs_dense"] = td / tr if td and tr else None
    meta = {"environment": environment(), "task": args.task, "workers": args.workers, "target": args.target,
            "profiles": profiles, "command": "rayq " + " ".join(args.argv)}
    (out / "e2e.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    table = e2e_markdown(results, profiles, args.target)
    (out / "e2e.md").write_text(table + "\n")
    plot_e2e(results, profiles[0], args.target, out / "e2e.png")
    print(table)
    print(f"wrote {out / 'e2e.json'}, {out / 'e2e.md'} and {out / 'e2e.png'}")
    return 0


def _fmt_s(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.2f} s"


def e2e_markdown(results: list[dict], profiles: list[str], target: float) -> str:
    head = "| configuration | final acc | bits/elem | payload B/step | wire B/step | wall s |" + "".join(
        f" {p}: time to {target:.2f} (speed-up) |" for p in profiles)
    lines = [head, "|---|---:|---:|---:|---:|---:|" + "---:|" * len(profiles)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error'].split(';')[0]} | | | | |" + " |" * len(profiles))
            continue
        cells = []
        for p in profiles:
            pr = r["profiles"][p]
            sp = pr.get("speedup_vs_dense")
            cells.append(f" {_fmt_s(pr['time_to_target_s'])}" + (f" ({sp:.1f}x)" if sp else "") + " |")
        bpe = "-" if r["bits_per_element"] is None else f"{r['bits_per_element']:.2f}"
        lines.append(f"| {r['config']} | {r['final_accuracy']:.4f} | {bpe} | {r['payload_bytes_per_step']:,.0f} | "
                     f"{r['wire_bytes_per_step']:,.0f} | {r['wall_s']:.0f} |" + "".join(cells))
    return "\n".join(lines)


def plot_e2e(results: list[dict], profile: str, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        if "error" in r:
            continue
        pts = r["profiles"][profile]["points"]
        ax1.plot([p[0] for p in pts], [p[3] for p in pts], marker=".", label=r["config"])
        ax2.plot([max(p[1], 1) for p in pts], [p[3] for p in pts], marker=".", label=r["config"])
    for ax, xlabel in ((ax1, f"simulated time on {profile} (s)"), (ax2, "bits uploaded, all workers")):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    if ax1.lines[1:]:  # the target line is always there; a legend needs a run that finished
        ax1.legend(fontsize=8)
    fig.suptitle("rayq bench e2e: accuracy vs simulated time and vs bits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_dir(out: str | None, stem: str) -> Path:
    """Where a bench command writes: ``--out`` if given, else ``bench_out/<stem>-<timestamp>``."""
    return Path(out or f"bench_out/{stem}-{datetime.now():%Y%m%d-%H%M%S}")


def bench_commands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction | None:
    """``rayq bench``'s subcommand table, for the modules that add benchmarks to it; None until
    :func:`add_commands` has made the command (argparse has no public accessor)."""
    bench = sub.choices.get("bench")
    return None if bench is None else next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))


def add_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: codec throughput and rate-distortion, end-to-end time")
    bsub = bench.add_subparsers(dest="bench", required=True)
    p = bsub.add_parser("codecs", help="encode/decode throughput, bits per element, distortion per codec")
    p.add_argument("--sizes", default="1e6,11e6", help="comma-separated element counts (default 1e6,11e6)")
    p.add_argument("--codecs", help="comma-separated codec names (default: all)")
    p.add_argument("--data", default="gaussian,gradient", help="gaussian and/or gradient (ResNet-18, real images)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    p.add_argument("--cuda-only", action="store_true", help="measure on CUDA alone (the CPU rows take most of the time)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while measuring (default 1)")
    p.add_argument("--out", help="output directory (default bench_out/codecs-<time>)")
    p.set_defaults(func=cmd_bench_codecs)

    p = bsub.add_parser("e2e", help="time to target accuracy in simulated seconds on several networks")
    p.add_argument("--task", default="digits-wide", help="task (default digits-wide: communication-bound)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--configs", help=f"comma-separated subset of: {', '.join(E2E_CONFIGS)}")
    p.add_argument("--profiles", default=",".join(E2E_PROFILES), help="network profiles (clusters/*.yaml)")
    p.add_argument("--target", type=float, default=0.95, help="target test accuracy")
    p.add_argument("--eval-every", type=int, default=10, help="evaluation interval in steps (curve resolution)")
    p.add_argument("--max-steps", type=int, help="cap steps per run (default: the task's epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra config override for every run")
    p.add_argument("--out", help="output directory (default bench_out/e2e-<time>)")
    p.set_defaults(func=cmd_bench_e2e)
