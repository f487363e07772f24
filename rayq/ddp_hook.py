"""A DistributedDataParallel communication hook built on rayq's compressed group.

For users who already wrap their model in DDP::

    state = RayqHookState(Policy("qsgd", error_feedback=True), model=ddp_model.module)
    ddp_model.register_comm_hook(state, rayq_hook)
    ...
    ledger = state.take_ledger()          # what the hook moved since the last call (bytes, rounds, wire)

The hook is a pure function ``(state, bucket) -> Future[Tensor]`` (PyTorch's contract: the future
holds the *averaged* bucket). It splits the bucket into its parameters' gradients, names them after
the module's parameters (so policy overrides and per-parameter codec state such as PowerSGD's Q or
error-feedback residuals work as in the ``sync`` trainer), averages them with
:meth:`CompressedGroup.allreduce_mean` over the DDP process group, and writes the result back into the
bucket. The exchange is synchronous inside the hook (no overlap with the backward pass).

The state is one explicit object: ``state_dict()`` / ``load_state_dict()`` for rayq checkpoints, and
it pickles (without its process group, which is re-attached to the default group on unpickling, as
PyTorch's ``PowerSGDState`` does).

No ``from __future__ import annotations`` here: DDP checks the hook's annotations as real objects.
"""

import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from compressors.policy import Policy
from rayq.collective import CompressedGroup, Ledger
from rayq.transport import TorchTransport, WireRecord


