"""rayq's compressed group as a ``ray.util.collective`` backend named ``RAYQ``.

Any Ray actors (and Ray Train workers) can then call ``ray.util.collective.allreduce(t, group_name=...)``
and get the sum through a rayq codec; every other operation keeps the semantics of Ray's own GLOO
group and runs dense::

    import ray.util.collective as col
    import rayq.ray_backend as rb

    rb.register()                                        # in every process (or the setup hook below)
    rb.configure("grads", codec="qsgd", params={"levels": 15})
    col.init_collective_group(4, rank, backend="RAYQ", group_name="grads")
    col.allreduce(t, group_name="grads")                 # t ← decoded Σ_workers t  (≈ N × mean)

* ``allreduce`` / ``reduce`` / ``reducescatter`` with ``ReduceOp.SUM`` on floating tensors are
  compressed: the result is the decoded sum (exact for ``codec="none"``; an unbiased estimate for
  QSGD; ``≈`` with error feedback), identical on every worker. ``MIN`` / ``MAX`` / ``PRODUCT`` and
  integer tensors are reduced dense. ``allgather``, ``broadcast``, ``barrier``, ``send``, ``recv``
  are dense: compression does not apply to them.
* The codec is chosen per group name by :func:`configure`, called in the process before the group is
  created; without it the ``RAYQ_COLLECTIVE`` environment variable (JSON with the same keys, e.g. set
  through ``runtime_env={"env_vars": ...}``) applies to every group; without both, ``codec="none"``.
* ``gather="direct"`` sends a gather codec's frames unpadded to every peer in one all-to-all instead of
  padding them to the longest for one all-gather; the decoded sums are bit-identical.
* :func:`register` is idempotent; ``runtime_env={"worker_process_setup_hook":
  "rayq.ray_backend.register"}`` registers the backend in every worker process of a job.
* Rendezvous: like Ray's GLOO group, rank 0 publishes ``address:port`` in Ray's internal KV store and
  every rank joins a gloo default process group. Where torch.distributed is already initialised (Ray
  Train workers, or an earlier RAYQ group) the existing default group is reused, which needs the same
  rank layout (gloo groups share the process-wide default group, and a second layout in one process
  gives silently wrong results, so it is refused); a group named other than ``default`` gets its
  own gloo subgroup of all ranks (so does ``default`` when the default group is NCCL).
* Error-feedback residuals (``error_feedback=True``) are kept per tensor shape and dtype: a tensor of
  another shape has its own memory. Like Ray's groups, a dead member hangs the group (no timeouts).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from ray.util.collective.collective_group.base_collective_group import BaseGroup

from compressors.policy import Policy
from rayq.collective import CompressedGroup, Ledger, check_strategy
from rayq.compat import frames_gathered
from rayq.transport import GATHER_MODES, TorchTransport

BACKEND = "RAYQ"
ENV_VAR = "RAYQ_COLLECTIVE"
_KV_PREFIX = "rayq_collective_master_"


@dataclass(frozen=True)
class GroupOptions:
    """How one RAYQ group compresses: the :class:`compressors.policy.Policy` and reduce strategy."""

    codec: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    error_feedback: bool = False
    strategy: str = "auto"
    min_numel: int = 256
    seed: int = 0
    timeout_s: float = 300.0
    gather: str = "padded"

    def validate(self) -> None:
        from compressors import make_codec

        codec = make_codec(self.codec, self.params)
        check_strategy(self.codec, self.strategy)
        if self.gather not in GATHER_MODES:
            raise ValueError(f"gather={self.gather!r} is unknown; choose one of: {', '.join(GATHER_MODES)}")
        if self.gather == "direct" and not frames_gathered(codec, self.strategy):
            raise ValueError(f"gather='direct' is invalid with codec={self.codec!r} under strategy={self.strategy!r}: "
                             "its packets are summed in an all-reduce, so no frame is all-gathered and the setting "
                             "would do nothing; choose a gather codec, strategy allgather or two_phase, or leave "
                             "gather='padded'")
        if self.min_numel < 0:
            raise ValueError(f"min_numel={self.min_numel!r} must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s!r} must be > 0")


_OPTIONS: dict[str, GroupOptions] = {}
_LIVE: set[str] = set()
_OWNS_DEFAULT = False


def configure(group_name: str, codec: str = "none", params: dict[str, Any] | None = None,
              error_feedback: bool = False, strategy: str = "auto", min_numel: int = 256, seed: int = 0,
              timeout_s: float = 300.0, gather: str = "padded") -> GroupOptions:
    """Choose the codec of the RAYQ group ``group_name`` in this process (before the group is created).

    ``gather``: how all-gathered frames cross, ``padded`` (each padded to the longest, one all-gather)
    or ``direct`` (each sent unpadded to every peer, one all-to-all); refused where the codec's packets
    are summed instead. Every member must configure the group identically. Invalid codecs, parameters
    and forbidden codec/strategy/gather combinations raise here, before any collective runs."""
    opts = GroupOptions(codec, dict(params or {}), error_feedback, strategy, min_numel, seed, timeout_s, gather)
    opts.validate()
    _OPTIONS[group_name] = opts
    return opts


def options_for(group_name: str) -> GroupOptions:
    """The options a new group gets: :func:`configure`'s, else ``$RAYQ_COLLECTIVE``'s, else dense."""
    if group_name in _OPTIONS:
        return _OPTIONS[group_name]
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return GroupOptions()
    try:
        data = json.loads(raw)
        opts = GroupOptions(**data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"${ENV_VAR}={raw!r} is not a JSON object of {list(GroupOptions.__dataclass_fields__)}: "
                         f"{err}") from err
    opts.validate()
    return opts


def register() -> None:
    """Register the ``RAYQ`` backend in this process (idempotent; usable as a worker_process_setup_hook)."""
    import ray.util.collective  # noqa: F401  (registers NCCL and GLOO first)
    from ray.util.collective.backend_registry import _global_registry, register_collective_backend

    if not _global_registry.is_registered(BACKEND):
        register_collective_backend(BACKEND, RayqGroup)


def get_ledger(group_name: str = "default") -> Ledger:
    """What this process's compressed calls on ``group_name`` moved so far (bytes, rounds, wire records)."""
    from ray.util.collective import get_group_handle

    group = get_group_handle(group_name)
    if not isinstance(group, RayqGroup):
        raise TypeError(f"collective group {group_name!r} is a {type(group).__name__}, not a {BACKEND} group")
    return group.ledger


