"""The trainer's last steps: judge the trained adapter, build its metadata, publish it (promoted or held).

main.py runs them in order; `judge_version` on every rank (evaluation is a collective), the rest on rank 0.
A new version is always published as v<N>; `latest` moves to it only when the gate passes (judge.decide).
"""

from __future__ import annotations

import hashlib
import platform
import shutil
from pathlib import Path

from daemon import durable, faults
from daemon import versions
from daemon.protocol import Event
from daemon.timefmt import now_iso
from daemon.trainer import eval_pool, judge
from daemon.trainer.process import emit


def judge_version(attempt, recipe, cfg) -> dict:
    """metadata's "judgement" and "promotion": the new version and the incumbent measured alike, and the gate's
    verdict (on every rank alike; only rank 0's counts)."""
    standing, world = attempt.standing, recipe.world
    # Rank 0 chooses: a `promote` between two ranks' reads would give them different incumbents (and different
    # numbers of evaluations, so collectives that never meet).
    incumbent = world.broadcast_object(versions.promoted_version(attempt.adapter_dir) if world.is_main else None)
    judgement = judge.measure(recipe, cfg, standing.examples, incumbent, attempt.adapter_dir,
                              attempt.base_fingerprint, emit)
    judgement = {"standing_set": {**standing.to_metadata(), "notes": standing.notes}, **judgement}
    v = cfg.versions
    decision, reason = judge.decide(v.promotion, v.tolerance, incumbent_version=incumbent, new=judgement["new"],
                                    incumbent=judgement["incumbent"], probes=judgement["probes"],
                                    standing_source=standing.source)
    latest_after = versions.next_version(attempt.adapter_dir) if decision == judge.PROMOTED else incumbent
    promotion = {"policy": v.promotion, "tolerance": v.tolerance, "decision": decision, "reason": reason,
                 "incumbent_version": incumbent, "latest_after": latest_after}
    recipe.log_scalars({k: val for k, val in (("judge/standing_eval_loss", judgement["new"]["standing_eval_loss"]),
                                              ("judge/incumbent_standing_eval_loss",
                                               judgement["incumbent"]["standing_eval_loss"])) if val is not None})
    return {"judgement": judgement, "promotion": promotion}


def build_metadata(attempt, recipe, cfg, base_dir: Path, report, verdict: dict) -> dict:
    """metadata.json of the version: where it came from, how it was trained, how it was judged (publish_version
    adds the rest)."""
    import torch

    job, t, p, summary = attempt.job, cfg.training, recipe.progress, recipe.summary()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "adapter": job["adapter"], "parent_version": p.parent_version, "base_model": cfg.base_model,
        "base_model_path": str(base_dir), "base_model_fingerprint": attempt.base_fingerprint,
        "parent_notes": attempt.parent_notes, "job_id": job["id"], "source_file": job["original_name"],
        "source_sha256": job["sha256"], "examples_trained": len(recipe.train_examples),
        "eval_examples": len(recipe.eval_examples), "examples_skipped": report.skipped,
        "examples_truncated": report.truncated,
        "eval_lines": sorted(ex.line for ex in recipe.eval_examples),  # replay leaves them out (replay.py)
        "tokens_trained": summary["tokens_trained"], "trainable_tokens_trained": summary["trainable_tokens_trained"],
        "epochs": t.epochs, "steps": summary["steps"], "steps_skipped": summary["steps_skipped"],
        "first_train_loss": summary["first_train_loss"], "final_train_loss": summary["final_train_loss"],
        "eval_loss": summary["eval_loss"],
        "lora": cfg.lora.model_dump(), "optimizer": {"name": "adamw", "learning_rate": t.learning_rate,
                                                    "weight_decay": t.weight_decay, "lr_scheduler": t.lr_scheduler,
                                                    "warmup_ratio": t.warmup_ratio, "max_grad_norm": t.max_grad_norm,
                                                    "micro_batch_size": summary["micro_batch_size"],
                                                    "gradient_accumulation": summary["gradient_accumulation"]},
        "mode": t.mode, "method": summary.get("method", "sft"),
        **({"preference": summary["preference"]} if "preference" in summary else {}),
        "started_at": attempt.started_at,
        "training_seconds": summary["training_seconds"], "device": device,
        "seconds": attempt.laps.as_dict(),  # where the attempt's time went, up to the verdict (timings.py)
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if cuda else None,
        **card_memory_fields(recipe),
        "plan": summary["plan"], "libraries": library_versions(),
        "loss_history": p.losses, "eval_history": p.evals,
        **verdict, "replay": attempt.replay.to_metadata(), "versions_config": cfg.versions.model_dump(),
    }


