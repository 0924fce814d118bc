"""torch.compile of the decoder layers, for the models whose steps are bound by the host (training.compile).

Small models (SmolLM2-135M, Qwen2.5-1.5B) spend most of a micro-batch launching ~3,800 kernels from Python
(docs/performance.md): the GPU waits on the host. Compiling each decoder layer (LoRA'd Linears, norms, RoPE,
SwiGLU, the attention call) with Inductor fuses the elementwise work into few kernels and takes the Python of
peft's LoRA modules out of the hot path. What it needs:

- one shape: every packed micro-batch is padded to the same number of tokens and its `cu_seq_lens` to the same
  number of entries (packing.pad_fixed; the recipe computes both from the whole run's plan, so one graph serves
  every micro-batch and nothing recompiles mid-run). Pads are documents of their own with no labels, so they
  change neither the loss nor the gradients; `max_seq_len` is fixed too (the longest document allowed).
- no Liger: Liger replaces RMSNorm/SwiGLU/RoPE with Triton autograd Functions module-wide, and Dynamo does not
  trace them; the compiled layers fuse norms and activations themselves. The model is prepared without Liger
  when it is compiled (model.py), and a process whose transformers modules Liger already patched is not compiled.
- the eager path unchanged: the embedding, the final norm and the chunked loss's matmuls (daemon/trainer/loss.py)
  stay eager; on a GPU each loss chunk's softmax and gradient run as one Inductor kernel (loss._fused).

Compiled artefacts are cached (Inductor's FX graph and autograd caches, Triton's kernels) under the daemon
root's state/torch_compile/ folder, so the next job of the same model shape and micro-batch skips most of the
compile time. `MODE` is what a GPU runs: "reduce-overhead" (Inductor + CUDA graphs, the faster; its gradient
accumulation was checked on an H200 by bench/gpu_check.py) or "default" (Inductor kernels alone; bench/run.py
--compile-modes measures both). The CPU always runs "default": CUDA graphs are a GPU's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

MODE = "reduce-overhead"
# training.compile: auto compiles CUDA models below this many parameters (measured on an H200: docs/performance.md).
AUTO_MAX_PARAMS = 3_000_000_000
# ... and runs of at least this many tokens: below it the compile (tens of seconds in a fresh process, less from
# the cache) costs more than the faster steps save.
AUTO_MIN_TOKENS = 500_000
# cu_seq_lens entries are rounded up to a multiple of this, so that jobs of one model and token budget share one
# shape, and with it Inductor's cached artefacts (an empty document costs the attention nothing).
DOC_BUCKET = 64
CACHE_FOLDER = "torch_compile"


def decide(setting, device: torch.device, n_params: int, *, quantized: bool, checkpointing: bool, fsdp: bool,
           allowed: bool = True, model=None, run_tokens: int | None = None) -> tuple[bool, str]:
    """(compile or not, why) for training.compile = auto | true | false; `run_tokens`: about how many tokens the
    run trains (None: unknown, not a reason to stay eager)."""
    setting = str(setting).lower()
    if setting == "false":
        return False, "training.compile: false"
    if not allowed:
        return False, "this recipe's step has no fixed shape (DPO): eager"
    blocker = ("4-bit base" if quantized else "activation checkpointing" if checkpointing
               else "FSDP" if fsdp else None)
    if blocker:
        return False, f"eager: {blocker} is not compiled"
    patched = liger_patched(model)
    if patched:
        return False, f"eager: Liger already patched this process ({patched}); Dynamo cannot trace it"
    if setting == "true":
        return True, "training.compile: true"
    if device.type != "cuda":
        return False, "auto: eager on CPU"
    if n_params >= AUTO_MAX_PARAMS:
        return False, f"auto: eager at {n_params / 1e9:.1f}B parameters (>= {AUTO_MAX_PARAMS / 1e9:.0f}B: GPU-bound)"
    if run_tokens is not None and run_tokens < AUTO_MIN_TOKENS:
        return False, (f"auto: eager for a short run (~{run_tokens:,} tokens < {AUTO_MIN_TOKENS:,}: the compile "
                       "costs more than it saves)")
    return True, f"auto: compiled at {n_params / 1e9:.2f}B parameters (< {AUTO_MAX_PARAMS / 1e9:.0f}B: host-bound)"


def liger_patched(model=None) -> str | None:
    """The first attribute of `model`'s transformers modeling module (of any, without a model) that Liger replaced
    in this process, or a Liger module inside `model`; None if none."""
    names = None
    if model is not None:
        for mod in model.modules():
            if type(mod).__module__.startswith("liger_kernel"):
                return type(mod).__name__
        names = {type(mod).__module__ for mod in model.modules() if type(mod).__module__.startswith("transformers.")}
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or not name.split(".")[-1].startswith("modeling_"):
            continue
        if names is not None and name not in names:
            continue
        for attr, value in list(vars(module).items()):
            if str(getattr(value, "__module__", "") or "").startswith("liger_kernel"):
                return f"{name.split('.')[-1]}.{attr}"
    return None


def decoder_layers(model) -> list[torch.nn.Module]:
    from daemon.trainer.loss import _causal_lm

    causal_lm = _causal_lm(model)
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else []


def compile_layers(model, *, mode: str | None = None, cache_dir: Path | None = None) -> int:
    """Compile every decoder layer in place (nn.Module.compile: the module keeps its parameters and state dict
    keys); returns how many were compiled. Nothing runs until the first forward."""
    mode = mode or MODE
    if cache_dir is not None:
        use_cache_dir(cache_dir)
    layers = decoder_layers(model)
    import torch._dynamo

    # Layers of one model share their compiled code (their parameters are graph inputs); the margin covers a
    # model whose layers differ (sliding-window and full-attention layers) and a no-grad evaluation pass.
    limit = max(int(getattr(torch._dynamo.config, "recompile_limit", 8)), 2 * len(layers) + 8)
    torch._dynamo.config.recompile_limit = limit
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit)
    for layer in layers:
        layer.compile(dynamic=False, mode=None if mode == "default" else mode)
        _train_only(layer)
    return len(layers)


def _train_only(layer: torch.nn.Module) -> None:
    """The compiled code for training steps only: in eval mode or without grad (the evaluation pass, the
    probes' generation with its KV cache and a new length per token, the judge's incumbent adapter) the layer runs
    its eager code, instead of recompiling for every new shape."""
    compiled_call = layer._compiled_call_impl

    def call(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return compiled_call(*args, **kwargs)
        return layer._call_impl(*args, **kwargs)

    layer._compiled_call_impl = call


def use_cache_dir(path: Path) -> None:
    """Inductor's (and through it Triton's) on-disk caches under `path`, unless the user set them."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))


