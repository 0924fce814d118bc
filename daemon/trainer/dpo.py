"""DPO's arithmetic: per-answer log-probabilities from one pass over a packed batch, and the preference losses.

A micro-batch of preference pairs is packed like any other (daemon/trainer/packing.py): each chosen and each
rejected sequence is one document of the row, in the order c0, r0, c1, r1, ..., so one forward of the decoder
gives both answers' hidden states. The vocabulary projection then runs in chunks of tokens, as in loss.py, and
each token's log-probability is added to its document's sum; the gradient of each token's log-probability with
respect to its hidden state is computed in the same pass, so backward only scales it by the loss's gradient with
respect to that document's sum. Peak memory for the head is one chunk of logits, never [tokens, vocab].

The loss formulas are TRL's (trl/trainer/dpo_trainer.py, `_compute_loss`), checked against it in
tests/test_dpo.py: sigmoid -log sigmoid(beta * delta), and IPO's squared distance of the length-normalised
delta from 1/(2 beta). With `dpo_sft_weight` (RPO, Pang et al. 2024; TRL's `rpo_alpha`, now its "sft" loss
term) the step adds weight x the chosen answers' mean token NLL (a mean over every chosen answer token of the
step, as TRL's F.cross_entropy over the batch's chosen tokens), from the same log-prob sums. Liger's chunked DPO
loss was not taken: it wants a padded [2B, T] batch and a second (reference) forward every step, where this
recipe keeps the padding-free rows and precomputes the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daemon.trainer import packing
from daemon.trainer.loss import IGNORE, PAD_MULTIPLE, _body_inputs, _causal_lm, _chunk_size, _plain_head, pad_packed

LOSSES = ("sigmoid", "ipo")


def sequences(pairs) -> list:
    """The pairs' sequences in batch order: chosen, rejected, chosen, rejected, ..."""
    return [s for p in pairs for s in (p.chosen, p.rejected)]


def collate_pairs(pairs, *, packing_on: bool, pad_id: int) -> dict:
    """packing.collate over both sequences of every pair, plus `n_seq` and each sequence's answer tokens."""
    seqs = sequences(pairs)
    batch = packing.collate(seqs, packing=packing_on, pad_id=pad_id)
    batch["n_seq"] = len(seqs)
    batch["answer_tokens"] = torch.tensor([packing.trainable_tokens(s) for s in seqs], dtype=torch.float32)
    return batch


def segment_ids(batch: dict) -> torch.Tensor:
    """The sequence each position of the flattened batch belongs to; padding gets n_seq (dropped later)."""
    ids = batch["input_ids"]
    if "cu_seq_lens" in batch:  # packed [1, T]: documents by their boundaries (a tail pad document is the last)
        cu = batch["cu_seq_lens"].to(ids.device, torch.long)
        seg = torch.bucketize(torch.arange(ids.shape[1], device=ids.device), cu[1:], right=True)
        return seg.clamp(max=batch["n_seq"])
    rows, width = ids.shape
    return torch.arange(rows, device=ids.device).repeat_interleave(width)


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Sum of log p(label) over each sequence's labelled tokens, fp32 [n_seq], differentiable."""
    causal_lm = _causal_lm(model)
    if "cu_seq_lens" in batch and batch["input_ids"].is_cuda:
        batch = {**pad_packed(batch, PAD_MULTIPLE), "n_seq": batch["n_seq"]}
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1).reshape(-1)
    seg = segment_ids(batch)
    n_seq = batch["n_seq"]
    if not _plain_head(causal_lm):
        logits = causal_lm(**_body_inputs(causal_lm, batch)).logits.float().reshape(-1, causal_lm.config.vocab_size)
        valid = targets != IGNORE
        tok = logits.log_softmax(-1).gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
        sums = torch.zeros(n_seq + 1, dtype=tok.dtype, device=tok.device)
        return sums.index_add(0, seg, torch.where(valid, tok, 0.0))[:n_seq]
    hidden = causal_lm.get_decoder()(**_body_inputs(causal_lm, batch)).last_hidden_state
    head = causal_lm.get_output_embeddings()
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return linear_sequence_logps(hidden, head.weight, targets, seg, n_seq, head.bias)


def linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, seg: torch.Tensor,
                          n_seq: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[n_seq] sums of log_softmax(hidden @ weight.T + bias)[target] by segment, chunked over tokens."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _ChunkedSequenceLogps.apply(hidden, weight, bias, targets, seg, n_seq)
    sums, _ = _chunked(hidden, weight, bias, targets, seg, n_seq, want_grad=False)
    return sums


