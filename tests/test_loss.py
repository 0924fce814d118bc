"""The loss: a sum over trainable tokens, equal to the plain HF loss, with chunking invisible in the result."""

from __future__ import annotations

import random
from types import SimpleNamespace as NS

import torch
import torch.nn.functional as F

from daemon.trainer import loss
from daemon.trainer import packing
from daemon.trainer.model import load_for_training


def cfg():
    return NS(training=NS(precision="auto", gradient_checkpointing="auto", max_length=64, micro_batch_size=4, seed=1,
                          attention="auto", micro_batch_tokens=None, liger_kernels=True),
              lora=NS(r=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype="base"), trust_remote_code=False)


def test_linear_cross_entropy_matches_full_logits_in_value_and_gradient(monkeypatch):
    monkeypatch.setattr(loss, "_chunk_size", lambda vocab: 7)  # 7 tokens a chunk: many chunks, a ragged last one
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (40,), generator=g)
    targets[::3] = -100
    ours = loss.linear_cross_entropy_sum(hidden, weight, targets)
    (g_ours,) = torch.autograd.grad(ours * 0.5, hidden)
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref * 0.5, hidden)
    assert ours.dtype == torch.float32 or ours.dtype == torch.float64
    assert torch.allclose(ours.double(), ref, rtol=1e-6)
    assert torch.allclose(g_ours, g_ref, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(loss.linear_cross_entropy_sum(hidden, weight, targets).double(), ref, rtol=1e-6)


def test_chunked_loss_equals_hf_loss_on_the_tiny_model(tiny_model_dir, monkeypatch):
    model, _, _ = load_for_training(tiny_model_dir, cfg(), "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    rng = random.Random(2)
    vocab = model.config.vocab_size
    exs = []
    for _ in range(5):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(4, 30))]
        exs.append(NS(input_ids=ids, labels=[-100] * 3 + ids[3:]))
    batch = packing.collate(exs, packing=False, pad_id=0)
    monkeypatch.setattr(loss, "_chunk_size", lambda vocab: 16)  # several chunks, a ragged last one

    ours = loss.token_loss_sum(model, batch)
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    # The reference: transformers computes the (mean) loss from full logits itself.
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    (hf * batch["n_trainable"]).backward()
    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert torch.allclose(ours, hf * batch["n_trainable"], rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (g_ours[n] - p.grad).norm() <= 1e-5 * p.grad.norm(), n

    # The plain path (models whose logits are more than lm_head(hidden) take it) gives the same sum.
    assert torch.allclose(loss.hf_loss_sum(loss._causal_lm(model), batch), ours, rtol=1e-5)


def test_eval_needs_no_graph(tiny_model_dir):
    model, _, _ = load_for_training(tiny_model_dir, cfg(), "cpu")
    exs = [NS(input_ids=[5, 6, 7, 8], labels=[5, 6, 7, 8])]
    with torch.no_grad():
        value = loss.token_loss_sum(model, packing.collate(exs, packing=True, pad_id=0))
    assert not value.requires_grad and torch.isfinite(value)


def test_the_fused_chunk_of_compiled_runs_gives_the_eager_loss_and_gradient(monkeypatch):
    """training.compile's loss (Inductor, here on CPU) is the eager chunked loss: same value, same gradient, in
    fp32 and in bf16 (the gradient rounded to bf16 once, as the eager path rounds it), ragged last chunk included."""
    monkeypatch.setattr(loss, "_chunk_size", lambda vocab: 24)  # 60 tokens: chunks of 24, 24 and a ragged 12
    compiled_calls = []
    fused_chunk = loss._fused
    monkeypatch.setattr(loss, "_fused", lambda: compiled_calls.append(1) or fused_chunk())
    g = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        weight = torch.randn(96, 32, generator=g).to(dtype)
        bias = torch.randn(96, generator=g).to(dtype)
        base = torch.randn(60, 32, generator=g).to(dtype)
        targets = torch.randint(0, 96, (60,), generator=g)
        targets[::4] = -100
        results = []
        for fused in (False, True):
            compiled_calls.clear()
            hidden = base.clone().requires_grad_(True)
            value = loss.linear_cross_entropy_sum(hidden, weight, targets, bias, fused=fused)
            (grad,) = torch.autograd.grad(value * 0.5, hidden)
            results.append((value.detach(), grad))
        assert len(compiled_calls) == 3  # the fused run went through the compiled chunk, once a chunk
        (v_eager, g_eager), (v_fused, g_fused) = results
        assert v_fused.dtype == torch.float32
        torch.testing.assert_close(v_fused, v_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_fused.float(), g_eager.float(), rtol=tol, atol=tol)
        assert (g_fused[::4] == 0).all() and (g_fused[1::4] != 0).any()  # ignored rows get no gradient
