"""`training-daemon export ADAPTER[@VERSION] --gguf OUT [--quant f16|bf16|q8_0]`: one GGUF file for llama.cpp and
Ollama, with an Ollama Modelfile beside it.

The adapter is merged into its base (export.load_merged) and written with the `gguf` package llama.cpp itself
ships: tensor names come from gguf.get_tensor_name_map, tokenizer merges, special-token ids and the chat
template from gguf.SpecialVocab. What the package leaves to llama.cpp's converter script is done here as that
script does it: the hyperparameter keys, the Q/K row permutation of llama (llama.cpp's rope pairs the halves of
a head, transformers its even and odd rows), no output.weight when the embeddings are tied, token types, and the
tokenizer.ggml.pre name of the byte-level pre-tokenizer. Only what was verified is accepted: llama and qwen2
models with a byte-level BPE tokenizer (docs/export.md says how); anything else is refused in one line.

OUT is a folder, written whole under a temporary name and renamed (export.write_folder): <adapter>-v<N>-<quant>.gguf,
Modelfile, export.json; with --lora, base-<quant>.gguf and the adapter alone, <adapter>-v<N>-lora-<quant>.gguf
(daemon/trainer/gguf_lora.py), instead of the merged file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from daemon import durable
from daemon.paths import Layout, UserError

QUANTS = ("f16", "bf16", "q8_0")
# HF model_type -> the gguf package's architecture, and whether its q/k rows need llama.cpp's rope permutation.
ARCHITECTURES = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}
# tokenizer.ggml.pre names for the byte-level pre-tokenizers llama.cpp knows, keyed by the Split regex that comes
# before ByteLevel in tokenizer.json (None: ByteLevel does the splitting itself, GPT-2's regex). llama.cpp picks the
# same regex for each name (src/llama-vocab.cpp); its converter finds them by hashing a test string instead.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZERS = {None: "gpt-2", "digits": "smollm", _QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def export_gguf(layout: Layout, spec: str, out: Path, quant: str = "f16", lora: bool = False) -> Path:
    """Write OUT; returns the path of the GGUF the Modelfile names first. lora=True: the base model and the adapter
    as two files (llama.cpp --lora, Ollama ADAPTER) instead of the merged model."""
    from daemon.trainer.export import load_merged, prepare_destination, write_folder
    from daemon.trainer.gguf_lora import lora_problem, write_lora_gguf
    from daemon.trainer.gguf_modelfile import modelfile

    if quant not in QUANTS:
        raise UserError(f"unknown --quant {quant!r}: choose one of {', '.join(QUANTS)}")
    out = prepare_destination(out, "the GGUF export")
    model, tokenizer, tokenizer_dir, provenance = load_merged(layout, spec, merge=not lora)
    check_supported(model.config, tokenizer)
    version_dir = Path(provenance["source"])
    if lora and (problem := lora_problem(version_dir)):
        raise UserError(f"cannot export the adapter alone as a llama.cpp LoRA: {problem}; export it merged")
    label = f"{provenance['adapter']}-v{provenance['version']}"
    name = f"base-{quant}.gguf" if lora else f"{label}-{quant}.gguf"
    adapter_name = f"{label}-lora-{quant}.gguf" if lora else None
    text, warning = modelfile(tokenizer, name, f"{label} {'on' if lora else 'merged into'} "
                                               f"{provenance['base_model']}, {quant}", adapter_name)

    def write(tmp: Path) -> None:
        write_gguf(model, tokenizer, tokenizer_dir, tmp / name, quant,
                   title=f"{provenance['base_model']}" if lora else f"{provenance['adapter']} v{provenance['version']}")
        if adapter_name:
            write_lora_gguf(version_dir, model.config, tmp / adapter_name, quant)
        durable.write_text(tmp / "Modelfile", text)
        durable.write_json(tmp / "export.json", {**provenance, "format": "gguf", "quant": quant, "file": name,
                                                 "lora_file": adapter_name})

    done = write_folder(out, "the GGUF export", write)
    if warning:
        print(f"Warning: {warning}", file=sys.stderr)
    return done / name


def check_supported(config, tokenizer) -> None:
    """Refuse in one line what this writer cannot represent faithfully, before any file is written."""
    if config.model_type not in ARCHITECTURES:
        raise UserError(f"cannot export a {config.model_type!r} model to GGUF: supported architectures are "
                        f"{', '.join(ARCHITECTURES)}")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"cannot export to GGUF: rope scaling {rope.get('rope_type')!r} is not supported "
                        "(only unscaled rope)")
    if getattr(config, "use_sliding_window", False):
        raise UserError("cannot export to GGUF: sliding-window attention is not supported")
    pre_tokenizer_name(tokenizer)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; a tokenizer llama.cpp would split differently is refused."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("cannot export to GGUF: the tokenizer has no tokenizer.json (a fast tokenizer is needed)")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if (spec.get("model") or {}).get("type") != "BPE":
        raise UserError(f"cannot export to GGUF: the tokenizer is {(spec.get('model') or {}).get('type')}, only "
                        "byte-level BPE tokenizers (GPT-2 style) are supported")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = "unsupported"
    if steps and steps[-1].get("type") == "ByteLevel":
        first, last = steps[:-1], steps[-1]
        if not first and last.get("use_regex", True):
            key = None
        elif (len(first) == 1 and first[0].get("type") == "Digits" and first[0].get("individual_digits")
              and last.get("use_regex", True)):
            key = "digits"
        elif len(first) == 1 and first[0].get("type") == "Split" and not last.get("use_regex", True):
            key = (first[0].get("pattern") or {}).get("Regex", "unsupported")
    if key not in PRE_TOKENIZERS:
        raise UserError(f"cannot export to GGUF: llama.cpp has no pre-tokenizer known to match this tokenizer's "
                        f"({json.dumps(pre)[:200]}); supported: byte-level BPE as in GPT-2, SmolLM, Qwen2, Llama 3")
    return PRE_TOKENIZERS[key]


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("full_attention", rope) if isinstance(rope, dict) else {}


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, quant: str, title: str) -> None:
    """Write `model` (a transformers causal LM) and its tokenizer as one GGUF file at `path`."""
    import gguf

    config = model.config
    arch_name, permute_qk = ARCHITECTURES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_name(title)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer, tokenizer_dir, config.vocab_size)
    _add_tensors(writer, model, gguf.get_tensor_name_map(arch, config.num_hidden_layers), quant, permute_qk)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hyperparameters(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    theta = _rope(config).get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer, tokenizer, tokenizer_dir: Path, vocab_size: int) -> None:
    import gguf

    if len(tokenizer) > vocab_size:
        raise UserError(f"cannot export to GGUF: the tokenizer has {len(tokenizer)} tokens, the model only "
                        f"{vocab_size} embedding rows")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # rows past the tokenizer's last id exist (padded embeddings): llama.cpp wants names
        token = by_id.get(i)
        tokens.append(f"[PAD{i}]" if token is None else token)
        types.append(gguf.TokenType.UNUSED if token is None else gguf.TokenType.NORMAL if i not in added
                     else gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    # What the tokenizer really does to a plain text, stated outright: llama.cpp's default for a BPE vocabulary is
    # to prepend BOS, which would put <|im_start|> before every ChatML prompt.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token = {"bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
                                 "eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]}
    for kind in ("bos", "eos", "unk", "pad"):  # the loaded tokenizer's roles win over the files SpecialVocab reads
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special.special_token_ids[kind] = token_id
    if tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _add_tensors(writer, model, names, quant: str, permute_qk: bool) -> None:
    import gguf
    import torch

    config = model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"cannot export to GGUF: no GGUF name for tensor {hf_name}")
        with torch.no_grad():
            data = tensor.detach().to(torch.float32).cpu().numpy()
        if permute_qk and (".q_proj." in hf_name or ".k_proj." in hf_name):
            data = permute(data, heads, heads if ".q_proj." in hf_name else kv_heads)
        qtype = tensor_type(data, quant)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def tensor_type(data, quant: str):
    """The GGML type a tensor is stored in: norms and biases stay float32 as llama.cpp's converter keeps them; a
    matrix whose rows do not fill whole Q8_0 blocks falls back to f16, as there."""
    import gguf

    kind = gguf.GGMLQuantizationType
    qtype = {"f16": kind.F16, "bf16": kind.BF16, "q8_0": kind.Q8_0}[quant] if data.ndim > 1 else kind.F32
    if qtype == kind.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = kind.F16
    return qtype


def permute(weights, n_head: int, n_head_kv: int | None):
    """llama.cpp's row order for q/k projections (convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