def root_cache_dir(job_dir: Path | None) -> Path | None:
    """<root>/state/torch_compile for a job folder under a daemon root (<root>/queue/<state>/<job>)."""
    if job_dir is None:
        return None
    for parent in Path(job_dir).resolve().parents:
        if (parent / "state").is_dir() and (parent / "queue").is_dir():
            return parent / "state" / CACHE_FOLDER
    return None


def fixed_shape(token_counts: list[int], plans: list[list[list[int]]], *, token_budget: int, max_length: int,
                multiple: int = 128, doc_bucket: int = DOC_BUCKET) -> dict:
    """The one shape every packed micro-batch of the run is padded to: tokens (the budget, or the largest
    micro-batch, rounded up to `multiple`), documents (the most any micro-batch has, pads included, rounded up to
    `doc_bucket`), and the longest document."""
    largest = max((sum(token_counts[i] for i in mb) for plan in plans for mb in plan), default=0)
    tokens = -(-max(token_budget, largest) // multiple) * multiple
    max_doc = max([max_length, *token_counts]) if token_counts else max_length
    docs = 0
    for plan in plans:
        for mb in plan:
            extra = tokens - sum(token_counts[i] for i in mb)
            docs = max(docs, len(mb) + -(-extra // max_doc))
    docs = -(-docs // doc_bucket) * doc_bucket
    return {"tokens": tokens, "docs": docs, "max_doc": max_doc}


def mode_for(device: torch.device) -> str:
    """The compile mode of a model trained on `device`: MODE on a GPU, Inductor alone on the CPU."""
    return MODE if torch.device(device).type == "cuda" else "default"


def graphs(plan: dict) -> bool:
    """Whether a model prepared with this plan runs its layers as CUDA graphs."""
    return plan.get("compile") == "reduce-overhead"


def mark_step() -> None:
    """Before each micro-batch under CUDA graphs: the previous replay's outputs may be overwritten."""
    if MODE == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def eager():
    """A context in which compiled layers run eagerly (the evaluation pass: other shapes, no grad)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        import contextlib

        return contextlib.nullcontext()
    return set_stance("force_eager")
