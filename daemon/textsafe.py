"""The one place where a string a user controls (a file name, an adapter name, error text) is made safe to
show in a terminal or a log line.

A file name from elsewhere can carry terminal escapes (`ESC ]0;title BEL`, `ESC [31m`), a newline that forges a
second log line, a right-to-left override that shows `exe.jsonl` as `lnosj.exe`, or undecodable bytes. Each such
character is written visibly as its escape (`\\x1b`, `\\n`, `\\u202e`, and `\\udcff` for the undecodable byte
0xff), so what a person reads is what is on disk and nothing the text says can act on the terminal.

Only what is shown goes through here: JSON (events.jsonl, status.json, job.json, `--json`) keeps the raw string
as data, and the backslash itself is left alone so that escaping twice changes nothing.
"""

from __future__ import annotations

import os
import re

# C0 controls and DEL, C1 controls, the bidi marks, embeddings, overrides and isolates, the line and paragraph
# separators, the byte-order mark, and lone surrogates (os.fsdecode's stand-ins for bytes that are not UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ufeff"
                     "\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    code = ord(ch)
    return _SHORT.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def for_terminal(text: object) -> str:
    """`text` with every control, escape and bidi character shown as its backslash escape."""
    return _UNSAFE.sub(_escape, os.fspath(text) if isinstance(text, os.PathLike) else str(text))
