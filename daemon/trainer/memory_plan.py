"""The memory plan: from the free GPU memory and the model's shape, pick micro-batch, checkpointing and 4-bit.

Pure arithmetic (no torch), so it is tested on CPU and the choice is explained in metadata. The estimates
are per token of a micro-batch: activations kept for backward with and without activation checkpointing,
plus the loss's one chunk of logits. Checked against H100 peaks (docs/performance.md): estimated/measured
24.5/20.6 GiB (Qwen2.5-1.5B, 8k tokens), 61.3/53.2 (Llama-8B, 8k), 19.7/18.9 (Llama-8B, 24 GiB cap, 2048,
checkpointing), 6.4/7.0 (Llama-8B 4-bit, 10 GiB cap: under, inside the headroom). An out-of-memory error
still ends in a retry with half the micro-batch (exit code 4).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
HEADROOM = 0.9          # of free memory the plan may use: the allocator fragments, cuBLAS wants workspace
FIXED_OVERHEAD = 1.0 * GIB  # CUDA context is outside torch's view; workspaces, optimizer state, loss chunk


@dataclass
class Shape:
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    n_kv_heads: int = 0
    head_dim: int = 0

    @classmethod
    def from_config(cls, cfg, n_params: int) -> "Shape":
        hidden = cfg.hidden_size
        heads = getattr(cfg, "num_attention_heads", 1)
        return cls(n_params=n_params, n_layers=cfg.num_hidden_layers, hidden=hidden,
                   intermediate=getattr(cfg, "intermediate_size", 4 * hidden), vocab=cfg.vocab_size,
                   n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or hidden // heads)


def activation_bytes_per_token(shape: Shape, *, checkpointing: bool, bytes_per_value: int = 2) -> float:
    """Bytes kept for backward per token of a micro-batch (whole model)."""
    kv = 2 * shape.n_kv_heads * shape.head_dim
    if checkpointing:
        # Only each layer's input is kept, plus one layer's full activations during its recompute.
        per_layer_full = _per_layer_values(shape, kv)
        return bytes_per_value * (shape.n_layers * shape.hidden + per_layer_full)
    return bytes_per_value * shape.n_layers * _per_layer_values(shape, kv)


def _per_layer_values(shape: Shape, kv: int) -> float:
    # Values per token a decoder layer saves: norms' inputs and outputs, q/k/v/o, attention output and its
    # statistics, the MLP's gate, up, activation and product (the largest share), LoRA's dropout inputs.
    h, i = shape.hidden, shape.intermediate
    return 8 * h + kv + 4 * i


@dataclass
class MemoryPlan:
    micro_batch_size: int
    gradient_checkpointing: bool
    quantize_4bit: bool
    free_gib: float | None
    budget_gib: float | None
    estimated_peak_gib: float | None
    reason: str
    fsdp: bool = False  # the base's weights sharded over the job's processes (daemon/trainer/sharding.py)


def plan_memory(shape: Shape, *, free_bytes: int | None, max_length: int, micro_batch_size: int,
                checkpointing: str = "auto", weight_bytes_per_param: float = 2.0,
                can_quantize: bool = False, max_tokens: int | None = None, world_size: int = 1,
                sharding: str = "auto") -> MemoryPlan:
    """Choose the largest micro-batch <= the configured one that fits, checkpointing only when it must.

    With several processes (`world_size`), FSDP shards the base only when no whole-base plan fits one GPU
    (or `sharding` forces it either way); 4-bit is the last resort and never combined with FSDP.
    free_bytes None (CPU, or unknown): the configured micro-batch, checkpointing and FSDP only if asked for.
    """
    forced = {"true": True, "false": False}.get(str(checkpointing).lower())
    forced_shard = {"true": True, "false": False}.get(str(sharding).lower()) if world_size > 1 else False
    shard_options = [False, True] if forced_shard is None else [forced_shard]
    if max_tokens:
        # Past a few thousand tokens a micro-batch runs no faster per token, it only holds more memory.
        while micro_batch_size > 1 and micro_batch_size * max_length > max_tokens:
            micro_batch_size //= 2
    if free_bytes is None:
        return MemoryPlan(micro_batch_size, bool(forced), False, None, None, None, "no GPU memory reading",
                          fsdp=bool(forced_shard))
    budget = free_bytes * HEADROOM - FIXED_OVERHEAD
    loss_chunk = 3 * 4 * (1 << 26)  # logits chunk, its softmax and a grad buffer (daemon/trainer/loss.py)
    options = [False, True] if forced is None else [forced]
    layouts = [(False, s) for s in shard_options] + ([(True, False)] if can_quantize and not forced_shard else [])
    for quantize, sharded in layouts:
        weights = shape.n_params * (0.56 if quantize else weight_bytes_per_param)  # nf4 + double-quant scales
        if sharded:  # this rank's shard, two layers gathered whole (one prefetched), the head whole on every rank
            weights = (weights / world_size + 2 * weights / shape.n_layers
                       + shape.vocab * shape.hidden * weight_bytes_per_param)
        lora_and_optimizer = 0.02 * shape.n_params * 4  # generous: LoRA r<=64 is well under 2% of the weights
        for ckpt in options:
            per_token = activation_bytes_per_token(shape, checkpointing=ckpt)
            mb = micro_batch_size
            while mb >= 1:
                peak = weights + lora_and_optimizer + loss_chunk + per_token * mb * max_length
                if peak <= budget:
                    why = (f"micro-batch {mb} x {max_length} tokens fits {budget / GIB:.1f} GiB "
                           f"with{'' if ckpt else 'out'} activation checkpointing"
                           + (" on a 4-bit base" if quantize else "")
                           + (f" with the base sharded over {world_size} GPUs (FSDP)" if sharded else ""))
                    return MemoryPlan(mb, ckpt, quantize, round(free_bytes / GIB, 2), round(budget / GIB, 2),
                                      round(peak / GIB, 2), why, fsdp=sharded)
                mb //= 2
    # Nothing fits by the estimate: try the smallest plan anyway; a real OOM is retried by the daemon.
    shard_last = shard_options[-1]
    return MemoryPlan(1, forced is not False, can_quantize and not shard_last, round(free_bytes / GIB, 2),
                      round(budget / GIB, 2), None, "no plan fits the estimate; trying the smallest", fsdp=shard_last)