class RayqHookState:
    """The hook's state: the compressed group, the step counter and the ledger not yet taken."""

    def __init__(self, policy: Policy, process_group: Any = None, seed: int = 0, strategy: str = "auto",
                 model: nn.Module | None = None, measure: bool = False, gather: str = "padded") -> None:
        self.process_group = process_group
        self.gather = gather
        self.group = CompressedGroup(policy, self._transport(process_group, gather, ready=True), seed=seed,
                                     strategy=strategy)
        self.names: dict[int, str] = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self.step = 0
        self.measure = measure
        self.ledger = Ledger()
        #: Flat-bucket keys planned in this step and the last: DDP rebuilds its buckets after the first step,
        #: and the memories of keys no longer planned are forgotten (they would stay in every checkpoint).
        self.flat_keys: set[str] = set()
        self.last_flat_keys: set[str] = set()

    @staticmethod
    def _transport(process_group: Any, gather: str = "padded", ready: bool = False) -> "TorchTransport | None":
        """The hook's transport. On NCCL, with ``ready`` (every member is constructing its state, as in
        :func:`register`), frame sizes go over a gloo group made here, between host memories; otherwise
        they stay on the data group (a group made lazily inside the hook would be a collective call from
        the autograd engine, and an unpickled state may be on one process only)."""
        if not dist.is_initialized():
            return None
        nccl = dist.get_backend(process_group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        transport = TorchTransport(device, group=process_group, gather=gather, host_control=nccl and ready)
        transport.open_control()
        return transport

    def take_ledger(self) -> Ledger:
        """What the hook moved since the last call; resets the running ledger."""
        ledger, self.ledger = self.ledger, Ledger()
        return ledger

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "group": self.group.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.group.load_state_dict(state["group"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["process_group"] = None
        state["names"] = {}  # parameter identities do not survive a pickle; rebind with bind()
        group = state["group"]
        state["group"] = (group.policy, group.seed, group.strategy)  # the policy holds every codec memory
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        policy, seed, strategy = state.pop("group")
        self.__dict__.update(state)
        self.group = CompressedGroup(policy, self._transport(None, self.gather), seed=seed,
                                     strategy=strategy)

    def bind(self, model: nn.Module) -> None:
        """Name the buckets' gradients after ``model``'s parameters (after unpickling a state)."""
        self.names = {id(p): n for n, p in model.named_parameters()}


def rayq_hook(state: RayqHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average one DDP bucket through rayq's compressed group; the future holds the averaged bucket."""
    buffer = bucket.buffer()
    if state.group.transport is None:
        state.group.transport = state._transport(state.process_group, state.gather)
    params, grads = bucket.parameters(), bucket.gradients()
    index = bucket.index()
    tensors = {state.names.get(id(p), f"bucket{index}.{i}"): g for i, (p, g) in enumerate(zip(params, grads))}
    averaged, ledger = state.group.allreduce_mean(tensors, state.step, measure=state.measure)
    state.ledger.add(ledger)
    policy = state.group.policy
    if policy.bucket_mb is not None:
        state.flat_keys |= {e.key for e in policy.plan({n: tuple(g.shape) for n, g in tensors.items()})
                            if e.key.startswith("__bucket")}
    flat = torch.cat([averaged[name].reshape(-1) for name in tensors]).to(buffer.dtype)
    if flat.numel() != buffer.numel():
        raise RuntimeError(f"bucket {index}: gradients hold {flat.numel()} elements, buffer {buffer.numel()}")
    buffer.copy_(flat)
    if bucket.is_last():
        state.step += 1
        if state.last_flat_keys - state.flat_keys:
            policy.forget(state.last_flat_keys - state.flat_keys)
        state.last_flat_keys, state.flat_keys = state.flat_keys, set()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut


def register(model: nn.parallel.DistributedDataParallel, policy: Policy, seed: int = 0, strategy: str = "auto",
             measure: bool = False, gather: str = "padded") -> RayqHookState:
    """Register :func:`rayq_hook` on ``model`` (a DDP module) and return its state. ``gather``: how frames of
    gather codecs cross (``padded`` all-gather or ``direct`` all-to-all, as ``compression.gather``)."""
    policy.bucket_keys = "members"  # each DDP bucket is planned apart: its flat buckets' memories need own keys
    state = RayqHookState(policy, model.process_group, seed=seed, strategy=strategy, model=model.module,
                          measure=measure, gather=gather)
    model.register_comm_hook(state, rayq_hook)
    return state


class AllReduceCounter:
    """Measures what PyTorch's own DDP hooks (``allreduce_hook``, ``powerSGD_hook``) really all-reduce.

    While active (``with counter:``), ``torch.distributed.all_reduce`` is wrapped: every call's tensor
    size is recorded and the collective is waited for on the spot, so its time is measured and the
    hook's chained rounds run inside the hook call (no overlap with backward, as with :func:`rayq_hook`).
    Keep it active around ``loss.backward()``; :meth:`wrap` a hook to time it whole, so its own compute
    (PowerSGD's matmuls and QR) is reported apart from the communication, like rayq's encode/decode.
    """

    def __init__(self, timed: bool = True) -> None:
        #: False: count bytes only and let DDP overlap the collectives with backward as it normally does.
        self.timed = timed
        self.calls = 0
        self.bytes = 0
        self.comm_s = 0.0
        self.hook_s = 0.0
        self._lock = threading.Lock()
        self._original: Any = None

    def __enter__(self) -> "AllReduceCounter":
        original = self._original = dist.all_reduce

        def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            work = original(tensor, *args, **kwargs)
            if work is not None and self.timed:
                work.wait()
            with self._lock:
                self.calls += 1
                self.bytes += tensor.numel() * tensor.element_size()
                self.comm_s += time.perf_counter() - t0
            return work

        dist.all_reduce = counting_all_reduce
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.all_reduce = self._original
        self._original = None

    def wrap(self, hook: Any) -> Any:
        """``hook`` timed from its call until its future completes (DDP checks the name ``bucket``)."""

        def timed_hook(state, bucket):  # noqa: ANN001, ANN202  (DDP rejects string annotations)
            t0 = time.perf_counter()
            fut = hook(state, bucket)
            if self.timed:
                fut.wait()
            with self._lock:
                self.hook_s += time.perf_counter() - t0
            return fut

        return timed_hook

    def take_ledger(self, world: int, elements: int) -> Ledger:
        """The counted calls as one all-reduce of ``calls`` rounds (the ``sync`` trainer's convention:
        bytes up = bytes down = the buffers reduced; the hook's time beyond its all-reduces is
        ``encode_s``); resets the counts."""
        with self._lock:
            calls, nbytes, comm, hook = self.calls, self.bytes, self.comm_s, self.hook_s
            self.calls = self.bytes = 0
            self.comm_s = self.hook_s = 0.0
        return Ledger(elements=elements, bytes_up=nbytes, bytes_down=nbytes, packets=calls, rounds=calls,
                      comm_s=comm, encode_s=max(hook - comm, 0.0),
                      wire=[WireRecord("allreduce", calls, (nbytes,) * world)] if calls else [])
