"""Model preparation: precision, LoRA placement, seeded (bit-for-bit) LoRA init, continuing an adapter, the
config's LoRA dtype and micro-batch caps, and the memory plan's choices."""

from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from daemon.trainer import memory_plan
from daemon.trainer.model import load_for_training, prepare_model

GIB = 1024**3


def cfg(seed=5, micro_batch_tokens=None, **lora):
    lo = dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype="base")
    lo.update(lora)
    return NS(training=NS(precision="auto", gradient_checkpointing="auto", max_length=64, micro_batch_size=4,
                          seed=seed, attention="auto", micro_batch_tokens=micro_batch_tokens, liger_kernels=True),
              lora=NS(**lo), trust_remote_code=False)


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


def test_lora_dtype_fp32_keeps_fp32_adapters_on_a_bf16_base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    for dtype, expected in (("base", torch.bfloat16), ("fp32", torch.float32)):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        config = cfg(dtype=dtype)
        config.training.precision = "bf16"
        model, _, plan = prepare_model(base, None, config, "cpu")
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {expected}
        assert plan["lora_dtype"] == str(expected).removeprefix("torch.")


def test_micro_batch_caps_the_token_budget_and_a_retry(tiny_model_dir):
    assert load_for_training(tiny_model_dir, cfg(), "cpu")[2]["micro_batch_size"] == 4
    # 4 x 64 tokens is over a 128-token budget: the micro-batch halves until it fits.
    assert load_for_training(tiny_model_dir, cfg(micro_batch_tokens=128), "cpu")[2]["micro_batch_size"] == 2
    # An out-of-memory retry asks for fewer examples than the config's micro_batch_size.
    assert load_for_training(tiny_model_dir, cfg(), "cpu", max_micro_batch=1)[2]["micro_batch_size"] == 1


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
