"""The adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m BASE.gguf --lora THIS.gguf`), written beside the merged
GGUF by export --gguf.

The layout is llama.cpp's convert_lora_to_gguf.py: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and for each adapted matrix W of the base, `<W's GGUF name>.lora_a` (A, r x in) and
`.lora_b` (B, out x r); llama.cpp scales B·A by alpha / r. Llama's q/k rows are permuted for llama.cpp's rope as in
the base file, which for W = B·A means permuting the rows of B. A base GGUF with the same tensor names is needed:
the one export --gguf writes for the bare base, or any llama.cpp conversion of that base.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.paths import UserError


def lora_problem(version_dir: Path) -> str | None:
    """Why this adapter cannot be expressed as a llama.cpp LoRA, or None."""
    cfg = json.loads((version_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        return f"it is a {cfg.get('peft_type')} adapter, not LoRA"
    for key, why in (("use_dora", "DoRA"), ("use_rslora", "rank-stabilised scaling"),
                     ("modules_to_save", "fully trained modules"), ("rank_pattern", "per-module ranks"),
                     ("alpha_pattern", "per-module alphas")):
        if cfg.get(key):
            return f"it uses {why}, which llama.cpp's LoRA format cannot express"
    return None


def write_lora_gguf(version_dir: Path, config, path: Path, quant: str) -> None:
    """Write the adapter in version_dir, trained on a model with `config`, as a LoRA GGUF at `path`."""
    import gguf
    import torch
    from safetensors.torch import load_file

    from daemon.trainer.gguf_export import ARCHITECTURES, permute, tensor_type

    problem = lora_problem(version_dir)
    if problem:
        raise UserError(f"cannot write a LoRA GGUF: {problem}")
    arch_name, permute_qk = ARCHITECTURES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    cfg = json.loads((version_dir / "adapter_config.json").read_text())
    weights = load_file(str(version_dir / "adapter_model.safetensors"))

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    for key in sorted(weights):
        if ".lora_A." not in key and ".lora_B." not in key:
            raise UserError(f"cannot write a LoRA GGUF: unexpected tensor {key} in the adapter")
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        name = names.get_name(module)
        if name is None or name in ("token_embd", "output"):
            raise UserError(f"cannot write a LoRA GGUF: llama.cpp cannot apply a LoRA to {module}")
        data = weights[key].to(torch.float32).numpy()
        is_b = ".lora_B." in key
        if permute_qk and is_b and module.endswith(("q_proj", "k_proj")):
            data = permute(data, heads, heads if module.endswith("q_proj") else kv_heads)
        qtype = tensor_type(data, quant)
        writer.add_tensor(f"{name}.weight.lora_{'b' if is_b else 'a'}", gguf.quants.quantize(data, qtype),
                          raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
