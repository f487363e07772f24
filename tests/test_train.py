"""`rayq train` on real Ray Train (4 workers, fractional CPUs, one Ray per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray

def test_tensorboard_event_files_hold_the_documented_tags(train_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, run_dir = train_run(["max_steps=60", "report_every=20", "eval_every=20"])
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "eval/accuracy", "comm/bits_per_element", "comm/bytes_up", "comm/compression_ratio",
                "comm/distortion", "time/compute_s", "time/encode_s", "time/comm_s", "time/decode_s"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [20, 40, 60]
    ratio = acc.Scalars("comm/compression_ratio")[-1].value
    assert ratio == pytest.approx(32 / acc.Scalars("comm/bits_per_element")[-1].value, rel=1e-5)
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["compression.codec"].string_value == "qsgd"
    assert start.session_start_info.hparams["workers"].number_value == 4


def _checkpoint_at(run_dir: Path, step: int) -> Path:
    for d in sorted(run_dir.glob("checkpoint_*")):
        meta = torch.load(d / "model.pt", weights_only=False)["meta"]
        if meta["step"] == step:
            return d
    raise AssertionError(f"no checkpoint at step {step} in {run_dir}")


def test_resuming_a_mid_run_checkpoint_reproduces_the_uninterrupted_run_bit_exactly(train_run):
    # QSGD (stochastic) + error feedback: the codec state and the RNG streams must both be restored. (15 levels:
    # error feedback needs a codec that loses less than its input, which QSGD's default 7 levels do not.)
    sets = ["compression.error_feedback=true", "compression.params.levels=15", "max_steps=40", "report_every=10", "checkpoint_every=20",
            "eval_every=0", "keep_checkpoints=5"]
    _, full = train_run(sets, name="full")
    mid = _checkpoint_at(full, 20)
    codec_state = torch.load(mid / "codec_rank1.pt", weights_only=False)["codec"]["policy"]
    residuals = next(iter(codec_state.values()))["residuals"]
    assert residuals and all(r.abs().sum() > 0 for r in residuals.values()), "EF residuals were not checkpointed"
    summary, resumed = train_run(sets, name="resumed", resume=str(mid))
    assert summary["step"] == 40
    a = torch.load(_checkpoint_at(full, 40) / "model.pt", weights_only=False)
    b = torch.load(_checkpoint_at(resumed, 40) / "model.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for r in range(4):
        ra = torch.load(_checkpoint_at(full, 40) / f"codec_rank{r}.pt", weights_only=False)["codec"]["policy"]
        rb = torch.load(_checkpoint_at(resumed, 40) / f"codec_rank{r}.pt", weights_only=False)["codec"]["policy"]
        for key in ra:
            for name, t in ra[key]["residuals"].items():
                assert torch.equal(t, rb[key]["residuals"][name])


def test_nonfinite_gradients_stop_the_run_with_a_named_error(train_run):
    from rayq.launch import TrainingError

    with pytest.raises(TrainingError, match="not finite"):
        train_run(["compression.codec=none", "optimizer.lr=1e12", "max_steps=40", "report_every=40"])
