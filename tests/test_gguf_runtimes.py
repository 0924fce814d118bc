"""export --gguf run where it is used: Ollama's template language (Go's text/template) renders the Modelfile's
TEMPLATE as the Jinja chat template does; llama.cpp (through llama-cpp-python, its Python binding) tokenizes like
transformers and gives the same greedy answers from the merged file and from base + LoRA; and the proof on the
embedded SmolLM2-135M-Instruct with an adapter the daemon trained. Each runtime test skips without its runtime."""

from __future__ import annotations

import json
import shutil

import pytest

from daemon.paths import Layout
from daemon.trainer.gguf_export import export_gguf
from test_gguf_export import PROMPT, base_plus_adapter, greedy, load_gguf, publish_adapter

# The same for SmolLM2-135M-Instruct with a trained adapter (logits of magnitude 20 to 30), measured 0.056 (f16),
# 0.54 (bf16) and 1.37 (q8_0), bounded here at about twice that.
SMOLLM2_TOLERANCE = {"f16": 0.12, "bf16": 1.0, "q8_0": 2.5}


def llama_cpp_greedy(path, prompt: str, n: int, lora=None) -> tuple[list[int], list[int]]:
    """(llama.cpp's tokens for the prompt, its greedy continuation) through llama-cpp-python, llama.cpp's own Python
    binding: the argmax of its logits, no sampler in between."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=2, seed=0,
                logits_all=True, verbose=False)  # logits_all: else llm.scores is not filled in
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    out = []
    llm.eval(ids)
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == llm.token_eos():
            break
        llm.eval([token])
    return ids, out


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python (llama.cpp's Python binding) is not installed")
def test_llama_cpp_tokenizes_and_answers_like_transformers(root, tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    layout = publish_adapter(root, tiny_model_dir)
    merged_path = export_gguf(layout, "default", root / "merged", "f16")
    base_path = export_gguf(layout, "default", root / "lora", "f16", lora=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    merged = base_plus_adapter(layout, tiny_model_dir).merge_and_unload()
    for text in (PROMPT, tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                                       tokenize=False, add_generation_prompt=True)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = greedy(merged, torch.tensor([ids]), tokenizer.eos_token_id, 12)
        assert llama_cpp_greedy(merged_path, text, 12) == (ids, expected)
        assert llama_cpp_greedy(base_path, text, 12, lora=base_path.parent / "default-v1-lora-f16.gguf") == (
            ids, expected)


# Ollama renders TEMPLATE with Go's text/template, .Messages a list of {Role, Content}: so does this program.
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string      `json:"template"`
		Cases    [][]Message `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(in.Template))
	out := []string{}
	for _, msgs := range in.Cases {
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"Messages": msgs, "System": ""}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.skipif(not shutil.which("go"), reason="no Go toolchain to run Ollama's template language")
def test_the_ollama_template_renders_what_the_jinja_template_does(tmp_path, tiny_model_dir):
    import subprocess

    from transformers import AutoTokenizer

    from daemon.trainer.gguf_modelfile import chatml_default_system, go_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    smollm2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
               "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>"
               "\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
               "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    user = {"role": "user", "content": "What is 2 + 2?\nShow your work."}
    assistant = {"role": "assistant", "content": "4"}
    system = {"role": "system", "content": "Answer in one word."}
    cases = [[user], [system, user], [user, assistant, user], [system, user, assistant, user]]
    (tmp_path / "render.go").write_text(GO_RENDER)
    for template in (tokenizer.chat_template, smollm2):
        tokenizer.chat_template = template
        go = go_template(chatml_default_system(tokenizer))
        run = subprocess.run(["go", "run", "render.go"], input=json.dumps({"template": go, "cases": cases}),
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert run.returncode == 0, run.stderr
        expected = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in cases]
        assert json.loads(run.stdout) == expected


# ---- the embedded SmolLM2-135M-Instruct, with an adapter the daemon trained (slow) ----

def _smollm2_converted() -> bool:
    from daemon import embedded

    return embedded.is_converted(embedded.embedded_model_path())


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a 12-step CPU training unless shared, three exports and their loads, a busy 2-core runner
@pytest.mark.skipif(not _smollm2_converted(), reason="embedded model not converted (run `bash scripts/setup.sh`)")
def test_smollm2_with_a_trained_adapter_answers_the_same_from_gguf(root, smollm2_fact):
    import torch
    from transformers import AutoTokenizer

    from daemon import embedded
    from daemon.paths import PROJECT_DIR
    from helpers import jobs

    examples = PROJECT_DIR / "examples"
    # The demo's fact trained by `run --once` (tests/real_model_fixture.py, shared with tests/test_real_model.py),
    # copied into this test's root: the exports below write there.
    run = smollm2_fact.run
    assert run.returncode == 0, run.stdout + run.stderr
    smollm2_fact.copy_to(root)
    assert [(j["state"], j["version"]) for j in jobs(root)] == [("done", 1)]
    layout = Layout.at(root)
    merged = base_plus_adapter(layout, embedded.embedded_model_path()).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(embedded.embedded_model_path())
    questions = json.loads((examples / "questions.json").read_text())
    prompts = {q["question"]: tokenizer.apply_chat_template([{"role": "user", "content": q["question"]}],
                                                            tokenize=False, add_generation_prompt=True)
               for q in questions.values()}
    ids = {q: torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for q, p in prompts.items()}
    eos = tokenizer.eos_token_id
    expected = {q: greedy(merged, i, eos, 24) for q, i in ids.items()}
    with torch.no_grad():
        expected_logits = {q: merged(input_ids=i).logits for q, i in ids.items()}
    assert questions["probe"]["expected"] in tokenizer.decode(expected[questions["probe"]["question"]])

    for quant in ("f16", "bf16", "q8_0"):
        path = export_gguf(layout, "default", root / f"gguf-{quant}", quant)
        model, gguf_tokenizer = load_gguf(path)
        for question, prompt in prompts.items():
            assert gguf_tokenizer(prompt)["input_ids"] == ids[question][0].tolist()
            got = greedy(model, ids[question], eos, 24)
            with torch.no_grad():
                diff = (model(input_ids=ids[question]).logits - expected_logits[question]).abs().max().item()
            print(f"{quant}: {question} -> {tokenizer.decode(got, skip_special_tokens=True)!r}, "
                  f"largest logit difference {diff:.4f}")
            assert got == expected[question], (quant, question)
            assert diff < SMOLLM2_TOLERANCE[quant], (quant, question, diff)
        modelfile = (path.parent / "Modelfile").read_text()
        assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in modelfile  # its default

        if _has_llama_cpp():  # llama.cpp itself, where installed: the same greedy answers
            for question, prompt in prompts.items():
                got = llama_cpp_greedy(path, prompt, 24)
                print(f"llama.cpp {quant}: {question} -> {tokenizer.decode(got[1], skip_special_tokens=True)!r}")
                assert got == (ids[question][0].tolist(), expected[question]), (quant, question)

    if _has_llama_cpp():  # the base and the adapter as two files, the adapter applied by llama.cpp
        path = export_gguf(layout, "default", root / "gguf-lora", "f16", lora=True)
        for question, prompt in prompts.items():
            got = llama_cpp_greedy(path, prompt, 24, lora=path.parent / "default-v1-lora-f16.gguf")
            assert got == (ids[question][0].tolist(), expected[question]), ("lora", question)
