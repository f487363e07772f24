"""Split learning's wire: the clients' smashed activations up to the server, their gradients back down.

In split learning (Gupta & Raskar, J. Network and Computer Applications 2018; with several clients
training in parallel as in SplitFed, Thapa et al., AAAI 2022) a client runs the bottom of the model,
f_c: X → Z, and sends the "smashed" activations Z with its labels to the server; the server runs the
top, ŷ = f_s(Z), and returns ∂L/∂Z. Here both directions go through rayq's codecs and transport:

* up: each client encodes Z with the codec ``compression.*`` assigns to the name ``split.activations``
  (a per-name override can pick another), packs it with its labels, and an all-to-all carries every
  client's frame to the server (rank 0);
* down: the server encodes each client's ∂L_i/∂Z_i (``split.gradients``) with that client's loss value
  and an all-to-all carries each frame back to its client.

The server is also a client: its own activations go through the same encode and decode, so every sample
sees the same distortion, but they cross no link and count no bytes (the transport records only what
leaves a worker). Every frame is real packet bytes, so the ledger, ``comm/*`` and the simulated clock
count split traffic exactly as they count gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressors import Codec, Packet, TensorInfo, pack_frame, unpack_frame
from compressors.policy import Policy
from rayq.collective import Ledger
from rayq.transport import Purpose, Transport

#: Tensor names the policy assigns codecs to (``compression.overrides`` patterns match them).
ACTIVATIONS = "split.activations"
GRADIENTS = "split.gradients"
SERVER = 0

_ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU)
_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)


def layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers a split can cut between: the children of an ``nn.Sequential`` (None for other models)."""
    return list(model.children()) if isinstance(model, nn.Sequential) else None


def default_cut(model: nn.Module) -> int | None:
    """After the first activation, and the pooling layer right after it (the first block), if the model has one."""
    seq = layers(model) or []
    for i, m in enumerate(seq[:-1]):
        if isinstance(m, _ACTIVATIONS):
            cut = i + 1
            if cut < len(seq) - 1 and isinstance(seq[cut], _POOLING):
                cut += 1
            return cut
    return None


def cut_problem(model: nn.Module, cut: int | None) -> str | None:
    """Why ``model`` cannot be split at ``cut`` (None when it can)."""
    seq = layers(model)
    if seq is None:
        return f"its model is a {type(model).__name__}, not an nn.Sequential of layers to cut between"
    if cut is None:
        return None if default_cut(model) is not None else "its model has no activation to cut after; set split.cut"
    if not 1 <= cut < len(seq):
        return f"its model has {len(seq)} layers; choose split.cut in 1..{len(seq) - 1}"
    return None


def split_model(model: nn.Module, cut: int | None) -> tuple[nn.Sequential, nn.Sequential]:
    """The client's bottom (layers ``[0, cut)``) and the server's top; they share the model's modules."""
    problem = cut_problem(model, cut)
    if problem:
        raise ValueError(f"split.cut={cut!r}: {problem}")
    seq = layers(model) or []
    at = cut if cut is not None else default_cut(model)
    return nn.Sequential(*seq[:at]), nn.Sequential(*seq[at:])


def _labels(y: torch.Tensor) -> torch.Tensor:
    """Class labels as they travel: one byte each when they fit, else 8."""
    y = y.detach().cpu()
    small = y.numel() == 0 or (int(y.min()) >= 0 and int(y.max()) < 256)
    return y.to(torch.uint8 if small else torch.int64)


@dataclass(frozen=True)
class Batch:
    """What the server received from one client this step (decoded)."""

    z: torch.Tensor
    y: torch.Tensor


