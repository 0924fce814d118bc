"""The LoRA training recipe: setup / train / save_checkpoint / cleanup, in the trainer child only.

Flat on purpose (torchtune-style): read it top to bottom to know what a job does. Data order, RNG and
optimizer state all live in checkpoints, so a run killed at any point and resumed from its last checkpoint
produces bit-for-bit the adapter an uninterrupted run would (CPU, fp32). Under N processes (daemon/supervisor/launch.py
starts them) every rank runs this same code on its share of each step; daemon/trainer/distributed.py says how.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator

from daemon import faults
from daemon.protocol import Event
from daemon.trainer import card_memory
from daemon.trainer import checkpoint
from daemon.trainer import compiled
from daemon.trainer import packing
from daemon.trainer import sharding
from daemon.trainer.checkpoint import Progress
from daemon.trainer.distributed import World, accelerator_kwargs
from daemon.trainer.loss import token_loss_sum
from daemon.trainer.model import load_for_training, prepare_model
from daemon.trainer.step import Diverged, OptimizerStep
from daemon.trainer.timings import Laps
from daemon.trainer.tracking import Tracker

GIB = 1024**3

PROGRESS_AT_LEAST_EVERY_SECONDS = 60.0  # well under limits.stall_timeout_seconds (20 min by default)


class NoSteps(Exception):
    """The run ended without one completed optimizer step: there is nothing to publish."""


class StopRequested(Exception):
    """A warm stop: the state is checkpointed and the job resumes later."""


class LoRARecipe(OptimizerStep):
    def __init__(self, cfg, *, emit: Callable[[dict], None] = lambda e: None, job_dir: Path | None = None,
                 stop_flag: Callable[[], bool] = lambda: False, tensorboard: tuple[Path, str] | None = None,
                 laps: Laps | None = None):
        """`tensorboard`: (folder, run name) for TensorBoard logs (status.tensorboard), written by rank 0;
        `laps`: where setup and train mark their phases (timings.py; the version's metadata keeps them)."""
        self.cfg = cfg
        self.laps = laps or Laps()
        self.tracker = Tracker(tensorboard, emit)
        self.t = cfg.training
        self.emit = emit
        self.job_dir = job_dir
        self.resume_dir = job_dir / "resume" if job_dir else None
        self.stop_flag = stop_flag
        self.progress = Progress()
        self.config_snapshot: dict = {}

    # ------------------------------------------------------------------ setup
    def setup(self, train_examples, eval_examples, *, base_dir: Path | None = None, adapter_dir: Path | None = None,
              model=None, tokenizer=None, config_snapshot: dict | None = None,
              max_micro_batch: int | None = None, preload=None) -> None:
        """Load the model with its LoRA, build the optimizer, plan every epoch's batches, and resume if possible.

        `max_micro_batch`: fewer examples per micro-batch than the config's (an out-of-memory retry);
        `preload`: the base built on the CPU while the job waited (early_load.Preload); `tokenizer` without
        `model`: the base's tokenizer, already loaded."""
        # Before this process makes its CUDA context: the card's baseline, and the allocator's settings
        # (expandable segments unless the user chose; daemon/trainer/card_memory.py).
        self.card = card_memory.CardMemory.before_cuda()
        self.card.reset_peak()
        self.allocator = card_memory.configure_allocator() if torch.cuda.is_available() else None
        # Under RANK/WORLD_SIZE from the daemon this joins the job's process group (gloo on CPU, NCCL on GPUs).
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), **accelerator_kwargs(),
                                       **self.tracker.accelerator_kwargs())
        self.device = self.accelerator.device
        self.world = World.from_accelerator(self.accelerator)
        self.laps.mark("cuda_context")
        self.tracker.start(self.accelerator)
        self._seed(self.t.seed + self.world.rank)  # LoRA init is seeded on its own (model.py): the same on every rank
        # training.compile (daemon/trainer/compiled.py) needs this recipe's own step: fixed-shape packed batches.
        fixed_ok = type(self)._accumulate_gradients is LoRARecipe._accumulate_gradients
        compile_kw = {"allow_compile": fixed_ok, "compile_cache": compiled.root_cache_dir(self.job_dir),
                      "run_tokens": self._run_tokens(train_examples)}
        if model is None:
            model, tokenizer, self.plan = load_for_training(base_dir, self.cfg, self.device, adapter_dir=adapter_dir,
                                                            world=self.world, max_micro_batch=max_micro_batch,
                                                            preload=preload, tokenizer=tokenizer, laps=self.laps,
                                                            **compile_kw)
        else:
            model, tokenizer, self.plan = prepare_model(model, tokenizer, self.cfg, self.device,
                                                        adapter_dir=adapter_dir, world=self.world,
                                                        max_micro_batch=max_micro_batch, laps=self.laps, **compile_kw)
        self.sharded = bool(self.plan.get("fsdp"))
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.config_snapshot = config_snapshot or {}

        self.micro_batch_size = int(self.plan.get("micro_batch_size") or self.t.micro_batch_size)
        # Micro-batches per optimizer step, over all ranks together: N processes train the job 1 process would.
        # The one place the accumulation follows a smaller micro-batch (the memory plan's, or a retry's), so
        # that a step still sees the configured micro_batch_size x gradient_accumulation examples.
        self.accum = self.t.gradient_accumulation * max(1, self.t.micro_batch_size // self.micro_batch_size)
        if self.accum % self.world.size:
            self.emit({"event": Event.LOG, "message": f"{self.accum} micro-batches per step do not divide over "
                       f"{self.world.size} processes: some wait in every step (make gradient_accumulation a "
                       "multiple of the number of GPUs)"})
        self.progress.examples_sha256 = checkpoint.examples_fingerprint(train_examples)  # a resume checks it
        self.token_counts = [len(ex.input_ids) for ex in train_examples]
        self.trainable_counts = [packing.trainable_tokens(ex) for ex in train_examples]
        self.plans = [self._plan_epoch(e) for e in range(self.t.epochs)]
        # Compiled layers: every micro-batch of the run padded to one shape, so one graph serves them all.
        self.fixed_shape = compiled.fixed_shape(self.token_counts, self.plans,
                                                token_budget=self.micro_batch_size * self.t.max_length,
                                                max_length=self.t.max_length) if self.plan.get("compile") else None
        if self.fixed_shape:
            self.plan["compile_shape"] = dict(self.fixed_shape)
        steps = sum(math.ceil(len(p) / self.accum) for p in self.plans)
        if self.t.max_steps:
            steps = min(steps, self.t.max_steps)
        self.progress.total_steps = steps

        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # The parent version's adapter, as the run starts from it (before a resume overwrites it): judging swaps it
        # back in to measure the parent when the parent is the incumbent (judge.py). A LoRA's worth of memory.
        self.start_weights = ([p.detach().clone() for p in self.trainable]
                              if adapter_dir is not None and not self.sharded else None)
        optimizer = torch.optim.AdamW(self.trainable, lr=self.t.learning_rate, weight_decay=self.t.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(self.t.lr_scheduler, optimizer, num_warmup_steps=int(self.t.warmup_ratio * steps),
                                  num_training_steps=max(steps, 1))
        if self.world.size > 1:  # no DDP wrapper: trainer/distributed.py sums the gradients (its docstring says why)
            self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self._resume()
        self.world.broadcast_(self.trainable)
        self._zero_grad()  # under CUDA graphs: .grad buffers of their own before the first backward
        self.laps.mark("optimizer_resume")

    def _run_tokens(self, examples) -> int:
        """About how many tokens the run will train (every epoch, or up to max_steps): auto compile weighs it."""
        t = self.t
        tokens = sum(len(ex.input_ids) for ex in examples) * t.epochs
        if t.max_steps and examples:
            per_step = t.micro_batch_size * t.max_length * t.gradient_accumulation  # a packed step at most
            tokens = min(tokens, t.max_steps * per_step)
        return tokens

    def log_scalars(self, values: dict, step: int | None = None) -> None:
        """Scalars for TensorBoard (nothing without status.tensorboard)."""
        self.tracker.log(values, self.progress.step if step is None else step)

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        lengths = [len(ex.input_ids) for ex in self.train_examples]
        return packing.plan_micro_batches(lengths, token_budget=self.micro_batch_size * self.t.max_length,
                                          max_examples=self.micro_batch_size, packing=self.t.packing,
                                          seed=self.t.seed, epoch=epoch)

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _resume(self) -> None:
        if self.resume_dir is None:
            return
        # Rank 0 chooses (and verifies); every rank restores that same checkpoint.
        path = (checkpoint.resumable(self.resume_dir, self.progress.examples_sha256, log=self._log)
                if self.world.is_main else None)
        path = self.world.broadcast_object(path)
        if path is None:
            return
        state = checkpoint.load(path, rank=self.world.rank)
        checkpoint.restore_weights(self.accelerator.unwrap_model(self.model), state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        sharding.reshard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:
            checkpoint.set_rng_state(state["rng"])
        else:  # saved by a run on fewer processes: this rank starts a fresh stream
            self._log(f"{path.name} holds no RNG state for rank {self.world.rank}")
        total, fingerprint = self.progress.total_steps, self.progress.examples_sha256
        self.progress = state["progress"]
        self.progress.total_steps, self.progress.examples_sha256 = total, fingerprint
        self.emit({"event": Event.RESUMED, "step": self.progress.step, "checkpoint": path.name})

    def _log(self, message: str) -> None:
        self.emit({"event": Event.LOG, "message": message})

    # ------------------------------------------------------------------ train
    def train(self) -> Progress:
        """Optimizer steps through every epoch's plan (or up to max_steps), then one evaluation.

        Raises StopRequested at a step boundary when a stop is asked for; Diverged when too many steps in a row,
        the last step or the evaluation had a non-finite loss or gradient norm; NoSteps when no step completed.
        Every rank raises alike: losses and gradient norms are summed over ranks before they are judged."""
        p, t = self.progress, self.t
        self.model.train()
        last_ckpt_time, last_ckpt_step = time.monotonic(), p.step
        window_start, window_tokens = time.perf_counter(), 0  # since the last progress event: its tokens/s
        first_step_emitted = p.step > 0
        while p.epoch < t.epochs and p.step < p.total_steps:
            plan = self.plans[p.epoch]
            while p.micro_batch < len(plan) and p.step < p.total_steps:
                if self._checkpoint_due(last_ckpt_time, last_ckpt_step):
                    self.save_checkpoint()
                    last_ckpt_time, last_ckpt_step = time.monotonic(), p.step
                window = plan[p.micro_batch:p.micro_batch + self.accum]
                step_began = time.perf_counter()
                stepped = self.train_step(window)
                p.micro_batch += len(window)  # a skipped step consumes its micro-batches too
                if stepped is None:
                    continue
                loss, grad_norm, n_tokens = stepped
                window_tokens += n_tokens
                if not first_step_emitted:
                    first_step_emitted = True
                    # How long the step itself took: with it, the events say when the GPU started training.
                    self.emit({"event": Event.FIRST_STEP, "step": p.step, "loss": loss,
                               "seconds": round(time.perf_counter() - step_began, 3)})
                    self.laps.mark("first_step")
                elapsed = time.perf_counter() - window_start
                # Every N steps, and at least once a minute: the daemon's stall watchdog hears from a run whose
                # steps are slow (a big base, 4-bit, high accumulation) long before its timeout.
                if (p.step % self.cfg.status.progress_every_steps == 0 or p.step == p.total_steps
                        or elapsed >= PROGRESS_AT_LEAST_EVERY_SECONDS):
                    p.train_seconds += elapsed
                    self._emit_progress(loss, grad_norm, window_tokens / elapsed if elapsed > 0 else 0.0)
                    window_start, window_tokens = time.perf_counter(), 0
            if p.micro_batch >= len(plan):
                p.epoch += 1
                p.micro_batch = 0
        p.train_seconds += time.perf_counter() - window_start
        self.laps.mark("steps")
        self._check_trained()
        eval_loss = self.evaluate()
        self.laps.mark("eval_split")
        if eval_loss is not None and not math.isfinite(eval_loss):
            raise Diverged(f"diverged: the eval loss after step {p.step} is not finite ({eval_loss})")
        if eval_loss is not None:
            p.evals = [e for e in p.evals if e[0] != p.step] + [[p.step, eval_loss]]  # once, after a resume
            self.emit({"event": Event.EVAL, "step": p.step, "eval_loss": eval_loss})
            self.log_scalars({"eval/loss": eval_loss})
        return p

    def _check_trained(self) -> None:
        """A run that completed no step, or whose final step had a non-finite loss, trained nothing worth
        publishing: its adapter is the parent's (or the untrained LoRA), or the last loss says it broke."""
        p = self.progress
        last = self._step_number() - 1
        if p.step == 0:
            raise NoSteps(f"no optimizer step completed: every step was non-finite (steps 1..{last})")
        if p.nonfinite_streak:
            first = last - p.nonfinite_streak + 1
            raise Diverged(f"diverged at step {first}: the final loss is not finite (steps {first}..{last}, the "
                           "last of the run, were skipped)")

    def _step_number(self) -> int:
        """The 1-based place of the current step in the run's schedule of steps (every epoch's windows, skipped
        steps included): what warnings and errors name. It can run ahead of progress.step, which counts
        completed steps only, and it follows from the checkpointed progress, so a resumed run numbers alike."""
        p = self.progress
        earlier = sum(math.ceil(len(plan) / self.accum) for plan in self.plans[:p.epoch])
        return earlier + p.micro_batch // self.accum + 1

    def _checkpoint_due(self, last_ckpt_time: float, last_ckpt_step: int) -> bool:
        """Decided at a step boundary, by all ranks alike (a signal or a clock reaches them at different steps):
        a stop (raised here), or a checkpoint of the step just done (never after the last: that one publishes)."""
        p, t = self.progress, self.t
        due = p.step > last_ckpt_step and (p.step % t.checkpoint_every_steps == 0
                                           or time.monotonic() - last_ckpt_time >= t.checkpoint_every_seconds)
        stop, due = self.world.agree(self.stop_flag(), due)
        if stop:
            raise StopRequested()
        return due

    def _emit_progress(self, loss: float, grad_norm: float, tokens_per_s: float) -> None:
        p = self.progress
        remaining = p.total_steps - p.step
        per_step = p.train_seconds / max(p.step, 1)
        event = {"event": Event.PROGRESS, "step": p.step, "total_steps": p.total_steps, "epoch": p.epoch,
                 "loss": round(loss, 5), "grad_norm": round(grad_norm, 4),
                 "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": round(tokens_per_s, 1),
                 "eta_s": round(remaining * per_step, 1)}
        if torch.cuda.is_available():
            # The allocator's peak (gpu_mem_gib), its reserved peak, and the card's (NVML) peak so far.
            event["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            card = self.memory_report()
            event.update({k: card[k] for k in ("gpu_peak_card_gib", "gpu_peak_reserved_gib") if k in card})
        self.emit(event)
        self.log_scalars({f"train/{k}": event[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "gpu_mem_gib",
                                                           "gpu_peak_card_gib", "gpu_peak_reserved_gib")
                          if event.get(k) is not None})

    def memory_report(self) -> dict:
        """The card's (NVML) peak of this process, the allocator's reserved peak, how the card was read, and the
        allocator's settings: for progress events and metadata. Empty on CPU."""
        card = getattr(self, "card", None)
        report = card.report() if card is not None else {}
        if report:
            report["allocator"] = getattr(self, "allocator", None)
        return report

    @torch.no_grad()
    def evaluate(self, examples: list | None = None) -> float | None:
        """Mean token loss over `examples` (default: the job's held-out split), summed over every rank."""
        examples = self.eval_examples if examples is None else examples
        if not examples:
            return None
        self.model.eval()
        if getattr(self, "fixed_shape", None):  # compiled layers: evaluate eagerly (other shapes, no grad)
            with compiled.eager():
                return self._evaluate(examples)
        return self._evaluate(examples)

    def _evaluate(self, examples: list) -> float | None:
        total, count = 0.0, 0
        lengths = [len(ex.input_ids) for ex in examples]
        plan = packing.plan_micro_batches(lengths, token_budget=self.micro_batch_size * self.t.max_length,
                                          max_examples=self.micro_batch_size, packing=self.t.packing,
                                          seed=self.t.seed, epoch=0)
        for mb, counts in self.world.share(plan, equal=self.sharded):
            batch = packing.collate([examples[i] for i in mb], packing=self.t.packing, pad_id=self.pad_id)
            n = batch["n_trainable"]
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = float(token_loss_sum(self.model, batch))
            if counts:
                total, count = total + loss, count + n
        if self.world.size > 1:
            sums = self.world.sum(torch.tensor([total, count], dtype=torch.float64, device=self.device))
            total, count = sums.tolist()
        self.model.train()
        return round(total / count, 6) if count else None

    # ------------------------------------------------------------ checkpoint
    def save_checkpoint(self) -> Path | None:
        if self.resume_dir is None:
            return None
        self.emit({"event": Event.SAVING, "step": self.progress.step})
        faults.check("checkpoint_save", step=self.progress.step)
        path = checkpoint.save(self.resume_dir, self.accelerator.unwrap_model(self.model), self.optimizer,
                               self.scheduler, self.progress, self.config_snapshot,
                               keep=self.t.keep_checkpoints, min_free_mb=self.cfg.limits.min_free_disk_mb,
                               world=self.world)
        self.emit({"event": Event.CHECKPOINT, "step": self.progress.step, "path": str(path)})
        return path

    def save_adapter(self, out_dir: Path | None) -> None:
        """The adapter as a PEFT folder, written by rank 0 (out_dir None elsewhere). Every rank calls it when the
        LoRA weights are sharded: gathering them whole is a collective."""
        model = self.accelerator.unwrap_model(self.model)
        if self.sharded:
            whole = {n: sharding.full(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
            if out_dir is not None:
                model.save_pretrained(out_dir, state_dict=whole, safe_serialization=True)
        elif out_dir is not None:
            model.save_pretrained(out_dir, safe_serialization=True)
        if out_dir is not None:
            self.tokenizer.save_pretrained(out_dir)

    def summary(self) -> dict:
        p = self.progress
        return {"steps": p.step, "steps_skipped": self._step_number() - 1 - p.step, "epochs": self.t.epochs,
                "tokens_trained": p.tokens_seen, "trainable_tokens_trained": p.trainable_tokens_seen,
                "first_train_loss": p.losses[0][1] if p.losses else None,
                "final_train_loss": p.losses[-1][1] if p.losses else None,
                "eval_loss": p.evals[-1][1] if p.evals else None, "training_seconds": round(p.train_seconds, 3),
                "micro_batch_size": self.micro_batch_size, "gradient_accumulation": self.accum,
                "plan": self.plan, "progress": asdict(p)}

    # --------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        self.tracker.end()
        for name in ("model", "optimizer", "scheduler"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