def card_memory_fields(recipe) -> dict:
    """Beside the allocator's peak (peak_gpu_mem_gib): the card's (NVML) peak of the trainer process, sampled at
    each progress event and now; the allocator's reserved peak; how the card was read; the allocator's settings
    (expandable segments). None where there is no GPU or no NVML."""
    report = recipe.memory_report() if hasattr(recipe, "memory_report") else {}
    return {"gpu_peak_card_gib": report.get("gpu_peak_card_gib"),
            "gpu_peak_reserved_gib": report.get("gpu_peak_reserved_gib"),
            "gpu_card_source": report.get("gpu_card_source"), "gpu_allocator": report.get("allocator")}


def publish(attempt, recipe, metadata: dict) -> None:
    """Rank 0: the trained adapter becomes the adapter's next version (`latest` moves to it only when promoted),
    the eval pool takes the job's held-out split, and result.json tells the daemon."""
    emit({"event": Event.PHASE, "phase": "publishing"})
    faults.check("publish")
    promotion = metadata["promotion"]
    promote = promotion["decision"] == judge.PROMOTED
    # The pool grows only with promoted versions' data: a held file (a contradiction, garbage) must not become the
    # yardstick of the versions after it. Written before the version: a crash in between re-adds the same records
    # on the retry, which dedup makes a no-op. A full disk raises protocol.DiskFull for main.py to report.
    # A `latest` moved by hand since judging holds the version (versions.publish): its data stays out too.
    grows = promote and versions.promoted_version(attempt.adapter_dir) == promotion.get("incumbent_version")
    metadata["eval_pool"] = update_pool(attempt, recipe) if grows else pool_as_is(attempt)
    version, path = publish_version(attempt, recipe, metadata, promote)
    # Read back: publishing settles what `latest` is after it (under the adapter's lock).
    outcome = published_fields(version, versions.read_metadata(attempt.adapter_dir, version))
    durable.write_json(attempt.job_dir / "result.json", {"version": version, "path": str(path), **outcome,
                                                         **recipe.summary()})
    emit({"event": Event.PUBLISHED, "version": version, "path": str(path), **outcome})


def published_fields(version: int, metadata: dict) -> dict:
    """decision, reason, latest, incumbent: what the published event and result.json say of a version (a version
    from before the gate was promoted, and says so)."""
    promotion = metadata.get("promotion") or {}
    decision = promotion.get("decision", judge.PROMOTED)
    latest = promotion.get("latest_after", version) if decision == judge.HELD else version
    return {"decision": decision, "reason": promotion.get("reason", "published before the promotion gate"),
            "latest": latest, "incumbent": promotion.get("incumbent_version")}


def update_pool(attempt, recipe) -> dict:
    cfg = recipe.cfg
    # A preference file's held-out pairs are no yardstick for SFT versions: the pool keeps SFT records.
    if (cfg.versions.eval_file or cfg.versions.eval_pool_max_examples == 0 or not recipe.eval_examples
            or recipe.summary().get("method") == "dpo"):
        return pool_as_is(attempt)
    lines = {ex.line for ex in recipe.eval_examples}
    records = eval_pool.raw_records(attempt.job_dir / "input.jsonl", lines, cfg.intake.max_line_bytes)
    return eval_pool.add_split(attempt.adapter_dir, records, attempt.job["id"], attempt.job["original_name"],
                               cfg.versions.eval_pool_max_examples)


def pool_as_is(attempt) -> dict:
    entries, data = eval_pool.read_pool(attempt.adapter_dir)
    return {"path": str(attempt.adapter_dir / eval_pool.POOL),
            "sha256": hashlib.sha256(data).hexdigest() if entries else None, "examples": len(entries), "added": 0}


def publish_version(attempt, recipe, metadata: dict, promote: bool) -> tuple[int, Path]:
    """The adapter, its loss plot and the standing set it was judged on, staged, then renamed into place whole
    (daemon/versions.py). The metadata gets what only this step knows: whether the plot could be drawn, and when
    the version was complete."""
    from daemon.trainer import checkpoint

    checkpoint.check_free_space(attempt.adapter_dir.parent, recipe.cfg.limits.min_free_disk_mb)
    staged = versions.staging_dir(attempt.adapter_dir, attempt.job["id"])
    try:
        recipe.save_adapter(staged)
        if attempt.standing.data:
            durable.write_bytes(staged / eval_pool.STANDING_COPY, attempt.standing.data)
        loss_plot = draw_loss_plot(recipe.progress, staged / "loss.png",
                                   f"{attempt.job['adapter']} job {attempt.job['id']}")
        return versions.publish(attempt.adapter_dir, staged,
                                {**metadata, "loss_plot": loss_plot, "finished_at": now_iso()}, promote=promote)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def draw_loss_plot(progress, path: Path, title: str) -> str | None:
    """The plot's file name, or None without matplotlib (an optional dependency: a version needs no plot)."""
    try:
        from daemon.trainer.plots import plot_loss

        plot_loss(progress.losses, progress.evals, path, title)
    except ImportError:
        return None
    return path.name


def library_versions() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}
