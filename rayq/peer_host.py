"""The Ray actors that host volunteer peers and do their real work (DeDLOC, Diskin et al., NeurIPS 2021).

One host keeps one model replica and, per hosted peer, its own codec state (a :class:`Policy`: error-feedback
memories) and data order. For each :class:`Job` it first closes the peer's previous exchange — it resets the
codec state when the peer downloaded the state, else it settles every packet of the previous payload with
whether that payload was applied (``Codec.settle``: error feedback commits ``e = u − D(C(u))`` only then, and
keeps ``e = u`` for a payload that arrived damaged; a peer whose payload was lost or late, or held NaN/Inf,
downloads the state and resets instead) — then computes the planned micro-batches on real data from the round's
state (BatchNorm statistics included), encodes them and replies with the packets' bytes, the peer's running
statistics last. A crash takes every hosted peer down.

:class:`RayHosts` is the pool of these actors as :class:`rayq.swarm.Swarm` drives it: run a round's jobs and
collect the replies (real time only guards against a hung host), crash, kill, and wait for a restart.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from compressors import Codec, TensorInfo
from rayq.dedloc import Job, Payload, buffers_packet, float_buffers, pack_payload, peer_indices
from rayq.faults import FaultKind, corrupt_bytes

if TYPE_CHECKING:
    from rayq.config import RunConfig

#: Longest real wait for Ray to restart a crashed host actor whose peers are due back.
RESTART_WAIT_S = 300.0


def host_layout(workers: int, actors: int | None) -> list[list[int]]:
    """The peers of each host: peer ``p`` lives on host ``p mod actors`` (default: one host per peer)."""
    n = actors or workers
    return [list(range(h, workers, n)) for h in range(n)]


class PeerHost:
    """A Ray actor hosting one or more volunteer peers (see the module docstring)."""

    def __init__(self, config: dict[str, Any], peers: list[int]) -> None:
        from rayq.config import RunConfig, from_dict
        from rayq.run import build_model, build_policy
        from rayq.tasks import get_task

        torch.set_num_threads(1)
        self.cfg = from_dict(RunConfig, config)
        self.peers = list(peers)
        task = get_task(self.cfg.task)
        self.train, _ = task.load(self.cfg.data_dir)
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(self.cfg, task)
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.policies = {p: build_policy(self.cfg) for p in self.peers}
        self.staged: dict[int, list[tuple[Codec, TensorInfo]]] = {}  # per peer: the packets of its last payload

    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        os._exit(1)

    def run(self, state: dict[str, torch.Tensor], jobs: list[Job]) -> tuple[int, list[Payload]]:
        """Compute, encode and return every job's payload. A ``CRASH`` job kills the process first (``os._exit``):
        a hard crash mid-round."""
        if any(j.fault is FaultKind.CRASH for j in jobs):
            os._exit(1)
        self.model.load_state_dict(state)
        return os.getpid(), [self._job(j, state) for j in jobs]

    def settle(self, peer: int, applied: bool) -> None:
        """Close ``peer``'s previous exchange: commit (applied) or keep (not applied) each packet's memory."""
        for codec, info in self.staged.pop(peer, []):
            codec.settle(info, applied)

    def reset(self, peer: int) -> None:
        self.staged.pop(peer, None)
        self.policies[peer].reset()

    def _job(self, job: Job, state: dict[str, torch.Tensor]) -> Payload:
        if job.reset:
            self.reset(job.peer)
        else:
            self.settle(job.peer, job.applied is True)
        for name, buf in float_buffers(self.model):  # each hosted peer starts from the round's statistics
            buf.copy_(state[name])
        micro = self.cfg.volunteer.microbatch or self.cfg.batch_size
        samples = job.microbatches * micro
        t0 = time.perf_counter()
        idx = peer_indices(self.cfg.seed, job.peer, job.cursor, samples, len(self.train))
        self.model.zero_grad(set_to_none=False)
        loss = 0.0
        for j in range(job.microbatches):  # accumulate the mean gradient over the peer's micro-batches
            part = idx[j * micro:(j + 1) * micro]
            mb = F.cross_entropy(self.model(self.train.x[part]), self.train.y[part]) / job.microbatches
            mb.backward()
            loss += float(mb.detach())
        t1 = time.perf_counter()
        grads = {n: p.grad for n, p in self.params}
        entries = self.policies[job.peer].plan({n: tuple(g.shape) for n, g in grads.items()})
        packets, staged = [], []
        for e in entries:
            flat = torch.cat([grads[m].reshape(-1).to(torch.float32) for m in e.members])
            info = TensorInfo(e.key, e.shape, worker=job.peer, world=self.cfg.workers, step=job.round,
                              seed=self.cfg.seed)
            packets.append(e.codec.encode(flat, info))
            staged.append((e.codec, info))
        self.staged[job.peer] = staged
        frame, size = pack_payload(entries, packets, buffers_packet(self.model))
        sent: bytes | None = frame
        if job.fault is FaultKind.CORRUPT:
            sent = corrupt_bytes(frame, self.cfg.seed, job.peer, job.round)
        elif job.fault is FaultKind.LOSE:
            sent = None
        return Payload(job.peer, job.round, samples, sent, size, loss, t1 - t0, time.perf_counter() - t1)


class ReplyStatus(enum.Enum):
    ANSWERED = "answered"
    DIED = "died"  # its actor died (a crash): the host is down
    HUNG = "hung"  # no answer within round_timeout_s (real): the host is busy until it answers


@dataclass(frozen=True)
class Reply:
    """A host's answer to its jobs of a round."""

    status: ReplyStatus
    pid: int | None = None
    payloads: tuple[Payload, ...] = ()
    error: str = ""