def _rendezvous(group_name: str, world_size: int, rank: int, timeout_s: float) -> None:
    """Rank 0 publishes ``address:port`` in Ray's internal KV; everyone joins a gloo default group."""
    import ray
    import ray.experimental.internal_kv as kv
    import torch.distributed as dist

    key = _KV_PREFIX + group_name
    if rank == 0:
        addr = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        kv._internal_kv_put(key, f"{addr}:{port}", overwrite=True)
    else:
        deadline = time.monotonic() + timeout_s
        while (meta := kv._internal_kv_get(key)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"RAYQ group {group_name!r}: rank 0 did not publish its address in "
                                   f"{timeout_s:.0f} s")
            time.sleep(0.05)
        addr, port = meta.decode().rsplit(":", 1)
    host = f"[{addr}]" if ":" in addr else addr
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", world_size=world_size, rank=rank,
                            timeout=timedelta(seconds=timeout_s))
    if rank == 0:  # every rank has joined: the address is no longer needed
        kv._internal_kv_del(key)


_REDUCE_OPS: dict[Any, Any] = {}


def _torch_op(op: Any) -> Any:
    import torch.distributed as dist
    from ray.util.collective.types import ReduceOp

    if not _REDUCE_OPS:
        _REDUCE_OPS.update({ReduceOp.SUM: dist.ReduceOp.SUM, ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
                            ReduceOp.MIN: dist.ReduceOp.MIN, ReduceOp.MAX: dist.ReduceOp.MAX})
    return _REDUCE_OPS[op]


