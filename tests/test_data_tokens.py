"""Tokenization and loss masks of training files with the tiny model's ChatML tokenizer, the model and tokenizer
fitting each other, and `training-daemon validate` (daemon/trainer/data.py, model_fit.py). Validation without a
tokenizer is tests/test_data.py, whose helpers this uses."""

from __future__ import annotations

import json

import pytest

from daemon.trainer.data import IGNORE, TokenizedExample, tokenize_example, validate_file
from daemon.trainer.formats import Rejection
from test_data import chat, only_error, write


# --- tokenization and loss masks (the tiny model's ChatML tokenizer) -------------------------------------------

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def fresh_tok(tiny_model_dir):
    """A private copy whose chat template a test may change."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_runs(tok, ex: TokenizedExample) -> list[str]:
    """The decoded text of each run of consecutive trained tokens, checking labels token by token."""
    assert isinstance(ex, TokenizedExample), ex
    assert len(ex.labels) == len(ex.input_ids)
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        assert label in (token, IGNORE)  # unshifted: a trained label is its own token
        if label != IGNORE:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tok.decode(r) for r in runs]


CONVERSATION = {"messages": [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Und auf Japanisch? 日本語で"},
    {"role": "assistant", "content": "パリ (Pari) 🗼 — ça marche."},
]}


def test_only_assistant_messages_and_their_end_of_turn_are_trained(tok):
    ex = tokenize_example(tok, CONVERSATION, max_length=512)
    assert trained_runs(tok, ex) == ["Paris." + EOT, "パリ (Pari) 🗼 — ça marche." + EOT]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert ex.trainable == sum(label != IGNORE for label in ex.labels) and not ex.truncated


def test_weight_zero_messages_are_not_trained(tok):
    messages = [dict(m) for m in CONVERSATION["messages"]]
    messages[2]["weight"] = 0
    messages[4]["weight"] = 1
    assert trained_runs(tok, tokenize_example(tok, {"messages": messages}, 512)) == [
        "パリ (Pari) 🗼 — ça marche." + EOT]


def test_train_on_inputs_trains_every_token_except_weight_zero(tok):
    ex = tokenize_example(tok, CONVERSATION, 512, train_on_inputs=True)
    assert ex.labels == ex.input_ids
    messages = [dict(m) for m in CONVERSATION["messages"]]
    messages[2]["weight"] = 0
    ex = tokenize_example(tok, {"messages": messages}, 512, train_on_inputs=True)
    untrained = [t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE]
    assert tok.decode(untrained) == "Paris." + EOT


@pytest.mark.parametrize("record, user, answer", [
    ({"prompt": "2+2=", "completion": " 4"}, "2+2=", " 4"),
    ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}, "Add the numbers.\n\n2 and 2", "4"),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "Say hi.", "hi"),
])
def test_pair_formats_become_one_user_and_one_assistant_turn(tok, record, user, answer):
    ex = tokenize_example(tok, record, 512)
    expected = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                       tokenize=False)
    assert tok.decode(ex.input_ids) == expected
    assert trained_runs(tok, ex) == [answer + EOT]


def test_text_trains_every_token_and_ends_with_eos(tok):
    ex = tokenize_example(tok, {"text": "The cat walks to the market. 猫"}, 512)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids) == "The cat walks to the market. 猫" + EOT


def test_too_long_is_skipped_or_truncated(tok):
    record = chat("a short question", "a long answer " * 40)
    n = len(tokenize_example(tok, record, 10_000).input_ids)
    skipped = tokenize_example(tok, record, 20)
    assert isinstance(skipped, Rejection) and skipped.code == "too_long"
    assert f"{n} tokens, more than max_length=20" in skipped.message
    cut = tokenize_example(tok, record, 20, too_long="truncate")
    assert cut.truncated and len(cut.input_ids) == len(cut.labels) == 20
    assert trained_runs(tok, cut)[0].startswith("a long")  # the answer's start survives, its end does not
    # cut before the answer begins: nothing left to learn
    nothing = tokenize_example(tok, chat("a long question " * 40, "ok"), 20, too_long="truncate")
    assert isinstance(nothing, Rejection) and nothing.code == "no_trainable_tokens"
    assert "truncation" in nothing.message


def test_validate_file_counts_tokens_and_keeps_examples_in_file_order(tok, tmp_path):
    lines = []
    for i in range(700):  # more than one tokenization batch
        if i % 100 == 7:
            lines.append(chat(f"question {i}", "word " * 300))  # too long
        elif i % 100 == 8:
            lines.append("{broken")
        else:
            lines.append(chat(f"question {i}", f"answer {i}"))
    path = write(tmp_path / "f.jsonl", lines)
    report = validate_file(path, tok, max_length=128, keep_examples=True)
    assert report.ok and report.examples == 686 and report.skipped == 14
    assert report.counts_by_code == {"too_long": 7, "invalid_json": 7}
    assert [e["line"] for e in report.errors] == sorted(i + 1 for i in range(700) if i % 100 in (7, 8))
    kept = report.examples_list
    assert [ex.line for ex in kept] == [i + 1 for i in range(700) if i % 100 not in (7, 8)]
    assert trained_runs(tok, kept[600]) == [f"answer {kept[600].line - 1}" + EOT]
    assert report.tokens == sum(len(ex.input_ids) for ex in kept)
    assert report.trainable_tokens == sum(ex.trainable for ex in kept)
    assert report.longest == max(len(ex.input_ids) for ex in kept)
    # the same file, truncating: all 693 JSON lines are usable; without keep_examples nothing is held
    report = validate_file(path, tok, max_length=128, too_long="truncate")
    assert (report.examples, report.truncated, report.examples_list) == (693, 7, [])
    assert "7 truncated to 128 tokens" in report.render()


def test_templates_that_rewrite_content_take_the_prefix_method(fresh_tok):
    # Llama-3 style: contents are trimmed, so a content with outer spaces is not in the text verbatim.
    fresh_tok.chat_template = fresh_tok.chat_template.replace("message['content']", "(message['content'] | trim)")
    record = {"messages": [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": " Paris. "},
                           {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Lyon"}]}
    ex = tokenize_example(fresh_tok, record, 512)
    assert trained_runs(fresh_tok, ex) == ["Paris." + EOT, "Lyon" + EOT]


def test_template_that_refuses_a_conversation_rejects_that_line(fresh_tok, tmp_path):
    fresh_tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must "
                               "start with a user message') }}{% endif %}" + fresh_tok.chat_template)
    bad = {"messages": [{"role": "system", "content": "s"}, *chat()["messages"]]}
    report = validate_file(write(tmp_path / "f.jsonl", [chat(), bad, chat()]), fresh_tok)
    err = only_error(report)
    assert (err["line"], err["code"]) == (2, "template_error")
    assert "must start with a user message" in err["message"] and report.examples == 2


def test_without_chat_template_only_plain_formats_work(fresh_tok, tmp_path):
    fresh_tok.chat_template = None
    ex = tokenize_example(fresh_tok, {"prompt": "2+2=", "completion": "4"}, 64)
    assert fresh_tok.decode(ex.input_ids) == "2+2=4" + EOT and trained_runs(fresh_tok, ex) == ["4" + EOT]
    report = validate_file(write(tmp_path / "f.jsonl", [chat()] * 3), fresh_tok)
    assert not report.ok and report.fatal["code"] == "no_chat_template"


def test_one_render_method_agrees_with_the_prefix_method(tok, monkeypatch):
    from daemon.trainer import chat_template

    records = [CONVERSATION, chat("q", "a"), {"prompt": "p", "completion": "c"},
               {"messages": [{"role": "user", "content": "Paris."}, {"role": "assistant", "content": "Paris."},
                             {"role": "user", "content": "again"}, {"role": "assistant", "content": "Paris."}]}]
    fast = [tokenize_example(tok, r, 512) for r in records]
    # As for a template the probe cannot read:
    monkeypatch.setattr(chat_template, "template_shape", lambda tokenizer: None)
    assert [tokenize_example(tok, r, 512) for r in records] == fast


# --- the model, its tokenizer and the file's format fit each other (model_fit.py) -------------------------------

def test_a_tokenizer_with_more_tokens_than_the_embedding_is_fatal_naming_both_sizes(tok, tmp_path):
    path = write(tmp_path / "f.jsonl", [chat()] * 3)
    assert validate_file(path, tok, model_vocab_size=len(tok)).ok  # as many rows as tokens, or more, is fine
    report = validate_file(path, tok, model_vocab_size=len(tok) - 3)
    assert not report.ok and report.fatal["code"] == "vocab_mismatch" and report.skipped == 0
    assert f"the tokenizer has {len(tok)} tokens but the model's embedding has {len(tok) - 3} rows" in report.render()


def test_embedding_rows_come_from_config_json_without_weights(tiny_model_dir, tmp_path):
    from daemon.trainer.model_fit import embedding_rows

    assert embedding_rows(tiny_model_dir) == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"vocab_size": 77}}))
    assert embedding_rows(tmp_path) == 77
    assert embedding_rows(tmp_path / "missing") is None


def test_a_tokenizer_that_encodes_nothing_is_fatal_naming_the_probe(tmp_path):
    from tiny_model import build_word_level_tokenizer

    tokenizer = build_word_level_tokenizer()
    report = validate_file(write(tmp_path / "f.jsonl", [{"text": "hello world"}] * 2), tokenizer)
    assert report.fatal["code"] == "tokenizer_encodes_nothing"
    assert (f"the tokenizer ({type(tokenizer).__name__}) returns no token ids for the probe 'Hello, world'"
            in report.fatal["message"])


def test_a_chat_template_that_refuses_every_conversation_is_one_error_for_the_file(fresh_tok, tmp_path):
    fresh_tok.chat_template = "{{ raise_exception('tool calls only') }}"
    report = validate_file(write(tmp_path / "f.jsonl", [chat()] * 3), fresh_tok)
    assert report.fatal["code"] == "chat_template_error" and report.skipped == 0
    assert "cannot render a messages conversation (one user and one assistant message): TemplateError: tool " \
           "calls only" in report.render()
    assert validate_file(write(tmp_path / "t.jsonl", [{"text": "plain"}] * 2), fresh_tok).ok  # needs no template


def test_a_chat_template_that_drops_the_assistant_message_is_one_error_for_the_file(fresh_tok, tmp_path):
    fresh_tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
                               "{% endfor %}")
    report = validate_file(write(tmp_path / "f.jsonl", [{"prompt": "2+2=", "completion": "4"}] * 2), fresh_tok)
    assert report.fatal["code"] == "chat_template_error"
    assert "does not write the assistant message of a prompt_completion conversation" in report.fatal["message"]


# --- `training-daemon validate` --------------------------------------------------------------------------------

def test_validate_command_prints_the_report_and_exits_by_ok(root, tiny_model_dir, capsys):
    from helpers import write_config

    from daemon.config import load_config
    from daemon.trainer.data import validate_command

    cfg = load_config(write_config(root, tiny_model_dir, training={"max_length": 128, "min_examples": 2}))
    good = write(root / "good.jsonl", [chat(), "oops", chat("another question", "another answer")])
    assert validate_command(good, cfg, as_json=False) == 0
    out = capsys.readouterr().out
    assert "good.jsonl: OK: 2 usable examples (messages format)" in out and "line 2: invalid JSON" in out
    long_answer = write(root / "long.jsonl", [chat(), chat(answer="many words " * 100)])
    assert validate_command(long_answer, cfg, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fatal"]["code"] == "too_few_examples" and report["counts_by_code"] == {"too_long": 1}
    assert report["errors"][0]["line"] == 2 and report["tokens"] > 0


def test_validate_command_checks_the_tokenizer_against_the_model(root, tmp_path, capsys):
    from helpers import write_config
    from tiny_model import build_tiny_model

    from daemon.config import load_config
    from daemon.trainer.data import validate_command

    cfg = load_config(write_config(root, build_tiny_model(tmp_path / "model", added_tokens=2)))
    assert validate_command(write(root / "good.jsonl", [chat()] * 2), cfg, as_json=False) == 1
    assert "good.jsonl: REJECTED (vocab_mismatch): the tokenizer has" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess that imports transformers (and so torch): several seconds on 2 cores
def test_validate_cli_json(root, tiny_model_dir):
    from helpers import cli, write_config

    write_config(root, tiny_model_dir)
    path = write(root / "mixed data.jsonl", [chat(), {"text": "plain"}])
    result = cli(root, "validate", str(path), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["fatal"]["code"] == "mixed_formats" and report["fatal"]["line"] == 2
    assert report["file"].endswith("mixed data.jsonl") and report["ok"] is False
