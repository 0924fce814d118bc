"""Load the base model and attach the LoRA the job trains, choosing precision, attention and memory plan.

The plan dict this returns is stored in the version's metadata, so a user can see how a run was made:
precision, attention implementation, checkpointing, whether Liger kernels ran, the micro-batch the memory
plan picked and the free memory it saw. On CPU everything is fp32 and seeded, so a resumed run is
bit-for-bit the run that was interrupted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daemon.trainer import memory_plan


def load_for_training(base_dir: Path, cfg, device, *, adapter_dir: Path | None = None, world=None,
                      max_micro_batch: int | None = None, allow_compile: bool = True,
                      compile_cache: Path | None = None, run_tokens: int | None = None, preload=None,
                      tokenizer=None, laps=None):
    """(peft model on `device`, tokenizer, plan) for the base model in `base_dir`; `adapter_dir` continues one.

    `world` (daemon/trainer/distributed.py): the job's ranks, which must all follow one memory plan.
    `max_micro_batch`: a cap below the config's micro_batch_size (an out-of-memory retry's).
    `allow_compile`: whether the caller trains on fixed-shape micro-batches (training.compile; compiled.py);
    `compile_cache`: where compiled artefacts are kept; `run_tokens`: about how many tokens the run trains.
    `preload` (early_load.Preload): the base already built on the CPU while the job waited for the GPU, taken
    when the plan wants that build (not 4-bit, same dtype); `tokenizer`: the one validation loaded;
    `laps` (timings.Laps): where the phases are marked (here and in prepare_model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    trust = bool(getattr(cfg, "trust_remote_code", False))
    dtype = resolve_dtype(cfg.training.precision, device)
    model_cfg = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust)
    mplan = _memory_plan(model_cfg, _count_params_from_config(model_cfg), cfg, device,
                         can_quantize=_bitsandbytes_available() and device.type == "cuda", world=world,
                         max_micro_batch=max_micro_batch)
    if laps is not None:
        laps.mark("memory_plan")  # on a GPU: waits for the CUDA context (early_load.EarlyCuda makes it)
    kwargs = from_pretrained_kwargs(cfg, device, dtype)
    model = None
    if preload is not None:  # built while the job waited: taken if it is what the plan wants, else dropped
        if mplan.quantize_4bit:
            preload.drop("the memory plan loads the base in 4 bits")
        elif preload.dtype != dtype:
            preload.drop(f"built in {preload.dtype}, the plan wants {dtype}")
        else:
            model = preload.take()
    if mplan.quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust)
    if laps is not None:
        laps.mark("load_weights")
    model, tokenizer, plan = prepare_model(model, tokenizer, cfg, device, adapter_dir=adapter_dir, _mplan=mplan,
                                           world=world, allow_compile=allow_compile, compile_cache=compile_cache,
                                           run_tokens=run_tokens, laps=laps)
    if preload is not None and preload.dropped:
        plan["lora_attached"] = f"at load (the base built while waiting was dropped: {preload.dropped})"
    return model, tokenizer, plan


def from_pretrained_kwargs(cfg, device, dtype) -> dict:
    """What from_pretrained is given for a job's base (early_load.Preload builds it with the same)."""
    trust = bool(getattr(cfg, "trust_remote_code", False))
    return {"dtype": dtype, "attn_implementation": attention_for(torch.device(device)), "trust_remote_code": trust}


