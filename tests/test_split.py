"""Trainer ``split``: the smashed-data link through real codecs and transports, the server's step, the config's
refusals, and one short Ray Train run on digits with the decoder attack at the end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressors.policy import Override, Policy
from rayq.collective import Ledger
from rayq.config import ConfigError, load_config
from rayq.smashed import (
    ACTIVATIONS, GRADIENTS, SERVER, SmashedLink, SplitTally, cut_problem, default_cut, server_step, split_model,
)
from rayq.tasks import get_task
from rayq.transport import LocalHub, Purpose, run_local

WORLD, BATCH, DIM = 3, 8, 16


def _client_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(BATCH, DIM, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _round_trip(policy: Policy):
    """Every worker sends its activations up; the server returns 2·Z_i and loss i to client i."""

    def work(transport):
        link = SmashedLink(policy, transport, seed=7)
        z, y = _client_batch(transport.rank)
        ledger = Ledger(rank=transport.rank)
        got = link.up(z, y, step=3, ledger=ledger)
        grads = losses = None
        if got is not None:
            grads, losses = [2 * b.z for b in got], [float(w) for w in range(len(got))]
        grad, loss = link.down(grads, losses, z, step=3, ledger=ledger)
        return got, grad, loss, ledger

    return run_local(WORLD, work)


def test_the_server_receives_every_clients_activations_and_labels_in_rank_order():
    results = _round_trip(Policy("none"))
    got = results[SERVER][0]
    assert len(got) == WORLD and all(r[0] is None for r in results[1:])
    for w, batch in enumerate(got):
        z, y = _client_batch(w)
        assert torch.equal(batch.z, z) and torch.equal(batch.y, y)


def test_each_client_gets_back_its_own_gradient_and_loss():
    for w, (_, grad, loss, _) in enumerate(_round_trip(Policy("none"))):
        assert torch.equal(grad, 2 * _client_batch(w)[0]) and loss == w


def test_only_frames_that_leave_a_worker_are_counted_and_every_one_is_in_the_ledger():
    results = _round_trip(Policy("none"))
    ledgers = [r[3] for r in results]
    assert ledgers[SERVER].bytes_down == sum(ledgers[w].bytes_up for w in range(WORLD) if w != SERVER)
    assert ledgers[SERVER].bytes_up == sum(ledgers[w].bytes_down for w in range(WORLD) if w != SERVER)
    payload = [r for r in ledgers[SERVER].wire if r.purpose == Purpose.PAYLOAD.value]
    assert [r.kind for r in payload] == ["alltoall", "alltoall"]
    # every worker's wire record agrees with every worker's own ledger: up is each client's frame, down the server's
    assert sum(sum(r.bytes_up) for r in payload) == sum(led.bytes_up for led in ledgers)
    # fp32 activations: 4 bytes per element plus the packets' headers and one byte per label
    client = ledgers[1]
    assert 4 * BATCH * DIM + BATCH < client.bytes_up < 4 * BATCH * DIM + BATCH + 120
    assert client.elements == BATCH * DIM + BATCH


def test_the_policy_picks_each_directions_codec_and_a_lossy_one_sends_fewer_bits():
    policy = Policy("int8", {"bits": 4}, overrides=[Override(GRADIENTS, "fp16")])
    results = _round_trip(policy)
    client, dense = results[1][3], _round_trip(Policy("none"))[1][3]
    assert client.bytes_up < 0.3 * dense.bytes_up             # 4-bit activations (+ scales, labels, headers)
    z, _ = _client_batch(1)
    assert 0 < (results[SERVER][0][1].z - z).abs().max() < 0.2 * z.abs().max()
    received = results[SERVER][0][1].z
    assert torch.allclose(results[1][1], 2 * received, rtol=1e-3, atol=1e-3)    # fp16 gradients of what it got
    assert policy.codec_for(ACTIVATIONS).name == "int8"


def test_the_servers_step_and_the_clients_backward_give_the_unsplit_models_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 12), nn.ReLU(), nn.Linear(12, 10))
    bottom, top = split_model(model, 2)
    batches = [_client_batch(w) for w in range(WORLD)]
    reference = torch.stack([F.cross_entropy(model(x), y) for x, y in batches]).mean()
    expected = torch.autograd.grad(reference, list(model.parameters()))

    from rayq.smashed import Batch

    zs = [bottom(x) for x, _ in batches]
    grads, losses = server_step(top, [Batch(z.detach(), y) for z, (_, y) in zip(zs, batches)])
    client = [torch.autograd.grad(z, list(bottom.parameters()), dz) for z, dz in zip(zs, grads)]
    averaged = [torch.stack(gs).mean(0) for gs in zip(*client)]
    got = averaged + [p.grad for p in top.parameters()]
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-6)
    assert sum(losses) / WORLD == pytest.approx(float(reference.detach()), rel=1e-6)


def test_the_default_cut_is_after_the_first_block_and_bad_cuts_are_named():
    assert default_cut(get_task("digits").build_model()) == 2                # Linear, ReLU | Linear
    assert default_cut(get_task("fashion-mnist").build_model()) == 3         # Conv, ReLU, MaxPool | ...
    assert "choose split.cut in 1..2" in cut_problem(get_task("digits").build_model(), 3)
    assert "not an nn.Sequential" in cut_problem(nn.Linear(3, 2), None)


def test_the_tally_sums_every_workers_bytes_at_a_report():
    def work(transport):
        tally = SplitTally()
        led = Ledger(bytes_up=10 * (transport.rank + 1))
        tally.add(led, 0.5)
        tally.settle(transport)
        return tally.metrics()

    out = run_local(WORLD, work, hub=LocalHub(WORLD))
    assert all(m["comm/bytes_up_all_workers_total"] == 60 for m in out)
    assert out[0]["split/train_dcor"] == 0.5


@pytest.mark.parametrize("sets, names", [
    (["sync.schedule=periodic"], ("trainer='split'", "sync.schedule='periodic'")),
    (["compression.codec=powersgd"], ("trainer='split'", "compression.codec='powersgd'")),
    (["compression.codec=sign"], ("trainer='split'", "compression.codec='sign'")),
    (["compression.codec=topk", "compression.error_feedback=true"], ("error_feedback=true", "trainer='split'")),
    (["faults.packet_loss=0.1"], ("faults.packet_loss=0.1", "trainer='split'")),
    (["task=cifar10"], ("split.cut=None", "task='cifar10'")),
    (["split.cut=3"], ("split.cut=3", "task='digits'")),
])
def test_combinations_that_cannot_work_with_split_are_refused_naming_both_halves(sets, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer=split", *sets])
    for name in names:
        assert name in str(err.value)


def test_split_keys_without_the_split_trainer_are_refused():
    with pytest.raises(ConfigError, match=r"split\.\* is set but trainer='sync'"):
        load_config(None, ["split.nopeek_alpha=1.0"])


@pytest.mark.ray
def test_a_split_run_on_digits_learns_counts_its_activations_and_attacks_the_client(train_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, run_dir = train_run(["trainer=split", "compression.codec=none", "max_steps=60", "report_every=20",
                                  "eval_every=30", "split.decoder_epochs=60"])
    assert summary["eval/accuracy"] > 0.8
    for key in ("privacy/decoder_ssim", "privacy/decoder_psnr", "privacy/dcor", "privacy/loss_auc",
                "privacy/correctness_attack_acc", "split/train_dcor", "comm/bytes_up_all_workers_total"):
        assert key in summary, key
    assert summary["privacy/decoder_ssim"] > 0.5 and summary["privacy/dcor"] > 0.5   # no NoPeek: Z gives X away
    # the smashed data on the wire: three clients' fp32 activations (32 × 128) up, their gradients down, every step
    steps = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "wire" in s]
    alltoall = [sum(r[2]) for s in steps for r in s["wire"] if r[0] == "alltoall" and r[4] == "payload"]
    assert len(alltoall) == 2 * 60
    assert all(3 * 32 * 128 * 4 < b < 3 * (32 * 128 * 4 + 200) for b in alltoall)
    assert summary["comm/bytes_up_all_workers_total"] > sum(alltoall)        # + the bottoms' averaging
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 4})
    acc.Reload()
    assert {"privacy/decoder_ssim", "privacy/loss_auc", "comm/bytes_up"} <= set(acc.Tags()["scalars"])
    assert "privacy/decoder_reconstructions" in acc.Tags()["images"]