def _chunked(hidden, weight, bias, targets, seg, n_seq: int, *, want_grad: bool):
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    sums = torch.zeros(n_seq + 1, dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad else None
    step = _chunk_size(vocab)
    for start in range(0, n, step):
        h, t, s = hidden[start:start + step], targets[start:start + step], seg[start:start + step]
        logits = F.linear(h, weight, bias).to(acc)
        lse = torch.logsumexp(logits, dim=-1)
        valid = t != IGNORE
        safe_t = t.clamp(min=0)
        target_logit = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)
        sums.index_add_(0, s, torch.where(valid, target_logit - lse, 0.0))
        if want_grad:
            # d(log p_t)/d(logits) = onehot - softmax, zero on unlabelled rows; the logits buffer becomes it.
            grad = logits.sub_(lse.unsqueeze(1)).exp_().neg_()
            grad.scatter_add_(1, safe_t.unsqueeze(1), torch.ones_like(target_logit).unsqueeze(1))
            grad.mul_(valid.unsqueeze(1))
            grad_hidden[start:start + step] = grad.to(weight.dtype) @ weight
    return sums[:n_seq], grad_hidden


class _ChunkedSequenceLogps(torch.autograd.Function):
    """Forward computes each token's d(log p)/d(hidden) with the sums; backward scales it by its sequence's
    gradient (the lm_head is frozen under LoRA: the hidden states need the only gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, seg, n_seq):
        sums, grad_hidden = _chunked(hidden, weight, bias, targets, seg, n_seq, want_grad=True)
        ctx.save_for_backward(grad_hidden, seg)
        ctx.n_seq = n_seq
        return sums

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, seg = ctx.saved_tensors
        per_seq = torch.cat([grad_out, grad_out.new_zeros(1)])  # padding's segment n_seq has no gradient
        scale = per_seq[seg].to(grad_hidden.dtype).unsqueeze(1)
        return grad_hidden * scale, None, None, None, None, None


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               *, beta: float, loss: str = "sigmoid", chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (log pi - log pi_ref) of each answer."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss == "ipo":
        # IPO on log-ratios averaged over each answer's tokens (TRL's choice, confirmed by the IPO authors).
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def step_objective(losses: torch.Tensor, chosen: torch.Tensor, *, n_pairs: int, n_tokens: float,
                   sft_weight: float) -> torch.Tensor:
    """This micro-batch's share of the step's loss: its pairs' DPO losses over the step's pairs, plus (RPO)
    sft_weight x its chosen answers' NLL over the step's chosen answer tokens. Summed over the step's micro-batches
    and ranks: mean DPO loss + sft_weight x the chosen answers' mean token NLL, whatever the split (one micro-batch
    holding the whole step: TRL's `loss + rpo_alpha * nll_loss`). Weight 0 adds nothing, not even a zero."""
    objective = losses.sum() / max(n_pairs, 1)
    if sft_weight:
        objective = objective + sft_weight * (-chosen.sum()) / max(float(n_tokens), 1.0)
    return objective


def pair_stats(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
               chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Sums over pairs, in one tensor (one host copy, one all_reduce): loss, pairs, correct, margin, chosen and
    rejected rewards, chosen and rejected log-probs, chosen answer tokens. A tie (the policy still is the
    reference) counts half correct: before any step the reward accuracy is 0.5, chance, not 0."""
    correct = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    tokens = chosen_tokens.to(losses.device) if chosen_tokens is not None else torch.zeros_like(losses)
    parts = [losses.detach(), torch.ones_like(losses), correct, chosen_rewards - rejected_rewards, chosen_rewards,
             rejected_rewards, chosen.detach(), rejected.detach(), tokens]
    return torch.stack([p.double().sum() for p in parts])


STAT_NAMES = ("loss", "pairs", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
              "chosen_logps", "rejected_logps", "chosen_tokens")


def summarise(stats) -> dict:
    """Means per pair of pair_stats' sums (summed over micro-batches and ranks), rounded for metadata; `loss` is
    the DPO loss alone, `chosen_nll` the chosen answers' mean token NLL (RPO's term before its weight)."""
    values = dict(zip(STAT_NAMES, (float(x) for x in stats)))
    n, tokens = values.pop("pairs"), values.pop("chosen_tokens")
    if not n:
        return {}
    out = {name: round(v / n, 6) for name, v in values.items()} | {"pairs": int(n)}
    if tokens:
        out["chosen_nll"] = round(-values["chosen_logps"] / tokens, 6)
    return out


def split(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[c0, r0, c1, r1, ...] -> (chosen, rejected)."""
    return logps[0::2], logps[1::2]
