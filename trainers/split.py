"""Trainer ``split``: split learning with NoPeek on Ray Train, one loop top to bottom.

Every worker is a client with its shard of the data and the bottom of the task's model (the layers
before ``split.cut``); rank 0 is also the server and runs the top (:mod:`rayq.smashed`: what crosses
the wire, through which codec). Per step:

    client  z = bottom(x)                     → up: Z and labels to the server (codec + all-to-all)
    server  loss_i = CE(top(Z_i), y_i)        → ∂loss_i/∂Z_i; the top's gradient is the mean over clients
            down: ∂loss_i/∂Z_i and loss_i back to client i (codec + all-to-all)
    client  backward of ⟨Z, ∂loss_i/∂Z⟩ + α·dCor(X, Z)   (NoPeek: Vepakomma et al., ICDMW 2020)
            the bottoms' gradients averaged through the compressed group (compression.*), one optimizer step

The clients' bottoms are averaged every step (parallel clients as in SplitFed, Thapa et al., AAAI 2022):
there is one client network, which is what the server can attack and what the checkpoint holds.
Evaluation runs the whole model on the server; at the last one the decoder attack fits Z → X on half of
the test split and scores the other half (``privacy/decoder_ssim``, ``privacy/decoder_psnr``,
``privacy/dcor``).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rayq.collective import Ledger
from rayq.privacy import IMAGE_FORMATS, decoder_attack, distance_correlation
from rayq.run import Evaluator, Run, build_policy
from rayq.schedules import Outcome
from rayq.smashed import SERVER, SmashedLink, SplitTally, server_step, split_model
from rayq.transport import Purpose


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    run = SplitRun(loop_config)
    cfg, optimizer = run.cfg, run.optimizer
    alpha = cfg.split.nopeek_alpha
    bottom, top = split_model(run.model, cfg.split.cut)
    names = {id(p): n for n, p in run.model.named_parameters()}
    client_params = {names[id(p)]: p for p in bottom.parameters()}
    group = run.group()                                   # averages the clients' bottoms
    link = SmashedLink(build_policy(cfg), run.transport, seed=cfg.seed)
    tally = SplitTally()
    run.track(policy=group, split=tally)
    run.serve(bottom, top, link)
    run.evaluators.append(decoder_figures(run, bottom))

    for step in run.steps():
        x, y = run.batch(step)
        ledger = Ledger(rank=run.rank)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        z = bottom(x)
        compute_s = time.perf_counter() - t0
        received = link.up(z, y, step, ledger, measure=run.measuring(step))   # the server gets every client's
        grads, losses = None, None
        if received is not None:
            t0 = time.perf_counter()
            grads, losses = server_step(top, received)
            compute_s += time.perf_counter() - t0
        dz, loss = link.down(grads, losses, z, step, ledger)
        t0 = time.perf_counter()
        dcor = distance_correlation(x, z)
        torch.autograd.backward([z, alpha * dcor] if alpha > 0 else [z], [dz, None] if alpha > 0 else [dz])
        compute_s += time.perf_counter() - t0
        local = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in client_params.items()}
        averaged, exchanged = group.allreduce_mean(local, step, measure=run.measuring(step))
        ledger.add(exchanged)
        applied = run.replica.finite(averaged, local, step, "averaged client gradient")
        if received is not None and not run.replica.finite({n: p.grad for n, p in top.named_parameters()},
                                                           {}, step, "server's gradient"):
            top.zero_grad(set_to_none=True)               # the server skips its top; the bottoms stay in step
        if applied:
            for n, p in client_params.items():
                p.grad = averaged[n]
            optimizer.step()
        tally.add(ledger, float(dcor.detach()))
        if run.measuring(step):                           # the report steps: the same on every worker
            tally.settle(run.transport)
        run.end(step, torch.tensor(loss), Outcome(ledger, True, applied, compute_s=compute_s))

    return run.finish()


class SplitRun(Run):
    """The run harness, evaluated by the server (only rank 0 holds the trained top of the model), on the
    activations as the codec delivers them, as in training."""

    def serve(self, bottom: nn.Module, top: nn.Module, link: SmashedLink) -> None:
        self.bottom, self.top, self.link = bottom, top, link

    def evaluate(self) -> tuple[float, float]:
        totals = torch.zeros(3, dtype=torch.float64)
        if self.rank == SERVER:
            self.model.eval()
            with torch.no_grad():
                for i in range(0, len(self.test.y), 1024):
                    xb, yb = self.test.x[i:i + 1024].to(self.device), self.test.y[i:i + 1024].to(self.device)
                    out = self.top(self.link.roundtrip(self.bottom(xb), -1 - i))
                    totals[0] += float((out.argmax(1) == yb).sum())
                    totals[1] += float(F.cross_entropy(out, yb, reduction="sum"))
            totals[2] = len(self.test.y)
            self.model.train()
        if self.world > 1:                                # every worker logs the server's figures
            totals = self.transport.all_reduce_sum(totals, Purpose.CONTROL)
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def decoder_figures(run: Run, bottom: nn.Module) -> Evaluator:
    """At the last evaluation, on the server: the decoder attack on the trained client network."""

    def figures(final: bool) -> dict[str, float]:
        fmt = IMAGE_FORMATS.get(run.cfg.task)
        if not final or run.rank != SERVER or not run.cfg.split.decoder_attack or fmt is None:
            return {}
        client = copy.deepcopy(bottom).cpu().eval()
        s = run.cfg.split
        attack = decoder_attack(client, run.test.x, *fmt, epochs=s.decoder_epochs, hidden=s.decoder_hidden,
                                seed=run.cfg.seed)
        if run.tb is not None:
            run.tb.writer.add_images("privacy/decoder_originals", attack.originals, run.plan.total_steps)
            run.tb.writer.add_images("privacy/decoder_reconstructions", attack.reconstructions, run.plan.total_steps)
        leak = attack.leakage
        return {"privacy/decoder_ssim": leak.ssim_mean, "privacy/decoder_psnr": leak.psnr_mean,
                "privacy/dcor": leak.dcor2, "privacy/decoder_samples": float(leak.samples)}

    return figures
