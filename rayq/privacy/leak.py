"""The leakage experiment: how much of a worker's batch can be rebuilt from its compressed update.

For each trial a fresh victim (weights U(−0.5, 0.5)) takes a batch of real training images; its
gradient goes through every codec spec on the real wire (:mod:`rayq.privacy.wire`), and each attack
(DLG, Inverting Gradients, the analytic FC inversion) tries to rebuild the batch from what came off
the wire, as a compressor-aware and as an adaptive attacker. Reported per codec, attack and
attacker: PSNR/SSIM of every image, label accuracy, bits per coordinate from the bytes, final
matching loss and closure calls: the PSNR/SSIM-vs-bits curve of compressed-update leakage.
"""

from __future__ import annotations

import enum
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from compressors.base import mix_seed
from rayq.privacy.attacks import (
    AttackResult, DLGBudget, Distance, GradientObjective, IGBudget, Knowledge, analytic_fc_inversion, dlg, idlg_labels,
    inverting_gradients,
)
from rayq.privacy.metrics import Normalization, is_success, label_accuracy, score_images
from rayq.privacy.victims import InputSpec, VictimKind, batch_gradient, build_victim
from rayq.privacy.wire import (
    INNOVATION_CODECS, CodecSpec, ErrorFeedbackMode, LayerRule, RandomPrecision, WireCapture, capture,
)

log = logging.getLogger(__name__)

_DATA_PURPOSE, _VICTIM_PURPOSE, _ATTACK_PURPOSE = 0x44415441, 0x5649434D, 0x41545443


class AttackName(str, enum.Enum):
    DLG = "dlg"
    IG = "ig"
    ANALYTIC = "analytic"


class LabelSource(str, enum.Enum):
    IDLG = "idlg"            # recovered from the observed last-layer gradient
    OPTIMISE = "optimise"    # DLG optimises soft labels jointly (IG then falls back to iDLG)
    TRUE = "true"            # the attacker is told the labels


def default_codecs() -> tuple[CodecSpec, ...]:
    """A small default sweep: fp32, fp16, 8/4/2-bit integers, top-1% and signs."""
    return (CodecSpec.of("none"), CodecSpec.of("fp16"), CodecSpec.of("int8", bits=8), CodecSpec.of("int8", bits=4),
            CodecSpec.of("int8", bits=2), CodecSpec.of("topk", density=0.01), CodecSpec.of("sign"))


def report_codecs() -> tuple[CodecSpec, ...]:
    """The full sweep: every family of codec, error feedback at its first and a steady-state round,
    a fixed mixed-precision pattern (first and last layers at 2 bits with per-channel scales) and a
    per-round random precision."""
    mixed = CodecSpec(codec="int8", params=(("bits", 8),), label="mixed(first+last 2b per-channel, rest 8b)",
                      rules=(LayerRule("0.*", "int8", (("bits", 2),), per_channel=True),
                             LayerRule("7.*", "int8", (("bits", 2),), per_channel=True)))
    return (CodecSpec.of("none"), CodecSpec.of("fp16"), CodecSpec.of("int8", bits=8), CodecSpec.of("int8", bits=4),
            CodecSpec.of("int8", bits=2), CodecSpec.of("qsgd"), CodecSpec.of("topk", density=0.01),
            CodecSpec.of("topk", density=0.01, error_feedback="first"),
            CodecSpec.of("topk", density=0.01, error_feedback="steady"), CodecSpec.of("sign"),
            CodecSpec.of("powersgd"), CodecSpec.of("rcfed"), mixed,
            CodecSpec(random_precision=RandomPrecision(bits=(2, 4, 8, 16), seed=0),
                      label="random-precision(2/4/8/16b)"))


