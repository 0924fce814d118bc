"""The recipe for a preference file: LoRARecipe's loop, checkpoints, stops and ranks, with DPO as the step's loss.

The reference policy is the starting point of the job: in continue mode the parent version's adapter, else the
base with the fresh (zero) LoRA delta. Its log-probabilities of every training and held-out answer are computed
once, before the first step (one no-grad pass, the model in eval mode), and kept with the examples, the way
TRL's `precompute_ref_log_probs` does: no second model, no adapter switching while training. They are written
to resume/reference.safetensors; a resumed attempt reads them back instead of recomputing, so it trains on the
very same numbers (the checkpoint's weights are no longer the starting point by then).

Everything else is the SFT recipe's: the plan (a pair's length is both its sequences'), accumulation, the one
all_reduce of gradients per step, warm stop, checkpoints, out-of-memory retries. The normaliser of a window is
its number of pairs, so the step's loss is the mean per-pair loss whatever the split into micro-batches and ranks;
with `dpo_sft_weight` (RPO) it adds the weight x the chosen answers' NLL over the step's chosen answer tokens
(dpo.step_objective), so that term too is the step's token mean whatever the split.
"""

from __future__ import annotations

import io

import torch
from safetensors.torch import load, save

from daemon import durable, faults
from daemon.protocol import Event
from daemon.trainer import checkpoint, dpo, packing, sharding
from daemon.trainer.preference import PreferencePair
from daemon.trainer.recipe import LoRARecipe

REFERENCE = "reference.safetensors"


