"""Where the assistant messages are in a conversation rendered by the tokenizer's chat template.

Templates differ (end-of-turn markers, generation prompts, default system prompts, trimming), so nothing is
assumed about their text: a probe conversation teaches each tokenizer's template shape once, and a template
the probe cannot read takes a slower method that works for any template that renders prefixes as prefixes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass


@dataclass(frozen=True)
class TemplateShape:
    """What the chat template writes around an assistant message, learned once per tokenizer from a probe."""

    gen_prompt: str  # appended by add_generation_prompt=True, e.g. "<|im_start|>assistant\n"
    end: str  # closes an assistant message, e.g. "<|im_end|>" (trailing whitespace left out)


_shapes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def render(tokenizer, messages: list[dict], generation: bool = False, tools: list[dict] | None = None) -> str:
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    extra = {"tools": tools} if tools else {}  # some templates test `tools is defined`, not its truth
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation, **extra)


def template_shape(tokenizer) -> TemplateShape | None:
    template = tokenizer.chat_template
    cached = _shapes.get(tokenizer)
    if cached and cached[0] == template:
        return cached[1]
    probe = [{"role": "user", "content": "probe-question-one"}, {"role": "assistant", "content": "probe-answer-one"},
             {"role": "user", "content": "probe-question-two"}, {"role": "assistant", "content": "probe-answer-two"}]
    shape = None
    try:
        head, head_gen = render(tokenizer, probe[:1]), render(tokenizer, probe[:1], True)
        full = render(tokenizer, probe)
        last = full.rfind("probe-answer-two")
        end = full[last + len("probe-answer-two"):].rstrip()
        first = len(head_gen) + len("probe-answer-one")
        if (head_gen.startswith(head) and full.startswith(head_gen + "probe-answer-one")
                and full.startswith(end, first)):
            shape = TemplateShape(head_gen[len(head):], end)
    except Exception:  # a template that refuses the probe: every example takes the slower prefix method
        shape = None
    try:
        _shapes[tokenizer] = (template, shape)
    except TypeError:
        pass
    return shape


def assistant_spans(tokenizer, messages: list[dict], full: str,
                    tools: list[dict] | None = None) -> list[tuple[int, int, int]] | None:
    """(start, end, message index) in characters of `full` for each assistant message: content (and the tool
    calls the template writes for it) + end marker.

    Fast path, one render: each assistant content must appear right after the generation prompt and be
    followed by the end marker (both learned from a probe). Templates that rewrite contents (trimming,
    reasoning removal, default system prompts in odd places) fail that check and take the prefix method:
    render messages[:i] with the generation prompt and messages[:i+1], both prefixes of the full text, the
    span between them. That costs O(turns^2) rendering, so it is only the fallback. Tool calls are written
    in each template's own way, so conversations with tool calls always take the prefix method.
    """
    shape = None if any(m.get("tool_calls") for m in messages) else template_shape(tokenizer)
    if shape is not None:
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            content = m["content"]
            if m["role"] != "assistant":
                # Step over prompts so that an assistant's text quoted in a prompt is not taken for the answer.
                pos = full.find(content, cursor)
                cursor = pos + len(content) if pos >= 0 else cursor
                continue
            pos = full.find(shape.gen_prompt + content, cursor)
            start = pos + len(shape.gen_prompt)
            if pos < 0 or not full.startswith(shape.end, start + len(content)):
                break
            cursor = start + len(content) + len(shape.end)
            spans.append((start, cursor, i))
        else:
            return spans
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True, tools)
        upto = render(tokenizer, messages[:i + 1], tools=tools).rstrip()
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            return None
        spans.append((len(before), len(upto), i))
    return spans