@dataclass(frozen=True)
class LeakConfig:
    """One leakage experiment. ``trials`` independent victims and batches of ``batch_size`` images."""

    task: str = "digits"
    victim: VictimKind = VictimKind.LENET
    codecs: tuple[CodecSpec, ...] = field(default_factory=default_codecs)
    attacks: tuple[AttackName, ...] = (AttackName.DLG, AttackName.IG)
    knowledge: tuple[Knowledge, ...] = (Knowledge.AWARE, Knowledge.ADAPTIVE)
    labels: LabelSource = LabelSource.IDLG
    trials: int = 2
    batch_size: int = 1
    dlg: DLGBudget = DLGBudget(steps=30, max_iter=20, restarts=2)
    ig: IGBudget = IGBudget(iterations=300, restarts=1, tv=1e-4)
    step: int = 10
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "victim", VictimKind(self.victim))
        object.__setattr__(self, "attacks", tuple(AttackName(a) for a in self.attacks))
        object.__setattr__(self, "knowledge", tuple(Knowledge(k) for k in self.knowledge))
        object.__setattr__(self, "labels", LabelSource(self.labels))
        object.__setattr__(self, "codecs", tuple(self.codecs))
        if self.task not in IMAGE_TASKS:
            raise ValueError(f"task={self.task!r} has no image data for the leak experiment; "
                             f"choose one of: {', '.join(IMAGE_TASKS)}")
        if not self.codecs or not self.attacks or not self.knowledge:
            raise ValueError("the leak experiment needs at least one codec, one attack and one attacker knowledge")
        if self.trials < 1 or self.batch_size < 1:
            raise ValueError(f"trials={self.trials} and batch_size={self.batch_size} must be >= 1")
        if self.batch_size > 10:
            raise ValueError(f"batch_size={self.batch_size} must be <= 10 (iDLG recovers at most one label per class)")
        if AttackName.ANALYTIC in self.attacks and (self.victim is not VictimKind.MLP or self.batch_size != 1):
            raise ValueError(f"attack 'analytic' inverts the first fully-connected layer of one sample: it needs "
                             f"victim='mlp' and batch_size=1, got victim={self.victim.value!r}, "
                             f"batch_size={self.batch_size}")
        names = [s.name for s in self.codecs]
        if len(set(names)) != len(names):
            raise ValueError(f"codec specs must have distinct names (set ``label``); got {names}")


@dataclass(frozen=True)
class ImageData:
    """A task's training images in model space, with what maps them back to pixels."""

    x: torch.Tensor
    y: torch.Tensor
    spec: InputSpec
    norm: Normalization


def _digits(data_dir: str | None) -> ImageData:
    from rayq.tasks import load_digits_split

    train, _ = load_digits_split(data_dir)
    return ImageData(train.x.reshape(-1, 1, 8, 8), train.y, InputSpec(1, 8, 8, 10), Normalization(0.0, 1.0))


def _idx_images(loader_name: str):
    def load(data_dir: str | None) -> ImageData:
        from rayq import tasks

        train, _ = getattr(tasks, loader_name)(data_dir)
        return ImageData(train.x, train.y, InputSpec(1, 28, 28, 10), Normalization(0.5, 0.5))

    return load


#: Tasks with grey images: digits (pixels in [0, 1]) and the 28×28 IDX sets ((p − 0.5)/0.5).
IMAGE_TASKS = {"digits": _digits, "digits-wide": _digits, "fashion-mnist": _idx_images("load_fashion_mnist"),
               "mnist": _idx_images("load_mnist")}


#: How each image task's samples map to pictures: (layout, normalisation). Digits are flat 64-vectors in the runs.
IMAGE_FORMATS: dict[str, tuple[InputSpec, Normalization]] = {
    **{t: (InputSpec(1, 8, 8, 10), Normalization(0.0, 1.0)) for t in ("digits", "digits-wide", "digits-gelu")},
    **{t: (InputSpec(1, 28, 28, 10), Normalization(0.5, 0.5)) for t in ("fashion-mnist", "mnist")},
}


