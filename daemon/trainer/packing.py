"""Examples -> micro-batches: which examples go together (a plan), and how they become tensors (collate).

Packing puts several examples in one row with no padding at all: `position_ids` restart at 0 for each
example, which tells the attention to keep documents apart (transformers builds a per-document causal mask
from them when there is no attention_mask; the varlen attention in daemon/trainer/model.py reads `cu_seq_lens_*`),
and the first label of each example is masked so that no token is trained to predict the next document.
The plan depends only on (lengths, seed, epoch), so a resumed run replays exactly the same batches.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

IGNORE = -100


def plan_micro_batches(lengths: Sequence[int], *, token_budget: int, max_examples: int, packing: bool,
                       seed: int, epoch: int) -> list[list[int]]:
    """Shuffled example indices grouped into micro-batches (a list of index lists), deterministic in (seed, epoch).

    packing=True: consecutive examples of the shuffled order fill a micro-batch up to `token_budget` real
    tokens (one longer than the budget gets a micro-batch of its own); packing=False: `max_examples` a batch.
    """
    order = list(range(len(lengths)))
    random.Random(f"plan:{seed}:{epoch}").shuffle(order)  # str seeds hash with sha512: stable across runs
    if not packing:
        size = max(1, max_examples)
        return [order[i:i + size] for i in range(0, len(order), size)]
    plan: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if current and used + n > token_budget:
            plan.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        plan.append(current)
    return plan


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return n
    return (n + multiple - 1) // multiple * multiple


def trainable_tokens(example) -> int:
    """Labels of an example that count in the loss, packed or padded."""
    # A label at an example's first position is never predicted by anything of that example: it does not count.
    return sum(1 for x in example.labels[1:] if x != IGNORE)


def collate(examples: Sequence, *, packing: bool, pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Tensors for one micro-batch of examples that have `.input_ids` and `.labels` (HF convention: unshifted).

    Returns input_ids, labels, position_ids (and attention_mask when padded) as int64 CPU tensors, plus
    `n_tokens` (real tokens) and `n_trainable` (labels that count after the shift: the same in both layouts).
    Packed batches also carry `cu_seq_lens` (int32 document boundaries) and `max_seq_len` for varlen attention.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lens = [len(ex.input_ids) for ex in examples]
    n_tokens = sum(lens)
    n_trainable = sum(trainable_tokens(ex) for ex in examples)
    if packing:
        return _collate_packed(examples, lens, n_tokens, n_trainable, pad_id, pad_to_multiple_of)
    return _collate_padded(examples, lens, n_tokens, n_trainable, pad_id, pad_to_multiple_of)


def _collate_packed(examples, lens, n_tokens, n_trainable, pad_id, multiple) -> dict:
    total = _round_up(n_tokens, multiple)
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex, n in zip(examples, lens):
        ids.extend(ex.input_ids)
        labels.append(IGNORE)  # the previous document's last token must not learn to predict this one
        labels.extend(ex.labels[1:])
        positions.extend(range(n))
    seq_lens = list(lens)
    if total > n_tokens:
        # The tail padding is one more (fully masked) document, so it never attends to or from real tokens.
        extra = total - n_tokens
        ids.extend([pad_id] * extra)
        labels.extend([IGNORE] * extra)
        positions.extend(range(extra))
        seq_lens.append(extra)
    cu = [0]
    for n in seq_lens:
        cu.append(cu[-1] + n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
        "max_seq_len": max(seq_lens),
        "n_tokens": n_tokens,
        "n_trainable": n_trainable,
    }


def _collate_padded(examples, lens, n_tokens, n_trainable, pad_id, multiple) -> dict:
    width = _round_up(max(lens), multiple)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lens)):
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(b, width).contiguous()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "n_tokens": n_tokens,
        "n_trainable": n_trainable,
    }


def pad_fixed(batch: dict, *, tokens: int, docs: int, max_doc: int) -> dict:
    """A packed batch (collate's, CPU tensors) padded to exactly `tokens` tokens and `docs` documents, every
    document at most `max_doc` long: the one shape the compiled path (daemon/trainer/compiled.py) trains on.

    The pad tokens form documents of their own (at most `max_doc` each: attention never mixes them with real
    tokens) with no labels; the remaining `cu_seq_lens` entries repeat the end, i.e. empty documents, which the
    varlen attention skips. `max_seq_len` becomes `max_doc`, a constant. Loss and gradients are unchanged."""
    length = batch["input_ids"].shape[1]
    extra = tokens - length
    n_docs = batch["cu_seq_lens"].numel() - 1
    pad_docs = [max_doc] * (extra // max_doc) + ([extra % max_doc] if extra % max_doc else [])
    if extra < 0 or n_docs + len(pad_docs) > docs:
        raise ValueError(f"a micro-batch of {length} tokens in {n_docs} documents does not fit the fixed shape "
                         f"({tokens} tokens, {docs} documents of at most {max_doc})")
    out = dict(batch)
    if extra:
        positions = torch.cat([torch.arange(n, dtype=torch.long) for n in pad_docs])
        out["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_zeros(1, extra)], dim=1)
        out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, extra), IGNORE)], dim=1)
        out["position_ids"] = torch.cat([batch["position_ids"], positions.unsqueeze(0)], dim=1)
    ends = (torch.tensor(pad_docs, dtype=torch.int32).cumsum(0) + length) if pad_docs else \
        torch.zeros(0, dtype=torch.int32)
    fill = torch.full((docs - n_docs - len(pad_docs),), tokens, dtype=torch.int32)
    out["cu_seq_lens"] = torch.cat([batch["cu_seq_lens"].to(torch.int32), ends.to(torch.int32), fill])
    out["max_seq_len"] = max_doc
    return out