class RayHosts:
    """The host actors on Ray (``volunteer.actors`` of them, ``max_restarts`` for Ray's auto-restart)."""

    def __init__(self, cfg: RunConfig, host_cls: type[PeerHost] = PeerHost) -> None:
        import ray

        v = cfg.volunteer
        self.timeout_s = v.round_timeout_s
        remote = ray.remote(host_cls).options(num_cpus=v.cpus_per_actor, max_restarts=v.max_restarts,
                                              max_task_retries=0)
        config = cfg.to_dict()
        self.actors = [remote.remote(config, peers) for peers in host_layout(cfg.workers, v.actors)]
        self.pids: list[int] = ray.get([a.pid.remote() for a in self.actors], timeout=600)
        self.pending: dict[int, Any] = {}  # hung hosts: the reply each still owes

    def __enter__(self) -> RayHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in range(len(self.actors)):
            self.kill(h)

    def run(self, jobs: dict[int, list[Job]], state: dict[str, torch.Tensor]) -> dict[int, Reply]:
        """Send each host its jobs and wait for every reply, up to the real guard ``round_timeout_s``."""
        import ray

        state_ref = ray.put(state)
        refs = {h: self.actors[h].run.remote(state_ref, js) for h, js in jobs.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        replies = {}
        for h, ref in refs.items():
            if ref in ready:
                replies[h] = self._get(ref)
            else:
                self.pending[h] = ref
                replies[h] = Reply(ReplyStatus.HUNG, error=f"no answer within round_timeout_s={self.timeout_s:g} s")
        return replies

    def poll(self, host: int) -> Reply | None:
        """A hung host's late reply, once it has come (None: not yet)."""
        import ray

        ref = self.pending.get(host)
        if ref is None or not ray.wait([ref], timeout=0)[0]:
            return None
        del self.pending[host]
        return self._get(ref)

    def crash(self, host: int) -> None:
        self.pending.pop(host, None)
        self.actors[host].crash.remote()

    def kill(self, host: int) -> None:
        import ray

        self.pending.pop(host, None)
        try:
            ray.kill(self.actors[host], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def restart(self, host: int) -> tuple[int | None, str]:
        """Wait (real time) until Ray has restarted the crashed ``host``: its new pid, or None and why not."""
        import ray

        until = time.perf_counter() + RESTART_WAIT_S
        while time.perf_counter() < until:
            try:
                return ray.get(self.actors[host].pid.remote(), timeout=max(0.1, until - time.perf_counter())), ""
            except ray.exceptions.ActorUnavailableError:  # still restarting: ask again
                time.sleep(0.1)
            except ray.exceptions.GetTimeoutError:
                break
            except ray.exceptions.RayActorError as err:
                return None, f"{type(err).__name__} (volunteer.max_restarts)"
        return None, f"Ray did not bring it back within {RESTART_WAIT_S:g} s (real)"

    @staticmethod
    def _get(ref: Any) -> Reply:
        import ray

        try:
            pid, payloads = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            return Reply(ReplyStatus.DIED, error=type(err).__name__)
        return Reply(ReplyStatus.ANSWERED, pid, tuple(payloads))
