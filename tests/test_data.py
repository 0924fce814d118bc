"""Validation of training files without a tokenizer: formats, per-line errors, whole-file problems, memory
(daemon/trainer/data.py, daemon/trainer/formats.py). Tokenization and `validate` are tests/test_data_tokens.py."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from daemon.trainer.data import validate_file


def chat(user="What is 2+2?", answer="4.", **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def write(path: Path, lines, ending: bytes = b"\n") -> Path:
    """lines: dicts (dumped as JSON), str or bytes, written one a line."""
    out = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        out.append(line if isinstance(line, bytes) else line.encode())
    path.write_bytes(ending.join(out) + ending)
    return path


def only_error(report) -> dict:
    assert len(report.errors) == 1, report.render()
    return report.errors[0]


# --- formats ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, record", [
    ("messages", chat()),
    ("messages", {"messages": [{"role": "system", "content": "Be brief."}, *chat()["messages"]]}),
    ("prompt_completion", {"prompt": "2+2=", "completion": "4"}),
    ("alpaca", {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}),
    ("alpaca", {"instruction": "Say hi.", "output": "hi"}),
    ("text", {"text": "Once upon a time.", "id": 7}),
])
def test_each_format_is_accepted(tmp_path, fmt, record):
    report = validate_file(write(tmp_path / "f.jsonl", [record] * 3))
    assert report.ok and report.fatal is None
    assert (report.format, report.examples, report.skipped, report.lines) == (fmt, 3, 0, 3)
    assert report.tokens is None  # no tokenizer, no token counts


# --- per-line errors -------------------------------------------------------------------------------------------

LINE_ERRORS = [
    ("invalid_json", '{"messages": [}'),
    ("invalid_json", '{"messages": []} trailing'),
    ("not_an_object", '"just a string"'),
    ("not_an_object", "42"),
    ("unknown_format", {"question": "a", "answer": "b"}),
    ("unknown_format", {"messages": [], "text": "both"}),
    ("missing_assistant", {"messages": [{"role": "user", "content": "hi"}]}),
    ("missing_assistant", {"messages": []}),
    ("missing_assistant", {"prompt": "hi"}),
    ("missing_assistant", {"instruction": "hi"}),
    ("unknown_role", {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
    ("empty_content", chat(answer="")),
    ("empty_content", chat(user="   ")),
    ("empty_content", {"prompt": "p", "completion": ""}),
    ("bad_weight", {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a", "weight": 2}]}),
    ("bad_weight", {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a", "weight": True}]}),
    ("bad_weight", {"messages": [{"role": "user", "content": "q", "weight": 1},
                                 {"role": "assistant", "content": "a"}]}),
    ("bad_field_type", {"messages": "hello"}),
    ("bad_field_type", {"messages": ["hello"]}),
    ("bad_field_type", {"messages": [{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "a"}]}),
    ("bad_field_type", {"messages": [{"role": 1, "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ("bad_field_type", {"prompt": 5, "completion": "x"}),
    ("bad_field_type", {"completion": "x"}),
    ("bad_field_type", {"instruction": "i", "input": 3, "output": "o"}),
    ("system_not_first", {"messages": [*chat()["messages"], {"role": "system", "content": "late"}]}),
    ("no_trainable_tokens", {"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a", "weight": 0}]}),
]


@pytest.mark.parametrize("code, line", LINE_ERRORS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(LINE_ERRORS)])
def test_line_error_is_reported_with_its_line_and_the_line_skipped(tmp_path, code, line):
    # a blank line before it: line numbers count every physical line
    format_line = {"prompt": "p", "completion": "c"} if "prompt" in str(line) or "completion" in str(line) else (
        {"instruction": "i", "output": "o"} if "instruction" in str(line) else chat())
    report = validate_file(write(tmp_path / "f.jsonl", [format_line, "", line, format_line]))
    err = only_error(report)
    assert (err["line"], err["code"]) == (3, code), err
    assert err["message"].startswith("line 3")
    assert report.counts_by_code == {code: 1}
    assert (report.examples, report.skipped, report.lines, report.ok) == (2, 1, 4, True)


def test_line_too_long_is_skipped_with_its_length(tmp_path):
    long_line = json.dumps(chat(answer="x" * 5000)).encode()
    crlf_exact = json.dumps(chat(answer="y" * 50)).encode()
    path = write(tmp_path / "f.jsonl", [chat(), long_line, crlf_exact, long_line[:-1]])  # last: no newline at EOF
    path.write_bytes(path.read_bytes()[:-1])
    report = validate_file(path, max_line_bytes=len(crlf_exact))
    assert [(e["line"], e["code"]) for e in report.errors] == [(2, "line_too_long"), (4, "line_too_long")]
    assert f"{len(long_line)} bytes" in report.errors[0]["message"]
    assert f"{len(long_line) - 1} bytes" in report.errors[1]["message"]
    assert report.examples == 2  # a line of exactly max_line_bytes is fine
    # ... also with CRLF endings
    report = validate_file(write(tmp_path / "g.jsonl", [crlf_exact, long_line], ending=b"\r\n"),
                           max_line_bytes=len(crlf_exact))
    assert report.examples == 1 and only_error(report)["code"] == "line_too_long"


def test_mixed_formats_is_fatal_naming_both_formats_and_the_line(tmp_path):
    report = validate_file(write(tmp_path / "f.jsonl", ["not json", chat(), chat(), {"text": "t"}, chat()]))
    assert not report.ok
    assert report.fatal["code"] == "mixed_formats" and report.fatal["line"] == 4
    assert "'text'" in report.fatal["message"] and "'messages'" in report.fatal["message"]
    assert "line 2" in report.fatal["message"]  # the line that decided the format
    assert report.format == "messages"


def test_errors_listing_is_capped_but_counts_are_complete(tmp_path):
    report = validate_file(write(tmp_path / "f.jsonl", [chat()] + ["oops"] * 150 + [{"x": 1}] * 20))
    assert len(report.errors) == 100 and report.skipped == 170
    assert report.counts_by_code == {"invalid_json": 150, "unknown_format": 20}
    assert report.to_dict()["errors_not_listed"] == 70
    assert "70 more not listed" in report.render()
    assert report.ok  # skipped lines alone do not reject a file


# --- whole-file problems ---------------------------------------------------------------------------------------

def test_bom_crlf_blank_lines_and_unicode_are_accepted(tmp_path):
    lines = [chat("Grüße, 你好 👋", "Hallo! 🎉"), "", "   ", chat("ça va ?", "très bien")]
    path = write(tmp_path / "f.jsonl", lines, ending=b"\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    report = validate_file(path)
    assert report.ok and (report.examples, report.skipped, report.lines) == (2, 0, 4), report.render()


def test_invalid_utf8_rejects_the_file_naming_line_and_offset(tmp_path):
    first = json.dumps(chat()).encode() + b"\n"
    bad = b'{"text": "caf\xe9"}\n'  # latin-1
    path = tmp_path / "f.jsonl"
    path.write_bytes(first + bad + first)
    report = validate_file(path)
    assert report.fatal["code"] == "invalid_utf8" and not report.ok
    assert report.fatal["line"] == 2 and report.fatal["offset"] == len(first) + bad.index(b"\xe9")
    assert "0xe9" in report.fatal["message"] and "UTF-8" in report.fatal["message"]


def test_utf16_file_is_rejected_with_a_hint(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(json.dumps(chat()).encode("utf-16"))
    report = validate_file(path)
    assert report.fatal["code"] in ("invalid_utf8", "nul_byte")
    assert "UTF-16" in report.fatal["message"]


def test_nul_byte_rejects_the_file_naming_line_and_offset(tmp_path):
    first = b'{"text": "fine"}\r\n'
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + first + b'{"text": "a\x00b"}\n')
    report = validate_file(path)
    assert report.fatal["code"] == "nul_byte" and report.fatal["line"] == 2
    assert report.fatal["offset"] == 3 + len(first) + 11


@pytest.mark.parametrize("content, what", [
    ('[\n  {"text": "a"},\n  {"text": "b"}\n]\n', "JSON array"),
    ('\ufeff  [' + '{"text": "a"}, ' * 1000 + '{"text": "b"}]', "JSON array"),  # one line over max_line_bytes
    ('[{"text": "a"}, {"text": "b"}]\n', "JSON array"),
    ('\n\n{\n  "text": "a"\n}\n', "pretty-printed JSON"),
])
def test_json_array_or_pretty_printed_json_is_explained(tmp_path, content, what):
    path = tmp_path / "f.json"
    path.write_text(content)
    report = validate_file(path, max_line_bytes=1000)
    assert report.fatal["code"] == "not_jsonl"
    assert "JSONL means one JSON object per line" in report.fatal["message"]
    assert f"this file looks like {'a ' if what == 'JSON array' else ''}{what}" in report.fatal["message"]


@pytest.mark.parametrize("lines, min_examples, expect", [
    ([], 1, "the file is empty"),
    (["", "  "], 1, "no usable example"),
    (["bad", chat()], 2, "only 1 usable examples"),
])
def test_too_few_examples(tmp_path, lines, min_examples, expect):
    path = tmp_path / "f.jsonl"
    if lines:
        write(path, lines)
    else:
        path.write_bytes(b"")
    report = validate_file(path, min_examples=min_examples)
    assert not report.ok and report.fatal["code"] == "too_few_examples"
    assert expect in report.fatal["message"]


def test_report_is_json_able_and_readable(tmp_path):
    report = validate_file(write(tmp_path / "data.jsonl", [chat(), "nope", {"prompt": "x"}]))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is False and d["fatal"]["code"] == "mixed_formats" and "examples_list" not in d
    text = report.render()
    assert "data.jsonl: REJECTED (mixed_formats)" in text and "line 3" in text and "line 2: invalid JSON" in text


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _big_file(path: Path, small_lines: int) -> Path:
    good = json.dumps(chat()).encode() + b"\n"
    bad = b'{"messages": 1}\n'  # one error every 10 lines: the listing must stay capped
    block = (good * 9 + bad) * 1000
    with open(path, "wb") as f:
        for _ in range(small_lines // 20_000):
            f.write(block)
        f.write(b'{"text": "' + b"a" * (50 << 20) + b'"}\n')  # one 50 MB line
        for _ in range(small_lines // 20_000):
            f.write(block)
    return path


def test_memory_stays_bounded_on_huge_files(tmp_path):
    path = _big_file(tmp_path / "big.jsonl", 20_000)
    result = {}
    peak = _peak_bytes(lambda: result.setdefault("r", validate_file(path, max_line_bytes=1 << 20)))
    report = result["r"]
    assert report.examples == 18_000 and report.counts_by_code == {"bad_field_type": 2_000, "line_too_long": 1}
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.slow
def test_memory_stays_bounded_on_200k_lines(tmp_path):
    path = _big_file(tmp_path / "big.jsonl", 200_000)
    peak = _peak_bytes(lambda: validate_file(path, max_line_bytes=1 << 20))
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"
