"""Training data: validate a JSONL file in one streaming pass and turn its records into token ids with loss masks.

Structural checks (formats, per-line error codes, safe line reading) live in formats.py and need no
tokenizer; this module adds tokenization, the `Report` of a whole file and the `validate` CLI command.
Nothing here imports torch or transformers at module level: the daemon process may use `validate_file`
without a tokenizer.

Masks: labels are aligned with input_ids (HF convention, the loss shifts) and hold -100 where nothing is
trained. Chat-like examples are rendered with the tokenizer's chat template; by default only assistant
messages are trained, each with the end-of-turn marker that follows it (e.g. <|im_end|>) so that the model
learns to stop; the tool calls a template writes into an assistant message are part of it, tool results and
the `tools` the template writes into its prompt are not. Assistant spans are found in characters of the
rendered text, then mapped to tokens through the fast tokenizer's offsets (daemon/trainer/chat_template.py).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from daemon.trainer import chat_template, model_fit, tool_template
from daemon.trainer.formats import Example, RecordReader, Rejection, check_record, detect_format
from daemon.trainer.formats_chat import uses_tools

IGNORE = -100
MAX_LISTED_ERRORS = 100
# Records tokenized per call (the Rust tokenizer spreads a batch over its threads), capped in bytes too so
# that a batch of long lines cannot hold much memory.
TOKENIZE_BATCH = 256
TOKENIZE_BATCH_BYTES = 4 << 20


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE where not trained
    truncated: bool = False
    line: int = 0  # 1-based line of the source file (0 when not from a file)

    @property
    def trainable(self) -> int:
        """Tokens that get a loss: a label at position 0 is never predicted by anything."""
        labels = self.labels
        return len(labels) - labels.count(IGNORE) - (1 if labels and labels[0] != IGNORE else 0)


# --- tokenization ---------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """One example ready to encode: its text and the character spans whose tokens are trained."""

    example: Example
    text: str
    trained: list[tuple[int, int]]  # character spans trained
    untrained: list[tuple[int, int]]  # spans excluded even with train_on_inputs (weight 0)
    special_tokens: bool = False  # let the tokenizer add BOS etc. (plain text); chat templates write their own
    add_eos: bool = False  # append EOS, trained: plain text and completions without a template learn to stop


def _plan(tokenizer, ex: Example, train_on_inputs: bool) -> _Plan | Rejection:
    if ex.messages is None:
        return _Plan(ex, ex.text, [(0, len(ex.text))], [], special_tokens=True, add_eos=True)
    if not getattr(tokenizer, "chat_template", None):
        if ex.format == "prompt_completion":  # a base model without a template: plain concatenation
            prompt, completion = ex.messages[0]["content"], ex.messages[1]["content"]
            text = prompt + completion
            return _Plan(ex, text, [(0 if train_on_inputs else len(prompt), len(text))], [], add_eos=True)
        return model_fit.no_chat_template(ex.format, ex.line)
    try:
        full = chat_template.render(tokenizer, ex.messages, tools=ex.tools)
        spans = chat_template.assistant_spans(tokenizer, ex.messages, full, ex.tools)
    except Exception as e:  # jinja raises for conversations a template forbids (e.g. roles not alternating)
        return Rejection(ex.line, "template_error", f"line {ex.line}: the model's chat template refused this "
                         f"conversation: {str(e)[:200]}")
    if spans is None:
        return Rejection(ex.line, "template_error", f"line {ex.line}: cannot locate the assistant messages in the "
                         "text rendered by the model's chat template")
    weight = [ex.messages[i].get("weight", 1) for _, _, i in spans]
    if train_on_inputs:
        return _Plan(ex, full, [(0, len(full))], [(s, e) for (s, e, _), w in zip(spans, weight) if not w])
    return _Plan(ex, full, [(s, e) for (s, e, _), w in zip(spans, weight) if w], [])


def _encode(tokenizer, plans: list[_Plan]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per plan: a token is trained when its characters overlap a trained span."""
    out = []
    if getattr(tokenizer, "is_fast", False):
        by_flag: dict[bool, list[int]] = {}
        for k, p in enumerate(plans):
            by_flag.setdefault(p.special_tokens, []).append(k)
        encoded: list = [None] * len(plans)
        for flag, idx in by_flag.items():
            for k, pair in zip(idx, _encode_batch(tokenizer, [plans[k].text for k in idx], flag)):
                encoded[k] = pair
        for p, (ids, offsets) in zip(plans, encoded):
            labels = [IGNORE] * len(ids)
            starts = [s for s, _ in offsets]
            ends = [e for _, e in offsets]
            for spans, on in ((p.trained, True), (p.untrained, False)):
                for s, e in spans:
                    a, b = bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)
                    labels[a:b] = ids[a:b] if on else [IGNORE] * max(0, b - a)
            out.append((list(ids), labels))
    else:
        out = [_encode_pieces(tokenizer, p) for p in plans]
    eos = getattr(tokenizer, "eos_token_id", None)
    for p, (ids, labels) in zip(plans, out):
        if p.add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
    return out


