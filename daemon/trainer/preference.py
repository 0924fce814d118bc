"""Preference files: {"prompt": ..., "chosen": ..., "rejected": ...} lines, checked and tokenized for DPO.

The shape TRL and OpenAI use: the prompt is a string or a list of chat messages (ending with a user turn), each
answer a string, one assistant message, or a list holding one assistant message. A line is checked without a
tokenizer (this module imports neither torch nor transformers: the daemon's `validate` path may use it), then
each answer is rendered after the prompt through the model's chat template, exactly as a prompt/completion
example would be, and only the answer's tokens (with its end-of-turn marker) are labelled: DPO compares the
log-probabilities of the two answers given the same prompt. Assistant turns inside a multi-turn prompt get
weight 0, so they are context, never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.trainer.formats import Example, Rejection, _json_type

FORMAT = "preference"
KEYS = ("chosen", "rejected")  # with "prompt": a preference line, whatever else it has
PROMPT_ROLES = ("system", "user", "assistant")


@dataclass
class PreferenceExample(Example):
    """A checked preference line: `messages` is the prompt followed by the chosen answer, `rejected` the prompt
    followed by the rejected one (chat messages, as the other formats normalise to)."""

    rejected: list[dict] | None = None
    plain_prompt: bool = False  # the prompt was a string: without a chat template, plain concatenation works


@dataclass
class PreferencePair:
    """Both answers tokenized after the same prompt; `ref_*`: the reference policy's log-probabilities of each
    answer (summed over its tokens), filled in before training (dpo_recipe.py). Looks like a TokenizedExample to
    the batch planner and the report: its length is both sequences'."""

    chosen: object  # data.TokenizedExample
    rejected: object
    line: int = 0
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def trainable(self) -> int:
        return self.chosen.trainable + self.rejected.trainable


def is_preference(obj: dict) -> bool:
    """A line whose keys name the preference format (it has "prompt" too, which prompt/completion shares)."""
    return any(k in obj for k in KEYS)


def check_preference(obj: dict, number: int) -> PreferenceExample | Rejection:
    """Normalise a preference line, or say with a code what is wrong: missing_prompt, missing_chosen,
    missing_rejected, bad_field_type, empty_content, bad_role, identical_pair."""
    where = f"line {number}"
    if "prompt" not in obj:
        return Rejection(number, "missing_prompt", f"{where}: missing 'prompt' (a string or a list of messages)")
    for key in KEYS:
        if key not in obj:
            return Rejection(number, f"missing_{key}", f"{where}: missing {key!r} (the {key} answer)")
    prompt = _prompt(obj["prompt"], number)
    if isinstance(prompt, Rejection):
        return prompt
    answers = []
    for key in KEYS:
        answer = _answer(obj[key], key, number)
        if isinstance(answer, Rejection):
            return answer
        answers.append(answer)
    if answers[0].strip() == answers[1].strip():
        return Rejection(number, "identical_pair", f"{where}: 'chosen' and 'rejected' are the same text, so there "
                         "is no preference to learn")
    chosen, rejected = ([*prompt, {"role": "assistant", "content": a}] for a in answers)
    return PreferenceExample(number, FORMAT, messages=chosen, rejected=rejected,
                             plain_prompt=isinstance(obj["prompt"], str))


def _prompt(value, number: int) -> list[dict] | Rejection:
    where = f"line {number}"
    if isinstance(value, str):
        if not value.strip():
            return Rejection(number, "empty_content", f"{where}: 'prompt' is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else _json_type(value)
        return Rejection(number, "bad_field_type", f"{where}: 'prompt' must be a string or a list of messages, "
                         f"got {what}")
    out = []
    for i, m in enumerate(value):
        at = f"{where}: prompt message {i + 1}"
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return Rejection(number, "bad_field_type", f"{at} must be an object with a string 'content'")
        if m.get("role") not in PROMPT_ROLES:
            return Rejection(number, "bad_role", f"{at} has role {m.get('role')!r}; expected one of "
                             f"{', '.join(PROMPT_ROLES)}")
        # Earlier assistant turns are context: weight 0 keeps them out of the scored answer tokens.
        out.append({"role": m["role"], "content": m["content"], **({"weight": 0} if m["role"] == "assistant" else {})})
    if out[-1]["role"] != "user":
        return Rejection(number, "bad_role", f"{where}: the prompt's last message must be the user's (the answers "
                         f"reply to it), not {out[-1]['role']!r}")
    return out


def _answer(value, key: str, number: int) -> str | Rejection:
    where = f"line {number}"
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            return Rejection(number, "bad_role", f"{where}: {key!r} must be an assistant message, not "
                             f"{value.get('role')!r}")
        value = value.get("content")
    if not isinstance(value, str):
        return Rejection(number, "bad_field_type", f"{where}: {key!r} must be a string or one assistant message, "
                         f"got {_json_type(value)}")
    if not value.strip():
        return Rejection(number, "empty_content", f"{where}: {key!r} is empty")
    return value


def tokenize_pairs(tokenizer, examples: list[PreferenceExample], max_length: int,
                   too_long: str = "skip") -> list[PreferencePair | Rejection]:
    """Both answers of each example through data.tokenize_examples (the chat template, answer-only labels), in
    one batch; a pair fails as a whole (too_long, no_trainable_tokens, identical_pair after truncation)."""
    from daemon.trainer.data import tokenize_examples

    halves = []
    for ex in examples:
        fmt = "prompt_completion" if ex.plain_prompt else "messages"
        halves += [Example(ex.line, fmt, messages=ex.messages), Example(ex.line, fmt, messages=ex.rejected)]
    done = tokenize_examples(tokenizer, halves, max_length, train_on_inputs=False, too_long=too_long)
    out: list[PreferencePair | Rejection] = []
    for k, ex in enumerate(examples):
        chosen, rejected = done[2 * k], done[2 * k + 1]
        bad = next((r for r in (chosen, rejected) if isinstance(r, Rejection)), None)
        if bad is not None:
            which = "chosen" if bad is chosen else "rejected"
            out.append(Rejection(ex.line, bad.code, f"{bad.message} (prompt + {which} answer)"))
        elif _answer_ids(chosen) == _answer_ids(rejected):
            out.append(Rejection(ex.line, "identical_pair", f"line {ex.line}: 'chosen' and 'rejected' are the same "
                                 f"tokens once cut to max_length={max_length}"))
        else:
            out.append(PreferencePair(chosen, rejected, ex.line))
    return out


def _answer_ids(ex) -> list[int]:
    return [x for x in ex.labels if x >= 0]

