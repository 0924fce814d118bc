"""FSDP for a base model that does not fit one GPU: each rank holds 1/N of the frozen weights.

torch's FSDP2 (`fully_shard`) on every decoder layer and on the decoder body, whose forward the chunked loss
calls (daemon/trainer/loss.py); LoRA parameters are sharded with their layers and are the only trainable ones. The
output head stays whole on every rank: the loss uses its weight outside the decoder's forward, where a
sharded weight would be a 1/N slice. A head tied to the input embedding is untied first (a copy of one
matrix) for the same reason. Gradients are summed, not averaged, over the ranks, as in daemon/trainer/distributed.py.

Checkpoints and published adapters hold whole tensors: `full` gathers a sharded one (a collective: every
rank calls it, in the same order), and `reshard_optimizer_state` turns whole optimizer state back into the
shards of this rank. Everything here is the identity for plain tensors, so callers need not ask.
"""

from __future__ import annotations

import torch


def shard(model, device: torch.device) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from daemon.trainer.loss import _causal_lm

    causal_lm = _causal_lm(model)
    head, embed = causal_lm.get_output_embeddings(), causal_lm.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    decoder = causal_lm.get_decoder()
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder, mesh=mesh)
    model.to(device)  # what is not sharded (the head) lives whole on every rank's device
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a sum: the loss is already normalised by the window's tokens
            m.set_force_sum_reduction_for_comms(True)  # plain sums, which gloo has (no NCCL PreMulSum)


def set_gradient_sync(model, on: bool) -> None:
    """Reduce-scatter gradients in this backward (the last micro-batch of a step) or keep accumulating."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(on, recurse=False)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded tensor gathered whole (the format one process writes)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full(v) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return sd


def reshard_optimizer_state(optimizer) -> None:
    """After load_state_dict of whole tensors: each sharded parameter's state becomes this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def copy_whole_(param: torch.Tensor, whole: torch.Tensor) -> None:
    """param <- whole, where param may be this rank's shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(whole)
