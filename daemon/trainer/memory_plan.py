"""The memory plan: from the free GPU memory and the model's shape, pick micro-batch, checkpointing and 4-bit.

Pure arithmetic (no torch), so it is tested on CPU and the choice is explained in metadata. The estimates
are per token of a micro-batch: activations kept for backward with and without activation checkpointing,
plus the loss's one chunk of logits. Checked against H100 peaks (docs/performance.md): estimated/measured
24.5/20.6 GiB (Qwen2.5-1.5B, 8k tokens), 61.3/53.2 (Llama-8B, 8k), 19.7/18.9 (Llama-8B, 24 GiB cap, 2048,
checkpointing), 7.8/7.0 (Llama-8B 4-bit, 10 GiB cap; 6.4 before the estimate kept the embedding and the head
in bf16, as bitsandbytes does). An out-of-memory error
still ends in a retry with half the micro-batch (exit code 4).

The budget is the memory the card shows (NVML), not only what the allocator hands out: the estimate above is
the allocator's peak of allocated memory; the card shows that plus what the allocator reserved and does not use
(FRAGMENTATION, less with expandable segments), plus memory outside the allocator: the CUDA context (already
used when free memory is read, `outside_bytes`), the libraries' kernels and handles loaded after the reading
(LIBRARY_OVERHEAD), NCCL's buffers under several processes (NCCL_BUFFERS). So a plan under a 24 GiB card (or
cap) predicts a card peak (`card_peak_bytes`) <= 24 GiB. Where each constant comes from is beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
# Outside the allocator, already on the card when free memory is read: the CUDA context. On an H100 (torch 2.11,
# CUDA 12) a process's context measured ~0.47 GiB on NVML (docs/performance.md, the daemon's overheads: 480 MiB
# used before the job). model.py reads the real figure through NVML; this is the fallback without NVML.
CUDA_CONTEXT = 0.5 * GIB
# Outside the allocator, loaded after the reading: cuBLAS/cuBLASLt handles, flash attention's and Triton's
# (Liger's) kernels. The embedded SmolLM2-135M job showed 1.60 GiB on NVML for a 0.80 GiB allocator peak
# (bench/results/h100-daemon-e2e-prestart.json): 0.80 - 0.47 (context) = ~0.33 GiB of libraries and
# fragmentation; rounded up.
LIBRARY_OVERHEAD = 0.5 * GIB
# Reserved but unused by the caching allocator, as a share of the allocated peak. llama-3.1-8b at 2048 under a
# 24 GiB cap (H100, default allocator): NVML 21.3 GiB for an 18.9 GiB allocated peak; 21.3 - 18.9 - 0.47 - 0.33
# = 1.6 GiB = 8.5% of the peak: 10% without expandable segments. With them freed blocks serve requests of any
# size: 5% (not yet measured; bench/run.py --cap-plan records NVML against the cap).
FRAGMENTATION = 0.10
FRAGMENTATION_EXPANDABLE = 0.05
# FSDP gathers each layer on its own stream, and blocks cached for one stream do not serve another: more reserved
# memory. Unmeasured under a cap. An FSDP run without a cap showed 93 GB (86.6 GiB) on NVML for a 65 GiB allocated
# peak, +33%, but an allocator nothing presses keeps all it cached (under a cap it frees its cache and retries
# before failing), so that is a ceiling, not the need: 5% on top of FRAGMENTATION, plus NCCL_BUFFERS.
FRAGMENTATION_FSDP_EXTRA = 0.05
# NCCL's communicator buffers on each rank (outside the allocator): per channel and peer, a 4 MiB Simple buffer
# (NCCL_BUFFSIZE) plus LL/LL128 buffers; ~0.6 GiB for rings of 32 channels, more with NVLS/tree. 1 GiB per rank.
NCCL_BUFFERS = 1.0 * GIB


@dataclass
class Shape:
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    n_kv_heads: int = 0
    head_dim: int = 0
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg, n_params: int) -> "Shape":
        hidden = cfg.hidden_size
        heads = getattr(cfg, "num_attention_heads", 1)
        return cls(n_params=n_params, n_layers=cfg.num_hidden_layers, hidden=hidden,
                   intermediate=getattr(cfg, "intermediate_size", 4 * hidden), vocab=cfg.vocab_size,
                   n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
                   tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))

    @property
    def embedding_params(self) -> int:
        """The input embedding and the output head (one matrix when tied): never quantized to 4 bits."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)


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


def fragmentation(*, expandable_segments: bool, sharded: bool = False) -> float:
    """Reserved-but-unused memory as a share of the allocated peak."""
    return ((FRAGMENTATION_EXPANDABLE if expandable_segments else FRAGMENTATION)
            + (FRAGMENTATION_FSDP_EXTRA if sharded else 0.0))


def late_overhead_bytes(*, world_size: int = 1) -> float:
    """Memory outside the allocator that arrives after free memory was read: libraries, NCCL's buffers."""
    return LIBRARY_OVERHEAD + (NCCL_BUFFERS if world_size > 1 else 0.0)


