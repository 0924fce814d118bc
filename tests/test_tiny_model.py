"""The shared tiny model loads like a real one: from_pretrained, a forward pass, a chat template."""

from __future__ import annotations

import os


def test_root_fixture_is_the_working_directory_and_offline(root):
    assert root.is_dir() and os.getcwd() == str(root)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_tiny_model_loads_runs_and_renders_chat(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert any(tiny_model_dir.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_system = tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert no_system == "<|im_start|>user\nHi there?<|im_end|>\n"

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_encodes_any_unicode_losslessly(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Zürich 東京 🙂 naïve — tab\there\nnewline <|im_end|> end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: nothing is unknown, nothing lost
    # The special markers are single tokens, and eos is the end-of-turn marker, as in SmolLM2.
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