def _encode_batch(tokenizer, texts: list[str], special_tokens: bool) -> list[tuple[list[int], list]]:
    """(ids, offsets) per text, straight from the Rust tokenizer when that is safe (a third faster: no per-token
    Python conversion), else through the transformers wrapper, which also resets truncation and padding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=special_tokens)]
    enc = tokenizer(texts, add_special_tokens=special_tokens, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _encode_pieces(tokenizer, p: _Plan) -> tuple[list[int], list[int]]:
    """Slow tokenizers have no offsets: encode the text piece by piece, cut at the span boundaries."""
    cuts = sorted({0, len(p.text), *(x for s in p.trained + p.untrained for x in s)})
    ids: list[int] = []
    labels: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(p.text[a:b], add_special_tokens=p.special_tokens and a == 0)["input_ids"]
        trained = any(s <= a and b <= e for s, e in p.trained) and not any(s <= a and b <= e for s, e in p.untrained)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))
    return ids, labels


def tokenize_examples(tokenizer, examples: list[Example], max_length: int, train_on_inputs: bool = False,
                      too_long: str = "skip") -> list[TokenizedExample | Rejection]:
    """Tokenize structurally valid examples in one batch; results in the same order."""
    if too_long not in ("skip", "truncate"):
        raise ValueError(f"too_long must be 'skip' or 'truncate', not {too_long!r}")
    if examples and examples[0].format == "preference":  # a file holds one format: pairs, scored on answers only
        from daemon.trainer.preference import tokenize_pairs

        return tokenize_pairs(tokenizer, examples, max_length, too_long)
    plans = [_plan(tokenizer, ex, train_on_inputs) for ex in examples]
    ready = [p for p in plans if isinstance(p, _Plan)]
    encoded = iter(_encode(tokenizer, ready))
    results: list[TokenizedExample | Rejection] = []
    for p in plans:
        if isinstance(p, Rejection):
            results.append(p)
            continue
        ids, labels = next(encoded)
        results.append(_fit(TokenizedExample(ids, labels, False, p.example.line), max_length, too_long))
    return results


def _fit(ex: TokenizedExample, max_length: int, too_long: str) -> TokenizedExample | Rejection:
    n = len(ex.input_ids)
    if n > max_length:
        if too_long == "skip":
            return Rejection(ex.line, "too_long", f"line {ex.line}: {n} tokens, more than max_length={max_length} "
                             "(set training.too_long: truncate to cut such examples instead of skipping them)")
        ex = TokenizedExample(ex.input_ids[:max_length], ex.labels[:max_length], True, ex.line)
    if not ex.trainable:
        why = " after truncation to max_length" if ex.truncated else ""
        return Rejection(ex.line, "no_trainable_tokens", f"line {ex.line}: no token left to train{why}")
    return ex


def tokenize_example(tokenizer, example: Example | dict, max_length: int, train_on_inputs: bool = False,
                     too_long: str = "skip") -> TokenizedExample | Rejection:
    """One record (an Example, or a parsed JSON object of any format) -> token ids and labels, or a Rejection."""
    if isinstance(example, dict):
        fmt = detect_format(example, 0)
        if isinstance(fmt, Rejection):
            return fmt
        example = check_record(example, fmt, 0, train_on_inputs)
        if isinstance(example, Rejection):
            return example
    return tokenize_examples(tokenizer, [example], max_length, train_on_inputs, too_long)[0]


# --- the report of a whole file -------------------------------------------------------------------------------

@dataclass
class Report:
    file: str
    format: str | None = None
    lines: int = 0
    examples: int = 0  # usable
    skipped: int = 0  # non-blank lines rejected
    truncated: int = 0
    tokens: int | None = None  # None when validated without a tokenizer
    trainable_tokens: int | None = None
    longest: int | None = None  # tokens in the longest usable example
    errors: list[dict] = field(default_factory=list)  # the first MAX_LISTED_ERRORS, in file order
    counts_by_code: dict[str, int] = field(default_factory=dict)  # complete
    fatal: dict | None = None
    min_examples: int = 1
    max_length: int | None = None
    examples_list: list[TokenizedExample] = field(default_factory=list, repr=False)  # keep_examples=True only

    @property
    def ok(self) -> bool:
        return self.fatal is None and self.examples >= self.min_examples

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "examples_list"}
        d = json.loads(json.dumps(d))  # a deep copy of plain data, never of the examples
        return {**d, "ok": self.ok, "errors_not_listed": self.skipped - len(self.errors)}

    def render(self) -> str:
        name = Path(self.file).name
        out = []
        if self.fatal:
            out.append(f"{name}: REJECTED ({self.fatal['code']}): {self.fatal['message']}{self._skip_reasons()}")
        else:
            out.append(f"{name}: {'OK' if self.ok else 'REJECTED'}: {self.examples} usable examples"
                       + (f" ({self.format} format)" if self.format else "")
                       + (self._skip_reasons() if not self.ok else ""))
        summary = f"  {self.lines} lines, {self.examples} usable, {self.skipped} skipped"
        if self.truncated:
            summary += f", {self.truncated} truncated to {self.max_length} tokens"
        out.append(summary)
        if self.tokens is not None:
            out.append(f"  {self.tokens:,} tokens, {self.trainable_tokens:,} trained; longest example "
                       f"{self.longest or 0:,} tokens")
        if self.counts_by_code:
            by_code = ", ".join(f"{code} {n}" for code, n in sorted(self.counts_by_code.items(), key=lambda x: -x[1]))
            out.append(f"  skipped lines by reason: {by_code}")
            out.extend(f"  {e['message']} [{e['code']}]" for e in self.errors)
            if self.skipped > len(self.errors):
                out.append(f"  ... and {self.skipped - len(self.errors)} more not listed")
        return "\n".join(out)

    def _skip_reasons(self) -> str:
        # The first line is what status.log and `jobs` show for a rejected file: say why lines were skipped.
        if not self.counts_by_code:
            return ""
        by_code = ", ".join(f"{code} x{n}" for code, n in sorted(self.counts_by_code.items(), key=lambda x: -x[1]))
        first = f" (first: line {self.errors[0]['line']})" if self.errors and self.errors[0].get("line") else ""
        return f"; skipped lines: {by_code}{first}"

    def _add(self, item: TokenizedExample | Example | Rejection, keep: bool) -> None:
        if isinstance(item, Rejection):
            self.skipped += 1
            self.counts_by_code[item.code] = self.counts_by_code.get(item.code, 0) + 1
            if len(self.errors) < MAX_LISTED_ERRORS:
                self.errors.append({"line": item.line, "code": item.code, "message": item.message})
            return
        self.examples += 1
        if not isinstance(item, Example):  # tokenized: a TokenizedExample, or a preference pair (both answers)
            n = len(item.input_ids)
            self.tokens += n
            self.trainable_tokens += item.trainable
            self.truncated += item.truncated
            self.longest = max(self.longest or 0, n)
            if keep:
                self.examples_list.append(item)

    def _set_fatal(self, r: Rejection) -> None:
        self.fatal = {"code": r.code, "message": r.message, "line": r.line or None, "offset": r.offset}


def validate_file(path, tokenizer=None, *, max_length: int = 2048, max_line_bytes: int = 16 << 20,
                  train_on_inputs: bool = False, too_long: str = "skip", min_examples: int = 1,
                  keep_examples: bool = False, model_vocab_size: int | None = None) -> Report:
    """Check a JSONL file in one streaming pass; with a tokenizer, also tokenize and count tokens.

    Memory stays bounded by the longest accepted line and a batch of records, whatever the file's size,
    unless keep_examples=True: then `report.examples_list` holds every usable TokenizedExample in file
    order (each knows its source `line`), ready for training; skipped lines leave no gap in the list.
    Validation stops at the first fatal problem (encoding, not JSONL, mixed formats, a tokenizer or chat
    template that does not fit the model or the file's format: model_fit.py, checked once the format is known;
    `model_vocab_size`: the model's embedding rows, when known).
    """
    report = Report(file=str(path), min_examples=min_examples, max_length=max_length if tokenizer else None)
    if tokenizer is not None:
        report.tokens = report.trainable_tokens = 0
    keep = keep_examples and tokenizer is not None
    pending: list[Example | Rejection] = []
    pending_bytes = 0
    fit_checked = tokenizer is None
    tools_checked = [tokenizer is None] * 2  # the template renders tool results / tools and tool calls

    def flush() -> None:
        nonlocal pending_bytes
        todo = [x for x in pending if isinstance(x, Example)]
        done = iter(tokenize_examples(tokenizer, todo, max_length, train_on_inputs, too_long) if todo else [])
        for x in pending:
            result = next(done) if isinstance(x, Example) else x
            if isinstance(result, Rejection) and result.fatal:
                report._set_fatal(result)
                break
            report._add(result, keep)
        pending.clear()
        pending_bytes = 0

    with open(path, "rb") as f:
        reader = RecordReader(f, max_line_bytes=max_line_bytes, train_on_inputs=train_on_inputs)
        for item in reader:
            if isinstance(item, Rejection) and item.fatal:
                flush()  # the lines before it still count
                if not report.fatal:
                    report._set_fatal(item)
                break
            if tokenizer is None:
                report._add(item, False)
                continue
            if not fit_checked and isinstance(item, Example):
                fit_checked = True
                # tools and sharegpt lines are messages to the template; their tool use is checked below
                fmt = item.format if item.format in model_fit.CHAT_FORMATS or item.messages is None else "messages"
                misfit = model_fit.check(tokenizer, fmt, model_vocab_size)
                if misfit:
                    flush()  # the lines before it still count
                    report._set_fatal(misfit)
                    break
            if isinstance(item, Example) and item.messages is not None:
                misfit = _check_tools_once(tokenizer, item, tools_checked)
                if misfit:
                    flush()
                    report._set_fatal(misfit)
                    break
            pending.append(item)
            pending_bytes += getattr(item, "size", 0)
            if len(pending) >= TOKENIZE_BATCH or pending_bytes >= TOKENIZE_BATCH_BYTES:
                flush()
                if report.fatal:
                    break
        flush()
        report.lines, report.format = reader.lines, reader.format
    if report.fatal:
        report.examples_list = []
    elif report.examples < min_examples:
        what = "no usable example" if report.examples == 0 else f"only {report.examples} usable examples"
        why = " (the file is empty)" if report.lines == 0 else ""
        report._set_fatal(Rejection(0, "too_few_examples", f"{what}{why}; at least {min_examples} needed"))
    return report


def _check_tools_once(tokenizer, ex: Example, checked: list[bool]) -> Rejection | None:
    """The template check for the first example that uses tool results, and again for the first with tool calls."""
    for k, needed in enumerate(uses_tools(ex)):
        if needed and not checked[k]:
            checked[k] = True
            misfit = tool_template.check(tokenizer, calls=k == 1)
            if misfit:
                return misfit
    return None


def validate_for_config(path, tokenizer, cfg, *, base_dir: Path | None = None,
                        keep_examples: bool = False) -> Report:
    """validate_file with the settings of a daemon config and the base model in `base_dir`: what the trainer and
    `validate` both check."""
    t = cfg.training
    return validate_file(path, tokenizer, max_length=t.max_length, max_line_bytes=cfg.intake.max_line_bytes,
                         train_on_inputs=t.train_on_inputs, too_long=t.too_long, min_examples=t.min_examples,
                         keep_examples=keep_examples,
                         model_vocab_size=model_fit.embedding_rows(base_dir) if base_dir else None)


def validate_command(path: Path, cfg, as_json: bool, show: int | None = None) -> int:
    """`training-daemon validate FILE`: check a file exactly as the trainer would; 0 when it is usable.
    `show`: also print what that line renders to, the trained tokens marked (show.py)."""
    from daemon.base_model import resolve_base_model
    from daemon.paths import UserError

    base_dir = resolve_base_model(cfg.base_model)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of the base model {base_dir}: {e}") from e
    report = validate_for_config(path, tokenizer, cfg, base_dir=base_dir)
    shown = None
    if show is not None:
        from daemon.trainer.show import render_shown, show_line

        shown = show_line(path, tokenizer, cfg, show)
    if as_json:
        print(json.dumps({**report.to_dict(), **({"show": shown} if shown else {})}, indent=2, ensure_ascii=False))
    else:
        print(report.render() + (f"\n\n{render_shown(shown)}" if shown else ""))
    return 0 if report.ok else 1
