"""A config's problems in plain words: `ConfigError` lists every one at once, each with its key, the value
given, what is allowed and the line of the file it is on.

pydantic's errors are rewritten here: its messages name Python types ("Input should be a valid integer"),
ours name what a user may write ("a whole number from 1 to 128"), read from the schema's own annotations so
that the allowed values are never described twice.
"""

from __future__ import annotations

import difflib
import json
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from daemon.paths import UserError


class ConfigError(UserError):
    """Every problem in a config at once. `errors`: dicts with path, message, got, allowed and line."""

    exit_code = 2

    def __init__(self, errors: list[dict], source: Path | str | None = None):
        self.errors = errors
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.errors)
        where = f"config {self.source}" if self.source else "config"
        return f"{where} has {n} error{'s' if n != 1 else ''}:\n" + "\n".join(
            "  " + _render(e) for e in self.errors)


def _render(e: dict) -> str:
    text = f"{e['path']}: {e['message']}" if e.get("path") else e["message"]
    extras = [f"got {e['got']}"] if e.get("got") is not None else []
    extras += [f"allowed: {e['allowed']}"] if e.get("allowed") else []
    text += f" ({'; '.join(extras)})" if extras else ""
    return text + (f" [line {e['line']}]" if e.get("line") else "")


def issue(path: str, message: str, got: Any = None, allowed: str | None = None, line: int | None = None) -> dict:
    """One problem, as ConfigError lists it; `path` is the key in dotted form (training.epochs)."""
    return {"path": path, "message": message, "got": None if got is None else _show(got), "allowed": allowed,
            "line": line}


SHOWN_CHARS = 80


class _Enough(Exception):
    """The preview is long enough: stop walking the value."""


def _show(value: Any) -> str:
    """`value` as JSON, cut at SHOWN_CHARS: built piece by piece and stopped there, so that a value of a
    billion items, one that contains itself or one nested 20,000 deep costs no more than a short one."""
    parts: list[str] = []
    size = 0

    def emit(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)
        if size > SHOWN_CHARS:
            raise _Enough

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            emit("{")
            for i, (k, item) in enumerate(v.items()):
                emit(", " if i else "")
                emit(_scalar(str(k)) + ": ")
                walk(item)
            emit("}")
        elif isinstance(v, (list, tuple)):
            emit("[")
            for i, item in enumerate(v):
                emit(", " if i else "")
                walk(item)
            emit("]")
        else:
            emit(_scalar(v))

    try:
        walk(value)
    except _Enough:
        pass
    text = "".join(parts)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _scalar(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v[:SHOWN_CHARS + 1])
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"a number of about {int((abs(v).bit_length() - 1) * 0.30103) + 1} digits"  # str() of a huge int raises
    try:
        return json.dumps(v, default=str)[:SHOWN_CHARS + 1]
    except (ValueError, TypeError):
        return type(v).__name__


def key_path(loc: tuple) -> str:
    """("training", "epochs") -> "training.epochs"; list items as [i]."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of the key at `loc`, else of the nearest section around it that was written."""
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in lines:
            return lines[tuple(loc[:n])]
    return None


_MESSAGES = {
    "missing": "required", "literal_error": "not one of the choices", "int_from_float": "must be a whole number",
    "int_parsing": "must be a whole number", "int_type": "must be a whole number", "float_parsing": "must be a number",
    "float_type": "must be a number", "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be text", "list_type": "must be a list", "model_type": "must be a section of keys",
    "model_attributes_type": "must be a section of keys", "dict_type": "must be a section of keys",
    "greater_than_equal": "too small", "greater_than": "too small", "less_than_equal": "too large",
    "less_than": "too large", "string_too_short": "must not be empty", "too_short": "must not be empty",
}


def validation_issues(exc: ValidationError, schema: type[BaseModel], lines: dict[tuple, int]) -> list[dict]:
    """pydantic's errors for `schema` as issues, each with the line of `lines` it belongs to."""
    out = []
    for e in exc.errors(include_url=False):
        loc = tuple(e["loc"])
        info, section = _field(schema, loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            keys = list(section.model_fields) if section else []
            # Typos, and names other tools use with a prefix (peft's lora_alpha for lora.alpha).
            close = (difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.75)
                     or [k for k in keys if str(loc[-1]).endswith("_" + k)])
            message = f"unknown key, did you mean {close[0]}?" if close else "unknown key"
            allowed = ("keys: " + ", ".join(keys)) if keys else None
        else:
            message = _MESSAGES.get(kind) or str(e["msg"]).removeprefix("Value error, ")
            allowed = _allowed(info)
        got = None if kind == "missing" else e.get("input")
        out.append(issue(key_path(loc), message, got, allowed, line_of(lines, loc)))
    return out


def _field(schema: type[BaseModel], loc: tuple) -> tuple[Any, type | None]:
    """(the FieldInfo at `loc`, None), or (None, the section that has no such key) for an unknown key."""
    section, info = schema, None
    for part in loc:
        if isinstance(part, int):  # an item of a list: describe the list
            break
        if section is None:
            return None, None
        info = section.model_fields.get(part)
        if info is None:
            return None, section
        ann = info.annotation
        section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return info, None


def _allowed(info) -> str | None:
    if info is None:
        return None
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("allowed") or _describe(info.annotation, list(info.metadata))


def _describe(tp, metadata: list) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        return _describe(base, metadata + meta)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        text = " or ".join(_describe(a, metadata) for a in args if a is not type(None))
        return text + (", or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin is list:
        return "a list of " + _describe(get_args(tp)[0], [])
    if tp is bool:
        return "true or false"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a section with keys " + ", ".join(tp.model_fields)
    if tp in (int, float):
        bounds = {}
        for m in metadata:
            for m2 in [m, *getattr(m, "metadata", [])]:  # a FieldInfo nested in Annotated carries its own
                for k in ("ge", "gt", "le", "lt"):
                    if getattr(m2, k, None) is not None:
                        bounds[k] = getattr(m2, k)
        kind = "a whole number" if tp is int else "a number"
        lo = bounds.get("ge", bounds.get("gt"))
        hi = bounds.get("le", bounds.get("lt"))
        if "ge" in bounds and "le" in bounds:
            return f"{kind} from {_num(lo)} to {_num(hi)}"
        parts = [f"at least {_num(lo)}" if "ge" in bounds else f"above {_num(lo)}" if "gt" in bounds else "",
                 f"at most {_num(hi)}" if "le" in bounds else f"below {_num(hi)}" if "lt" in bounds else ""]
        return ", ".join([kind] + [p for p in parts if p])
    return "text" if tp is str else getattr(tp, "__name__", str(tp))


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"