class DPORecipe(LoRARecipe):
    method = "dpo"

    def __init__(self, cfg, **kw):
        self._emit_outer = kw.pop("emit", lambda e: None)
        self.train_stats: torch.Tensor | None = None  # the last step's pair_stats (summed over ranks)
        self.eval_stats: dict = {}  # the held-out split's, after training (metadata)
        self._last_eval: dict = {}
        super().__init__(cfg, emit=self._with_rewards, **kw)

    def _with_rewards(self, event: dict) -> None:
        """Reward accuracy rides on the events the SFT loop emits: progress (the last step's) and eval."""
        if event.get("event") == Event.PROGRESS and self.train_stats is not None:
            stats = dpo.summarise(self.train_stats.tolist())
            event = {**event, "reward_accuracy": stats.get("reward_accuracy"),
                     "reward_margin": stats.get("reward_margin")}
            self.log_scalars({"train/reward_accuracy": stats.get("reward_accuracy", 0.0),
                              "train/reward_margin": stats.get("reward_margin", 0.0)})
        elif event.get("event") == Event.EVAL and self._last_eval:
            event = {**event, "reward_accuracy": self._last_eval.get("reward_accuracy"),
                     "reward_margin": self._last_eval.get("reward_margin")}
            self.log_scalars({"eval/reward_accuracy": self._last_eval.get("reward_accuracy", 0.0)})
        self._emit_outer(event)

    def setup(self, train_examples, eval_examples, **kw) -> None:
        super().setup(train_examples, eval_examples, **kw)
        self.trainable_counts = [1] * len(train_examples)  # the window's normaliser: its pairs

    def _resume(self) -> None:
        # Before the checkpoint's weights are restored: the model is still the job's starting point.
        self._reference()
        super()._resume()

    # ------------------------------------------------------------ the reference
    def _reference(self) -> None:
        pairs = [ex for ex in self.train_examples + self.eval_examples if isinstance(ex, PreferencePair)]
        path = self.resume_dir / REFERENCE if self.resume_dir is not None else None
        stored = self._read_reference(path, len(pairs))
        if stored is None:
            self._log(f"computing the reference log-probabilities of {len(pairs)} preference pairs")
            # Each split in the batches evaluate() makes of it: at the starting point the held-out split's
            # log-probs are then bitwise its reference's (every reward exactly 0, the accuracy exactly chance).
            train = [ex for ex in self.train_examples if isinstance(ex, PreferencePair)]
            stored = torch.cat([self._compute_reference(train), self._compute_reference(pairs[len(train):])])
            if path is not None and self.world.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                durable.write_bytes(path, save({"logps": stored.contiguous()}))
        for k, p in enumerate(pairs):
            p.ref_chosen, p.ref_rejected = float(stored[2 * k]), float(stored[2 * k + 1])

    def _read_reference(self, path, n_pairs: int) -> torch.Tensor | None:
        found = None
        # Only a run that has moved the weights needs the stored numbers; before its first checkpoint the model
        # is still the starting point, and computing again cannot pick up another attempt's parent.
        if (path is not None and self.world.is_main and path.is_file()
                and checkpoint.complete_checkpoints(self.resume_dir)):
            try:
                found = load(path.read_bytes())["logps"]
            except Exception as e:  # damaged: computed again, from the same starting point
                self._log(f"{REFERENCE} unreadable ({type(e).__name__}): computing the reference again")
            if found is not None and found.numel() != 2 * n_pairs:
                found = None
        if self.world.size > 1:  # rank 0 decides; every rank then takes its numbers (or computes with the others)
            box = io.BytesIO()
            torch.save(found, box)
            found = torch.load(io.BytesIO(self.world.broadcast_object(box.getvalue())), weights_only=True)
        return found

    @torch.no_grad()
    def _compute_reference(self, pairs: list) -> torch.Tensor:
        """[2 * pairs] fp64 log-probs (c0, r0, c1, r1, ...); each rank computes its micro-batches, one sum joins."""
        out = torch.zeros(2 * len(pairs), dtype=torch.float64, device=self.device)
        plan = self._eval_plan(pairs)
        self.model.eval()
        for mb, counts in self.world.share(plan, equal=self.sharded):
            logps = self._logps([pairs[i] for i in mb])
            if counts:
                index = torch.tensor([2 * i + j for i in mb for j in (0, 1)], device=self.device)
                out.index_copy_(0, index, logps.double())
        self.model.train()
        return self.world.sum(out).cpu()

    def _eval_plan(self, pairs: list) -> list[list[int]]:
        return packing.plan_micro_batches([len(p.input_ids) for p in pairs],
                                          token_budget=self.micro_batch_size * self.t.max_length,
                                          max_examples=self.micro_batch_size, packing=self.t.packing,
                                          seed=self.t.seed, epoch=0)

    def _logps(self, pairs: list) -> torch.Tensor:
        batch = dpo.collate_pairs(pairs, packing_on=self.t.packing, pad_id=self.pad_id)
        return dpo.sequence_logps(self.model, self._to_device(batch))

    # ------------------------------------------------------------ the step
    def _pair_losses(self, pairs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair DPO losses, the chosen answers' log-probs and the pair_stats, from one forward."""
        batch = self._to_device(dpo.collate_pairs(pairs, packing_on=self.t.packing, pad_id=self.pad_id))
        chosen, rejected = dpo.split(dpo.sequence_logps(self.model, batch))
        ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=chosen.dtype, device=self.device)
        tokens_c, tokens_r = dpo.split(batch["answer_tokens"])
        losses, rc, rr = dpo.dpo_losses(chosen, rejected, ref[:, 0], ref[:, 1], beta=self.t.dpo_beta,
                                        loss=self.t.dpo_loss, chosen_tokens=tokens_c, rejected_tokens=tokens_r)
        return losses, chosen, dpo.pair_stats(losses, rc, rr, chosen, rejected, tokens_c)

    def _accumulate_gradients(self, window: list[list[int]], n_window: int) -> torch.Tensor:
        model = self.model
        mine = self.world.share(window, equal=self.sharded)
        loss_sum = torch.zeros((), device=self.device)
        stats = torch.zeros(len(dpo.STAT_NAMES), dtype=torch.float64, device=self.device)
        weight = self.t.dpo_sft_weight
        # The step's chosen answer tokens (every rank's): RPO's NLL is their mean, whatever the split.
        n_tokens = sum(packing.trainable_tokens(self.train_examples[i].chosen) for mb in window for i in mb)
        for k, (mb, counts) in enumerate(mine):
            faults.check("train_step", step=self.progress.step)
            if self.sharded:
                sharding.set_gradient_sync(model, k == len(mine) - 1)
            losses, chosen, mb_stats = self._pair_losses([self.train_examples[i] for i in mb])
            objective = dpo.step_objective(losses, chosen, n_pairs=n_window, n_tokens=n_tokens, sft_weight=weight)
            self.accelerator.backward(objective if counts else objective * 0.0)
            if counts:  # loss_sum / n_window is the step's objective (the progress loss)
                loss_sum += (objective.detach() * max(n_window, 1)).float() if weight else losses.sum().detach().float()
                stats += mb_stats
        self.train_stats = self.world.sum(stats)
        return loss_sum

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, examples: list | None = None) -> float | None:
        """Mean DPO loss over preference pairs (reward accuracy and margins kept aside), or the SFT token loss for
        other examples (the standing eval set the gate measures every version on)."""
        examples = self.eval_examples if examples is None else examples
        if not examples or not isinstance(examples[0], PreferencePair):
            return super().evaluate(examples)
        self.model.eval()
        stats = torch.zeros(len(dpo.STAT_NAMES), dtype=torch.float64, device=self.device)
        for mb, counts in self.world.share(self._eval_plan(examples), equal=self.sharded):
            _, _, mb_stats = self._pair_losses([examples[i] for i in mb])
            if counts:
                stats += mb_stats
        self.model.train()
        self._last_eval = dpo.summarise(self.world.sum(stats).tolist())
        return self._last_eval.get("loss")

    def train(self):
        progress = super().train()
        self.eval_stats = dict(self._last_eval)  # the trained adapter's; the judge's later evaluations leave it
        return progress

    def summary(self) -> dict:
        train = dpo.summarise(self.train_stats.tolist()) if self.train_stats is not None else {}
        return {**super().summary(), "method": self.method,
                "preference": {"beta": self.t.dpo_beta, "loss": self.t.dpo_loss, "sft_weight": self.t.dpo_sft_weight,
                               "reference": "starting point",
                               "eval": self.eval_stats, "last_step": train}}


def recipe_for(file_format: str | None) -> type[LoRARecipe]:
    """The recipe a job's file trains with: DPO for a preference file, the SFT recipe for every other format."""
    return DPORecipe if file_format == "preference" else LoRARecipe
