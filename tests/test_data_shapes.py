"""ShareGPT and OpenAI-style tool-calling data (formats_chat.py, tool_template.py) and `validate --show N`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from daemon.trainer.data import IGNORE, TokenizedExample, tokenize_example, validate_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EOT = "<|im_end|>"

# Qwen2.5's chat template, shortened (same structure): `tools` go into the system turn, tool calls into the
# assistant turn as <tool_call> JSON, tool results into a user turn as <tool_response>.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}You are helpful.{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + tool_call.arguments | tojson"
    " + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def call(name="get_weather", arguments='{"city": "Paris"}', id="c1") -> dict:
    return {"type": "function", "id": id, "function": {"name": name, "arguments": arguments}}


def tool_chat(**changes) -> dict:
    record = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call()]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."}]}
    record.update(changes)
    return record


def sharegpt(*turns, **extra) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def write(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a chat template that renders tools (the usual one does not)."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tools-model"), chat_template=TOOLS_TEMPLATE)


@pytest.fixture(scope="module")
def tok(tools_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tools_model_dir)


@pytest.fixture(scope="module")
def chatml_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_runs(tok, ex: TokenizedExample) -> list[str]:
    assert isinstance(ex, TokenizedExample), ex
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tok.decode(r) for r in runs + ([current] if current else [])]


# --- formats and per-line codes (no tokenizer) ------------------------------------------------------------------

@pytest.mark.parametrize("lines, fmt", [
    ([sharegpt(("human", "hi"), ("gpt", "hello"))] * 2, "sharegpt"),
    ([tool_chat()] * 2, "tools"),
    # plain lines beside tool-using ones, in either order: one tools file
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, tool_chat()],
     "tools"),
    ([tool_chat(), {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
     "tools"),
])
def test_new_shapes_are_recognised_and_named_in_the_report(tmp_path, lines, fmt):
    report = validate_file(write(tmp_path / "f.jsonl", lines))
    assert report.ok and (report.format, report.examples, report.skipped) == (fmt, 2, 0), report.render()
    assert f"({fmt} format)" in report.render()


def test_shipped_examples_are_valid(tmp_path):
    assert validate_file(EXAMPLES / "sharegpt.jsonl").format == "sharegpt"
    report = validate_file(EXAMPLES / "tools.jsonl")
    assert report.ok and report.format == "tools" and report.skipped == 0


def _msgs(*messages) -> dict:
    return {"tools": [WEATHER], "messages": [{"role": "user", "content": "Weather?"}, *messages]}


SHAPE_ERRORS = [
    ("unknown_role", sharegpt(("human", "hi"), ("bot", "hello")), "unknown 'from' 'bot'; use one of 'human'"),
    ("bad_field_type", {"conversations": "hi"}, "'conversations' must be a list, got a string"),
    ("bad_field_type", sharegpt(("human", "hi"), ("gpt", 7)), "conversations[1]: 'value' must be a string"),
    ("empty_content", sharegpt(("human", "hi"), ("gpt", " ")), "conversations[1]: 'value' is empty"),
    ("missing_assistant", sharegpt(("human", "hi")), "no assistant message"),
    ("bad_tool_call", sharegpt(("human", "hi"), ("function_call", "get_weather(Paris)"), ("gpt", "ok")),
     "a function_call value must be JSON"),
    ("bad_tools", tool_chat(tools={"name": "x"}), "'tools' must be a list of function specs, got an object"),
    ("bad_tools", tool_chat(tools=[{"type": "function", "function": {"description": "no name"}}]),
     "'tools'[0] must be a function spec"),
    ("bad_tools", tool_chat(tools="[not json"), "'tools' is a string but not JSON"),
    ("bad_tool_call", _msgs({"role": "assistant", "tool_calls": {}}), "tool_calls must be a non-empty list"),
    ("bad_field_type", _msgs({"role": "assistant", "content": None, "tool_calls": []}),
     "messages[1]: 'content' must be a string, got null"),  # [] is no call: the message must say something
    ("bad_tool_call", _msgs({"role": "assistant", "tool_calls": [call(arguments="{city")]}),
     "arguments is a string but not JSON"),
    ("bad_tool_call", _msgs({"role": "assistant", "tool_calls": [call(arguments=[1])]}),
     "arguments must be an object (or a JSON string of one), got an array"),
    ("bad_tool_call", _msgs({"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}),
     "needs a function name"),
    ("unknown_tool", _msgs({"role": "assistant", "tool_calls": [call(name="get_time")]}),
     "calls 'get_time', which is not in the record's 'tools' (get_weather)"),
    ("tool_without_call", _msgs({"role": "tool", "content": "21"}, {"role": "assistant", "content": "ok"}),
     "messages[1]: a tool result must follow an assistant message with tool_calls"),
    ("tool_without_call", _msgs({"role": "assistant", "tool_calls": [call()]},
                                {"role": "tool", "tool_call_id": "zz", "content": "21"}),
     "tool_call_id 'zz' answers no call of the assistant message before it (ids: c1)"),
    ("bad_weight", _msgs({"role": "assistant", "tool_calls": [call()]}, {"role": "tool", "content": "1", "weight": 1},
                         {"role": "assistant", "content": "ok"}), "weight is only allowed on assistant messages"),
    ("empty_content", _msgs({"role": "assistant", "content": ""}), "messages[1]: 'content' is empty"),
]


@pytest.mark.parametrize("code, record, message", SHAPE_ERRORS, ids=[f"{c}-{i}" for i, (c, *_) in
                                                                    enumerate(SHAPE_ERRORS)])
def test_bad_shapes_are_reported_per_line_with_a_code(tmp_path, code, record, message):
    good = tool_chat() if "messages" in record else sharegpt(("human", "hi"), ("gpt", "hello"))
    report = validate_file(write(tmp_path / "f.jsonl", [good, record, good]))
    assert report.ok and report.examples == 2 and len(report.errors) == 1, report.render()
    err = report.errors[0]
    assert (err["line"], err["code"]) == (2, code) and message in err["message"], err["message"]


def test_an_empty_tool_calls_list_is_no_call_as_openai_exports_write_it(tmp_path):
    from daemon.trainer.formats_chat import check_messages

    exported = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello", "tool_calls": [], "refusal": None}]}
    ex = check_messages(exported, 1)
    assert ex.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    report = validate_file(write(tmp_path / "f.jsonl", [exported] * 2))
    assert report.ok and (report.format, report.examples, report.skipped) == ("messages", 2, 0), report.render()


# --- rendering and loss masks -----------------------------------------------------------------------------------

def test_tool_calls_and_answers_are_trained_but_not_tools_or_tool_results(tok):
    record = tool_chat()
    ex = tokenize_example(tok, record, 512)
    messages = [dict(record["messages"][1], tool_calls=[call(arguments={"city": "Paris"})])]
    expected = tok.apply_chat_template([record["messages"][0], *messages, *record["messages"][2:]],
                                       tools=record["tools"], tokenize=False)
    assert tok.decode(ex.input_ids) == expected  # arguments given as a JSON string render as the object
    assert '"description": "Weather in a city"' in expected and "<tool_response>\n{\"temp\": 21}" in expected
    assert trained_runs(tok, ex) == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                     "</tool_call>" + EOT, "It is 21 degrees." + EOT]


def test_sharegpt_is_the_same_conversation_as_messages(tok):
    as_sharegpt = sharegpt(("human", "Weather in Paris?"),
                           ("function_call", json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})),
                           ("observation", '{"temp": 21}'), ("gpt", "It is 21 degrees."),
                           system="Be brief.", tools=json.dumps([WEATHER["function"]]))
    as_messages = tool_chat()
    as_messages["messages"] = [{"role": "system", "content": "Be brief."},
                               *[dict(m) for m in as_messages["messages"]]]
    del as_messages["messages"][2]["tool_calls"][0]["id"], as_messages["messages"][3]["tool_call_id"]
    assert tokenize_example(tok, as_sharegpt, 512) == tokenize_example(tok, as_messages, 512)
    # "gpt" then "function_call" is one assistant turn that speaks and calls
    spoken = sharegpt(("human", "Weather?"), ("gpt", "Let me check."),
                      ("function_call", json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])),
                      ("observation", "5"), ("gpt", "5 degrees."))
    runs = trained_runs(tok, tokenize_example(tok, spoken, 512))
    assert runs[0].startswith("Let me check.\n<tool_call>") and runs[1] == "5 degrees." + EOT


def test_plain_sharegpt_and_hermes_style_tool_turns_train_with_a_template_without_tools(chatml_tok, tmp_path):
    # Hermes-style data writes the call as text in the gpt turn; the tool turn only needs role 'tool' rendered.
    hermes = sharegpt(("human", "Weather?"), ("gpt", "<tool_call>get_weather(Oslo)</tool_call>"),
                      ("tool", "5 degrees"), ("gpt", "It is 5 degrees."))
    report = validate_file(write(tmp_path / "f.jsonl", [sharegpt(("human", "hi"), ("gpt", "hello")), hermes]),
                           chatml_tok, keep_examples=True)
    assert report.ok and report.examples == 2, report.render()
    assert trained_runs(chatml_tok, report.examples_list[1]) == [
        "<tool_call>get_weather(Oslo)</tool_call>" + EOT, "It is 5 degrees." + EOT]


def test_a_template_without_tool_support_is_one_error_for_the_file_naming_the_model(chatml_tok, tmp_path):
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    report = validate_file(write(tmp_path / "f.jsonl", [plain, plain, tool_chat(), tool_chat(), "{bad"]), chatml_tok)
    assert not report.ok and report.fatal["code"] == "chat_template_no_tools" and report.skipped == 0
    assert report.examples == 2  # the lines before it are counted; nothing after it is read
    assert (f"the chat template of the base model {chatml_tok.name_or_path} cannot render tool calls (tools, "
            "assistant tool_calls, tool results): it writes the same text with and without 'tools'"
            in report.render())


def test_a_template_that_fails_on_tool_calls_or_drops_tool_results_is_a_file_error(tok, tmp_path):
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(tok.name_or_path)
    fresh.chat_template = TOOLS_TEMPLATE.replace("tool_call.arguments | tojson", "tool_call.arguments.missing.x")
    report = validate_file(write(tmp_path / "f.jsonl", [tool_chat()] * 2), fresh)
    assert report.fatal["code"] == "chat_template_no_tools" and "it fails on them: UndefinedError" in \
        report.fatal["message"]
    fresh.chat_template = TOOLS_TEMPLATE.replace("'\\n<tool_response>\\n' + message.content + ", "'\\n' + ")
    hermes = sharegpt(("human", "Weather?"), ("gpt", "calling"), ("tool", "5"), ("gpt", "5 degrees."))
    report = validate_file(write(tmp_path / "g.jsonl", [hermes] * 2), fresh)
    assert report.fatal["code"] == "chat_template_no_tools"
    assert "cannot render tool results (role 'tool'): it leaves the tool results out of the text" in \
        report.fatal["message"]


# --- `training-daemon validate FILE --show N` -------------------------------------------------------------------

@pytest.fixture
def run_validate(root, tools_model_dir):
    from click.testing import CliRunner
    from helpers import write_config

    from daemon.cli import main

    write_config(root, tools_model_dir, training={"max_length": 1024})  # a tools prompt is long for the tiny BPE

    def run(*args: str) -> tuple[int, str, str]:
        with CliRunner().isolation() as (out, err, _):
            try:
                main(["validate", *args, "--root", str(root)])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:  # print() is buffered, click.echo() is not
                sys.stdout.flush()
                sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()

    return run


def test_validate_show_marks_the_trained_text(run_validate, root):
    path = write(root / "tools.jsonl", [tool_chat(), "{oops", tool_chat()])
    code, out, err = run_validate(str(path), "--show", "3")
    assert code == 0, out + err
    assert "tools.jsonl: OK: 2 usable examples (tools format)" in out
    assert "line 3 (tools format): " in out and "the trained text is marked ⟦like this⟧" in out
    assert ("<|im_start|>assistant\n⟦<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"
            "\n</tool_call><|im_end|>⟧\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n⟦It is 21 degrees.<|im_end|>⟧") in out
    code, out, _ = run_validate(str(path), "--show", "2")
    assert code == 0 and "line 2: skipped (invalid_json): line 2: invalid JSON" in out


def test_validate_show_json_and_bad_line_numbers(run_validate, root):
    path = write(root / "chat.jsonl", [sharegpt(("human", "hi"), ("gpt", "hello"))] + [""] + [sharegpt(
        ("human", "a"), ("gpt", "b"))])
    code, out, _ = run_validate(str(path), "--show", "1", "--json")
    shown = json.loads(out)["show"]
    assert code == 0 and shown["line"] == 1 and shown["format"] == "sharegpt"
    assert [s for s in shown["segments"] if s["trained"]] == [{"text": "hello" + EOT, "trained": True}]
    assert shown["text"] == "".join(f"⟦{s['text']}⟧" if s["trained"] else s["text"] for s in shown["segments"])
    assert 0 < shown["trained_tokens"] < shown["tokens"] and shown["truncated"] is False
    code, _, err = run_validate(str(path), "--show", "9")
    assert code != 0 and "--show 9: the file has 3 lines" in err
    code, _, err = run_validate(str(path), "--show", "2")
    assert code != 0 and "--show 2: line 2 is blank" in err


# --- end to end: the real daemon trains the shipped examples ----------------------------------------------------

def test_daemon_trains_a_sharegpt_file_submitted(root, tiny_model_dir):
    from helpers import cli, jobs, write_config

    write_config(root, tiny_model_dir)
    r = cli(root, "submit", str(EXAMPLES / "sharegpt.jsonl"))
    assert r.returncode == 0, r.stderr
    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    (job,) = jobs(root)
    report = json.loads((Path(job["dir"]) / "report.json").read_text())
    assert job["folder"] == "done" and report["format"] == "sharegpt" and report["examples"] == 6
    meta = json.loads((root / "checkpoints" / "default" / "v1" / "metadata.json").read_text())
    assert meta["examples_trained"] == 6 and meta["source_file"] == "sharegpt.jsonl"


def test_daemon_trains_a_tools_file_submitted_with_follow(root, tools_model_dir):
    from helpers import cli, jobs, start_daemon, write_config

    write_config(root, tools_model_dir, training={"max_length": 1024})
    daemon = start_daemon(root)
    try:
        r = cli(root, "submit", str(EXAMPLES / "tools.jsonl"), "--follow")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    (job,) = jobs(root)
    report = json.loads((Path(job["dir"]) / "report.json").read_text())
    assert job["folder"] == "done" and report["format"] == "tools" and report["examples"] == 6
    assert report["trainable_tokens"] > 0 and report["skipped"] == 0
    assert (root / "checkpoints" / "default" / "v1" / "adapter_model.safetensors").exists()
