"""``rayq bench``: speed and rate-distortion figures, written as JSON and a Markdown table.

``rayq bench codecs``: every codec on flat vectors of 1 M and 11 M elements (ResNet-18 size), on
Gaussian vectors and on real gradients (ResNet-18, CIFAR stem, on real images), on CPU and on CUDA when
available: encode and decode throughput (elements/s, median of repeats after a warm-up), bits per element
from the packets' bytes, and relative distortion ‖C(g)−g‖²/‖g‖².
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from compressors import REGISTRY, Codec, Kind, TensorInfo, make_codec
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


def bench_codec(name: str, params: dict[str, Any], x: torch.Tensor, repeat: int) -> dict[str, Any]:
    codec = make_codec(name, params)
    info = TensorInfo("bench", _matrix_shape(x.numel()), seed=1)
    device = x.device
    multi_round = codec.kind is Kind.LINEAR and type(codec).exchange is not Codec.exchange
    enc_t, dec_t = [], []
    for i in range(repeat + 1):  # the first run warms up caches, kernels and lazily built tables
        info_i = TensorInfo(info.name, info.shape, seed=1, step=i)
        _sync(device)
        t0 = time.perf_counter()
        if multi_round:
            decoded, nbytes = _single_worker_exchange(codec, x, info_i)
            _sync(device)
            t1 = t2 = time.perf_counter()
        else:
            packet = codec.encode(x, info_i)
            data = packet.to_bytes()
            _sync(device)
            t1 = time.perf_counter()
            decoded = codec.decode(type(packet).from_bytes(data).to(device), info_i)
            _sync(device)
            t2 = time.perf_counter()
            nbytes = len(data)
        if i:
            enc_t.append(t1 - t0)
            dec_t.append(t2 - t1)
    err = float(((decoded.double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
    enc, dec = statistics.median(enc_t), statistics.median(dec_t)
    return {
        "codec": name, "params": params, "kind": codec.kind.value, "numel": x.numel(),
        "bits_per_element": 8.0 * nbytes / x.numel(), "bytes": nbytes,
        "encode_elems_per_s": x.numel() / enc if enc > 0 else None,
        "decode_elems_per_s": (x.numel() / dec if dec > 0 else None) if not multi_round else None,
        "encode_s": enc, "decode_s": dec if not multi_round else None,
        "distortion": err, "protocol": "multi-round exchange (encode = whole exchange)" if multi_round else "packet",
    }


def run_codecs(sizes: list[int], devices: list[str], codecs: list[str], repeat: int, data: list[str]) -> list[dict]:
    rows = []
    cache: dict[tuple[str, int], torch.Tensor] = {}
    for kind in data:
        for n in sizes:
            cache[(kind, n)] = real_gradient(n) if kind == "gradient" else torch.randn(
                n, generator=torch.Generator().manual_seed(n))
    for device in devices:
        for kind in data:
            for n in sizes:
                x = cache[(kind, n)].to(device)
                for name in codecs:
                    row = bench_codec(name, {}, x, repeat)
                    row.update(device=device, data=kind)
                    rows.append(row)
                    print(f"  {device:4} {kind:8} {n:>9,} {name:10} {row['bits_per_element']:7.3f} bits/elem  "
                          f"enc {_rate(row['encode_elems_per_s']):>10}  dec {_rate(row['decode_elems_per_s']):>10}  "
                          f"distortion {row['distortion']:.4g}", flush=True)
    return rows


def _rate(r: float | None) -> str:
    if r is None:
        return "-"
    for unit, div in (("G/s", 1e9), ("M/s", 1e6), ("k/s", 1e3)):
        if r >= div:
            return f"{r / div:.2f} {unit}"
    return f"{r:.0f} /s"


def codecs_markdown(rows: list[dict]) -> str:
    lines = ["| device | data | elements | codec | kind | bits/elem | ratio | encode | decode | distortion |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['data']} | {r['numel']:,} | {r['codec']} | {r['kind']} | "
                     f"{r['bits_per_element']:.3f} | {32 / r['bits_per_element']:.1f}x | "
                     f"{_rate(r['encode_elems_per_s'])} | {_rate(r['decode_elems_per_s'])} | {r['distortion']:.3g} |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
           platform.machine(), "threads": torch.get_num_threads(), "when": datetime.now().isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def cmd_bench_codecs(args: argparse.Namespace) -> int:
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    codecs = args.codecs.split(",") if args.codecs else list(REGISTRY)
    unknown = [c for c in codecs if c not in REGISTRY]
    if unknown:
        print(f"rayq bench: unknown codec(s) {unknown}; choose from: {', '.join(REGISTRY)}")
        return 2
    data = args.data.split(",")
    out = Path(args.out or f"bench_out/codecs-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"rayq bench codecs: sizes {sizes}, devices {devices}, {len(codecs)} codecs, data {data} -> {out}")
    rows = run_codecs(sizes, devices, codecs, args.repeat, data)
    (out / "codecs.json").write_text(json.dumps({"environment": environment(), "results": rows}, indent=2))
    table = codecs_markdown(rows)
    (out / "codecs.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'codecs.json'} and {out / 'codecs.md'}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: codec throughput and rate-distortion, end-to-end time")
    bsub = bench.add_subparsers(dest="bench", required=True)
    p = bsub.add_parser("codecs", help="encode/decode throughput, bits per element, distortion per codec")
    p.add_argument("--sizes", default="1e6,11e6", help="comma-separated element counts (default 1e6,11e6)")
    p.add_argument("--codecs", help="comma-separated codec names (default: all)")
    p.add_argument("--data", default="gaussian,gradient", help="gaussian and/or gradient (ResNet-18, real images)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    p.add_argument("--out", help="output directory (default bench_out/codecs-<time>)")
    p.set_defaults(func=cmd_bench_codecs)
