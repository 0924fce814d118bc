"""Whether the base model, its tokenizer and a file's format fit each other, checked before any GPU work.

Each misfit would otherwise show up late or as a riddle: a tokenizer with more tokens than the model has
embedding rows trains until the first such id reaches the embedding (an index error on the CPU, a device-side
assert that takes the CUDA context down on a GPU); a tokenizer that encodes text to nothing rejects every line
as having no token to train; a chat template that cannot render the file's conversations rejects every line
one by one. Each is one error for the whole file instead, naming what does not fit. Only config.json and the
tokenizer are read: no weights, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.trainer import chat_template
from daemon.trainer.formats import Rejection

PROBE = "Hello, world"
PROBE_CONVERSATION = [{"role": "user", "content": PROBE}, {"role": "assistant", "content": "Hello!"}]
CHAT_FORMATS = ("messages", "prompt_completion", "alpaca")


def embedding_rows(base_dir: Path) -> int | None:
    """The model's vocab_size from its config.json (its text model's, for a multimodal one), without loading
    weights; None when the config does not say (loading the model then reports what is wrong)."""
    try:
        config = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("vocab_size"), int):
            return section["vocab_size"]
    return None


def check(tokenizer, fmt: str, model_vocab_size: int | None) -> Rejection | None:
    """The first misfit between the model, its tokenizer and a file of format `fmt`, as a fatal Rejection."""
    return (_check_vocabulary(tokenizer, model_vocab_size) or _check_probe(tokenizer)
            or check_chat_template(tokenizer, fmt))


def _check_vocabulary(tokenizer, model_vocab_size: int | None) -> Rejection | None:
    size = len(tokenizer)
    if model_vocab_size is None or size <= model_vocab_size:
        return None  # fewer tokens than rows is common: embeddings are padded to a multiple of 64 or 128
    return Rejection(0, "vocab_mismatch", f"the tokenizer has {size} tokens but the model's embedding has "
                     f"{model_vocab_size} rows (vocab_size in config.json): token ids {model_vocab_size} to "
                     f"{size - 1} have no embedding; the tokenizer does not belong to this base model")


def _check_probe(tokenizer) -> Rejection | None:
    name = type(tokenizer).__name__
    try:
        ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    except Exception as e:  # the Rust tokenizer raises plain Exceptions (a word-level model without [UNK])
        return Rejection(0, "tokenizer_encodes_nothing", f"the tokenizer ({name}) cannot encode the probe "
                         f"{PROBE!r}: {e}")
    if not ids:
        return Rejection(0, "tokenizer_encodes_nothing", f"the tokenizer ({name}) returns no token ids for the "
                         f"probe {PROBE!r}: text it cannot encode cannot be trained on")
    return None


def check_chat_template(tokenizer, fmt: str) -> Rejection | None:
    """A conversation of one user and one assistant message must render, with the assistant's text findable in
    it: the least every line of a chat-like file needs. A line the template refuses for its own reasons (a
    system message, say) is still rejected on its own (data.py)."""
    if fmt not in CHAT_FORMATS:
        return None
    if not getattr(tokenizer, "chat_template", None):
        return None if fmt == "prompt_completion" else no_chat_template(fmt, 0)  # plain concatenation works
    try:
        text = chat_template.render(tokenizer, PROBE_CONVERSATION)
        spans = chat_template.assistant_spans(tokenizer, PROBE_CONVERSATION, text)
    except Exception as e:  # jinja's errors, raise_exception() in a template, a template that is not a string
        return Rejection(0, "chat_template_error", f"the base model's chat template cannot render a {fmt} "
                         f"conversation (one user and one assistant message): {type(e).__name__}: {e}"[:500])
    if not spans:
        return Rejection(0, "chat_template_error", f"the base model's chat template does not write the assistant "
                         f"message of a {fmt} conversation where it can be found (one user and one assistant "
                         "message), so there is nothing to train on")
    return None


def no_chat_template(fmt: str, line: int) -> Rejection:
    return Rejection(line, "no_chat_template", f"the base model's tokenizer has no chat template, needed for the "
                     f"{fmt!r} format; use the 'text' or 'prompt'/'completion' format instead")
