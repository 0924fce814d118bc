"""DPO's numbers: our chunked, packed per-answer log-probs and losses equal TRL's reference formula (reimplemented
here from trl/trainer/dpo_trainer.py `_compute_loss`: TRL is not installed; RPO's term as TRL's loss_type "sft",
formerly `rpo_alpha`, at huggingface/trl f2cd57710ae345ea6428ae95363267fcf38a3dc8), packed equals padded, and
preference lines are checked with codes and tokenized with answer-only labels."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F

from daemon.trainer import dpo, packing, preference
from daemon.trainer.data import validate_file
from daemon.trainer.model import load_for_training

from helpers import write_config, cli


def cfg():
    return NS(training=NS(precision="auto", gradient_checkpointing="auto", max_length=128, micro_batch_size=4, seed=1,
                          attention="auto", micro_batch_tokens=None, liger_kernels=True),
              lora=NS(r=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype="base"), trust_remote_code=False)


PROMPTS = ["What is the capital of France?", "Name a red fruit.", "Count to three.", "Say hello."]


def pref_line(i: int, chosen: str | None = None, rejected: str | None = None, **extra) -> str:
    p = PROMPTS[i % len(PROMPTS)] + f" ({i})"
    return json.dumps({"prompt": p, "chosen": chosen or f"The answer is {i}. Cheers, Bob", "rejected":
                       rejected or f"It is {i}.", **extra})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = load_for_training(tiny_model_dir, cfg(), "cpu")
    with torch.no_grad():  # a LoRA that changes the outputs, so its gradients are worth comparing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model, tok


def pairs_of(tok, lines: list[str]):
    examples = [preference.check_preference(json.loads(s), k + 1) for k, s in enumerate(lines)]
    return preference.tokenize_pairs(tok, examples, max_length=128)


# ---------------------------------------------------------------- TRL's reference formula (reimplemented)

def selective_log_softmax(logits, index):
    return torch.gather(logits.log_softmax(-1), dim=-1, index=index.unsqueeze(-1)).squeeze(-1)


def trl_dpo_loss(model, pairs, ref_chosen, ref_rejected, beta, loss_type, rpo_alpha=0.0):
    """TRL's `_compute_loss`: a padded batch [chosen..., rejected...], full logits, completion_mask on the answers,
    per_token_logps summed; sigmoid: -logsigmoid(beta * delta); ipo: ((delta_c/n_c - delta_r/n_r) - 1/(2 beta))^2.
    rpo_alpha (TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, alpha]): + alpha x F.cross_entropy over
    every chosen completion token of the batch (one token mean, not a mean of per-answer means)."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(s.input_ids) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, s in enumerate(seqs):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        attention_mask[row, :n] = 1
        completion_mask[row, :n] = torch.tensor([int(x != -100) for x in s.labels])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    shift_logits, shift_labels, shift_mask = logits[..., :-1, :], input_ids[..., 1:], completion_mask[..., 1:]
    per_token_logps = selective_log_softmax(shift_logits, shift_labels)
    per_token_logps[shift_mask == 0] = 0.0
    chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)
    chosen_logratios, rejected_logratios = chosen_logps - ref_chosen, rejected_logps - ref_rejected
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    else:
        chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
        chosen_avg = chosen_logratios / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg = rejected_logratios / rejected_mask.sum(dim=1).clamp(min=1.0)
        per_sequence_loss = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    loss = per_sequence_loss.mean()
    if rpo_alpha:
        chosen_logits, _ = shift_logits.chunk(2, dim=0)
        chosen_labels, _ = shift_labels.chunk(2, dim=0)
        chosen_mask, _ = shift_mask.chunk(2, dim=0)
        nll_loss = F.cross_entropy(chosen_logits[chosen_mask.bool()], chosen_labels[chosen_mask.bool()])
        loss = loss + rpo_alpha * nll_loss
    chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    return loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards


