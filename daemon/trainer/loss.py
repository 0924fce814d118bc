"""The causal-LM loss as a SUM over trainable tokens, without materialising [tokens, vocab] logits.

The decoder body gives hidden states; the vocabulary projection and cross entropy then run in chunks of
tokens whose gradient with respect to the hidden states is computed in the same pass (the lm_head is frozen
under LoRA, so that is the only gradient needed). Peak memory for the loss is one chunk of logits instead of
all of them: for a 150k vocabulary and 16k tokens that is ~0.3 GB instead of ~10 GB. It measured faster
than Liger's fused linear cross entropy on an H100 (Liger launches many small Triton chunks from Python and
syncs the host once per call: docs/performance.md). Models whose logits are more than `lm_head(hidden)`
(soft-capping, logit scales) and LoRA on the lm_head itself take the plain HF path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (fp32: 256 MB)
# Packed rows vary in length at every step; each new length makes cuBLAS choose its kernels again on the host
# for every matmul. Rounding the row up to a multiple (a padding document that attends only to itself and has
# no labels) keeps the set of shapes small. On GPU only.
PAD_MULTIPLE = 128


def token_loss_sum(model, batch: dict, *, fused: bool = False) -> torch.Tensor:
    """Sum of next-token cross entropy over the batch's trainable positions, as an fp32 scalar. `fused`: each
    chunk's softmax and gradient in one compiled kernel pair (for compiled runs: see `_fused_chunk`)."""
    causal_lm = _causal_lm(model)
    if "cu_seq_lens" in batch and batch["input_ids"].is_cuda:
        batch = pad_packed(batch, PAD_MULTIPLE)
    if not _plain_head(causal_lm):
        return hf_loss_sum(causal_lm, batch)
    hidden = causal_lm.get_decoder()(**_body_inputs(causal_lm, batch)).last_hidden_state
    head = causal_lm.get_output_embeddings()
    labels = batch["labels"]
    # Shift the labels, not the hidden states: hidden.view(-1, H) then needs no copy.
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return linear_cross_entropy_sum(hidden, head.weight, targets, head.bias, fused=fused)


def pad_packed(batch: dict, multiple: int) -> dict:
    """A packed [1, T] batch padded on the device to a multiple of `multiple` tokens (no host sync)."""
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if extra == 0:
        return batch
    out = dict(batch)
    out["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=0)
    out["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE)
    out["position_ids"] = F.pad(batch["position_ids"], (0, extra), value=0)
    out["cu_seq_lens"] = F.pad(batch["cu_seq_lens"], (0, 1), value=length + extra)
    out["max_seq_len"] = max(batch["max_seq_len"], extra)
    return out


def _causal_lm(model):
    """The transformers *ForCausalLM under peft / accelerate wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def _plain_head(causal_lm) -> bool:
    cfg = causal_lm.config
    head = causal_lm.get_output_embeddings()
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return False
    if type(head) is not torch.nn.Linear or head.weight.requires_grad:
        return False
    return hasattr(causal_lm, "get_decoder")


def _body_inputs(causal_lm, batch: dict) -> dict:
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    elif "cu_seq_lens" in batch and getattr(causal_lm.config, "_attn_implementation", None) == "daemon_varlen":
        # Document boundaries computed on the host by collate: the attention needs no host sync to find them.
        cu, n = batch["cu_seq_lens"], batch["max_seq_len"]
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
    return inputs


def hf_loss_sum(causal_lm, batch: dict) -> torch.Tensor:
    """The same sum from the full logits of the model's own forward: for heads the chunked path cannot take."""
    inputs = _body_inputs(causal_lm, batch)
    logits = causal_lm(**inputs).logits.float()
    labels = batch["labels"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, *, fused: bool = False) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T + bias, targets_i) over targets != -100, chunked over tokens."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _ChunkedLinearCE.apply(hidden, weight, bias, targets, fused)
    loss, _ = _chunked_forward(hidden, weight, bias, targets, want_grad=False)
    return loss


def _chunk_size(vocab: int) -> int:
    return max(128, min(8192, CHUNK_ELEMENTS // max(vocab, 1)))


def _chunk_loss_and_grad(logits: torch.Tensor, t: torch.Tensor, acc: torch.dtype):
    """One chunk's loss sum and d(loss)/d(logits) in the logits' dtype: the eager path's arithmetic, written
    for Inductor, which fuses it into a reduction (the log-sum-exp and the target's logit) and one pointwise pass
    (softmax - onehot, masked, cast): two reads of the bf16 logits and one write, where the eager ops make
    eight passes over an fp32 copy. That is ~7% of a compiled Qwen2.5-1.5B micro-batch (docs/performance.md)."""
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1)
    valid = t != IGNORE
    safe_t = t.clamp(min=0)
    loss = torch.where(valid, lse - x.gather(1, safe_t.unsqueeze(1)).squeeze(1), 0.0).sum()
    onehot = torch.arange(x.shape[1], device=x.device).unsqueeze(0) == safe_t.unsqueeze(1)
    grad = (torch.exp(x - lse.unsqueeze(1)) - onehot.to(acc)) * valid.unsqueeze(1).to(acc)
    return loss, grad.to(logits.dtype)


_fused_chunk = None


def _fused():
    global _fused_chunk
    if _fused_chunk is None:
        # Inductor alone (no CUDA graphs: its outputs must outlive the next call); the two chunk shapes of a
        # fixed-shape run (full and last) are two compiles, cached with the layers' under state/torch_compile.
        _fused_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _fused_chunk


def _chunked_forward(hidden, weight, bias, targets, *, want_grad: bool, fused: bool = False):
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are upcast; fp64 (tests) stays fp64
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad else None
    step = _chunk_size(vocab)
    for start in range(0, n, step):
        h = hidden[start:start + step]
        t = targets[start:start + step]
        if want_grad and fused:
            chunk_loss, grad_logits = _fused()(F.linear(h, weight, bias), t, acc)
            loss += chunk_loss
            grad_hidden[start:start + step] = grad_logits.to(weight.dtype) @ weight
            continue
        logits = F.linear(h, weight, bias).to(acc)
        lse = torch.logsumexp(logits, dim=-1)
        valid = t != IGNORE
        safe_t = t.clamp(min=0)
        target_logit = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)
        loss += torch.where(valid, lse - target_logit, 0.0).sum()
        if want_grad:
            # d(CE)/d(logits) = softmax - onehot, zero on ignored rows; reuse the logits buffer for it.
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs.scatter_add_(1, safe_t.unsqueeze(1), torch.full_like(target_logit, -1.0).unsqueeze(1))
            probs.mul_(valid.unsqueeze(1))
            grad_hidden[start:start + step] = probs.to(weight.dtype) @ weight
    return loss, grad_hidden


class _ChunkedLinearCE(torch.autograd.Function):
    """Forward computes the loss and d(loss)/d(hidden) together; backward only scales the saved gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, fused):
        loss, grad_hidden = _chunked_forward(hidden, weight, bias, targets, want_grad=True, fused=fused)
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), None, None, None, None
