"""The DPO recipe in-process: a stopped and resumed run is bitwise the uninterrupted one (the reference
log-probs come back from the job folder, not recomputed from moved weights), N processes train what one does,
and the held-out reward accuracy starts at chance and rises."""

from __future__ import annotations

import pytest
import torch

from daemon.trainer import checkpoint, dpo_recipe
from daemon.trainer.data import TokenizedExample
from daemon.trainer.dpo_recipe import DPORecipe
from daemon.trainer.preference import PreferencePair
from daemon.trainer.recipe import StopRequested

from test_recipe import Tok, config, model


def pairs(n=24, seed=1):
    """Prompt, then a random answer with a fixed sign-off (chosen) or without it (rejected): what generalises to
    the held-out prompts is the sign-off."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        prompt = torch.randint(2, 200, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        bad = torch.randint(2, 150, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        good = bad + [190, 191, 192]
        seq = [TokenizedExample(prompt + a, [-100] * len(prompt) + a, line=k + 1) for a in (good, bad)]
        out.append(PreferencePair(seq[0], seq[1], line=k + 1))
    return out


def dpo_config(**training):
    cfg = config(**{"dpo_beta": 0.5, "dpo_loss": "sigmoid", "dpo_sft_weight": 1.0, "learning_rate": 5e-3, **training})
    return cfg


def run(job_dir, cfg, stop_after=None, events=None):
    recipe = DPORecipe(cfg, job_dir=job_dir, emit=(events.append if events is not None else lambda e: None))
    if stop_after is not None:
        recipe.stop_flag = lambda: recipe.progress.step >= stop_after
    data = pairs()
    recipe.setup(data[:20], data[20:], model=model(), tokenizer=Tok(), config_snapshot={"x": 1})
    try:
        recipe.train()
    except StopRequested:
        recipe.save_checkpoint()
        return None, recipe
    return checkpoint.trainable_state(recipe.accelerator.unwrap_model(recipe.model)), recipe


@pytest.mark.parametrize("sft_weight", [1.0, 0.0])
def test_stop_and_resume_is_bitwise_identical_with_the_stored_reference(tmp_path, sft_weight):
    cfg = dpo_config(dpo_sft_weight=sft_weight)
    reference, ref_recipe = run(tmp_path / "a", cfg)
    assert ref_recipe.progress.step == ref_recipe.progress.total_steps >= 6

    stopped, _ = run(tmp_path / "b", cfg, stop_after=3)
    assert stopped is None
    assert (tmp_path / "b" / "resume" / dpo_recipe.REFERENCE).is_file()
    events: list = []
    resumed, recipe = run(tmp_path / "b", cfg, events=events)
    assert any(e.get("event") == "resumed" for e in events)
    assert not any("computing the reference" in e.get("message", "") for e in events)  # read back, not computed
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert recipe.progress.losses == ref_recipe.progress.losses
    assert recipe.eval_stats == ref_recipe.eval_stats


def test_reward_accuracy_starts_at_chance_and_rises_and_rides_on_the_events(tmp_path):
    events: list = []
    cfg = dpo_config(epochs=4)
    recipe = DPORecipe(cfg, job_dir=tmp_path, emit=events.append)
    data = pairs()
    recipe.setup(data[:20], data[20:], model=model(), tokenizer=Tok(), config_snapshot={})
    before = recipe.evaluate()
    assert abs(before - 0.693147) < 1e-4 and recipe._last_eval["reward_accuracy"] == 0.5
    recipe.train()
    after = recipe.eval_stats
    assert after["loss"] < before and after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0
    assert after["chosen_reward"] > after["rejected_reward"] and after["chosen_logps"] < 0
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all(0 <= e["reward_accuracy"] <= 1 for e in progress)
    (ev,) = [e for e in events if e["event"] == "eval"]
    assert ev["reward_accuracy"] == 1.0 and ev["eval_loss"] == after["loss"]
    summary = recipe.summary()
    assert summary["method"] == "dpo" and summary["preference"]["beta"] == 0.5
    assert summary["preference"]["eval"]["pairs"] == 4


def test_ipo_trains_too(tmp_path):
    _, recipe = run(tmp_path, dpo_config(dpo_loss="ipo", epochs=2))
    assert recipe.eval_stats["reward_accuracy"] > 0.5
