"""The training recipe in-process: exact resume from a checkpoint, divergence and runs that train nothing,
checkpoint verification."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from daemon.trainer import checkpoint
from daemon.trainer.data import TokenizedExample
from daemon.trainer.recipe import Diverged, LoRARecipe, NoSteps, StopRequested


class Tok:
    pad_token_id, eos_token_id = 0, 1


def examples(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, 50, (1,), generator=g))
        ids = torch.randint(2, 200, (length,), generator=g).tolist()
        out.append(TokenizedExample(input_ids=ids, labels=[-100] * (length // 2) + ids[length // 2:]))
    return out


def config(**training):
    t = dict(seed=3, micro_batch_size=2, gradient_accumulation=2, max_length=64, epochs=2, max_steps=None,
             packing=True, learning_rate=1e-3, weight_decay=0.01, lr_scheduler="cosine", warmup_ratio=0.1,
             max_grad_norm=1.0, checkpoint_every_steps=2, checkpoint_every_seconds=600, keep_checkpoints=2,
             precision="fp32", gradient_checkpointing="false", attention="auto", micro_batch_tokens=None,
             liger_kernels=True)
    t.update(training)
    return NS(training=NS(**t), lora=NS(r=4, alpha=8, dropout=0.1, target_modules="all-linear", dtype="base"),
              limits=NS(max_diverged_steps=2, min_free_disk_mb=1), status=NS(progress_every_steps=1),
              trust_remote_code=False)


def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=200))


def run(job_dir: Path | None, cfg, stop_after: int | None = None):
    recipe = LoRARecipe(cfg, job_dir=job_dir)
    if stop_after is not None:
        recipe.stop_flag = lambda: recipe.progress.step >= stop_after
    recipe.setup(examples()[:20], examples()[20:], model=model(), tokenizer=Tok(), config_snapshot={"x": 1})
    try:
        recipe.train()
    except StopRequested:
        recipe.save_checkpoint()
        return None, recipe
    weights = checkpoint.trainable_state(recipe.accelerator.unwrap_model(recipe.model))
    return weights, recipe


def test_stop_and_resume_is_bitwise_identical(tmp_path):
    cfg = config()
    reference, ref_recipe = run(tmp_path / "a", cfg)
    assert ref_recipe.progress.step == ref_recipe.progress.total_steps >= 6

    stopped, _ = run(tmp_path / "b", cfg, stop_after=3)  # stops mid-epoch, between checkpoints
    assert stopped is None
    resumed, recipe = run(tmp_path / "b", cfg)
    assert recipe.progress.losses == ref_recipe.progress.losses
    assert recipe.progress.evals == ref_recipe.progress.evals
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def test_incomplete_or_corrupt_checkpoints_are_never_loaded(tmp_path):
    cfg = config()
    run(tmp_path, cfg, stop_after=3)
    resume = tmp_path / "resume"
    good = checkpoint.complete_checkpoints(resume)[0]
    # A newer checkpoint whose save was cut short (no manifest) and one with a corrupted file.
    half = resume / "step-000010"
    half.mkdir()
    (half / "adapter.safetensors").write_bytes(b"partial")
    corrupt = resume / "step-000009"
    corrupt.mkdir()
    for f in good.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "optimizer.pt").write_bytes(b"garbage")
    skipped = []
    path = checkpoint.latest_verified(resume, log=skipped.append)
    assert path == good
    state = checkpoint.load(path)
    assert any("step-000009" in s and "sha256" in s for s in skipped)
    assert state["progress"].step == 3


def test_nonfinite_loss_stops_the_job_as_diverged(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINING_DAEMON_FAULTS", '[{"point": "train_step", "kind": "nan", "min_step": 2}]')
    recipe = LoRARecipe(config(), job_dir=tmp_path)
    recipe.setup(examples()[:20], [], model=model(), tokenizer=Tok())
    with pytest.raises(Diverged, match="diverged at step 3"):
        recipe.train()
    assert recipe.progress.step == 2


def test_accumulation_matches_one_big_batch():
    """micro-batch 1 x accumulation 4 trains the same adapter as micro-batch 4 x accumulation 1 (an OOM retry)."""
    big_cfg = config(micro_batch_size=4, gradient_accumulation=1, packing=False, epochs=1)
    small_cfg = config(micro_batch_size=1, gradient_accumulation=4, packing=False, epochs=1)
    big_cfg.lora.dropout = small_cfg.lora.dropout = 0.0  # dropout draws differ with the batch split
    big, _ = run(None, big_cfg)
    small, _ = run(None, small_cfg)
    for name in big:
        torch.testing.assert_close(big[name], small[name], rtol=1e-4, atol=1e-6)


def test_the_trainer_side_never_imports_the_supervisor():
    """The trainer process shares only the core (daemon/*.py) with the daemon: daemon/protocol.py is the contract."""
    import subprocess
    import sys

    code = ("import sys, daemon.trainer.main, daemon.trainer.recipe, daemon.trainer.export, daemon.trainer.generate; "
            "assert not [m for m in sys.modules if m.startswith('daemon.supervisor')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def train_with_nan(tmp_path, monkeypatch, faults: str, max_diverged_steps: int = 100):
    """A recipe set up under the given nan faults, and the events it emits."""
    monkeypatch.setenv("TRAINING_DAEMON_FAULTS", faults)
    cfg = config(epochs=1)
    cfg.limits.max_diverged_steps = max_diverged_steps
    emitted = []
    recipe = LoRARecipe(cfg, job_dir=tmp_path, emit=emitted.append)
    recipe.setup(examples()[:20], [], model=model(), tokenizer=Tok())
    return recipe, emitted


def skipped(emitted: list[dict]) -> list[str]:
    """The warnings' first words: "step N skipped"."""
    return [e["message"].split(",")[0] for e in emitted if e.get("level") == "warning"]


def test_a_run_without_one_finite_step_raises_no_steps_naming_them(tmp_path, monkeypatch):
    recipe, emitted = train_with_nan(tmp_path, monkeypatch, '[{"point": "train_step", "kind": "nan"}]')
    total = recipe.progress.total_steps
    with pytest.raises(NoSteps, match=rf"every step was non-finite \(steps 1..{total}\)"):
        recipe.train()
    assert skipped(emitted) == [f"step {n} skipped" for n in range(1, total + 1)]


def test_skipped_steps_are_numbered_in_the_schedule_and_a_non_finite_last_step_diverges(tmp_path, monkeypatch):
    # Non-finite while 2 steps are done: every later step is skipped, the last one included.
    recipe, emitted = train_with_nan(tmp_path, monkeypatch, '[{"point": "train_step", "kind": "nan", "step": 2}]')
    total = recipe.progress.total_steps
    with pytest.raises(Diverged, match=rf"diverged at step 3: the final loss is not finite \(steps 3..{total},"):
        recipe.train()
    assert skipped(emitted) == [f"step {n} skipped" for n in range(3, total + 1)]


def test_some_skipped_steps_still_train_and_are_counted(tmp_path, monkeypatch):
    once = tmp_path / "fired"
    recipe, emitted = train_with_nan(
        tmp_path, monkeypatch, f'[{{"point": "train_step", "kind": "nan", "step": 1, "once_file": "{once}"}}]')
    recipe.train()
    summary = recipe.summary()
    assert summary["steps"] == recipe.progress.total_steps - 1 and summary["steps_skipped"] == 1
    assert skipped(emitted) == ["step 2 skipped"]


def test_a_non_finite_eval_loss_diverges(tmp_path, monkeypatch):
    recipe, _ = train_with_nan(tmp_path, monkeypatch, "[]")
    monkeypatch.setattr(recipe, "evaluate", lambda: float("inf"))
    with pytest.raises(Diverged, match="the eval loss after step .* is not finite"):
        recipe.train()


def test_the_parent_as_incumbent_is_measured_on_the_weights_the_run_started_from(tmp_path):
    """Judging measures the incumbent; when it is the run's parent, the recipe swaps the parent's weights (kept at
    setup) into the trained adapter instead of loading a second adapter: the same figures, and the trained
    weights come back."""
    from daemon.trainer import judge

    cfg = config(max_steps=2, epochs=1)
    first = LoRARecipe(cfg)
    first.setup(examples()[:20], [], model=model(), tokenizer=Tok())
    first.train()
    first.accelerator.unwrap_model(first.model).save_pretrained(tmp_path / "v1")

    recipe = LoRARecipe(cfg)
    recipe.setup(examples()[:20], examples()[20:], model=model(), tokenizer=Tok(), adapter_dir=tmp_path / "v1")
    recipe.progress.parent_version = 1
    recipe.train()
    trained = [p.detach().clone() for p in recipe.trainable]
    trained_loss = recipe.evaluate()

    assert judge.load_incumbent(recipe, tmp_path / "v1", 1) is None  # the parent: swapped in
    assert recipe.swapped_out is not None
    swapped_loss = recipe.evaluate()
    judge.unload_incumbent(recipe)
    assert all(torch.equal(p, q) for p, q in zip(recipe.trainable, trained))

    assert judge.load_incumbent(recipe, tmp_path / "v1", None) is None  # not known as the parent: loaded beside
    assert recipe.swapped_out is None
    loaded_loss = recipe.evaluate()
    judge.unload_incumbent(recipe)
    assert all(torch.equal(p, q) for p, q in zip(recipe.trainable, trained))
    assert recipe.evaluate() == trained_loss

    assert swapped_loss == loaded_loss  # the same weights through the same arithmetic
    assert swapped_loss != trained_loss  # the incumbent is not the trained adapter
    assert not all(torch.equal(p, q) for p, q in zip(recipe.start_weights, trained))