def prepare_model(model, tokenizer, cfg, device, adapter_dir: Path | None = None, *, _mplan=None, world=None,
                  max_micro_batch: int | None = None, allow_compile: bool = True, compile_cache: Path | None = None,
                  run_tokens: int | None = None, laps=None):
    """Attach the LoRA to an already-built causal LM (moved to `device` in the plan's precision).

    `model` may already carry a fresh LoRA of this job's config, attached on the host while the job waited for
    the GPU (lora_attach.py; in the plan's dtype): it is kept when it can carry the job.
    With training.compile on (compiled.decide) the decoder layers are compiled and Liger is not applied: the
    caller must then train on fixed-shape packed micro-batches (packing.pad_fixed), as LoRARecipe does."""
    from daemon.trainer import compiled, lora_attach
    from peft import PeftModel

    device = torch.device(device)
    dtype = resolve_dtype(cfg.training.precision, device)
    early = isinstance(model, PeftModel)
    attached = "while waiting for the GPU" if early else "at load"
    if early and (why := lora_attach.why_not_kept(model, adapter_dir)):
        model, early, attached = model.unload(), False, f"at load ({why})"
    quantized = bool(getattr(model, "is_loaded_in_4bit", False))
    sharded = _mplan is not None and _mplan.fsdp  # then the weights stay on the host until each rank takes its shard
    # From load_for_training the weights are still on the host: the LoRA is attached there and the whole model
    # moves once, below (attached on the device, peft moves each new adapter there on its own: 1.4 s of a 1.5B
    # model's load on an H200 host). A built model handed in is moved first: the plan below counts it resident.
    on_host_until_wrapped = _mplan is not None
    if not quantized and not early:
        model = model.to(dtype=dtype) if sharded or on_host_until_wrapped else model.to(device=device, dtype=dtype)
    mark = laps.mark if laps is not None else (lambda name: None)
    if _mplan is None:
        # The weights are already resident: the plan counts them itself, so give it their bytes back.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        _mplan = _memory_plan(model.config, sum(p.numel() for p in model.parameters()), cfg, device,
                              resident_bytes=weight_bytes, bytes_per_param=torch.finfo(dtype).bits // 8, world=world,
                              max_micro_batch=max_micro_batch)
    model.config.use_cache = False
    attn = attention_for(device) if cfg.training.attention == "auto" else cfg.training.attention
    if attn == VARLEN:
        register_varlen_attention()
    if model.config._attn_implementation != attn and not (device.type == "cpu" and attn == "sdpa"):
        model.set_attn_implementation(attn)
    base = model.get_base_model() if early else model
    if not early:  # an early LoRA's base is frozen already, and its own weights must stay trainable
        for p in model.parameters():
            p.requires_grad_(False)
    n_base = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    compile_on, compile_reason = compiled.decide(
        getattr(cfg.training, "compile", "auto"), device, n_base,
        quantized=quantized, checkpointing=bool(_mplan.gradient_checkpointing), fsdp=bool(_mplan.fsdp),
        allowed=allow_compile and bool(getattr(cfg.training, "packing", True)), model=base, run_tokens=run_tokens)
    # Liger's module-wide patches and Dynamo do not mix: a compiled model fuses its norms and activations itself.
    # (Liger rebinds the norms' and MLPs' forwards: the same whether the Linears inside carry a LoRA yet or not.)
    liger = (device.type == "cuda" and cfg.training.liger_kernels and not compile_on
             and _apply_liger_kernels(base))
    mark("kernels")

    # Seeded so that LoRA A matrices are the same in every attempt of a job (resume is bit-for-bit on CPU).
    # LoRA weights stay in the base dtype (bf16 on GPU): fp32 adapters make every LoRA'd Linear cast its input
    # to fp32 and add in fp32; on Qwen2.5-1.5B that measured 5% slower and 50% more peak memory
    # (docs/performance.md). The price: AdamW updates far below a weight's bf16 resolution are rounded away;
    # lora.dtype: fp32 pays it for fp32 adapters.
    autocast = cfg.lora.dtype == "fp32"
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    moved = not quantized and not _mplan.fsdp  # bitsandbytes places 4-bit weights itself and refuses .to()
    parent_on_device = early and adapter_dir is not None and moved
    if early:
        if adapter_dir is not None and not parent_on_device:  # FSDP: on the host, before each rank's shard
            lora_attach.load_parent(model, adapter_dir)
    else:
        from peft import get_peft_model

        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(cfg.training.seed)
            if adapter_dir is not None:
                model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True,
                                                  autocast_adapter_dtype=autocast)
            else:
                model = get_peft_model(model, lora_attach.lora_config(cfg), autocast_adapter_dtype=autocast)
    mark("lora")
    if moved:
        model.to(device)
    mark("to_device")
    if parent_on_device:
        # Read straight to the device and copied there: on an H200 host the same 392 small copies on the host
        # took 0.38-0.77 s (torch's CPU copies with 32 intra-op threads), on the card milliseconds.
        lora_attach.load_parent(model, adapter_dir, device)
        mark("lora")  # adds to the lap above

    if _mplan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if _mplan.fsdp:
        from daemon.trainer.sharding import shard

        shard(model, device)
    if compile_on:
        compiled.compile_layers(model, cache_dir=compile_cache, mode=compiled.mode_for(device))
        mark("compile")  # importing Dynamo and Inductor: 1.6 s on a CPU, before the first step compiles
    lora_dtype = next((p.dtype for p in model.parameters() if p.requires_grad), dtype)
    plan = {
        "device": str(device),
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "lora_dtype": str(lora_dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "gradient_checkpointing": _mplan.gradient_checkpointing,
        "quantized_4bit": quantized,
        "liger": bool(liger),
        "lora_attached": attached,  # early_load: a fresh LoRA attached on the host while the job waited
        "compile": compiled.mode_for(device) if compile_on else False,  # "default" or "reduce-overhead" when compiled
        "compile_reason": compile_reason,
        "micro_batch_size": _mplan.micro_batch_size,
        "free_memory_gib": _mplan.free_gib,
        "memory_budget_gib": _mplan.budget_gib,
        "estimated_peak_gib": _mplan.estimated_peak_gib,
        "estimated_card_peak_gib": _mplan.card_peak_gib,  # what NVML should show (memory_plan.card_peak_bytes)
        "outside_allocator_gib": _mplan.outside_gib,  # the CUDA context when the plan read free memory
        "expandable_segments": _mplan.expandable_segments,
        "memory_plan": _mplan.reason,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "processes": world.size if world else 1,
        "fsdp": _mplan.fsdp,
    }
    return model, tokenizer, plan


def _apply_liger_kernels(model) -> bool:
    """Liger's fused RMSNorm, SwiGLU and RoPE kernels (fewer launches, less saved activation memory)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception:
        return False
    try:
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    except (TypeError, ValueError, NotImplementedError):  # an architecture Liger does not know: plain kernels
        return False
    return True


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    precision = str(precision).lower()
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision bf16 was asked for but this GPU does not support bfloat16")
        return torch.bfloat16
    # auto: bf16 where the GPU has it; fp32 on CPU (bf16 matmuls there are slow and not reproducible)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


VARLEN = "daemon_varlen"


def attention_for(device: torch.device) -> str:
    """Varlen flash attention for packed batches on a GPU that has it; SDPA otherwise.

    SDPA on a packed row needs a dense [T, T] per-document mask, which rules out its flash kernel and
    computes every masked-out block; varlen attention reads the document boundaries from `cu_seq_lens` and
    does only the work inside each document.
    """
    if device.type == "cuda" and register_varlen_attention():
        return VARLEN
    return "sdpa"


_VARLEN: dict = {}  # the torch function and which keywords it takes, looked up once (no inspect in the hot path)


def register_varlen_attention() -> bool:
    """Register VARLEN with transformers (once); False when this torch has no varlen flash attention."""
    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return False
        import inspect

        from transformers import AttentionInterface

        params = inspect.signature(varlen_attn).parameters
        _VARLEN.update(fn=varlen_attn, gqa="enable_gqa" in params, is_causal="is_causal" in params)
        AttentionInterface.register(VARLEN, varlen_attention_forward)
    return True


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                             **kwargs):
    """transformers attention function: causal attention within each document of a packed [1, T] row.

    Without `cu_seq_lens_q` (padded batches) it is SDPA with a causal mask and no attention mask, which is
    exact for right-padded rows (real tokens only ever see earlier, real tokens; pads carry no loss):
    VARLEN registers no mask function, so transformers builds no [T, T] mask for it at all.
    """
    if cu_seq_lens_q is None or query.device.type != "cuda":
        if cu_seq_lens_q is not None:  # CPU (tests): the same function, one document at a time
            return _per_document_sdpa(module, query, key, value, cu_seq_lens_q, scaling)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    q, k, v = (x.transpose(1, 2).squeeze(0) for x in (query, key, value))  # [T, heads, head_dim]
    extra = {"scale": scaling}
    if _VARLEN["gqa"]:
        extra["enable_gqa"] = k.shape[1] != q.shape[1]
    elif k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if _VARLEN["is_causal"]:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)
    out = _VARLEN["fn"](q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **extra)
    return out.unsqueeze(0), None


def _per_document_sdpa(module, query, key, value, cu_seq_lens, scaling):
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens.tolist()
    outs = [torch.nn.functional.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                             is_causal=True, scale=scaling)
            for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _targets(target_modules):
    if target_modules in (None, "all-linear", ["all-linear"]):
        return "all-linear"  # peft: every Linear except the output layer
    return list(target_modules)


def _count_params_from_config(model_cfg) -> int:
    h, layers = model_cfg.hidden_size, model_cfg.num_hidden_layers
    inter = getattr(model_cfg, "intermediate_size", 4 * h)
    heads = model_cfg.num_attention_heads
    kv = getattr(model_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(model_cfg, "head_dim", None) or h // heads
    attn = h * head_dim * (2 * heads + 2 * kv)
    embed = model_cfg.vocab_size * h * (1 if getattr(model_cfg, "tie_word_embeddings", False) else 2)
    return layers * (attn + 3 * h * inter) + embed


def _memory_plan(model_cfg, n_params: int, cfg, device: torch.device, *, can_quantize: bool = False,
                 resident_bytes: int = 0, bytes_per_param: int = 2, world=None, max_micro_batch: int | None = None):
    shape = memory_plan.Shape.from_config(model_cfg, n_params)
    outside = outside_allocator(device)
    free = free_memory(device, outside=outside)
    plan = memory_plan.plan_memory(shape, free_bytes=None if free is None else free + resident_bytes,
                                   outside_bytes=outside, expandable_segments=expandable_segments(device),
                                   max_length=cfg.training.max_length,
                                   micro_batch_size=min(cfg.training.micro_batch_size,
                                                        max_micro_batch or cfg.training.micro_batch_size),
                                   checkpointing=cfg.training.gradient_checkpointing, can_quantize=can_quantize,
                                   weight_bytes_per_param=bytes_per_param,
                                   max_tokens=cfg.training.micro_batch_tokens,
                                   world_size=world.size if world else 1,
                                   sharding=getattr(cfg.training, "fsdp", "auto"))
    return world.agree_plan(plan) if world else plan


def free_memory(device: torch.device, *, outside: int | None = None) -> int | None:
    """Free bytes this process's allocator may still get on `device`: the driver's free memory, under any
    per-process cap. The driver's figure already leaves out the CUDA context; a cap (set_per_process_memory_fraction,
    how bench/run.py makes a 24 GiB card of a larger one) counts only the allocator's reserved memory, so the
    memory outside the allocator (`outside`, the context: CUDA_CONTEXT when unknown) is taken off it too: a
    24 GiB cap then means 24 GiB on the card, as on a 24 GiB card."""
    if device.type != "cuda":
        return None
    index = _index(device)
    free, total = torch.cuda.mem_get_info(index)
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction_of is not None:
        fraction = fraction_of(index)
        if fraction < 1.0:
            context = memory_plan.CUDA_CONTEXT if outside is None else outside
            cap = int(fraction * total) - torch.cuda.memory_reserved(index) - int(context)
            free = min(free, cap)
    return free


def outside_allocator(device: torch.device) -> int | None:
    """What the card (NVML) shows for this process beyond the allocator's reserved memory: its CUDA context and
    the libraries loaded so far. None on CPU or without NVML."""
    if device.type != "cuda":
        return None
    from daemon.trainer import card_memory

    return card_memory.for_device(_index(device)).outside_allocator()


def expandable_segments(device: torch.device) -> bool:
    """Whether the allocator makes expandable segments (card_memory.configure_allocator, or the user's setting)."""
    if device.type != "cuda":
        return False
    from daemon.trainer import card_memory

    return card_memory.expandable_in_force()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True
