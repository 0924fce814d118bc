"""The Ollama Modelfile written beside an exported GGUF: FROM, the chat template as a Go template, stop tokens.

Ollama does not run Jinja. Rather than parse the Jinja source, the tokenizer's own template is rendered on a few
conversations and accepted as ChatML only if every rendering is exactly what ChatML gives (optionally with a
default system prompt when the conversation has none, as SmolLM2's adds). Then the Go template below renders the
same text for the same messages. Any other template is left out of the Modelfile, with a comment saying so and a
warning: Ollama then falls back to what it detects from the GGUF's tokenizer.chat_template. A template that
mentions tools is also rendered on a conversation with tools, tool calls and tool results: the Go template
writes them as plain ChatML (role "tool", no tool specs, no calls), so a template that writes them otherwise
(Qwen2.5: tools in the system turn, <tool_call>, <tool_response>) is left out too.
"""

from __future__ import annotations

START, END = "<|im_start|>", "<|im_end|>"

# Every message as ChatML; a trailing assistant message is left open (Ollama continues it), otherwise the prompt
# ends with the assistant's header, as the Jinja template does with add_generation_prompt.
_MESSAGES = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}" + START + "{{ .Role }}\n"
    "{{ .Content }}{{ if not (and $last (eq .Role \"assistant\")) }}" + END + "\n{{ end }}\n"
    "{{- if and $last (ne .Role \"assistant\") }}" + START + "assistant\n{{ end }}\n"
    "{{- end }}"
)
_DEFAULT_SYSTEM = ("{{- if not (and .Messages (eq (index .Messages 0).Role \"system\")) }}" + START + "system\n"
                   "%s" + END + "\n{{ end }}\n")


def _render(tokenizer, messages, tools=None):
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)


def _chatml(messages):
    """What the Go template below writes for these messages (ending with a user or tool message)."""
    return "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages) + f"{START}assistant\n"


def chatml_default_system(tokenizer) -> str | None | bool:
    """False when the tokenizer's chat template is not ChatML; else its default system prompt (None: it has none)."""
    def render(messages):
        return _render(tokenizer, messages)

    chatml = _chatml
    if not tokenizer.chat_template:
        return False
    user = [{"role": "user", "content": "Question one?"}]
    turns = [*user, {"role": "assistant", "content": "Answer one."}, {"role": "user", "content": "Two?"}]
    system = [{"role": "system", "content": "Be brief."}]
    try:
        first = render(user)
        if not first.endswith(chatml(user)):
            return False
        prefix = first[:-len(chatml(user))]
        default = None
        if prefix:
            if not (prefix.startswith(f"{START}system\n") and prefix.endswith(f"{END}\n")):
                return False
            default = prefix[len(f"{START}system\n"):-len(f"{END}\n")]
        if render(turns) != prefix + chatml(turns) or render(system + turns) != chatml(system + turns):
            return False
    except Exception:  # a template that cannot render these plain conversations is not one we can translate
        return False
    if default is not None and ("{{" in default or '"""' in default):
        return False
    return default


def tools_differ(tokenizer, default_system: str | None) -> bool:
    """Whether a ChatML template that mentions tools writes tool use otherwise than the Go template would."""
    from daemon.trainer.tool_template import PROBE_TOOL_CONVERSATION, PROBE_TOOLS

    if "tool" not in str(tokenizer.chat_template):
        return False  # it cannot treat tools in any way of its own: they render as the plain probes showed
    prefix = f"{START}system\n{default_system}{END}\n" if default_system is not None else ""
    answered = [*PROBE_TOOL_CONVERSATION, {"role": "user", "content": "probe-followup"}]
    try:
        for messages in (PROBE_TOOL_CONVERSATION[:3], answered):
            for tools in (PROBE_TOOLS, None):
                if _render(tokenizer, messages, tools) != prefix + _chatml(messages):
                    return True
    except Exception:  # a template that refuses tool use is not one whose tool use we can reproduce
        return True
    return False


def go_template(default_system: str | None) -> str:
    return (_DEFAULT_SYSTEM % default_system if default_system is not None else "") + _MESSAGES


def modelfile(tokenizer, gguf_name: str, description: str, adapter: str | None = None) -> tuple[str, str | None]:
    """(the Modelfile's text, a warning for stderr or None); `adapter`: a LoRA GGUF to apply over gguf_name."""
    lines = [f"# Ollama: ollama create NAME -f Modelfile  (in this folder). {description}.",
             f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter}"] if adapter else [])
    default = chatml_default_system(tokenizer)
    warning = None
    if default is False:
        warning = ("the chat template is not ChatML and was not translated into Ollama's template language: the "
                   "Modelfile has no TEMPLATE (Ollama uses what it detects from the GGUF's chat template)")
        lines.insert(1, f"# No TEMPLATE: {warning}.")
    elif tools_differ(tokenizer, default):
        warning = ("the chat template writes tools, tool calls or tool results otherwise than plain ChatML, which "
                   "is all the Modelfile's TEMPLATE could write: the Modelfile has no TEMPLATE (Ollama uses what it "
                   "detects from the GGUF's chat template)")
        lines.insert(1, f"# No TEMPLATE: {warning}.")
    else:
        lines.append(f'TEMPLATE """{go_template(default)}"""')
        lines += [f'PARAMETER stop "{START}"', f'PARAMETER stop "{END}"']
    return "\n".join(lines) + "\n", warning