class SmashedLink:
    """Both directions of one split-learning step between every client and the server (see the module)."""

    def __init__(self, policy: Policy, transport: Transport, seed: int = 0) -> None:
        self.policy, self.transport, self.seed = policy, transport, seed

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def world(self) -> int:
        return self.transport.world

    def _codec(self, name: str, shape: tuple[int, ...]) -> Codec:
        return self.policy.plan({name: shape})[0].codec  # small tensors get the policy's dense codec

    def _info(self, name: str, shape: tuple[int, ...], worker: int, step: int) -> TensorInfo:
        return TensorInfo(name, shape, role=name, worker=worker, world=self.world, step=step, seed=self.seed)

    def roundtrip(self, z: torch.Tensor, step: int) -> torch.Tensor:
        """What the server decodes of activations ``z`` (no transport): evaluation sees what training sees."""
        shape = tuple(z.shape)
        codec = self._codec(ACTIVATIONS, shape)
        flat = z.detach().reshape(-1).to(torch.float32)
        _, decoded = codec.encode_decode(flat, self._info(ACTIVATIONS, shape, SERVER, step))
        return decoded.reshape(shape).to(z.device, z.dtype)

    def up(self, z: torch.Tensor, y: torch.Tensor, step: int, ledger: Ledger,
           measure: bool = False) -> list[Batch] | None:
        """Send this client's activations and labels to the server; the server gets every client's (rank order)."""
        shape = tuple(z.shape)
        codec, info = self._codec(ACTIVATIONS, shape), self._info(ACTIVATIONS, shape, self.rank, step)
        t0 = time.perf_counter()
        flat = z.detach().reshape(-1).to(torch.float32)
        packet = codec.encode(flat, info)
        frame = pack_frame([packet, Packet("labels", y.numel(), (_labels(y),))])
        ledger.encode_s += time.perf_counter() - t0
        if measure:
            own = codec.decode(packet, info)
            ledger.err_sq += float(((own - flat) ** 2).sum())
            ledger.ref_sq += float((flat ** 2).sum())
        chunks = [frame if w == SERVER else b"" for w in range(self.world)]
        got = self._exchange(chunks, ledger, sent=self.rank != SERVER, elements=flat.numel() + y.numel())
        if self.rank != SERVER:
            return None
        t0 = time.perf_counter()
        out = []
        for w, data in enumerate(got):
            zp, yp = unpack_frame(data, 2)
            wshape = (zp.numel // max(1, math.prod(shape[1:])), *shape[1:])
            zw = codec.decode(zp, self._info(ACTIVATIONS, wshape, w, step)).reshape(wshape).to(z.device, z.dtype)
            out.append(Batch(zw, yp.fields[0].to(y.device, torch.int64)))
            ledger.bytes_down += len(data) if w != SERVER else 0
        ledger.decode_s += time.perf_counter() - t0
        return out

    def down(self, grads: list[torch.Tensor] | None, losses: list[float] | None, like: torch.Tensor, step: int,
             ledger: Ledger) -> tuple[torch.Tensor, float]:
        """The server returns ∂L_i/∂Z_i and the loss to each client i; every client gets its own (decoded)."""
        shape = tuple(like.shape)
        codec = self._codec(GRADIENTS, shape)
        chunks = [b""] * self.world
        elements = 0
        if self.rank == SERVER:
            if grads is None or losses is None or len(grads) != self.world or len(losses) != self.world:
                raise ValueError(f"the server returns one gradient and one loss per client ({self.world})")
            t0 = time.perf_counter()
            for w, (g, loss) in enumerate(zip(grads, losses)):
                info = self._info(GRADIENTS, tuple(g.shape), w, step)
                packet = codec.encode(g.detach().reshape(-1).to(torch.float32), info)
                chunks[w] = pack_frame([packet, Packet("loss", 1, (torch.tensor([loss], dtype=torch.float32),))])
                elements += (g.numel() + 1) if w != SERVER else 0
            ledger.encode_s += time.perf_counter() - t0
        got = self._exchange(chunks, ledger, sent=self.rank == SERVER, elements=elements)
        t0 = time.perf_counter()
        gp, lp = unpack_frame(got[SERVER], 2)
        grad = codec.decode(gp, self._info(GRADIENTS, shape, self.rank, step)).reshape(shape)
        grad = grad.to(like.device, like.dtype)
        ledger.decode_s += time.perf_counter() - t0
        ledger.bytes_down += len(got[SERVER]) if self.rank != SERVER else 0
        return grad, float(lp.fields[0][0])

    def _exchange(self, chunks: list[bytes], ledger: Ledger, sent: bool, elements: int) -> list[bytes]:
        """One accounted all-to-all; this worker's packet bytes count only for frames that leave it."""
        t0 = time.perf_counter()
        got = self.transport.all_to_all_bytes(chunks, Purpose.PAYLOAD)
        ledger.comm_s += time.perf_counter() - t0
        ledger.wire.extend(self.transport.take_records())
        if sent:
            away = [c for w, c in enumerate(chunks) if w != self.rank and c]
            ledger.bytes_up += sum(len(c) for c in away)
            ledger.packet_bytes += [len(c) for c in away]
            ledger.packets += 2 * len(away)
            ledger.elements += elements
        ledger.rounds += 1
        return got


def server_step(top: nn.Module, batches: list[Batch]) -> tuple[list[torch.Tensor], list[float]]:
    """The server's half of a step: client i's loss is CE(top(Z_i), y_i), its own batch mean. Returns
    ∂loss_i/∂Z_i and loss_i per client, and leaves the mean over clients of the top's gradients in ``.grad``."""
    zs = [b.z.detach().requires_grad_(True) for b in batches]
    per_sample = F.cross_entropy(top(torch.cat(zs)), torch.cat([b.y for b in batches]), reduction="none")
    losses = [chunk.mean() for chunk in per_sample.split([len(z) for z in zs])]
    params = [p for p in top.parameters() if p.requires_grad]
    grads = torch.autograd.grad(torch.stack(losses).sum(), zs + params)
    n = len(zs)
    for p, g in zip(params, grads[n:]):
        p.grad = g / n
    return list(grads[:n]), [float(loss.detach()) for loss in losses]


class SplitTally:
    """What a split run reports besides the ledger: packet bytes sent by all workers together (summed
    with one control all-reduce per report; split traffic is not symmetric, the server sends every
    client's gradients, so "bytes per worker × workers" would be wrong) and this worker's mean training
    dCor(X, Z) since the last report. Checkpointed with the run."""

    def __init__(self) -> None:
        self.total = 0
        self.pending = 0
        self.dcor_sum = 0.0
        self.dcor_n = 0

    def add(self, ledger: Ledger, dcor: float) -> None:
        self.pending += ledger.bytes_up
        self.dcor_sum += dcor
        self.dcor_n += 1

    def settle(self, transport: Transport) -> None:
        """Every worker, at the same steps: add the window's bytes of every worker to the total."""
        window = torch.tensor([float(self.pending)], dtype=torch.float64)
        if transport.world > 1:
            window = transport.all_reduce_sum(window, Purpose.CONTROL)
        self.total += int(window[0])
        self.pending = 0

    def metrics(self) -> dict[str, float]:
        out = {"comm/bytes_up_all_workers_total": float(self.total)}
        if self.dcor_n:
            out["split/train_dcor"] = self.dcor_sum / self.dcor_n
        self.dcor_sum, self.dcor_n = 0.0, 0
        return out

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "pending": self.pending}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.pending = int(state["total"]), int(state["pending"])
