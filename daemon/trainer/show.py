"""`validate --show N`: what one line of a file becomes for training, the trained tokens marked.

The text shown is the decoded token ids, not the template's output, so a truncation, a missing end-of-turn
marker or a tool call the template wrote differently than expected shows exactly as the model sees it.
"""

from __future__ import annotations

from daemon.trainer.data import IGNORE, TokenizedExample, tokenize_examples
from daemon.trainer.formats import RecordReader, Rejection

OPEN, CLOSE = "⟦", "⟧"  # rare in training data, and visible both on a terminal and in JSON


def show_line(path, tokenizer, cfg, number: int) -> dict:
    """Line `number` of the file as the trainer would use it: its segments, or why it is skipped."""
    from daemon.paths import UserError

    t = cfg.training
    found = None
    with open(path, "rb") as f:
        reader = RecordReader(f, max_line_bytes=cfg.intake.max_line_bytes, train_on_inputs=t.train_on_inputs)
        for item in reader:
            if item.line == number or (isinstance(item, Rejection) and item.fatal and item.line < number):
                found = item
                break
        lines = reader.lines
    if found is None:
        if number > lines:
            raise UserError(f"--show {number}: the file has {lines} lines")
        raise UserError(f"--show {number}: line {number} is blank")
    if isinstance(found, Rejection) and found.line != number:  # a fatal problem earlier ends the reading
        return {"line": number, "rejected": {"code": found.code, "message": f"not read: {found.message}"}}
    if not isinstance(found, Rejection):
        fmt = found.format
        found = tokenize_examples(tokenizer, [found], t.max_length, t.train_on_inputs, t.too_long)[0]
    if isinstance(found, Rejection):
        return {"line": number, "rejected": {"code": found.code, "message": found.message}}
    return {"line": number, "format": fmt, **_segments(tokenizer, found)}


def _segments(tokenizer, ex: TokenizedExample) -> dict:
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ex.input_ids, ex.labels):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    segments = [{"text": tokenizer.decode(ids, skip_special_tokens=False), "trained": trained}
                for trained, ids in runs]
    return {"tokens": len(ex.input_ids), "trained_tokens": ex.trainable, "truncated": ex.truncated,
            "text": "".join(f"{OPEN}{s['text']}{CLOSE}" if s["trained"] else s["text"] for s in segments),
            "segments": segments}


def render_shown(shown: dict) -> str:
    n = shown["line"]
    if "rejected" in shown:
        r = shown["rejected"]
        return f"line {n}: skipped ({r['code']}): {r['message']}"
    cut = ", truncated to max_length" if shown["truncated"] else ""
    head = (f"line {n} ({shown['format']} format): {shown['tokens']} tokens, {shown['trained_tokens']} trained{cut}; "
            f"the trained text is marked {OPEN}like this{CLOSE}")
    return f"{head}\n{shown['text']}"