def allocated_budget_bytes(free_bytes: float, *, world_size: int = 1, sharded: bool = False,
                           expandable_segments: bool = False) -> float:
    """The allocated peak that keeps the card within `free_bytes` (what the allocator may still get, the CUDA
    context already excluded): the late overhead off, then the fragmentation's share."""
    frag = fragmentation(expandable_segments=expandable_segments, sharded=sharded)
    return (free_bytes - late_overhead_bytes(world_size=world_size)) / (1 + frag)


def card_peak_bytes(allocated_peak: float, *, outside_bytes: float | None = None, world_size: int = 1,
                    sharded: bool = False, expandable_segments: bool = False) -> float:
    """What the card (NVML) will show for this process at an allocated peak: the context (`outside_bytes`, what
    was outside the allocator when free memory was read; CUDA_CONTEXT when unknown), the late overhead, and the
    allocated peak with its fragmentation."""
    frag = fragmentation(expandable_segments=expandable_segments, sharded=sharded)
    outside = CUDA_CONTEXT if outside_bytes is None else outside_bytes
    return outside + late_overhead_bytes(world_size=world_size) + allocated_peak * (1 + frag)


def weight_bytes(shape: Shape, *, quantize: bool, weight_bytes_per_param: float = 2.0) -> float:
    """The base's weights on the GPU: nf4 with double-quantised scales (0.56 bytes a parameter) for every layer but
    the embedding and the output head, which bitsandbytes leaves in the compute dtype."""
    if not quantize:
        return shape.n_params * weight_bytes_per_param
    embed = min(shape.embedding_params, shape.n_params)
    return (shape.n_params - embed) * 0.56 + embed * weight_bytes_per_param


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
    card_peak_gib: float | None = None  # what the card (NVML) is predicted to show at the estimated peak
    outside_gib: float | None = None  # outside the allocator when free memory was read (the CUDA context)
    expandable_segments: bool = False


def plan_memory(shape: Shape, *, free_bytes: int | None, max_length: int, micro_batch_size: int,
                checkpointing: str = "auto", weight_bytes_per_param: float = 2.0,
                can_quantize: bool = False, max_tokens: int | None = None, world_size: int = 1,
                sharding: str = "auto", outside_bytes: int | None = None,
                expandable_segments: bool = False) -> MemoryPlan:
    """Choose the largest micro-batch <= the configured one that fits, checkpointing only when it must.

    `free_bytes`: what the allocator may still get from the card (the CUDA context, `outside_bytes`, is already
    in use and not part of it). The estimated allocated peak must fit `allocated_budget_bytes`, so that the card's
    peak (`card_peak_bytes`) stays within free + outside: a plan under a 24 GiB card shows <= 24 GiB on NVML.
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
                          fsdp=bool(forced_shard), expandable_segments=expandable_segments)
    outside = CUDA_CONTEXT if outside_bytes is None else outside_bytes
    extra = dict(outside_gib=round(outside / GIB, 2), expandable_segments=expandable_segments)
    loss_chunk = 3 * 4 * (1 << 26)  # logits chunk, its softmax and a grad buffer (daemon/trainer/loss.py)
    options = [False, True] if forced is None else [forced]
    layouts = [(False, s) for s in shard_options] + ([(True, False)] if can_quantize and not forced_shard else [])
    for quantize, sharded in layouts:
        budget = allocated_budget_bytes(free_bytes, world_size=world_size, sharded=sharded,
                                        expandable_segments=expandable_segments)
        weights = weight_bytes(shape, quantize=quantize, weight_bytes_per_param=weight_bytes_per_param)
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
                    card = card_peak_bytes(peak, outside_bytes=outside, world_size=world_size, sharded=sharded,
                                           expandable_segments=expandable_segments)
                    why = (f"micro-batch {mb} x {max_length} tokens fits {budget / GIB:.1f} GiB "
                           f"with{'' if ckpt else 'out'} activation checkpointing"
                           + (" on a 4-bit base" if quantize else "")
                           + (f" with the base sharded over {world_size} GPUs (FSDP)" if sharded else "")
                           + f" (the card: {card / GIB:.1f} of {(free_bytes + outside) / GIB:.1f} GiB)")
                    return MemoryPlan(mb, ckpt, quantize, round(free_bytes / GIB, 2), round(budget / GIB, 2),
                                      round(peak / GIB, 2), why, fsdp=sharded, card_peak_gib=round(card / GIB, 2),
                                      **extra)
                mb //= 2
    # Nothing fits by the estimate: try the smallest plan anyway; a real OOM is retried by the daemon.
    shard_last = shard_options[-1]
    budget = allocated_budget_bytes(free_bytes, world_size=world_size, sharded=shard_last,
                                    expandable_segments=expandable_segments)
    return MemoryPlan(1, forced is not False, can_quantize and not shard_last, round(free_bytes / GIB, 2),
                      round(budget / GIB, 2), None, "no plan fits the estimate; trying the smallest", fsdp=shard_last,
                      **extra)