def lora_grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("loss_type, sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 1.0), ("ipo", 0.7)])
def test_loss_and_gradients_equal_trls_formula_on_the_tiny_model(tiny, loss_type, sft_weight, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(dpo, "_chunk_size", lambda vocab: 16)  # many chunks, a ragged last one
    pairs = pairs_of(tok, [pref_line(i) for i in range(4)])
    assert all(isinstance(p, preference.PreferencePair) for p in pairs)
    g = torch.Generator().manual_seed(3)
    ref_c, ref_r = -30 + torch.randn(4, generator=g), -25 + torch.randn(4, generator=g)
    beta = 0.3
    expected, exp_c, exp_r, exp_rc, exp_rr = trl_dpo_loss(model, pairs, ref_c, ref_r, beta, loss_type, sft_weight)
    expected.backward()
    g_expected = lora_grads(model)

    batch = dpo.collate_pairs(pairs, packing_on=True, pad_id=tok.pad_token_id)
    chosen, rejected = dpo.split(dpo.sequence_logps(model, batch))
    n_c, n_r = dpo.split(batch["answer_tokens"])
    losses, rc, rr = dpo.dpo_losses(chosen, rejected, ref_c, ref_r, beta=beta, loss=loss_type,
                                    chosen_tokens=n_c, rejected_tokens=n_r)
    objective = dpo.step_objective(losses, chosen, n_pairs=4, n_tokens=float(n_c.sum()), sft_weight=sft_weight)
    objective.backward()
    g_ours = lora_grads(model)

    assert torch.allclose(chosen, exp_c, atol=1e-4) and torch.allclose(rejected, exp_r, atol=1e-4)
    assert torch.allclose(objective, expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(rc, exp_rc, atol=1e-5) and torch.allclose(rr, exp_rr, atol=1e-5)
    for name, grad in g_expected.items():
        assert torch.allclose(g_ours[name], grad, rtol=1e-3, atol=1e-6), name


def test_weight_0_is_plain_dpo_and_the_sft_term_is_the_steps_token_mean_whatever_the_split(tiny):
    model, tok = tiny
    pairs = pairs_of(tok, [pref_line(i, chosen=f"Answer {i}." + " Cheers, Bob" * (i + 1)) for i in range(4)])
    ref_c, ref_r = torch.full((4,), -30.0), torch.full((4,), -25.0)

    def step(groups, weight):
        """Sum of step_objective over micro-batches of the same step, as the recipe accumulates it."""
        n_tokens = sum(packing.trainable_tokens(p.chosen) for p in pairs)
        total, stats = 0.0, torch.zeros(len(dpo.STAT_NAMES), dtype=torch.float64)
        for group in groups:
            batch = dpo.collate_pairs([pairs[i] for i in group], packing_on=True, pad_id=tok.pad_token_id)
            c, r = dpo.split(dpo.sequence_logps(model, batch))
            losses, rc, rr = dpo.dpo_losses(c, r, ref_c[group], ref_r[group], beta=0.1)
            objective = dpo.step_objective(losses, c, n_pairs=4, n_tokens=n_tokens, sft_weight=weight)
            objective.backward()
            total = total + objective.detach()
            stats += dpo.pair_stats(losses, rc, rr, c, r, dpo.split(batch["answer_tokens"])[0])
        return total, lora_grads(model), dpo.summarise(stats.tolist())

    plain, g_plain, stats = step([[0, 1, 2, 3]], 0.0)
    batch = dpo.collate_pairs(pairs, packing_on=True, pad_id=tok.pad_token_id)
    c, r = dpo.split(dpo.sequence_logps(model, batch))
    losses, _, _ = dpo.dpo_losses(c, r, ref_c, ref_r, beta=0.1)
    (losses.sum() / 4).backward()  # what the recipe computed before the weight existed
    assert torch.equal(plain, (losses.sum() / 4).detach())
    assert all(torch.equal(g, g_plain[n]) for n, g in lora_grads(model).items())
    n_chosen = dpo.split(batch["answer_tokens"])[0].sum()
    assert stats["chosen_nll"] == pytest.approx(float(-c.detach().sum() / n_chosen), 1e-5)
    assert stats["loss"] == pytest.approx(float(losses.detach().mean()), 1e-5)

    whole, g_whole, _ = step([[0, 1, 2, 3]], 2.0)
    parts, g_parts, _ = step([[0], [1, 3], [2]], 2.0)  # answers of different lengths: a token mean, not per answer
    assert float(whole) == pytest.approx(float(plain) + 2.0 * stats["chosen_nll"], rel=1e-5)
    assert torch.allclose(whole, parts, rtol=1e-5)
    for name, grad in g_whole.items():
        assert torch.allclose(g_parts[name], grad, rtol=1e-4, atol=1e-7), name
        assert not torch.allclose(g_plain[name], grad), name


def test_packed_and_padded_batches_give_the_same_log_probs(tiny):
    model, tok = tiny
    pairs = pairs_of(tok, [pref_line(i) for i in range(5)])
    with torch.no_grad():
        packed = dpo.sequence_logps(model, dpo.collate_pairs(pairs, packing_on=True, pad_id=tok.pad_token_id))
        padded = dpo.sequence_logps(model, dpo.collate_pairs(pairs, packing_on=False, pad_id=tok.pad_token_id))
        one_by_one = torch.cat([dpo.sequence_logps(model, dpo.collate_pairs([p], packing_on=True,
                                                                              pad_id=tok.pad_token_id))
                                for p in pairs])
    assert packed.shape == (10,)
    assert torch.allclose(packed, padded, atol=1e-4)
    assert torch.allclose(packed, one_by_one, atol=1e-4)
    assert (packed < 0).all()


def test_at_the_reference_the_loss_is_log2_and_accuracy_is_chance():
    c, r = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    losses, rc, rr = dpo.dpo_losses(c, r, c.clone(), r.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((2,), 0.6931472))
    stats = dpo.summarise(dpo.pair_stats(losses, rc, rr, c, r).tolist())
    assert stats["reward_accuracy"] == 0.5 and stats["pairs"] == 2 and stats["reward_margin"] == 0
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo.dpo_losses(c, r, c, r, beta=0.1, loss="kto")


# ---------------------------------------------------------------- the format

@pytest.mark.parametrize("record, code", [
    ({"chosen": "a", "rejected": "b"}, "missing_prompt"),
    ({"prompt": "q", "rejected": "b"}, "missing_chosen"),
    ({"prompt": "q", "chosen": "a"}, "missing_rejected"),
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "identical_pair"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_content"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "bad_field_type"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "bad_role"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "bad_role"),
])
def test_bad_preference_lines_have_codes(record, code):
    result = preference.check_preference(record, 7)
    assert result.code == code and result.message.startswith("line 7")


def test_chat_shaped_lines_are_accepted_and_only_the_answers_are_labelled(tiny):
    _, tok = tiny
    conversational = json.dumps({
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Name a fruit."}],
        "chosen": [{"role": "assistant", "content": "An apple."}], "rejected": {"role": "assistant",
                                                                               "content": "Potato."}})
    (pair,) = pairs_of(tok, [conversational])
    answer = tok.decode([x for x in pair.chosen.labels if x != -100])
    assert answer == "An apple.<|im_end|>"  # not the earlier assistant turn: it is context
    assert tok.decode([x for x in pair.rejected.labels if x != -100]) == "Potato.<|im_end|>"
    prompt_len = pair.chosen.labels.index(next(x for x in pair.chosen.labels if x != -100))
    assert pair.chosen.input_ids[:prompt_len] == pair.rejected.input_ids[:prompt_len]


def test_validate_reports_a_preference_file_with_codes(tiny, tmp_path):
    _, tok = tiny
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([pref_line(0), pref_line(1), '{"prompt": "q", "chosen": "x", "rejected": "x"}',
                               pref_line(2, chosen="word " * 200)]) + "\n")
    report = validate_file(path, tok, max_length=128, keep_examples=True)
    assert report.ok and report.format == "preference" and report.examples == 2
    assert report.counts_by_code == {"identical_pair": 1, "too_long": 1}
    assert "prompt + chosen answer" in report.errors[1]["message"]
    assert all(isinstance(p, preference.PreferencePair) for p in report.examples_list)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(pref_line(0) + "\n" + json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    report = validate_file(mixed, tok, max_length=128)
    assert report.fatal["code"] == "mixed_formats"


def test_validate_command_on_a_preference_file(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    (root / "prefs.jsonl").write_text("\n".join(pref_line(i) for i in range(3)) + "\n")
    r = cli(root, "validate", "prefs.jsonl")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 usable examples (preference format)" in r.stdout


def test_heads_the_chunked_path_cannot_take_give_the_same_log_probs(tiny, monkeypatch):
    model, tok = tiny
    pairs = pairs_of(tok, [pref_line(i) for i in range(3)])
    batch = dpo.collate_pairs(pairs, packing_on=True, pad_id=tok.pad_token_id)
    with torch.no_grad():
        chunked = dpo.sequence_logps(model, batch)
        monkeypatch.setattr(dpo, "_plain_head", lambda causal_lm: False)  # soft-capped logits and the like
        full = dpo.sequence_logps(model, batch)
    assert torch.allclose(chunked, full, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_our_chunked_dpo_equals_ligers_chunked_dpo_loss_on_a_gpu():
    """Liger's fused linear DPO loss (liger_kernel.chunked_loss, the `gpu` extra) on a padded [2B, T] batch with a
    reference forward, and ours on the same hidden states with the reference's log-probs precomputed."""
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
    torch.manual_seed(0)
    b, t, h, v, beta = 3, 40, 64, 1000, 0.1
    dev = torch.device("cuda")
    weight = torch.randn(v, h, device=dev) * 0.05
    hidden = torch.randn(2 * b, t, h, device=dev, requires_grad=True)
    ref_hidden = hidden.detach() + 0.1 * torch.randn(2 * b, t, h, device=dev)
    target = torch.randint(0, v, (2 * b, t), device=dev)
    target[:, :10] = -100  # the prompt
    target[1, 30:] = -100  # a shorter answer
    liger = chunked_loss.LigerFusedLinearDPOLoss(beta=beta, use_ref_model=True, compiled=False)
    out = liger(weight, hidden, target, ref_input=ref_hidden, ref_weight=weight)
    expected = out[0] if isinstance(out, tuple) else out  # (loss, metrics) in recent versions
    (g_expected,) = torch.autograd.grad(expected, hidden)

    seg = torch.arange(2 * b, device=dev).repeat_interleave(t)
    flat = target.reshape(-1)
    logps = dpo.linear_sequence_logps(hidden.reshape(-1, h), weight, flat, seg, 2 * b)
    with torch.no_grad():
        ref = dpo.linear_sequence_logps(ref_hidden.reshape(-1, h), weight, flat, seg, 2 * b)
    losses, _, _ = dpo.dpo_losses(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta)
    (g_ours,) = torch.autograd.grad(losses.mean(), hidden)
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_ours, g_expected, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- what the daemon shows and decides

def test_the_status_line_shows_the_reward_accuracy_next_to_the_loss():
    from daemon.supervisor.status_line import status_line

    current = {"job_id": 4, "adapter": "default", "phase": "training", "step": 3, "total_steps": 10, "loss": 0.41,
               "reward_accuracy": 0.75, "tokens_per_s": 900.0, "eta_s": 20}
    assert "loss 0.4100  reward acc 0.75" in status_line("training", current)
    assert "reward acc" not in status_line("training", {**current, "reward_accuracy": None})


def test_the_gate_holds_a_preference_version_whose_chosen_answers_do_not_win():
    from daemon.trainer import judge

    incumbent = {"standing_eval_loss": 1.0, "own_eval_loss": 0.69}
    better = {"standing_eval_loss": 1.0, "own_eval_loss": 0.3}
    decision, reason = judge.decide("not_worse", 0.02, incumbent_version=1, new={**better, "reward_accuracy": 0.5},
                                    incumbent=incumbent, probes=[])
    assert decision == judge.HELD and "held-out reward accuracy 0.50 is not above chance" in reason
    decision, _ = judge.decide("not_worse", 0.02, incumbent_version=1, new={**better, "reward_accuracy": 0.9},
                               incumbent=incumbent, probes=[])
    assert decision == judge.PROMOTED
    worse = {"standing_eval_loss": 1.5, "own_eval_loss": 0.3, "reward_accuracy": 1.0}  # forgot its SFT data
    assert judge.decide("not_worse", 0.02, incumbent_version=1, new=worse, incumbent=incumbent,
                        probes=[])[0] == judge.HELD
    assert judge.decide("always", 0.02, incumbent_version=1, new={**better, "reward_accuracy": 0.0},
                        incumbent=incumbent, probes=[])[0] == judge.PROMOTED


def test_metrics_carry_the_reward_accuracy(root):
    from daemon.durable import write_json
    from daemon.paths import Layout
    from daemon.supervisor.spool import Spool
    from daemon.supervisor.web_metrics import FileCollector

    layout = Layout.at(root)
    write_json(layout.status_json, {"current": {"adapter": "default", "loss": 0.3, "reward_accuracy": 0.75}})
    families = {f.name: f for f in FileCollector(Spool(layout)).collect()}
    (sample,) = families["training_daemon_current_reward_accuracy"].samples
    assert sample.value == 0.75 and sample.labels == {"adapter": "default"}