class RayqGroup(BaseGroup):
    """A ``ray.util.collective`` group whose SUM reductions go through a rayq :class:`CompressedGroup`."""

    def __init__(self, world_size: int, rank: int, group_name: str) -> None:
        import torch.distributed as dist

        global _OWNS_DEFAULT
        self.options = options_for(group_name)
        if dist.is_initialized():
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise RuntimeError(
                    f"RAYQ group {group_name!r} wants rank {rank} of {world_size}, but this process's "
                    f"torch.distributed default group has rank {dist.get_rank()} of {dist.get_world_size()}; "
                    "a process can hold one rank layout only, because gloo groups share the process-wide default "
                    "group and a second layout gives wrong results; see the README section 'Ray collective "
                    "backend (RAYQ)'")
        else:
            _rendezvous(group_name, world_size, rank, self.options.timeout_s)
            _OWNS_DEFAULT = True
        super().__init__(world_size, rank, group_name)
        if group_name == "default" and dist.get_backend() == "gloo":
            self._pg = dist.group.WORLD
        else:
            self._pg = dist.new_group(ranks=list(range(world_size)), backend="gloo",
                                      timeout=timedelta(seconds=self.options.timeout_s))
        o = self.options
        self.compressed = CompressedGroup(
            Policy(o.codec, o.params, error_feedback=o.error_feedback, min_numel=o.min_numel),
            TorchTransport(torch.device("cpu"), group=self._pg, gather=o.gather), seed=o.seed, strategy=o.strategy)
        self.ledger = Ledger()
        self._calls = 0
        _LIVE.add(group_name)

    # -- Ray's BaseGroup contract ------------------------------------------------------------------
    @classmethod
    def backend(cls) -> str:
        return BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return torch.distributed.is_available()

    def destroy_group(self) -> None:
        import torch.distributed as dist

        global _OWNS_DEFAULT
        _LIVE.discard(self.group_name)
        if not dist.is_initialized():
            return
        if self._pg is not dist.group.WORLD:
            dist.destroy_process_group(self._pg)
        if _OWNS_DEFAULT and not _LIVE:
            dist.destroy_process_group()
            _OWNS_DEFAULT = False

    def allreduce(self, tensor: list, allreduce_options: Any = None) -> None:
        from ray.util.collective.types import AllReduceOptions

        op = (allreduce_options or AllReduceOptions).reduceOp
        t = _one(tensor)
        if self._compressible(t, op):
            t.copy_(self._compressed_sum({_key(t): t})[_key(t)])
        else:
            torch.distributed.all_reduce(t, op=_torch_op(op), group=self._pg)

    def barrier(self, barrier_options: Any = None) -> None:
        torch.distributed.barrier(group=self._pg)

    def reduce(self, tensor: list, reduce_options: Any = None) -> None:
        """The reduced tensor lands on ``root_rank`` only; the others' tensors are left unchanged (as
        Ray's GLOO group). SUM of floating tensors is a compressed all-reduce whose result the root keeps."""
        from ray.util.collective.types import ReduceOptions

        opts = reduce_options or ReduceOptions()
        t = _one(tensor)
        if self._compressible(t, opts.reduceOp):
            total = self._compressed_sum({_key(t): t})[_key(t)]
            if self.rank == opts.root_rank:
                t.copy_(total)
            return
        target = t if self.rank == opts.root_rank else t.detach().clone()
        torch.distributed.reduce(target, dst=opts.root_rank, op=_torch_op(opts.reduceOp), group=self._pg)

    def allgather(self, tensor_list: list, tensor: list, allgather_options: Any = None) -> None:
        outs = _many(tensor_list)
        torch.distributed.all_gather(outs, _one(tensor), group=self._pg)

    def broadcast(self, tensor: list, broadcast_options: Any = None) -> None:
        from ray.util.collective.types import BroadcastOptions

        opts = broadcast_options or BroadcastOptions()
        torch.distributed.broadcast(_one(tensor), src=opts.root_rank, group=self._pg)

    def reducescatter(self, tensor: list, tensor_list: list, reducescatter_options: Any = None) -> None:
        """``tensor`` ← Σ_workers ``tensor_list[rank]``; the inputs are not modified."""
        from ray.util.collective.types import ReduceScatterOptions

        op = (reducescatter_options or ReduceScatterOptions()).reduceOp
        out, parts = _one(tensor), _many(tensor_list)
        if len(parts) != self.world_size:
            raise ValueError(f"reducescatter needs {self.world_size} input tensors, got {len(parts)}")
        if out.shape != parts[self.rank].shape:
            raise ValueError(f"reducescatter output has shape {tuple(out.shape)}, input {self.rank} has "
                             f"{tuple(parts[self.rank].shape)}")
        if self._compressible(out, op) and all(p.is_floating_point() for p in parts):
            out.copy_(self._compressed_sum({f"scatter{j}.{_key(p)}": p for j, p in enumerate(parts)})
                      [f"scatter{self.rank}.{_key(parts[self.rank])}"])
            return
        for j, p in enumerate(parts):
            q = p.detach().clone()
            torch.distributed.reduce(q, dst=j, op=_torch_op(op), group=self._pg)
            if j == self.rank:
                out.copy_(q)

    def send(self, tensor: list, send_options: Any) -> None:
        torch.distributed.send(_one(tensor), dst=send_options.dst_rank, group=self._pg)

    def recv(self, tensor: list, recv_options: Any) -> None:
        torch.distributed.recv(_one(tensor), src=recv_options.src_rank, group=self._pg)

    # -- compression -------------------------------------------------------------------------------
    def _compressible(self, t: torch.Tensor, op: Any) -> bool:
        from ray.util.collective.types import ReduceOp

        return op == ReduceOp.SUM and t.is_floating_point() and t.numel() > 0

    def _compressed_sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cpu = {k: v.detach().to("cpu") for k, v in tensors.items()}
        out, ledger = self.compressed.allreduce_sum(cpu, self._calls)
        self._calls += 1
        self.ledger.add(ledger)
        del self.ledger.wire[:-256]  # the totals grow; the per-call records kept are the latest ones
        return {k: out[k].to(tensors[k].device) for k in tensors}


def _key(t: torch.Tensor) -> str:
    """Tensor name for the codec (randomness, error-feedback memory): shape and dtype."""
    return "x".join(map(str, t.shape)) + f":{str(t.dtype).removeprefix('torch.')}"


def _as_torch(t: Any) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(t, np.ndarray):
        return torch.from_numpy(t)  # shares memory: in-place results reach the caller's array
    raise TypeError(f"the {BACKEND} backend takes torch.Tensor or numpy.ndarray, got {type(t).__name__}")


def _one(tensor: list) -> torch.Tensor:
    if not isinstance(tensor, list) or len(tensor) != 1:
        raise ValueError(f"the {BACKEND} backend takes one tensor per process, got {tensor!r:.80}")
    return _as_torch(tensor[0])


def _many(tensor_list: list) -> list[torch.Tensor]:
    if not isinstance(tensor_list, list) or len(tensor_list) != 1 or not isinstance(tensor_list[0], list):
        raise ValueError(f"the {BACKEND} backend takes one list of tensors per process, got {tensor_list!r:.80}")
    return [_as_torch(t) for t in tensor_list[0]]
