"""Packing: deterministic plans, the packed layout, and packed == padded for loss and LoRA gradients."""

from __future__ import annotations

import random
from types import SimpleNamespace as NS

import pytest
import torch

from daemon.trainer import loss
from daemon.trainer import packing
from daemon.trainer.model import load_for_training


def make_examples(n=6, seed=0, vocab=1000, lo=3, hi=40):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
        prompt = len(ids) // 3
        out.append(NS(input_ids=ids, labels=[-100] * prompt + ids[prompt:]))
    return out


def cfg(**training):
    t = dict(precision="auto", gradient_checkpointing="auto", max_length=64, micro_batch_size=4, seed=7,
             attention="auto", micro_batch_tokens=None, liger_kernels=True)
    t.update(training)
    return NS(training=NS(**t), lora=NS(r=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype="base"),
              trust_remote_code=False)


def test_plan_is_deterministic_and_covers_every_example_once():
    lengths = [random.Random(i).randint(1, 300) for i in range(200)]
    kw = dict(token_budget=512, max_examples=4, seed=3)
    for packed in (True, False):
        a = packing.plan_micro_batches(lengths, packing=packed, epoch=0, **kw)
        assert a == packing.plan_micro_batches(lengths, packing=packed, epoch=0, **kw)
        assert sorted(i for mb in a for i in mb) == list(range(200))
        assert a != packing.plan_micro_batches(lengths, packing=packed, epoch=1, **kw)
        assert a != packing.plan_micro_batches(lengths, packing=packed, epoch=0, **{**kw, "seed": 4})


def test_packed_plan_respects_the_token_budget_and_isolates_long_examples():
    lengths = [100, 700, 50, 300, 600, 20, 1000, 5]
    plan = packing.plan_micro_batches(lengths, token_budget=600, max_examples=2, packing=True, seed=0, epoch=0)
    for mb in plan:
        assert len(mb) == 1 or sum(lengths[i] for i in mb) <= 600
    for big in (1, 6):
        assert [big] in plan  # longer than the budget: a micro-batch of its own
    padded = packing.plan_micro_batches(lengths, token_budget=600, max_examples=3, packing=False, seed=0, epoch=0)
    assert [len(mb) for mb in padded] == [3, 3, 2]


def test_collate_layouts():
    exs = [NS(input_ids=[5, 6, 7], labels=[-100, 6, 7]), NS(input_ids=[8, 9], labels=[8, 9])]
    p = packing.collate(exs, packing=True, pad_id=0)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert p["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # nothing learns to predict the next document
    assert p["cu_seq_lens"].tolist() == [0, 3, 5] and p["max_seq_len"] == 3
    assert "attention_mask" not in p
    assert (p["n_tokens"], p["n_trainable"]) == (5, 3)

    d = packing.collate(exs, packing=False, pad_id=0)
    assert d["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert d["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert d["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert (d["n_tokens"], d["n_trainable"]) == (5, 3)

    p8 = packing.collate(exs, packing=True, pad_id=0, pad_to_multiple_of=4)
    assert p8["input_ids"].shape == (1, 8) and p8["labels"][0, 5:].tolist() == [-100] * 3
    assert p8["cu_seq_lens"].tolist() == [0, 3, 5, 8] and p8["n_tokens"] == 5
    assert packing.collate(exs, packing=False, pad_id=0, pad_to_multiple_of=4)["input_ids"].shape == (2, 4)


def trained_pairs(batch):
    """The (previous token, target) pairs that carry loss after the shift: the loss mask, layout-free."""
    pairs = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        pairs += [(ids[t], labels[t + 1]) for t in range(len(ids) - 1) if labels[t + 1] != -100]
    return sorted(pairs)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    value = loss.token_loss_sum(model, batch)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["sdpa", "eager", "daemon_varlen"])
def test_packed_equals_padded_loss_and_lora_gradients(tiny_model_dir, attn):
    model, _, plan = load_for_training(tiny_model_dir, cfg(attention=attn), "cpu")
    assert plan["attn_implementation"] == attn and plan["precision"] == "fp32"
    with torch.no_grad():  # LoRA B starts at zero; make every LoRA gradient non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    exs = make_examples(vocab=model.config.vocab_size)
    packed = packing.collate(exs, packing=True, pad_id=0)
    padded = packing.collate(exs, packing=False, pad_id=0)
    assert trained_pairs(packed) == trained_pairs(padded)
    assert packed["n_trainable"] == padded["n_trainable"] == len(trained_pairs(padded))

    lp, gp = loss_and_grads(model, packed)
    ld, gd = loss_and_grads(model, padded)
    assert torch.allclose(lp / packed["n_trainable"], ld / padded["n_trainable"], rtol=1e-5, atol=0)
    for name in gd:
        rel = (gp[name] - gd[name]).norm() / gd[name].norm()
        assert gd[name].norm() > 0 and rel <= 1e-5, (name, float(rel))

    # The GPU path rounds packed rows up with a padding document; it must change nothing either.
    lpad, gpad = loss_and_grads(model, loss.pad_packed(packed, 16))
    assert torch.allclose(lpad, lp, rtol=1e-5, atol=0)
    assert all((gpad[n] - gp[n]).norm() <= 1e-5 * gp[n].norm() for n in gp)
