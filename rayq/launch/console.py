"""What the CLI prints for a run: progress and event lines while it trains, a summary table at the end."""

from __future__ import annotations

from typing import Any

from rayq.telemetry import event_line


def console_line(m: dict[str, Any]) -> str:
    """What the CLI prints for one item from a run: an event line or a progress line."""
    return event_line(m) if "event" in m else progress_line(m, m["total_steps"])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def progress_line(m: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {m['step']:>{len(str(total_steps))}}/{total_steps}", f"epoch {m.get('epoch', 0):.2f}",
             f"loss {m.get('train/loss', float('nan')):.4f}"]
    if "eval/accuracy" in m:
        parts.append(f"acc {m['eval/accuracy']:.4f}")
    parts.append(f"{m.get('comm/bits_per_element', 0):.2f} bits/elem")
    parts.append(f"x{m.get('comm/compression_ratio', 0):.1f}")
    parts.append(f"{m.get('time/step_s', 0) * 1000:.1f} ms/step")
    if "volunteer/alive" in m:
        parts.append(f"{m['volunteer/alive']:.0f}/{m.get('volunteer/peers', 0):.0f} peers")
    if "sim/time_s" in m:
        parts.append(f"sim {m['sim/time_s']:.1f} s")
    if m.get("faults/stragglers"):
        parts.append(f"{m['faults/stragglers']:.0f} straggling")
    return "  ".join(parts)


def table(rows: list[tuple[str, str]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [title] if title else []
    out.append(line)
    for k, v in rows:
        out.append(f"| {k:<{width}} | {v:<{vwidth}} |")
    out.append(line)
    return "\n".join(out)


def summary_table(result: dict[str, Any]) -> str:
    rows = [
        ("run", str(result["run"])),
        ("task / codec", f"{result['task']} / {result['codec']}"),
        ("workers", str(result["workers"])),
        ("test accuracy", f"{result['eval/accuracy']:.4f}"),
        ("test loss", f"{result['eval/loss']:.4f}"),
        ("train loss", f"{result['train/loss']:.4f}"),
        ("steps", str(result["step"])),
        ("bits per element", f"{result['comm/bits_per_element']:.3f}"),
        ("compression ratio", f"{result['comm/compression_ratio']:.1f}x"),
        ("bytes sent (rank 0: the server)" if "comm/bytes_up_all_workers_total" in result
         else "bytes sent (per worker)", human_bytes(result["comm/bytes_up_total"])),
        ("bytes sent (all workers)", human_bytes(result.get("comm/bytes_up_all_workers_total",
                                                            result["comm/bytes_up_total"] * result["workers"]))),
        ("wall time", f"{result['wall_s']:.1f} s"),
        *privacy_rows(result),
        *fault_rows(result),
        ("tensorboard", f"tensorboard --logdir {result['tensorboard']}"),
        ("checkpoints", str(result["checkpoint"] or "(none)")),
    ]
    return table(rows, title="rayq summary")


def privacy_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary rows of what the run's privacy figures say, for the figures the run has."""
    rows = []
    if "privacy/loss_auc" in result:
        rows += [("train - test accuracy gap", f"{result['privacy/train_test_gap']:+.4f}"),
                 ("membership: correctness attack", f"{result['privacy/correctness_attack_acc']:.4f} (0.5 = chance)"),
                 ("membership: loss attack AUC", f"{result['privacy/loss_auc']:.4f} "
                                                 f"(TPR {result['privacy/tpr_at_1pct_fpr']:.3f} at 1% FPR)")]
    if "split/train_dcor" in result:
        rows.append(("NoPeek dCor(X, Z) in training", f"{result['split/train_dcor']:.4f}"))
    if "privacy/decoder_ssim" in result:
        rows += [("decoder attack Z -> X: SSIM", f"{result['privacy/decoder_ssim']:.4f}"),
                 ("decoder attack Z -> X: PSNR", f"{result['privacy/decoder_psnr']:.2f} dB"),
                 ("dCor² (bias-corrected) of X, Z", f"{result['privacy/dcor']:.4f} "
                                                    f"(on {result.get('privacy/decoder_samples', 0):.0f} test images)")]
    return rows


def fault_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary rows of volunteer mode and fault injection, for the figures the run has."""
    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    def secs(x: float) -> str:
        return f"{x:.1f} s"

    spec = [
        ("sim/time_s", "simulated time", secs),
        ("sim/time_to_accuracy_s", "time to accuracy (simulated)", secs),
        ("volunteer/alive", "alive peers (end / min / mean)", None),
        ("volunteer/samples_per_s", "samples per second (simulated)", lambda x: f"{x:.1f}"),
        ("volunteer/utilisation", "utilisation (useful compute / online)", pct),
        ("volunteer/wasted_samples", "wasted samples", lambda x: f"{x:.0f}"),
        ("volunteer/staleness_mean", "staleness of state downloads (rounds)", lambda x: f"{x:.2f}"),
        ("recovery/lost_s", "time lost to recovery", secs),
        ("recovery/sim_lost_s", "time lost to recovery (simulated)", secs),
        ("faults/dropped_payloads", "dropped payloads", lambda x: f"{x:.0f}"),
    ]
    rows = []
    for key, label, fmt in spec:
        if key not in result or result[key] is None:
            continue
        if key == "sim/time_to_accuracy_s":
            target = result.get("volunteer/target_accuracy")
            label = f"time to accuracy {target:.2f} (simulated)" if target else label
        if key == "volunteer/alive":
            value = f"{result[key]:.0f} / {result.get('volunteer/alive_min', 0):.0f} / " \
                    f"{result.get('volunteer/alive_mean', 0):.1f} of {result.get('volunteer/peers', 0):.0f}"
        elif key == "volunteer/wasted_samples":
            value = f"{result[key]:.0f} ({pct(result.get('volunteer/wasted_fraction', 0))})"
        else:
            value = fmt(result[key])  # type: ignore[misc]
        rows.append((label, value))
    if "volunteer/target_accuracy" in result and "sim/time_to_accuracy_s" not in result:
        rows.insert(1, (f"time to accuracy {result['volunteer/target_accuracy']:.2f} (simulated)", "not reached"))
    if result.get("faults/events"):
        rows.append(("fault events", str(result["faults/events"])))
    return rows