def load_images(task: str, data_dir: str | None = None) -> ImageData:
    if task not in IMAGE_TASKS:
        raise ValueError(f"task={task!r} has no image data for the leak experiment; "
                         f"choose one of: {', '.join(IMAGE_TASKS)}")
    return IMAGE_TASKS[task](data_dir)


@dataclass(frozen=True, eq=False)
class LeakRow:
    """One (codec, attack, attacker) cell over all trials; ``images`` are the matched reconstructions in pixels."""

    codec: str
    attack: AttackName
    knowledge: Knowledge
    bits_per_coordinate: float
    psnr: tuple[float, ...]
    ssim: tuple[float, ...]
    label_accuracy: float
    losses: tuple[float, ...]
    iterations: tuple[int, ...]
    restarts: int
    seconds: float
    images: torch.Tensor

    @property
    def success(self) -> tuple[bool, ...]:
        return tuple(is_success(p, s) for p, s in zip(self.psnr, self.ssim))

    @property
    def success_rate(self) -> float:
        return sum(self.success) / len(self.success)

    @property
    def psnr_median(self) -> float:
        return statistics.median(self.psnr)

    @property
    def ssim_median(self) -> float:
        return statistics.median(self.ssim)


@dataclass(frozen=True, eq=False)
class LeakReport:
    config: LeakConfig
    truth: torch.Tensor           # all trials' true images in pixels, (trials·batch, C, H, W)
    labels: torch.Tensor
    rows: tuple[LeakRow, ...]
    seconds: float

    def row(self, codec: str, attack: AttackName | str, knowledge: Knowledge | str) -> LeakRow:
        attack, knowledge = AttackName(attack), Knowledge(knowledge)
        for r in self.rows:
            if r.codec == codec and r.attack is attack and r.knowledge is knowledge:
                return r
        raise KeyError(f"no result for codec={codec!r}, attack={attack.value!r}, knowledge={knowledge.value!r}; "
                       f"codecs: {sorted({r.codec for r in self.rows})}")


def _lossless(spec: CodecSpec) -> bool:
    return spec.codec == "none" and not spec.rules and spec.random_precision is None


def _last_linear(model: nn.Module) -> str:
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"{name}.weight"


def _first_linear(model: nn.Module) -> tuple[str, str]:
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    return f"{name}.weight", f"{name}.bias"


def _history_rounds(specs: Sequence[CodecSpec]) -> int:
    rounds = 0
    for s in specs:
        if s.error_feedback is ErrorFeedbackMode.STEADY:
            rounds = max(rounds, s.warmup_rounds)
        if s.codec in INNOVATION_CODECS or any(r.codec in INNOVATION_CODECS for r in s.rules):
            rounds = max(rounds, s.warmup_rounds, 1)
    return rounds


@dataclass
class _Cell:
    """Accumulates one (codec, attack, knowledge) cell across trials."""

    bits: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    label_hits: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    restarts: int = 0
    seconds: float = 0.0
    images: list[torch.Tensor] = field(default_factory=list)


def _attack(cfg: LeakConfig, kind: AttackName, knowledge: Knowledge, model: nn.Module, cap: WireCapture,
            shape: tuple[int, ...], classes: int, labels: torch.Tensor, box: tuple[float, float],
            seed: int) -> AttackResult:
    if kind is AttackName.DLG:
        objective = GradientObjective.from_capture(cap, Distance.L2, knowledge)
        known = None if cfg.labels is LabelSource.OPTIMISE else labels
        return dlg(model, objective, shape, classes, cfg.dlg, labels=known, seed=seed)
    if kind is AttackName.IG:
        objective = GradientObjective.from_capture(cap, Distance.COSINE, knowledge)
        return inverting_gradients(model, objective, shape, labels, cfg.ig, box=box, seed=seed)
    w, b = _first_linear(model)
    decoded = cap.decoded()
    x = analytic_fc_inversion(decoded[w], decoded[b]).reshape(shape)
    return AttackResult(reconstruction=x, labels=labels, loss=0.0, iterations=1, restarts=1, trial_losses=(0.0,))


