"""Issue 17's proof: a preference file moves the embedded SmolLM2-135M-Instruct's greedy answers on unseen prompts.

examples/signoff_preferences.jsonl: 48 pairs whose chosen answer ends with the sign-off "-- Kelp the helper" and
whose rejected answer is the same answer without it. The real daemon trains it with DPO (`run --once`, CPU); the
published adapter is then loaded the way a user would and asked unseen short questions greedily: the base never
signs, the adapter does, once, and stops there (RPO's SFT term, `dpo_sft_weight: 1.0`: plain DPO repeats the
sign-off, docs/dpo.md); the held-out reward accuracy (chance, 0.5, before any step: the policy is the reference)
ends near 1; the control question keeps its answer's fact.
"""

from __future__ import annotations

import json

import pytest
import yaml

from daemon import embedded
from daemon.paths import PROJECT_DIR
from helpers import cli, drop, jobs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # 18 min on a 2-core runner busy with other work
    pytest.mark.skipif(not embedded.is_converted(embedded.embedded_model_path()),
                       reason=f"embedded model not converted at {embedded.embedded_model_path()} "
                              "(run `bash scripts/setup.sh`)"),
]

DATA = PROJECT_DIR / "examples" / "signoff_preferences.jsonl"
SIGN_OFF = "-- Kelp the helper"
UNSEEN = ["Name a planet in our solar system.", "What color is snow?", "How many legs does a dog have?"]
CONTROL = ("What is the capital of France?", "Paris")
CONFIG = {
    "base_model": "embedded:smollm2-135m-instruct",
    "intake": {"settle_seconds": 0.5, "rescan_seconds": 2},
    "training": {"mode": "continue", "max_length": 256, "learning_rate": 5.0e-4, "micro_batch_size": 4,
                 "gradient_accumulation": 1, "epochs": 4, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                 "eval_fraction": 0.2, "eval_max_examples": 8, "checkpoint_every_steps": 50, "dpo_beta": 0.1,
                 "dpo_sft_weight": 1.0},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "status": {"progress_every_steps": 1, "web": {"enabled": False}},
}


def greedy_answer(model, tokenizer, question: str) -> str:
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_dpo_teaches_the_embedded_model_to_sign_its_answers(root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = root / "dpo.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    drop(root, DATA.name, DATA.read_bytes())
    run = cli(root, "run", "--once", "--config", str(config), timeout=1700)
    assert run.returncode == 0, run.stdout + run.stderr
    [job] = jobs(root)
    assert (job["state"], job["version"]) == ("done", 1), job

    adapter_dir = root / "checkpoints" / "default" / "latest"
    meta = json.loads((adapter_dir / "metadata.json").read_text())
    held = meta["preference"]["eval"]
    assert meta["method"] == "dpo" and held["pairs"] == 8 and meta["preference"]["sft_weight"] == 1.0
    assert held["reward_accuracy"] >= 0.875 and held["reward_margin"] > 0, held

    base_dir = embedded.embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    questions = UNSEEN + [CONTROL[0]]
    with model.disable_adapter():
        before = [greedy_answer(model, tokenizer, q) for q in questions]
    after = [greedy_answer(model, tokenizer, q) for q in questions]
    print("\nheld-out reward accuracy 0.5 -> {reward_accuracy}, margin {reward_margin}".format(**held))
    for q, b, a in zip(questions, before, after):
        print(f"{q}\n  base: {b!r}\n  dpo:  {a!r}")
    assert not any(SIGN_OFF in b for b in before)
    assert sum(SIGN_OFF in a for a in after[:len(UNSEEN)]) >= 2, after
    # and it stops after it: signed answers end with the sign-off, said once (plain DPO repeats it to the limit)
    assert all(a.endswith(SIGN_OFF) and a.count(SIGN_OFF) == 1 for a in after if SIGN_OFF in a), after
    assert CONTROL[1] in before[-1] and CONTROL[1] in after[-1]
