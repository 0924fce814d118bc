"""Whether a base model's chat template can render tool use, checked once per file before any GPU work.

Templates without tool support rarely fail loudly: most ignore `tools`, write an assistant message with tool
calls as an empty turn, or drop messages of a role they do not know. Training on what they write would teach
the model conversations in which nothing was called and nothing answered, so such a template is one clear
error for the whole file instead.
"""

from __future__ import annotations

from daemon.trainer import chat_template
from daemon.trainer.formats import Rejection
from daemon.trainer.model_fit import no_chat_template

PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_lookup", "description": "Look up a probe value.",
    "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}]
PROBE_TOOL_CONVERSATION = [
    {"role": "user", "content": "probe-question"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call_probe",
         "function": {"name": "probe_lookup", "arguments": {"key": "probe-key"}}}]},
    {"role": "tool", "content": "probe-result", "tool_call_id": "call_probe", "name": "probe_lookup"},
    {"role": "assistant", "content": "probe-answer"}]


def check(tokenizer, calls: bool) -> Rejection | None:
    """Whether the chat template renders what a file's tool use needs, checked once per file: tool results always,
    and with `calls` the record's `tools` and the assistant's tool calls too. A template that silently drops any
    of them would train on conversations that no longer say what happened."""
    if not getattr(tokenizer, "chat_template", None):
        return no_chat_template("tools", 0)
    model = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    conversation = PROBE_TOOL_CONVERSATION if calls else [
        {"role": "user", "content": "probe-question"}, {"role": "assistant", "content": "probe-call"},
        {"role": "tool", "content": "probe-result"}, {"role": "assistant", "content": "probe-answer"}]
    what = "tool calls (tools, assistant tool_calls, tool results)" if calls else "tool results (role 'tool')"
    try:
        text = chat_template.render(tokenizer, conversation, tools=PROBE_TOOLS if calls else None)
        plain = chat_template.render(tokenizer, conversation) if calls else text
        spans = chat_template.assistant_spans(tokenizer, conversation, text, PROBE_TOOLS if calls else None)
    except Exception as e:  # jinja's errors, raise_exception() in a template, a None content concatenated
        return _no_tools(model, what, f"it fails on them: {type(e).__name__}: {e}"[:300])
    if "probe-result" not in text:
        return _no_tools(model, what, "it leaves the tool results out of the text")
    if calls and text == plain:
        return _no_tools(model, what, "it writes the same text with and without 'tools'")
    if calls and ("probe_lookup" not in plain or "probe-key" not in plain):
        return _no_tools(model, what, "it leaves the assistant's tool_calls out of the text")
    if not spans or len(spans) != 2:
        return _no_tools(model, what, "the assistant messages cannot be found in the text it writes")
    return None


def _no_tools(model: str, what: str, why: str) -> Rejection:
    return Rejection(0, "chat_template_no_tools", f"the chat template of the base model {model} cannot render "
                     f"{what}: {why}; use a base model whose chat template supports tools (e.g. Qwen2.5, "
                     "Llama 3.1 Instruct), or write the calls and their results as plain text in the turns")
