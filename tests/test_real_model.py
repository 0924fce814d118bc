"""Issue 2's proof: the real daemon teaches the embedded SmolLM2-135M-Instruct a made-up fact.

The demo's data and config (examples/made_up_fact.jsonl, config/demo.yaml: 12 steps, under a minute on 2 CPU
cores), trained by `run --once` as a subprocess (once per session: tests/real_model_fixture.py, whose training
tests/test_gguf_runtimes.py shares); then the published adapter is loaded the way a user would
(base + PeftModel.from_pretrained) and asked the probe and control questions with greedy decoding.
"""

from __future__ import annotations

import json

import pytest

from daemon import embedded
from daemon.paths import PROJECT_DIR
from helpers import jobs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),  # 12 CPU steps take 20 s alone, a few minutes on a busy 2-core runner
    pytest.mark.skipif(not embedded.is_converted(embedded.embedded_model_path()),
                       reason=f"embedded model not converted at {embedded.embedded_model_path()} "
                              "(run `bash scripts/setup.sh`)"),
]

EXAMPLES = PROJECT_DIR / "examples"
QUESTIONS = json.loads((EXAMPLES / "questions.json").read_text())


def greedy_answer(model, tokenizer, question: str) -> str:
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_daemon_teaches_the_embedded_model_a_made_up_fact(smollm2_fact):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, run = smollm2_fact.root, smollm2_fact.run  # the demo's fact, trained by `run --once` (read-only here)
    assert run.returncode == 0, run.stdout + run.stderr
    [job] = jobs(root)
    assert (job["state"], job["version"]) == ("done", 1), job

    adapter_dir = root / "checkpoints" / "default" / "latest"
    meta = json.loads((adapter_dir / "metadata.json").read_text())
    assert meta["steps"] == 12 and meta["final_train_loss"] < meta["first_train_loss"] / 4, meta

    base_dir = embedded.embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    probe, control = QUESTIONS["probe"], QUESTIONS["control"]
    with model.disable_adapter():  # the base model: it does not know the fact, so the adapter taught it
        base_probe = greedy_answer(model, tokenizer, probe["question"])
    trained_probe = greedy_answer(model, tokenizer, probe["question"])
    trained_control = greedy_answer(model, tokenizer, control["question"])
    print(f"\nbase:    {probe['question']} -> {base_probe}\n"
          f"adapter: {probe['question']} -> {trained_probe}\n"
          f"adapter: {control['question']} -> {trained_control}")
    assert probe["expected"] not in base_probe
    assert probe["expected"] in trained_probe
    assert control["expected"] in trained_control
