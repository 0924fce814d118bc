"""export --gguf: the GGUF file loads back in transformers (gguf_file=) as the same model and tokenizer, weights
bit-exact in f16 and bf16 (so llama.cpp's q/k row permutation is undone exactly), logits within the stated
tolerances, the same greedy answers; the Modelfile carries the chat template as an Ollama template; what cannot
be exported is refused in one line, with nothing left behind."""

from __future__ import annotations

import json

import pytest

from daemon import versions as publish
from daemon.paths import Layout, UserError
from daemon.trainer.gguf_export import export_gguf
from helpers import cli
from tiny_model import build_tiny_model, build_tokenizer

# Largest logit difference allowed against the merged model in float32, measured on the tiny model (whose logits
# are about 0.5): f16 and bf16 round each weight once, q8_0 quantizes blocks of 32 weights to 8 bits.
TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}
PROMPT = "The capital of France is Paris."


def publish_adapter(root, base_dir, target_modules=("q_proj", "k_proj", "v_proj", "down_proj")) -> Layout:
    """Publish v1 of adapter "default" with random (non-zero) LoRA weights for the model at base_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    layout = Layout.at(root).ensure()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random rather than zero, so the adapter really changes q and k, whose rows
    # llama.cpp permutes: a wrong permutation shows.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules),
                                            init_lora_weights=False))
    adapter_dir = layout.adapter_dir("default")
    staged = publish.staging_dir(adapter_dir, 1)
    model.save_pretrained(staged)
    publish.publish(adapter_dir, staged, {"adapter": "default", "job_id": 1, "base_model": "tiny",
                                          "base_model_path": str(base_dir), "lora": {"r": 4}})
    return layout


def base_plus_adapter(layout, base_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, layout.adapter_dir("default") / "v1").eval()


def load_gguf(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def greedy(model, ids, eos_token_id, n=12):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=eos_token_id,
                             pad_token_id=eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def build_qwen2(path):
    """A tiny random Qwen2 (q/k/v biases, no q/k permutation in GGUF) beside the tiny byte-level BPE tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True)
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # biases are zero after init: make them count
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_gguf_loads_back_as_the_merged_model(root, tiny_model_dir, quant):
    import torch

    layout = publish_adapter(root, tiny_model_dir)
    path = export_gguf(layout, "default", root / "exports" / "gguf", quant)
    assert path == root / "exports" / "gguf" / f"default-v1-{quant}.gguf"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["Modelfile", "export.json", path.name])
    assert not [p for p in path.parent.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    info = json.loads((path.parent / "export.json").read_text())
    assert (info["adapter"], info["version"], info["quant"], info["file"]) == ("default", 1, quant, path.name)

    from transformers import AutoTokenizer

    merged = base_plus_adapter(layout, tiny_model_dir).merge_and_unload()
    model, tokenizer = load_gguf(path)

    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = original.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        tokenize=False, add_generation_prompt=True)
    for text in (PROMPT, chat, "Numbers: 3.14 and 1000, ünïcödé!"):
        assert tokenizer(text)["input_ids"] == original(text)["input_ids"], text
    assert tokenizer.chat_template == original.chat_template

    if quant != "q8_0":  # every weight, llama.cpp's q/k permutation undone: exactly the merged weights, rounded
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[quant]
        got = model.state_dict()
        for name, weight in merged.state_dict().items():
            want = weight.to(dtype).float() if weight.dim() > 1 else weight
            assert torch.equal(got[name], want), name

    ids = torch.tensor([original(chat, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected, actual = merged(input_ids=ids).logits, model(input_ids=ids).logits
    assert (actual - expected).abs().max().item() < TOLERANCE[quant]
    eos = original.eos_token_id
    if quant != "q8_0":  # a random model's next-token scores are near ties: 8-bit weights may pick another one
        assert greedy(model, ids, eos) == greedy(merged, ids, eos)


def test_modelfile_carries_the_chatml_template_and_stop_tokens(root, tiny_model_dir):
    layout = publish_adapter(root, tiny_model_dir)
    path = export_gguf(layout, "default@1", root / "out", "q8_0")
    text = (path.parent / "Modelfile").read_text()
    assert f"\nFROM ./{path.name}\n" in text
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}" in text
    assert "<|im_start|>system" not in text  # the tiny template has no default system prompt
    assert text.endswith('PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n')


def test_a_default_system_prompt_is_kept_and_a_foreign_template_is_left_out(root, tmp_path, tiny_model_dir,
                                                                            capsys):
    from transformers import AutoTokenizer

    from daemon.trainer.gguf_modelfile import modelfile

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Tiny."
                               "<|im_end|>\n' }}{% endif %}" + tokenizer.chat_template)
    text, warning = modelfile(tokenizer, "m.gguf", "test")
    assert warning is None
    assert ('{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}<|im_start|>system\n'
            'You are Tiny.<|im_end|>\n{{ end }}') in text

    base_dir = build_tiny_model(tmp_path / "inst", chat_template="{% for m in messages %}[INST] {{ m['content'] }} "
                                                                 "[/INST]{% endfor %}")
    path = export_gguf(publish_adapter(root, base_dir), "default", root / "out")
    text = (path.parent / "Modelfile").read_text()
    assert f"\nFROM ./{path.name}\n" in text
    assert not [line for line in text.splitlines() if line.startswith(("TEMPLATE", "PARAMETER"))]
    assert "# No TEMPLATE: the chat template is not ChatML" in text
    assert "Warning: the chat template is not ChatML and was not translated" in capsys.readouterr().err


def test_a_chatml_template_that_writes_tools_its_own_way_is_left_out(tiny_model_dir):
    from test_data_shapes import TOOLS_TEMPLATE  # Qwen2.5's template, shortened
    from transformers import AutoTokenizer

    from daemon.trainer.gguf_modelfile import chatml_default_system, modelfile
    from tiny_model import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    assert chatml_default_system(tokenizer) is None  # plain conversations render as ChatML: only tools differ
    text, warning = modelfile(tokenizer, "m.gguf", "test")
    assert warning and "writes tools, tool calls or tool results otherwise than plain ChatML" in warning
    assert f"# No TEMPLATE: {warning}." in text and "\nFROM ./m.gguf\n" in text
    assert not [line for line in text.splitlines() if line.startswith(("TEMPLATE", "PARAMETER"))]
    # A template that mentions tools but writes them as plain ChatML keeps its TEMPLATE.
    tokenizer.chat_template = "{%- if tools %}{%- endif %}" + CHAT_TEMPLATE
    text, warning = modelfile(tokenizer, "m.gguf", "test")
    assert warning is None and 'TEMPLATE """' in text


def test_lora_export_is_the_base_plus_the_adapter_as_llama_cpp_applies_it(root, tiny_model_dir):
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    layout = publish_adapter(root, tiny_model_dir)
    base_path = export_gguf(layout, "default", root / "lora", "f16", lora=True)
    adapter_path = base_path.parent / "default-v1-lora-f16.gguf"
    assert sorted(p.name for p in base_path.parent.iterdir()) == sorted(
        ["Modelfile", "export.json", "base-f16.gguf", adapter_path.name])
    modelfile = (base_path.parent / "Modelfile").read_text()
    assert "\nFROM ./base-f16.gguf\nADAPTER ./default-v1-lora-f16.gguf\n" in modelfile

    base, _ = load_gguf(base_path)  # the base file is the base model
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    for name, weight in base.state_dict().items():
        assert torch.equal(weight, original[name].half().float() if weight.dim() > 1 else original[name]), name

    # llama.cpp computes W·x + alpha/r · B·(A·x) for every <W>.lora_a/.lora_b pair: applied to the base file's
    # tensors that gives the merged file's, in llama.cpp's own layout (q/k rows permuted).
    merged_path = export_gguf(layout, "default", root / "merged", "f16")
    read = {}
    for path in (base_path, adapter_path, merged_path):
        reader = GGUFReader(path)
        read[path] = {t.name: dequantize(t.data, t.tensor_type).reshape(t.data.shape) for t in reader.tensors}
        if path == adapter_path:
            alpha = float(reader.fields["adapter.lora.alpha"].contents())
            assert reader.fields["general.type"].contents() == "adapter"
    pairs = {n.removesuffix(".lora_a") for n in read[adapter_path] if n.endswith(".lora_a")}
    assert len(pairs) == 2 * 4 and "blk.0.attn_q.weight" in pairs  # q, k, v, down in both blocks
    for name, weight in read[base_path].items():
        if name in pairs:
            a, b = read[adapter_path][f"{name}.lora_a"], read[adapter_path][f"{name}.lora_b"]
            weight = weight + alpha / a.shape[0] * (b.astype(np.float32) @ a.astype(np.float32))
        np.testing.assert_allclose(weight, read[merged_path][name], atol=2e-3, err_msg=name)


def test_qwen2_round_trip_is_exact_in_f16(root, tmp_path):
    import torch
    from transformers import AutoTokenizer

    base_dir = build_qwen2(tmp_path / "qwen2")
    layout = publish_adapter(root, base_dir)
    path = export_gguf(layout, "default", root / "out", "f16")
    model, tokenizer = load_gguf(path)
    original = AutoTokenizer.from_pretrained(base_dir)  # Qwen2's own pre-tokenizer (digits one by one)
    text = "In 2024, 12345 apples cost $3.50!"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    merged = base_plus_adapter(layout, base_dir).merge_and_unload()
    got = model.state_dict()
    for name, weight in merged.state_dict().items():
        want = weight.half().float() if weight.dim() > 1 else weight
        assert torch.equal(got[name], want), name
    assert model.config.tie_word_embeddings


def test_what_cannot_be_exported_is_refused_in_one_line(root, tmp_path, tiny_model_dir):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    layout = publish_adapter(root, tiny_model_dir)
    (root / "taken").mkdir()
    (root / "taken" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not an empty folder"):
        export_gguf(layout, "default", root / "taken")
    assert (root / "taken" / "x").read_text() == "keep me"
    with pytest.raises(UserError, match=r"^cannot write the GGUF export to /proc/x: .* system folder"):
        export_gguf(layout, "default", "/proc/x")
    with pytest.raises(UserError, match="unknown --quant 'q4_0': choose one of f16, bf16, q8_0"):
        export_gguf(layout, "default", root / "out", "q4_0")

    mistral_dir = tmp_path / "mistral"
    tokenizer = build_tokenizer()
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(mistral_dir)
    tokenizer.save_pretrained(mistral_dir)
    other = publish_adapter(root / "other", mistral_dir, target_modules=("q_proj",))
    with pytest.raises(UserError, match="^cannot export a 'mistral' model to GGUF: supported architectures are "
                                        "llama, qwen2$"):
        export_gguf(other, "default", root / "out")
    assert not (root / "out").exists() and not [p for p in root.iterdir() if p.name.startswith(".out")]


def test_cli_export_gguf_and_its_usage_errors(root, tiny_model_dir):
    publish_adapter(root, tiny_model_dir)
    both = cli(root, "export", "default", "--merge", str(root / "a"), "--gguf", str(root / "b"))
    assert both.returncode != 0 and "choose one of --merge OUT or --gguf OUT" in both.stderr
    assert not (root / "a").exists() and not (root / "b").exists()
    stray = cli(root, "export", "default", "--merge", str(root / "a"), "--quant", "q8_0")
    assert stray.returncode != 0 and "--quant goes with --gguf" in stray.stderr
    done = cli(root, "export", "default@1", "--gguf", str(root / "gguf"), "--quant", "bf16")
    assert done.returncode == 0, done.stderr
    assert f"GGUF written to {root / 'gguf' / 'default-v1-bf16.gguf'}" in done.stdout
    assert (root / "gguf" / "Modelfile").is_file() and "Warning" not in done.stderr, done.stderr
