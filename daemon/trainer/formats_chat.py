"""Conversation records: OpenAI-style `messages` (with `tools` and tool calls) and ShareGPT `conversations`.

Both become the same normalised chat messages, checked by the same code, so every later step (the chat
template, the loss masks) sees one shape:
  {"role": "system"|"user"|"assistant"|"tool", "content": str, "weight"?: 0|1,
   "tool_calls"?: [{"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}],  # assistant
   "tool_call_id"?: str, "name"?: str}                                                              # tool
and the record's `tools` become [{"type": "function", "function": {"name": str, ...}}, ...] (what
`apply_chat_template(tools=...)` takes). Arguments given as a JSON string are parsed: templates write them
with `tojson`, which would quote a string a second time.

ShareGPT (`{"conversations": [{"from": ..., "value": ...}], "system"?: str, "tools"?: list or JSON string}`)
maps human/user -> user, gpt/assistant -> assistant, system, tool/observation -> tool, and function_call (a
JSON {"name", "arguments"} or a list of them) -> the tool calls of an assistant turn, as LLaMA-Factory reads it.
"""

from __future__ import annotations

import json

from daemon.trainer.formats import Example, Rejection, _json_type, _need_str

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "function_call"}


def uses_tools(ex: Example) -> tuple[bool, bool]:
    """(has tool results, has tool specs or structured tool calls): what the chat template must be able to render."""
    messages = ex.messages or []
    results = any(m["role"] == "tool" for m in messages)
    calls = bool(ex.tools) or any(m.get("tool_calls") for m in messages)
    return results, calls


def check_messages(obj: dict, number: int) -> Example | Rejection:
    """An OpenAI-style record: `messages`, optionally `tools`."""
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return Rejection(number, "bad_field_type", f"line {number}: 'messages' must be a list, "
                         f"got {_json_type(messages)}")
    tools = _check_tools(obj.get("tools"), number)
    if isinstance(tools, Rejection):
        return tools
    out = []
    for i, m in enumerate(messages):
        where = f"line {number}: messages[{i}]"
        if not isinstance(m, dict):
            return Rejection(number, "bad_field_type", f"{where} must be an object, got {_json_type(m)}")
        role = m.get("role")
        if not isinstance(role, str):
            return Rejection(number, "bad_field_type", f"{where}.role must be a string, got {_json_type(role)}")
        if role not in ROLES:
            return Rejection(number, "unknown_role", f"{where}: unknown role {role[:40]!r}; use "
                             "'system', 'user', 'assistant' or 'tool'")
        msg = _check_message(m, role, where, number)
        if isinstance(msg, Rejection):
            return msg
        out.append(msg)
    return _finish(out, tools, number, structured_calls=True)


def check_sharegpt(obj: dict, number: int) -> Example | Rejection:
    """A ShareGPT record: `conversations` of {from, value}, optional top-level `system` and `tools`."""
    turns = obj.get("conversations")
    if not isinstance(turns, list):
        return Rejection(number, "bad_field_type", f"line {number}: 'conversations' must be a list, "
                         f"got {_json_type(turns)}")
    tools = _check_tools(obj.get("tools"), number)
    if isinstance(tools, Rejection):
        return tools
    out = []
    if obj.get("system") is not None:
        bad = _need_str(obj["system"], "system", number, allow_empty=True)
        if bad:
            return bad
        if obj["system"].strip():
            out.append({"role": "system", "content": obj["system"]})
    for i, turn in enumerate(turns):
        where = f"line {number}: conversations[{i}]"
        if not isinstance(turn, dict):
            return Rejection(number, "bad_field_type", f"{where} must be an object, got {_json_type(turn)}")
        source = turn.get("from")
        if not isinstance(source, str):
            return Rejection(number, "bad_field_type", f"{where}.from must be a string, got {_json_type(source)}")
        role = SHAREGPT_ROLES.get(source)
        if role is None:
            return Rejection(number, "unknown_role", f"{where}: unknown 'from' {source[:40]!r}; use one of "
                             f"{', '.join(repr(k) for k in SHAREGPT_ROLES)}")
        value = turn.get("value")
        if role == "function_call":
            calls = _parse_calls(value, where, number)
            if isinstance(calls, Rejection):
                return calls
            previous = out[-1] if out else None
            # "gpt" then "function_call" is one assistant turn that says something and calls a tool
            if previous and previous["role"] == "assistant" and "tool_calls" not in previous:
                previous["tool_calls"] = calls
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        msg = {"role": role, "content": value}
        if "weight" in turn:
            msg["weight"] = turn["weight"]
        msg = _check_message(msg, role, where, number, value_key="value")
        if isinstance(msg, Rejection):
            return msg
        out.append(msg)
    # Tool results may follow a plain gpt turn here: Hermes-style data writes the call as text in that turn.
    return _finish(out, tools, number, structured_calls=False)


