"""One job on several processes: what a rank does that a lone trainer does not (the torch side; the
daemon's side, starting the ranks, is daemon/supervisor/launch.py).

Data parallel without DDP's wrapper. Every rank plans the same windows (one optimizer step each); rank r
trains micro-batches r, r+N, r+2N, ... of each window, its gradients accumulate locally, and one
all_reduce per optimizer step sums them (LoRA gradients only, ~1% of the weights) together with the loss.
DDP's reducer would never sync here: daemon/trainer/loss.py calls the decoder body directly, not the wrapper's
forward, which is where DDP arms its gradient hooks. And DDP needs every rank to run the same number of
synchronised backwards, which a window of 3 micro-batches on 2 ranks does not give. The normaliser of the
loss (trainable tokens of the whole window) is known to every rank from the shared plan, so the summed
gradient is the one-process gradient, and the optimizer, scheduler and clipping see identical numbers on
every rank: the replicas stay equal, and every decision (stop, divergence) is taken alike.

One process: every method is a no-op or the identity, with no torch.distributed call at all.
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch

# Bounds a collective whose peer is gone without exiting (a hung rank); the daemon kills the whole group as
# soon as one rank exits with a failure, so this only matters when nothing exits.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def accelerator_kwargs() -> dict:
    from accelerate.utils import InitProcessGroupKwargs

    return {"kwargs_handlers": [InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)]}


class World:
    """This process's place among the job's ranks, and the few collectives the recipe needs."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None):
        self.rank, self.size = rank, size
        self.device = device or torch.device("cpu")  # where collectives run: cuda under NCCL, cpu under gloo

    @classmethod
    def from_accelerator(cls, accelerator) -> "World":
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, window: list, *, equal: bool = False) -> list[tuple[object, bool]]:
        """This rank's micro-batches of a window, as (micro-batch, counts). `equal` (FSDP, whose every
        forward is a collective): pad to the same number on every rank with a repeat whose loss counts 0."""
        mine = [(mb, True) for mb in window[self.rank::self.size]]
        if equal and window:
            mine += [(window[0], False)] * (math.ceil(len(window) / self.size) - len(mine))
        return mine

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on every rank if it is true on any (a stop request or a clock reaches the ranks at
        different steps), in one all_reduce."""
        if self.size == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(v > 0 for v in t.tolist())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(t)
        return t

    def sum_gradients(self, params: list, extra: torch.Tensor) -> torch.Tensor:
        """Sum the plain (not FSDP-sharded) gradients of `params` and the scalar `extra` over the ranks, in
        one fp32 all_reduce; returns the summed `extra`. A rank without a micro-batch this step adds zeros."""
        if self.size == 1:
            return extra
        plain = [p for p in params if not _is_dtensor(p)]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in plain] + [extra.reshape(1).float().to(self.device)])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in plain:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[-1]

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values everywhere (LoRA weights: equal by seed already; this makes it a fact)."""
        if self.size > 1:
            for t in tensors:
                if not _is_dtensor(t):
                    torch.distributed.broadcast(t.data, src=0)

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (a list by rank); None elsewhere."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj):
        if self.size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def agree_plan(self, plan):
        """The memory plan every rank follows: the smallest micro-batch any rank's free memory allows, and
        checkpointing, FSDP or 4-bit where any rank needs them (the ranks' GPUs may be unequally busy)."""
        if self.size == 1:
            return plan
        t = torch.tensor([-plan.micro_batch_size, plan.gradient_checkpointing, plan.quantize_4bit, plan.fsdp],
                         dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        mb, ckpt, quantize, fsdp = t.tolist()
        plan.micro_batch_size, plan.gradient_checkpointing = int(-mb), bool(ckpt)
        plan.quantize_4bit, plan.fsdp = bool(quantize) and not fsdp, bool(fsdp)
        return plan


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shutdown() -> None:
    """Leave the process group cleanly after a normal end (NCCL warns about a group never destroyed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
