"""Structural checks of a JSONL training file: reading lines safely, recognising formats, per-line errors.

No tokenizer and no torch here: the daemon process can check a file with this module alone.

A file holds one format, decided by the first line whose keys name one:
  messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1}, ...]}
  tools              messages with tool use: "tools", assistant "tool_calls", "tool" messages (formats_chat.py);
                     a file may mix such lines with plain messages lines, and is then in format tools
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|"tool"|..., "value": str}, ...]}
  prompt_completion  {"prompt": str, "completion": str}
  alpaca             {"instruction": str, "input": str (optional), "output": str}
  text               {"text": str}
  preference         {"prompt": str | messages, "chosen": str | message, "rejected": str | message} (DPO,
                     preference.py; "prompt" alone is prompt_completion's)
Other keys on a line are ignored (ids, metadata). Every record becomes an `Example` holding either a list of
chat messages (every format but text) or a plain text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO, Iterator

# The keys that name each format; a line with keys of two formats is ambiguous.
FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
}
BOM = b"\xef\xbb\xbf"
SKIP_CHUNK = 1 << 20  # how much of an over-long line is read at a time while skipping it

# Fatal codes reject the whole file; the others reject one line, which is then skipped.
FATAL_CODES = frozenset({"invalid_utf8", "nul_byte", "not_jsonl", "mixed_formats", "no_chat_template",
                         "too_few_examples", "vocab_mismatch", "tokenizer_encodes_nothing", "chat_template_error",
                         "chat_template_no_tools"})
JSONL_HINT = ("JSONL means one JSON object per line, each line a complete training example, "
              'e.g. {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}')


@dataclass
class Rejection:
    """Why one line (or, for a fatal code, the whole file) cannot be used."""

    line: int
    code: str
    message: str
    offset: int | None = None  # byte offset in the file, for encoding problems

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES


@dataclass
class Example:
    """A structurally valid record, normalised: chat `messages` (formats_chat.py says their keys) or plain `text`."""

    line: int
    format: str
    messages: list[dict] | None = None
    text: str | None = None
    tools: list[dict] | None = None  # function specs for apply_chat_template(tools=...)
    size: int = 0  # bytes of its line: batches of examples are bounded by size too


@dataclass
class RawLine:
    """One physical line: its bytes without the line ending, or only its length when it was too long."""

    number: int  # 1-based
    offset: int  # byte offset of the line's first byte in the file
    data: bytes | None
    length: int
    head: bytes = b""  # the first bytes of a line too long to keep, to recognise a one-line JSON array


def read_lines(f: BinaryIO, max_line_bytes: int) -> Iterator[RawLine]:
    """Lines of a binary file in bounded memory: a line over `max_line_bytes` is skipped in chunks, never held."""
    number = 0
    offset = 0
    while True:
        # +2 so that a line of exactly max_line_bytes still fits with its "\r\n"
        chunk = f.readline(max_line_bytes + 2)
        if not chunk:
            return
        number += 1
        start = offset
        offset += len(chunk)
        if not chunk.endswith(b"\n") and len(chunk) == max_line_bytes + 2:
            length, head = len(chunk), chunk[:64]
            del chunk
            while True:
                piece = f.readline(SKIP_CHUNK)
                offset += len(piece)
                length += len(piece)
                if not piece or piece.endswith(b"\n"):
                    break
            length -= 1 if piece.endswith(b"\n") else 0
            yield RawLine(number, start, None, length, head)
            continue
        data = chunk[:-1] if chunk.endswith(b"\n") else chunk
        if data.endswith(b"\r"):
            data = data[:-1]
        if len(data) > max_line_bytes:
            yield RawLine(number, start, None, len(data), data[:64])
        else:
            yield RawLine(number, start, data, len(data))


def decode_line(raw: RawLine) -> str | Rejection:
    """UTF-8 text of a line (the BOM of line 1 dropped), or a fatal `nul_byte` / `invalid_utf8`."""
    data, offset = raw.data, raw.offset
    if raw.number == 1 and data.startswith(BOM):
        data, offset = data[len(BOM):], offset + len(BOM)
    nul = data.find(b"\x00")
    if nul >= 0:
        hint = " (the file looks like UTF-16: save it as UTF-8)" if raw.number == 1 and _looks_utf16(data) else ""
        return Rejection(raw.number, "nul_byte", f"line {raw.number} contains a NUL byte at file offset "
                         f"{offset + nul}{hint}; a JSONL file must be UTF-8 text", offset + nul)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = offset + e.start
        hint = " (the file looks like UTF-16: save it as UTF-8)" if raw.number == 1 and _looks_utf16(data) else ""
        return Rejection(raw.number, "invalid_utf8", f"line {raw.number} is not valid UTF-8: byte "
                         f"0x{data[e.start]:02x} at file offset {bad}{hint}; save the file as UTF-8", bad)


def _looks_utf16(data: bytes) -> bool:
    return data[:2] in (b"\xff\xfe", b"\xfe\xff")


def not_jsonl(first_line: str, number: int) -> Rejection | None:
    """A JSON array or pretty-printed JSON, recognised on the first non-blank line."""
    stripped = first_line.strip()
    if stripped.startswith("["):
        what = "a JSON array"
    elif stripped == "{":
        what = "pretty-printed JSON (one object spread over several lines)"
    else:
        return None
    return Rejection(number, "not_jsonl", f"{JSONL_HINT}; this file looks like {what}: write each example "
                     "as one line (e.g. with `jq -c '.[]' file.json > file.jsonl`)")


def parse_line(text: str, number: int) -> dict | Rejection:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Rejection(number, "invalid_json", f"line {number}: invalid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return Rejection(number, "invalid_json", f"line {number}: invalid JSON: nested too deeply")
    if not isinstance(obj, dict):
        return Rejection(number, "not_an_object", f"line {number}: expected a JSON object {{...}}, "
                         f"got {_json_type(obj)}")
    return obj


def detect_format(obj: dict, number: int) -> str | Rejection:
    found = [fmt for fmt, keys in FORMAT_KEYS.items() if any(k in obj for k in keys)]
    if "preference" in found and "completion" not in obj:  # its "prompt" does not make it prompt_completion
        found = [fmt for fmt in found if fmt != "prompt_completion"]
    if len(found) == 1:
        return "tools" if found[0] == "messages" and "tools" in obj else found[0]
    if not found:
        keys = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
        return Rejection(number, "unknown_format", f"line {number}: no known format (keys: {keys}); expected "
                         "'messages', 'conversations', 'prompt'+'completion', 'instruction'+'output', 'text' or "
                         "'prompt'+'chosen'+'rejected'")
    return Rejection(number, "unknown_format", f"line {number}: ambiguous, has keys of formats "
                     f"{' and '.join(found)}; use one format per line")


def check_record(obj: dict, fmt: str, number: int, train_on_inputs: bool = False) -> Example | Rejection:
    """Normalise a parsed line of a known format into an Example, or say what is wrong with it."""
    from daemon.trainer import formats_chat  # it builds on this module's Rejection and Example

    if fmt in ("messages", "tools"):
        result = formats_chat.check_messages(obj, number)
    elif fmt == "sharegpt":
        result = formats_chat.check_sharegpt(obj, number)
    elif fmt == "preference":
        from daemon.trainer.preference import check_preference

        result = check_preference(obj, number)
    elif fmt == "text":
        text = obj.get("text")
        result = _need_str(text, "text", number) or Example(number, fmt, text=text)
    else:
        result = _check_pair(obj, fmt, number)
    if isinstance(result, Rejection):
        return result
    # a messages line that uses tools is in format tools, with or without a "tools" key
    result.format = "tools" if fmt == "messages" and any(formats_chat.uses_tools(result)) else fmt
    if result.messages is not None and not _any_trained(result.messages, train_on_inputs):
        return Rejection(number, "no_trainable_tokens", f"line {number}: every assistant message has weight 0, "
                         "so nothing would be trained")
    return result


def _check_pair(obj: dict, fmt: str, number: int) -> Example | Rejection:
    """prompt/completion and Alpaca become one user turn and one assistant turn."""
    if fmt == "prompt_completion":
        user_key, answer_key = "prompt", "completion"
    else:
        user_key, answer_key = "instruction", "output"
    if answer_key not in obj:
        return Rejection(number, "missing_assistant", f"line {number}: missing {answer_key!r} (the text to train on)")
    if user_key not in obj:
        return Rejection(number, "bad_field_type", f"line {number}: missing {user_key!r} (a string)")
    user, answer = obj[user_key], obj[answer_key]
    bad = _need_str(user, user_key, number) or _need_str(answer, answer_key, number)
    if bad:
        return bad
    if fmt == "alpaca":
        extra = obj.get("input")
        if extra is not None:
            bad = _need_str(extra, "input", number, allow_empty=True)
            if bad:
                return bad
            if extra.strip():
                user = f"{user}\n\n{extra}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return Example(number, fmt, messages=messages)


def _any_trained(messages: list[dict], train_on_inputs: bool) -> bool:
    # With train_on_inputs the prompts are trained too, but an explicit weight 0 still excludes its message.
    return train_on_inputs or any(m["role"] == "assistant" and m.get("weight", 1) for m in messages)


def _need_str(value, name: str, number: int, allow_empty: bool = False, where: str | None = None):
    where = where or f"line {number}"
    if not isinstance(value, str):
        return Rejection(number, "bad_field_type", f"{where}: {name!r} must be a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        return Rejection(number, "empty_content", f"{where}: {name!r} is empty")
    return None


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


class RecordReader:
    """Walks a file once, yielding an Example or a Rejection per non-blank line; stops after a fatal one.

    Holds the file's state: the format (decided by the first line that names one) and the line count.
    """

    def __init__(self, f: BinaryIO, *, max_line_bytes: int, train_on_inputs: bool = False):
        self.f = f
        self.max_line_bytes = max_line_bytes
        self.train_on_inputs = train_on_inputs
        self.format: str | None = None
        self.format_line: int | None = None
        self.lines = 0

    def __iter__(self) -> Iterator[Example | Rejection]:
        seen_content = False
        for raw in read_lines(self.f, self.max_line_bytes):
            self.lines = raw.number
            if raw.data is None:
                if not seen_content and raw.head.removeprefix(BOM).lstrip().startswith(b"["):
                    yield not_jsonl("[", raw.number)
                    return
                seen_content = True
                yield Rejection(raw.number, "line_too_long", f"line {raw.number} is {raw.length} bytes, more than "
                                f"max_line_bytes={self.max_line_bytes}")
                continue
            text = decode_line(raw)
            if isinstance(text, Rejection):
                yield text
                return
            if not text.strip():
                continue
            if not seen_content:
                seen_content = True
                bad = not_jsonl(text, raw.number)
                if bad:
                    yield bad
                    return
            item = self._record(text, raw.number)
            yield item
            if isinstance(item, Rejection) and item.fatal:
                return

    def _record(self, text: str, number: int) -> Example | Rejection:
        obj = parse_line(text, number)
        if isinstance(obj, Rejection):
            return obj
        fmt = detect_format(obj, number)
        if isinstance(fmt, Rejection):
            return fmt
        if self.format is None:
            self.format, self.format_line = fmt, number
        elif fmt != self.format and {fmt, self.format} != {"messages", "tools"}:
            return Rejection(number, "mixed_formats", f"line {number} is in format {fmt!r} but the file is in "
                             f"format {self.format!r} (decided by line {self.format_line}); use one format per file")
        result = check_record(obj, fmt, number, self.train_on_inputs)
        if isinstance(result, Example):
            result.size = len(text)
            if result.format == "tools":
                self.format = "tools"  # plain messages lines beside tool-using ones: a tools file
        return result
