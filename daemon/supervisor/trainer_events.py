"""What the daemon makes of its trainer's events: a status line for each, and the training job's fields in
status.json (`current`). The names are protocol.Event's; the trainer writes them on rank 0's stdout."""

from __future__ import annotations

from daemon.protocol import Event
from daemon.supervisor.job import Job
from daemon.supervisor.status import StatusWriter
from daemon.timefmt import fmt_eta

# reward_accuracy: preference (DPO) jobs only, the step's share of pairs whose chosen answer wins.
_PROGRESS_FIELDS = ("step", "total_steps", "epoch", "loss", "reward_accuracy", "lr", "tokens_per_s", "eta_s",
                    "gpu_mem_gib", "gpu_peak_card_gib")


def report(ev: dict, job: Job, current: dict, status: StatusWriter) -> None:
    """Log one event and update `current` with it; an unknown event (from a newer trainer, say) is ignored."""
    try:
        kind = Event(ev.get("event"))
    except ValueError:
        return
    if kind == Event.PHASE:
        current["phase"] = ev["phase"]
        if ev.get("total_steps") is not None:
            current["total_steps"] = ev["total_steps"]
        status.event("phase", f"job {job.id}: {ev['phase']}", level="debug", job_id=job.id, **ev)
    elif kind == Event.PROGRESS:
        current.update({k: ev.get(k) for k in _PROGRESS_FIELDS})
        gpu_txt = f" GPU {ev['gpu_mem_gib']:.2f} GiB" if ev.get("gpu_mem_gib") is not None else ""
        reward = f" reward acc {ev['reward_accuracy']:.2f}" if ev.get("reward_accuracy") is not None else ""
        status.event("progress", f"job {job.id} step {ev['step']}/{ev['total_steps']} loss {ev['loss']:.4f}{reward} "
                     f"{ev['tokens_per_s']:.0f} tok/s ETA {fmt_eta(ev.get('eta_s'))}{gpu_txt}",
                     job_id=job.id, **{k: v for k, v in ev.items() if k not in ("event", "ts")})
    elif kind == Event.FIRST_STEP:
        took = ev.get("seconds")
        status.event("first_step", f"job {job.id}: first optimizer step done"
                     + (f" in {took:.2f}s" if took is not None else "") + f" (loss {ev['loss']:.4f})",
                     job_id=job.id, loss=ev["loss"], **({"seconds": took} if took is not None else {}))
    elif kind == Event.EVAL:
        current["eval_loss"] = ev["eval_loss"]
        reward = ev.get("reward_accuracy")
        if reward is not None:
            current["eval_reward_accuracy"] = reward
        status.event("eval", f"job {job.id}: eval loss {ev['eval_loss']:.4f}"
                     + (f", held-out reward accuracy {reward:.2f}" if reward is not None else ""), job_id=job.id,
                     step=ev.get("step"), eval_loss=ev["eval_loss"],
                     **({"reward_accuracy": reward} if reward is not None else {}))
    elif kind == Event.VALIDATED:
        status.event("validated", f"job {job.id}: {ev['examples']} examples, {ev['tokens']} tokens, "
                     f"{ev['skipped']} skipped", job_id=job.id, examples=ev["examples"],
                     tokens=ev["tokens"], skipped=ev["skipped"])
    elif kind == Event.PUBLISHED:
        published(ev, job, status)
    elif kind in (Event.CHECKPOINT, Event.RESUMED, Event.LOG, Event.INVALID, Event.SAVING):
        if kind == Event.SAVING:  # a checkpoint being written: what `status` and systemd show until it is done
            current["saving_step"] = ev.get("step")
        elif kind == Event.CHECKPOINT:
            current.pop("saving_step", None)
        msg = {Event.CHECKPOINT: f"checkpoint at step {ev.get('step')}",
               Event.RESUMED: f"resumed from {ev.get('checkpoint')} (step {ev.get('step')})",
               Event.INVALID: "input rejected by validation", Event.SAVING: f"saving at step {ev.get('step')}",
               }.get(kind, ev.get("message", ""))
        # A log event may carry its level (a skipped non-finite step is a warning).
        level = ev.get("level") or ("debug" if kind == Event.SAVING else "info")
        status.event(kind.value, f"job {job.id}: {msg}", level=level, job_id=job.id,
                     **{k: v for k, v in ev.items() if k not in ("event", "ts", "message", "level")})


def published(ev: dict, job: Job, status: StatusWriter) -> None:
    """The gate's verdict on a new version: event "published" when it became `latest`, "held" when it did not
    (hooks tell the two apart by kind). A trainer from before the gate says neither: its versions were promoted."""
    version, reason = ev.get("version"), ev.get("reason")
    held = ev.get("decision") == "held"
    latest = ev.get("latest", None if held else version)
    fields = {k: w for k, w in ev.items() if k not in ("event", "ts", "message", "level")}
    fields.update(job_id=job.id, adapter=job.adapter, version=version, decision="held" if held else "promoted",
                  reason=reason, latest=latest)
    if held:
        stays = f"v{latest}" if latest is not None else "none"
        status.event("held", f"job {job.id}: v{version} held: {reason or 'the promotion gate did not pass'}; "
                     f"latest stays {stays}", level="warning", **fields)
    else:
        status.event("published", f"job {job.id}: published version {version}, now latest"
                     + (f" ({reason})" if reason else ""), **fields)


def describe_event(ev: dict | None) -> str:
    """An event in a few words, for a stalled trainer's report: what it last said it was doing."""
    if ev is None:
        return "none: it never got past its imports"
    words = [str(ev.get("event"))]
    if ev.get("phase"):
        words.append(str(ev["phase"]))
    if ev.get("step") is not None:
        words.append(f"at step {ev['step']}" + (f"/{ev['total_steps']}" if ev.get("total_steps") else ""))
    if ev.get("message"):
        words.append(repr(str(ev["message"])[:200]))
    return " ".join(words)
