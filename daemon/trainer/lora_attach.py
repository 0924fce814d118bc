"""Attaching the job's LoRA before the GPU is free, and continuing a parent version on it after the go.

PEFT builds one LoRA module per targeted Linear, in Python: 1.4 s for the 196 of Qwen2.5-1.5B on an H200 host,
whether it starts fresh (get_peft_model) or from the parent version (PeftModel.from_pretrained). A trainer
waiting at the GPU gate has the base in host memory (early_load.Preload), so it attaches a fresh LoRA there, as
model.prepare_model would (the same config, the same seed, the same host RNG: the same A matrices). After the
go, prepare_model keeps it when it is what the job needs: a fresh adapter, or the parent's when the parent's
LoRA config and tensors are this one's (then the parent's weights are copied into it). A parent of another LoRA
config or other tensors takes the model back to its bare base (`unload`) and attaches as usual: the
speculation never changes what trains, only how soon.
"""

from __future__ import annotations

from pathlib import Path

import torch

# LoraConfig fields that say nothing about the modules PEFT builds or how they compute.
_NOT_STRUCTURE = {"inference_mode", "base_model_name_or_path", "revision", "peft_version", "runtime_config"}


def lora_config(cfg):
    """The LoraConfig of a fresh adapter for this job (model.prepare_model builds the same)."""
    from peft import LoraConfig

    from daemon.trainer.model import _targets

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=_targets(cfg.lora.target_modules), task_type="CAUSAL_LM", bias="none")


def fresh_lora(model, cfg):
    """The base frozen and a fresh LoRA attached, on the host, seeded as prepare_model seeds it. Touches neither
    CUDA nor its RNG (the early trainer holds no CUDA context until the go)."""
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.training.seed)
        return get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=cfg.lora.dtype == "fp32")


def structure(config) -> dict:
    """What of a LoraConfig decides the modules PEFT builds and their computation."""
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_STRUCTURE}


def why_not_kept(model, adapter_dir: Path | None) -> str | None:
    """Why the LoRA attached early cannot carry this job (None: it can): a parent version with another LoRA
    config, or whose saved tensors are not this adapter's one for one (continuing it is PEFT's own load then)."""
    if adapter_dir is None:
        return None
    from peft import LoraConfig

    try:
        parent = LoraConfig.from_pretrained(str(adapter_dir))
        saved = _saved_shapes(Path(adapter_dir) / SAFETENSORS)
    except Exception as e:  # not a LoRA folder read here: the usual path says what is wrong with it
        return f"the parent's adapter is unreadable here ({type(e).__name__})"
    if structure(parent) != structure(model.peft_config["default"]):
        return "the parent version's LoRA config differs from this job's"
    if saved != {key: tuple(p.shape) for key, p in _saved_names(model).items()}:
        return "the parent version's tensors are not this adapter's one for one"
    return None


SAFETENSORS = "adapter_model.safetensors"


def _saved_names(model) -> dict:
    """The adapter's trainable tensors by the names a saved LoRA gives them: PEFT saves
    `...q_proj.lora_A.weight` for the model's `...q_proj.lora_A.default.weight`."""
    return {name.replace(".default.", ".", 1): p for name, p in model.named_parameters() if p.requires_grad}


def _saved_shapes(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def load_parent(model, adapter_dir: Path, device=None) -> None:
    """The parent version's LoRA weights copied into the attached adapter (why_not_kept found them the same
    tensors, one for one), as PeftModel.from_pretrained would load them, without PEFT's pairwise matching of
    names (1 s for a 1.5B model's 392 tensors on an H200 host). `device`: where the adapter is now (the file is
    read straight there; default the host)."""
    from safetensors.torch import load_file

    where = "cpu" if device is None or torch.device(device).type == "cpu" else str(device)  # safetensors: no "cpu:0"
    weights = load_file(str(Path(adapter_dir) / SAFETENSORS), device=where)
    with torch.no_grad():
        for key, p in _saved_names(model).items():
            p.copy_(weights[key])
