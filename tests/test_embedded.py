"""The embedded SmolLM2-135M-Instruct: resolving `embedded:NAME`, setting it up, and the converted model answering
sensibly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from daemon import embedded
from daemon.base_model import resolve_base_model
from daemon.paths import PROJECT_DIR, UserError
from daemon.trainer import embedded_setup


def test_resolving_it_does_not_import_torch():
    # The daemon resolves `embedded:NAME` when it checks a config and must stay free of torch.
    code = ("import sys, daemon.embedded, daemon.base_model; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_DIR, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_models_dir_follows_the_environment(root, monkeypatch):
    monkeypatch.delenv(embedded.MODELS_DIR_ENV, raising=False)
    assert embedded.embedded_model_dir() == PROJECT_DIR / "models"
    monkeypatch.setenv(embedded.MODELS_DIR_ENV, str(root / "m"))
    assert embedded.embedded_model_path() == root / "m" / embedded.EMBEDDED_NAME


def test_resolve_names(root, monkeypatch):
    monkeypatch.setenv(embedded.MODELS_DIR_ENV, str(root / "models"))
    with pytest.raises(UserError, match="unknown embedded model 'gpt-9'"):
        resolve_base_model("embedded:gpt-9")
    with pytest.raises(UserError, match=r"scripts/setup.sh.*python -m daemon\.trainer\.embedded_setup"):
        resolve_base_model("embedded:smollm2-135m-instruct")


def test_only_a_finished_conversion_counts(root, monkeypatch):
    models = root / "models"
    monkeypatch.setenv(embedded.MODELS_DIR_ENV, str(models))
    final = models / embedded.EMBEDDED_NAME
    # What a killed conversion leaves: a temp folder, never the final name.
    (models / f".{embedded.EMBEDDED_NAME}.tmp-abc" / "model").mkdir(parents=True)
    (models / f".{embedded.EMBEDDED_NAME}.tmp-abc" / "model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not set up"):
        resolve_base_model("embedded:" + embedded.EMBEDDED_NAME)
    # A folder under the final name without provenance is refused, not trusted and not deleted.
    final.mkdir()
    (final / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a finished conversion"):
        embedded_setup.ensure_embedded_model()
    assert (final / "config.json").exists()
    assert not (models / f".{embedded.EMBEDDED_NAME}.tmp-abc").exists()  # the stale temp folder was cleared
    # With provenance it is complete, and ensuring it again does nothing.
    (final / embedded.SOURCE_FILE).write_text(json.dumps({"dtype": "float32"}))
    assert embedded_setup.ensure_embedded_model() == final
    assert resolve_base_model("embedded:" + embedded.EMBEDDED_NAME) == final


@pytest.mark.slow
def test_converted_model_answers_a_chat_question(monkeypatch):
    monkeypatch.delenv(embedded.MODELS_DIR_ENV, raising=False)
    path = embedded.embedded_model_path()
    if not embedded.is_converted(path):
        pytest.skip(f"{path} is not converted: run `bash scripts/setup.sh`")
    from daemon.trainer.generate import answer, load

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["eos_token_id"] == 2
    model, tokenizer = load(path)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template
    reply = answer(model, tokenizer, "What is the capital of France?")
    # Greedy decoding gives "The capital of France is Paris." and stops there: eos is the end of turn.
    assert "Paris" in reply and len(reply) < 80, reply