def run_leak(cfg: LeakConfig = LeakConfig()) -> LeakReport:
    """Run every (trial, codec, attack, attacker) of ``cfg``; returns the typed results (nothing is printed)."""
    started = time.perf_counter()
    data = load_images(cfg.task, cfg.data_dir)
    rounds = _history_rounds(cfg.codecs)
    needed = cfg.batch_size * (1 + rounds)
    if needed > len(data.y):
        raise ValueError(f"task {cfg.task!r} has {len(data.y)} training images; a trial needs {needed}")
    data_gen = torch.Generator().manual_seed(mix_seed(cfg.seed, _DATA_PURPOSE))
    cells: dict[tuple[str, AttackName, Knowledge], _Cell] = {}
    truths, true_labels = [], []
    box = data.norm.box()
    for trial in range(cfg.trials):
        index = torch.randperm(len(data.y), generator=data_gen)[:needed].view(1 + rounds, cfg.batch_size)
        x, y = data.x[index[0]], data.y[index[0]]
        model = build_victim(cfg.victim, data.spec, mix_seed(cfg.seed, trial, _VICTIM_PURPOSE))
        grads = batch_gradient(model, x, y)
        history = [batch_gradient(model, data.x[i], data.y[i]) for i in index[1:]]
        truths.append(data.norm.to_pixels(x))
        true_labels.append(y)
        for spec in cfg.codecs:
            cap = capture(grads, spec, step=cfg.step, seed=cfg.seed, history=history)
            recovered = y if cfg.labels is LabelSource.TRUE else idlg_labels(cap.decoded()[_last_linear(model)], len(y))
            knowledge = [k for k in cfg.knowledge if not (k is Knowledge.ADAPTIVE and _lossless(spec))]
            for kind in cfg.attacks:
                for k in ([Knowledge.NAIVE] if kind is AttackName.ANALYTIC else knowledge):
                    t0 = time.perf_counter()
                    result = _attack(cfg, kind, k, model, cap, tuple(x.shape), data.spec.classes, recovered, box,
                                     mix_seed(cfg.seed, trial, _ATTACK_PURPOSE))
                    scores = score_images(result.reconstruction, x, data.norm)
                    cell = cells.setdefault((spec.name, kind, k), _Cell())
                    cell.bits.append(cap.bits_per_coordinate)
                    cell.psnr += scores.psnr
                    cell.ssim += scores.ssim
                    cell.label_hits.append(label_accuracy(result.labels, y))
                    cell.losses.append(result.loss)
                    cell.iterations.append(result.iterations)
                    cell.restarts = result.restarts
                    cell.seconds += time.perf_counter() - t0
                    cell.images.append(data.norm.to_pixels(result.reconstruction.detach())[list(scores.permutation)])
                    log.info("leak trial %d %s %s/%s: %.2f bits/coord, PSNR %s dB", trial, spec.name, kind.value,
                             k.value, cap.bits_per_coordinate, ", ".join(f"{p:.1f}" for p in scores.psnr))
    rows = tuple(
        LeakRow(codec=codec, attack=kind, knowledge=k, bits_per_coordinate=sum(c.bits) / len(c.bits),
                psnr=tuple(c.psnr), ssim=tuple(c.ssim), label_accuracy=sum(c.label_hits) / len(c.label_hits),
                losses=tuple(c.losses), iterations=tuple(c.iterations), restarts=c.restarts, seconds=c.seconds,
                images=torch.cat(c.images))
        for (codec, kind, k), c in cells.items())
    return LeakReport(config=cfg, truth=torch.cat(truths), labels=torch.cat(true_labels), rows=rows,
                      seconds=time.perf_counter() - started)
