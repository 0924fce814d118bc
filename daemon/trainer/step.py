"""One optimizer step of the LoRA recipe: a window of micro-batches accumulated (this rank's share), the
gradients summed over ranks, one host sync for the loss and the gradient norm, a non-finite step skipped (the
optimizer and scheduler never see it), clipping, the update. LoRARecipe (recipe.py) inherits it; the DPO recipe
overrides `_accumulate_gradients` with its pair loss.
"""

from __future__ import annotations

import math

import torch

from daemon import faults
from daemon.protocol import Event
from daemon.trainer import compiled
from daemon.trainer import packing
from daemon.trainer import sharding
from daemon.trainer.loss import token_loss_sum


class Diverged(Exception):
    """Loss or gradient norm stopped being finite: too many steps in a row, the last step, or the eval loss."""



class OptimizerStep:
    """The step's part of LoRARecipe: it reads the recipe's model, optimizer, scheduler, world, plans and
    progress, and its `_step_number` for messages."""

    def train_step(self, window: list[list[int]]) -> tuple[float, float, int] | None:
        """One optimizer step over a window of micro-batches, of which this rank trains its share: the mean
        token loss, the gradient norm and the tokens trained on. None when the loss or the gradient norm is not
        finite: the step is skipped, and the optimizer and scheduler never see it."""
        p = self.progress
        # Normalise by the trainable tokens of the whole window (every rank's share), so accumulation and
        # N processes equal one large batch whatever the split into micro-batches (and an OOM retry with
        # half the micro-batch is the same job).
        n_window = sum(self.trainable_counts[i] for mb in window for i in mb)
        loss_sum = self._accumulate_gradients(window, n_window)
        loss_sum = self.world.sum_gradients(self.trainable, loss_sum)
        # One host sync per optimizer step (both numbers in one copy), never one per micro-batch.
        loss, grad_norm = torch.stack([loss_sum / max(n_window, 1), self._clip().float()]).tolist()
        if faults.active("train_step", step=p.step):
            loss = float("nan")
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._zero_grad()
            p.nonfinite_streak += 1
            number, limit = self._step_number(), self.cfg.limits.max_diverged_steps
            self.emit({"event": Event.LOG, "level": "warning",
                       "message": f"step {number} skipped, the loss or gradient is not finite (loss={loss:.4g} "
                                  f"grad_norm={grad_norm:.4g}); the weights are unchanged ({p.nonfinite_streak} in a "
                                  f"row, limits.max_diverged_steps={limit} in a row fail the job)"})
            if p.nonfinite_streak >= limit:
                first = number - p.nonfinite_streak + 1
                raise Diverged(f"diverged at step {first}: loss={loss:.4g} grad_norm={grad_norm:.4g} "
                               f"for {p.nonfinite_streak} consecutive steps ({first}..{number})")
            return None
        p.nonfinite_streak = 0
        self.optimizer.step()
        self.scheduler.step()
        self._zero_grad()
        n_tokens = sum(self.token_counts[i] for mb in window for i in mb)
        p.step += 1
        p.tokens_seen += n_tokens
        p.trainable_tokens_seen += n_window
        p.losses.append([p.step, round(loss, 6)])
        return loss, grad_norm, n_tokens

    def _zero_grad(self) -> None:
        # Under CUDA graphs a .grad first made by a graph's backward lives in the graphs' memory pool, which the
        # next micro-batch's replay overwrites: accumulation needs .grad buffers of its own, zeroed in place.
        stable = bool(self.fixed_shape) and compiled.graphs(self.plan)
        if stable:
            for q in self.trainable:
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
        self.optimizer.zero_grad(set_to_none=not stable)

    def _accumulate_gradients(self, window: list[list[int]], n_window: int) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches of the window; returns their summed token loss."""
        model = self.model
        mine = self.world.share(window, equal=self.sharded)
        loss_sum = torch.zeros((), device=self.device)
        for k, (mb, counts) in enumerate(mine):
            faults.check("train_step", step=self.progress.step)
            if self.sharded:  # reduce-scatter once per step, after the last micro-batch
                sharding.set_gradient_sync(model, k == len(mine) - 1)
            batch = packing.collate([self.train_examples[i] for i in mb], packing=self.t.packing, pad_id=self.pad_id)
            if self.fixed_shape:
                batch = packing.pad_fixed(batch, **self.fixed_shape)
                compiled.mark_step()
            # Compiled runs on a GPU also fuse the loss's softmax and gradient (loss._chunk_loss_and_grad).
            step_loss = token_loss_sum(model, self._to_device(batch),
                                       fused=bool(self.fixed_shape) and self.device.type == "cuda")
            # A padding repeat (counts False) still runs its backward, as FSDP's collectives need, but adds 0.
            self.accelerator.backward(step_loss / max(n_window, 1) if counts else step_loss * 0.0)
            if counts:
                loss_sum += step_loss.detach()
        return loss_sum

    def _clip(self) -> torch.Tensor:
        params = [q for q in self.model.parameters() if q.requires_grad]
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm else float("inf")
        return sharding.full(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _to_device(self, batch: dict) -> dict:
        # Plain copies: pinning each micro-batch (pin_memory + non_blocking) measured 6-8% slower on the
        # H100 (docs/performance.md): the pinning costs more host time than the blocking copy it saves.
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
