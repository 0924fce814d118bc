"""Model preparation: precision, LoRA placement, seeded (bit-for-bit) LoRA init, continuing an adapter, the
lean LoRA forward, and the memory plan's choices."""

from __future__ import annotations

import random
from types import SimpleNamespace as NS

import torch

from daemon.trainer import loss
from daemon.trainer import memory_plan
from daemon.trainer import packing
from daemon.trainer.model import load_for_training

GIB = 1024**3


def cfg(seed=5, **lora):
    lo = dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    lo.update(lora)
    return NS(training=NS(precision="auto", gradient_checkpointing="auto", max_length=64, micro_batch_size=4,
                          seed=seed), lora=NS(**lo), trust_remote_code=False)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cpu_load_is_fp32_lora_on_every_linear_but_the_head_and_seeded(tiny_model_dir):
    model, tokenizer, plan = load_for_training(tiny_model_dir, cfg(), "cpu")
    assert plan["precision"] == "fp32" and plan["device"] == "cpu" and plan["gradient_checkpointing"] is False
    assert plan["micro_batch_size"] == 4 and plan["trainable_params"] > 0
    assert tokenizer is not None and all(p.dtype == torch.float32 for p in model.parameters())
    trained = {n.split(".lora_")[0] for n in lora_state(model)}
    assert not any("lm_head" in n or "embed" in n for n in trained)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(n.endswith(proj) for n in trained), proj

    again, _, _ = load_for_training(tiny_model_dir, cfg(), "cpu")
    other, _, _ = load_for_training(tiny_model_dir, cfg(seed=6), "cpu")
    a, b, c = lora_state(model), lora_state(again), lora_state(other)
    assert all(torch.equal(a[n], b[n]) for n in a)  # bit for bit: a resumed attempt starts from the same LoRA
    assert any(not torch.equal(a[n], c[n]) for n in a if "lora_A" in n)


def test_continue_from_an_adapter_trains_it(tiny_model_dir, tmp_path):
    model, _, _ = load_for_training(tiny_model_dir, cfg(), "cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    model.save_pretrained(tmp_path / "adapter")
    again, _, _ = load_for_training(tiny_model_dir, cfg(seed=99), "cpu", adapter_dir=tmp_path / "adapter")
    saved, loaded = lora_state(model), lora_state(again)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[n], loaded[n]) for n in saved)


def test_lean_lora_forward_matches_peft(tiny_model_dir, monkeypatch):
    results = {}
    for lean in ("1", "0"):
        monkeypatch.setenv("DAEMON_LEAN_LORA", lean)
        model, _, plan = load_for_training(tiny_model_dir, cfg(), "cpu")
        assert bool(plan["lean_lora_modules"]) == (lean == "1")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        rng, vocab = random.Random(1), model.config.vocab_size  # the same examples for both
        exs = [NS(input_ids=(ids := [rng.randrange(vocab) for _ in range(12)]), labels=ids) for _ in range(3)]
        value = loss.token_loss_sum(model, packing.collate(exs, packing=True, pad_id=0))
        value.backward()
        results[lean] = (value.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (l1, g1), (l0, g0) = results["1"], results["0"]
    assert torch.allclose(l1, l0, rtol=1e-6)
    assert all(torch.allclose(g1[n], g0[n], rtol=1e-5, atol=1e-8) for n in g0)


SHAPE_8B = memory_plan.Shape(n_params=8_030_000_000, n_layers=32, hidden=4096, intermediate=14336, vocab=128256,
                             n_kv_heads=8, head_dim=128)


def test_memory_plan_choices():
    plan = memory_plan.plan_memory
    roomy = plan(SHAPE_8B, free_bytes=78 * GIB, max_length=1024, micro_batch_size=8)
    assert (roomy.micro_batch_size, roomy.gradient_checkpointing, roomy.quantize_4bit) == (8, False, False)
    assert roomy == plan(SHAPE_8B, free_bytes=78 * GIB, max_length=1024, micro_batch_size=8)  # deterministic

    capped = plan(SHAPE_8B, free_bytes=24 * GIB, max_length=2048, micro_batch_size=8)
    assert capped.gradient_checkpointing and not capped.quantize_4bit and 1 <= capped.micro_batch_size < 8
    assert capped.estimated_peak_gib <= capped.budget_gib

    tiny = plan(SHAPE_8B, free_bytes=10 * GIB, max_length=1024, micro_batch_size=8, can_quantize=True)
    assert tiny.quantize_4bit and tiny.gradient_checkpointing
    no_bnb = plan(SHAPE_8B, free_bytes=10 * GIB, max_length=1024, micro_batch_size=8)
    assert not no_bnb.quantize_4bit and no_bnb.estimated_peak_gib is None  # says it does not fit; tries anyway

    cpu = plan(SHAPE_8B, free_bytes=None, max_length=1024, micro_batch_size=8, checkpointing="true")
    assert (cpu.micro_batch_size, cpu.gradient_checkpointing) == (8, True)
    never = plan(SHAPE_8B, free_bytes=24 * GIB, max_length=2048, micro_batch_size=8, checkpointing="false")
    assert not never.gradient_checkpointing
    assert plan(SHAPE_8B, free_bytes=78 * GIB, max_length=1024, micro_batch_size=8,
                max_tokens=4096).micro_batch_size == 4