def _check_message(m: dict, role: str, where: str, number: int, value_key: str = "content") -> dict | Rejection:
    content = m.get("content")
    msg: dict = {"role": role}
    # `"tool_calls": []` (OpenAI exports write it on every assistant message) is no call: as if absent
    if role == "assistant" and m.get("tool_calls") is not None and m["tool_calls"] != []:
        calls = _check_calls(m["tool_calls"], where, number)
        if isinstance(calls, Rejection):
            return calls
        if content is not None:  # null or absent content is usual beside tool calls
            bad = _need_str(content, value_key, number, allow_empty=True, where=where)
            if bad:
                return bad
        msg["content"], msg["tool_calls"] = content or "", calls
    else:
        bad = _need_str(content, value_key, number, allow_empty=role == "tool", where=where)
        if bad:
            return bad
        msg["content"] = content
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    return Rejection(number, "bad_field_type", f"{where}.{key} must be a string, "
                                     f"got {_json_type(m[key])}")
                msg[key] = m[key]
    if "weight" in m:
        w = m["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
            return Rejection(number, "bad_weight", f"{where}.weight must be 0 or 1, got {json.dumps(w)[:40]}")
        if role != "assistant":
            return Rejection(number, "bad_weight", f"{where}: weight is only allowed on assistant messages")
        msg["weight"] = int(w)
    return msg


def _finish(out: list[dict], tools: list[dict] | None, number: int, structured_calls: bool) -> Example | Rejection:
    label = "messages" if structured_calls else "conversations"
    names = {t["function"]["name"] for t in tools} if tools else None
    calls_open: list[dict] | None = None  # the tool calls a tool result may answer
    for i, m in enumerate(out):
        where = f"line {number}: {label}[{i}]"
        if m["role"] == "system" and i > 0:
            return Rejection(number, "system_not_first", f"{where}: a system message may only come first")
        if m["role"] == "assistant":
            calls_open = m.get("tool_calls") or ([] if not structured_calls else None)
            for call in m.get("tool_calls", ()):
                if names is not None and call["function"]["name"] not in names:
                    return Rejection(number, "unknown_tool", f"{where}: calls {call['function']['name'][:60]!r}, "
                                     f"which is not in the record's 'tools' ({', '.join(sorted(names))[:200]})")
        elif m["role"] == "tool":
            if calls_open is None:
                what = "an assistant message with tool_calls" if structured_calls else "an assistant turn"
                return Rejection(number, "tool_without_call", f"{where}: a tool result must follow {what} "
                                 "(or another tool result)")
            ids = {c["id"] for c in calls_open if "id" in c}
            if "tool_call_id" in m and ids and m["tool_call_id"] not in ids:
                return Rejection(number, "tool_without_call", f"{where}: tool_call_id {m['tool_call_id'][:60]!r} "
                                 f"answers no call of the assistant message before it (ids: {', '.join(sorted(ids))})")
        else:
            calls_open = None
    if not any(m["role"] == "assistant" for m in out):
        return Rejection(number, "missing_assistant", f"line {number}: no assistant message (nothing to train on)")
    return Example(number, "messages", messages=out, tools=tools)


def _check_tools(tools, number: int) -> list[dict] | None | Rejection:
    if tools is None:
        return None
    where = f"line {number}: 'tools'"
    if isinstance(tools, str):  # LLaMA-Factory writes the list as a JSON string
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            return Rejection(number, "bad_tools", f"{where} is a string but not JSON: {e.msg} at column {e.colno}")
    if not isinstance(tools, list):
        return Rejection(number, "bad_tools", f"{where} must be a list of function specs, got {_json_type(tools)}")
    out = []
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        if isinstance(tool, dict) and tool.get("type", "function") != "function":
            return Rejection(number, "bad_tools", f"{where}[{i}].type must be 'function', "
                             f"got {json.dumps(tool['type'])[:40]}")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"].strip():
            return Rejection(number, "bad_tools", f"{where}[{i}] must be a function spec "
                             '{"type": "function", "function": {"name": ..., "description": ..., "parameters": '
                             "{JSON schema}}}, or the function object alone")
        if not isinstance(spec.get("parameters", {}), dict):
            return Rejection(number, "bad_tools", f"{where}[{i}].parameters must be a JSON schema object, "
                             f"got {_json_type(spec['parameters'])}")
        out.append({"type": "function", "function": spec})
    return out or None


def _check_calls(calls, where: str, number: int) -> list[dict] | Rejection:
    if not isinstance(calls, list) or not calls:
        return Rejection(number, "bad_tool_call", f"{where}.tool_calls must be a non-empty list, "
                         f"got {_json_type(calls) if calls != [] else 'an empty list'}")
    out = []
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(call, dict):
            return Rejection(number, "bad_tool_call", f"{at} must be an object, got {_json_type(call)}")
        if call.get("type", "function") != "function":
            return Rejection(number, "bad_tool_call", f"{at}.type must be 'function', "
                             f"got {json.dumps(call['type'])[:40]}")
        fn = call.get("function", call)  # {"name", "arguments"} alone is accepted too
        checked = _check_function(fn, at, number)
        if isinstance(checked, Rejection):
            return checked
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                return Rejection(number, "bad_tool_call", f"{at}.id must be a string, got {_json_type(call['id'])}")
            checked["id"] = call["id"]
        out.append(checked)
    return out


def _check_function(fn, at: str, number: int) -> dict | Rejection:
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        return Rejection(number, "bad_tool_call", f"{at} needs a function name: "
                         '{"type": "function", "function": {"name": ..., "arguments": {...}}}')
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return Rejection(number, "bad_tool_call", f"{at}: arguments is a string but not JSON: {e.msg} at "
                             f"column {e.colno}")
    if not isinstance(args, dict):
        return Rejection(number, "bad_tool_call", f"{at}: arguments must be an object (or a JSON string of one), "
                         f"got {_json_type(args)}")
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def _parse_calls(value, where: str, number: int) -> list[dict] | Rejection:
    """A ShareGPT function_call turn's value: JSON of one call {"name", "arguments"} or a list of them."""
    if not isinstance(value, str):
        return Rejection(number, "bad_tool_call", f"{where}.value must be a JSON string of the call, "
                         f"got {_json_type(value)}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        return Rejection(number, "bad_tool_call", f"{where}: a function_call value must be JSON "
                         f'{{"name": ..., "arguments": {{...}}}}: {e.msg} at column {e.colno}')
    return _check_calls(parsed if isinstance(parsed, list) else [parsed], where, number)
