"""Judging a new version before `latest` moves to it (docs/trust.md).

The new version and the incumbent (what `latest` points at) are measured in the same process, on the same
examples: the standing eval set and the job's own held-out split. The incumbent is loaded as a second named
PEFT adapter beside the one just trained, measured, and deleted again before anything is saved (PEFT saves every
adapter a model holds). Probes are asked of both, greedily. `decide()` is the gate: a pure rule from those
figures to "promoted" or "held" and the one line that says why.
"""

from __future__ import annotations

import math
from pathlib import Path

from daemon import faults, versions
from daemon.protocol import Event

PROMOTED, HELD = "promoted", "held"
INCUMBENT = "incumbent"  # the PEFT adapter name the incumbent is loaded under, next to "default"


# ---------------------------------------------------------------- the gate (pure)

def probe_verdict(probe, answer: str | None) -> tuple[bool | None, str | None]:
    """(passed, why it failed) of a probe's answer; passed is None when the probe checks nothing."""
    if answer is None:
        return None, None
    if probe.expect is None and probe.must_not_contain is None:
        return None, None
    low = answer.lower()
    if probe.expect is not None and probe.expect.lower() not in low:
        return False, f"the answer lacks {probe.expect!r}"
    if probe.must_not_contain is not None and probe.must_not_contain.lower() in low:
        return False, f"the answer contains {probe.must_not_contain!r}"
    return True, None


def _short(text: str, n: int = 60) -> str:
    """A prompt on one line, cut at a word near n characters: the reason must stay one readable line."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def _num(x: float) -> str:
    return f"{x:.3g}"


def _change(new: float, old: float) -> str:
    if old == 0:
        return "+inf%" if new > 0 else "+0%"
    pct = (new - old) / old * 100
    return f"{pct:+.1f}%" if abs(pct) < 10 else f"{pct:+.0f}%"


def passes(policy: str, tolerance: float, new: float, old: float) -> bool:
    """The loss rule: not_worse lets the loss rise by `tolerance` (a share of the incumbent's); better needs it to
    fall by that share, and to fall at all."""
    if not math.isfinite(new):
        return False
    if policy == "better":
        return new < old and new <= old * (1 - tolerance)
    return new <= old * (1 + tolerance)


def decide(policy: str, tolerance: float, *, incumbent_version: int | None, new: dict, incumbent: dict,
           probes: list[dict], standing_source: str = "none") -> tuple[str, str]:
    """(decision, reason) for a new version. `new` / `incumbent`: {"standing_eval_loss", "own_eval_loss"} (None
    where not measured), incumbent["note"]: why it could not be measured; `probes`: the metadata's probe rows.

    always promotes; so does a first version, or one that has nothing measurable to compare. Otherwise a failed
    required probe holds it, and so does a loss (standing set first, else the own split) over the policy's
    bound."""
    if policy == "always":
        return PROMOTED, "promotion: always"
    failed = [p for p in probes if p.get("required") and p.get("passed") is False]
    probe_reasons = [f"required probe {_short(p['prompt'])!r} failed: {p.get('why') or 'the answer is wrong'}"
                     for p in failed]
    reward = new.get("reward_accuracy")  # a preference (DPO) version: its chosen answers must win, held out
    if reward is not None and reward <= 0.5:
        probe_reasons.append(f"held-out reward accuracy {reward:.2f} is not above chance (0.5)")
    if incumbent_version is None:
        return PROMOTED, "no latest version yet" + (f" ({probe_reasons[0]})" if probe_reasons else "")
    loss_reason, loss_ok = None, True
    if new.get("standing_eval_loss") is not None and incumbent.get("standing_eval_loss") is not None:
        a, b, what = new["standing_eval_loss"], incumbent["standing_eval_loss"], "standing eval loss"
    elif new.get("own_eval_loss") is not None and incumbent.get("own_eval_loss") is not None:
        a, b = new["own_eval_loss"], incumbent["own_eval_loss"]
        what = "own eval split loss (no standing set)" if standing_source == "none" else "own eval split loss"
    else:
        a = b = None
    if a is not None:
        loss_ok = passes(policy, tolerance, a, b)
        loss_reason = f"{what} {_num(a)} vs {_num(b)} for v{incumbent_version} ({_change(a, b)})"
    if probe_reasons or not loss_ok:
        return HELD, "; ".join(probe_reasons + ([loss_reason] if not loss_ok else []))
    if loss_reason is not None:
        return PROMOTED, loss_reason
    why = incumbent.get("note") or "no standing eval set and no held-out split"
    return PROMOTED, f"nothing to compare with v{incumbent_version}: {why}"


# ---------------------------------------------------------------- measuring (torch, in the trainer)

def incumbent_problem(adapter_dir: Path, version: int, base_fingerprint: str | None, sharded: bool) -> str | None:
    """Why the incumbent cannot be measured in this process, or None. Every rank reaches the same answer."""
    if sharded:
        return "not measured under FSDP (the base is sharded over GPUs)"
    path = adapter_dir / f"v{version}"
    found = versions.problems(path)
    if found:
        return f"v{version} is damaged ({'; '.join(found)})"
    try:
        meta = versions.read_metadata(adapter_dir, version)
    except (OSError, ValueError) as e:
        return f"v{version}'s metadata is unreadable: {e}"
    if meta.get("base_model_fingerprint") not in (None, base_fingerprint):
        return f"v{version} was trained on another base model"
    return None


def load_incumbent(recipe, path: Path, version: int | None = None) -> str | None:
    """The incumbent's adapter in force in place of the trained one; why it could not be, or None.

    When the incumbent is the version this run started from (its parent: the common case), its weights are the
    ones the recipe kept at setup (recipe.start_weights): they are swapped into the trained adapter's own
    tensors, and the trained weights kept aside. Otherwise the incumbent is loaded as a second adapter beside
    the trained one (PEFT builds every LoRA module again: 1.4 s for a 1.5B model on an H200 host)."""
    start = getattr(recipe, "start_weights", None)
    if start is not None and version is not None and version == recipe.progress.parent_version:
        recipe.swapped_out = swap_weights(recipe.trainable, start)
        return None
    model = recipe.accelerator.unwrap_model(recipe.model)
    try:
        model.load_adapter(str(path), adapter_name=INCUMBENT,
                           autocast_adapter_dtype=recipe.cfg.lora.dtype == "fp32")
    except Exception as e:  # another LoRA layout, a file PEFT refuses: not measured, said so (every rank alike)
        if INCUMBENT in getattr(model, "peft_config", {}):
            model.delete_adapter(INCUMBENT)
        return f"{path.name} could not be loaded beside the new adapter: {type(e).__name__}: {str(e)[:200]}"
    model.set_adapter(INCUMBENT)
    return None


def agreed(world, note: str | None) -> str | None:
    """The same answer on every rank: None when every rank can measure the incumbent, else the first rank's
    reason (a load can fail on one rank alone; rank 0 chose the incumbent, publish_step.judge_version)."""
    if world.size == 1:
        return note
    notes = world.gather(note)
    first = next(((r, n) for r, n in enumerate(notes) if n), None) if world.is_main else None
    return world.broadcast_object(None if first is None else first[1] if first[0] == 0 else
                                  f"{first[1]} (on process {first[0]})")


def inc_measured(inc: dict, standing_examples: list, recipe) -> bool:
    """Whether every evaluation of the incumbent (the collectives) is done: what failed after it was rank 0's."""
    return ((inc["standing_eval_loss"] is not None or not standing_examples)
            and (inc["own_eval_loss"] is not None or not recipe.eval_examples))


def _free_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def swap_weights(params: list, values: list) -> list:
    """Copy `values` into `params` in place; returns what the params held before (copies)."""
    import torch

    with torch.no_grad():
        before = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    return before


def unload_incumbent(recipe) -> None:
    """The trained adapter active again and the incumbent gone: PEFT would save every adapter the model holds."""
    swapped = getattr(recipe, "swapped_out", None)
    if swapped is not None:  # the incumbent was swapped in: the trained weights go back
        swap_weights(recipe.trainable, swapped)
        recipe.swapped_out = None
        return
    model = recipe.accelerator.unwrap_model(recipe.model)
    model.set_adapter("default")
    model.delete_adapter(INCUMBENT)
    for p in recipe.trainable:  # set_adapter's bookkeeping must not leave the trained weights frozen
        p.requires_grad_(True)


def ask_probes(recipe, probes, max_new_tokens: int) -> list[str]:
    """Greedy answers of the model as it is now (rank 0 only: generation is not a collective)."""
    from daemon.trainer.generate import answer

    model = recipe.accelerator.unwrap_model(recipe.model)
    was_training = model.training
    model.eval()
    try:
        return [answer(model, recipe.tokenizer, p.prompt, max_new_tokens) for p in probes]
    finally:
        model.train(was_training)


def measure(recipe, cfg, standing_examples: list, incumbent_version: int | None, adapter_dir: Path,
            base_fingerprint: str | None, emit) -> dict:
    """The figures of the new version and the incumbent on the same sets, and the probes' answers: the
    "judgement" of metadata.json without its "standing_set" (the caller knows where that came from). Called on
    every rank (evaluation sums over ranks); only rank 0 asks the probes."""
    v = cfg.versions
    emit({"event": Event.PHASE, "phase": "judging"})
    world = recipe.world
    summary = recipe.summary()
    faults.check("judge")  # an out-of-memory error here ends the attempt (main.py: judge), after a checkpoint
    new = {"standing_eval_loss": recipe.evaluate(standing_examples) if standing_examples else None,
           "own_eval_loss": summary["eval_loss"],
           "reward_accuracy": ((summary.get("preference") or {}).get("eval") or {}).get("reward_accuracy")}
    can_ask = world.is_main and not recipe.sharded and v.probes
    answers = ask_probes(recipe, v.probes, v.probe_max_new_tokens) if can_ask else [None] * len(v.probes)
    recipe.laps.mark("judge_new")
    inc = {"version": incumbent_version, "standing_eval_loss": None, "own_eval_loss": None, "note": None}
    inc_answers: list = [None] * len(v.probes)
    if incumbent_version is not None:
        note = incumbent_problem(adapter_dir, incumbent_version, base_fingerprint, recipe.sharded)
        if note is None:
            emit({"event": Event.LOG, "level": "debug",
                  "message": f"judging: measuring the incumbent v{incumbent_version} on the same sets"})
            note = load_incumbent(recipe, adapter_dir / f"v{incumbent_version}", incumbent_version)
        recipe.laps.mark("incumbent_load")
        loaded, note = note is None, agreed(world, note)  # a rank alone must not evaluate: collectives would hang
        if note is not None and loaded:
            unload_incumbent(recipe)
        elif note is None:
            try:
                faults.check("judge_incumbent")
                if standing_examples:
                    inc["standing_eval_loss"] = recipe.evaluate(standing_examples)
                if recipe.eval_examples:
                    inc["own_eval_loss"] = recipe.evaluate(recipe.eval_examples)
                if can_ask:  # rank 0 alone, no collective: caught on any number of ranks
                    inc_answers = ask_probes(recipe, v.probes, v.probe_max_new_tokens)
            except Exception as e:  # out of memory, a probe's generation: the incumbent is not measured, said so
                if world.size > 1 and not inc_measured(inc, standing_examples, recipe):
                    raise  # mid-evaluation: the other ranks may wait in its collective; the daemon stops the group
                _free_memory()
                inc["standing_eval_loss"] = inc["own_eval_loss"] = None
                inc_answers = [None] * len(v.probes)
                note = (f"v{incumbent_version} could not be measured: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}")
            finally:
                unload_incumbent(recipe)
        inc["note"] = note
    if v.probes and not can_ask and recipe.sharded:
        inc["note"] = (inc["note"] + "; " if inc["note"] else "") + "probes not asked under FSDP"
    rows = []
    for probe, a, b in zip(v.probes, answers, inc_answers):
        passed, why = probe_verdict(probe, a)
        inc_passed, _ = probe_verdict(probe, b)
        rows.append({"prompt": probe.prompt, "expect": probe.expect, "must_not_contain": probe.must_not_contain,
                     "required": probe.required, "answer": a, "passed": passed, "why": why,
                     "incumbent_answer": b, "incumbent_passed": inc_passed})
    return {"new": new, "incumbent": inc, "probes": rows}
