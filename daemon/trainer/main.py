"""The trainer child: `python -m daemon.trainer.main JOB_DIR --root ROOT`.

It validates the job's file, trains, and publishes a version, reporting on stdout as JSON lines; the exit
status (daemon/protocol.py) says how it ended. The daemon starts it in its own process group; it dies with
the daemon (PR_SET_PDEATHSIG, set by the daemon, and a lifeline pipe whose EOF means the daemon is gone).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from daemon import durable, faults
from daemon import protocol
from daemon import versions as publish
from daemon.paths import Layout

_stop = threading.Event()


def emit(event: dict) -> None:
    event.setdefault("ts", time.time())
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def watch_lifeline(fd: int) -> None:
    """Exit at once when the daemon's end of the pipe closes: no trainer runs unsupervised."""
    def run():
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        os._exit(protocol.DAEMON_GONE)

    threading.Thread(target=run, daemon=True, name="lifeline").start()


def die_with_parent(parent_pid: int | None) -> None:
    """PR_SET_PDEATHSIG: the kernel kills us when the daemon dies; the pid check closes the race before it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(protocol.DAEMON_GONE)


def rank() -> int:
    """This process's rank among the job's processes (daemon/launch.py sets RANK; one process: 0)."""
    return int(os.environ.get("RANK", "0"))


def write_error(job_dir: Path, kind: str, message: str) -> None:
    error = {"kind": kind, "message": message, "traceback": traceback.format_exc(), "at": now_iso()}
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        durable.write_json(job_dir / "error.json", error)
        return
    # Several ranks: the first to fail tells the cause (the daemon removed the last attempt's file). A peer that
    # fails after it, in a collective with the rank that is gone, only has the consequence to tell.
    tmp = job_dir / f".error.json.rank{rank()}"
    durable.write_json(tmp, error)
    try:
        os.link(tmp, job_dir / "error.json")
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def wait_for_job() -> tuple[dict | None, Exception | None]:
    """Standby: pay for the imports (10-14 s on a GPU host) while the daemon waits for a file, then take the job
    the daemon writes on stdin as one JSON line. No CUDA here: the GPU stays untouched until the job starts.
    An import that fails is kept and returned with the job, so that the job's error.json tells it."""
    import_error = None
    try:
        import accelerate  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        from daemon.trainer import data
        from daemon.trainer import recipe  # noqa: F401
    except Exception as e:
        import_error = e
    try:
        import liger_kernel.transformers  # noqa: F401  (optional: the training path copes without it)
    except Exception:
        pass
    emit({"event": "standby", "pid": os.getpid()})
    line = sys.stdin.readline()
    if not line.strip():
        return None, None
    order = json.loads(line)
    # From here on this is an ordinary trainer for that job: its stderr goes to the job's trainer.log.
    log = os.open(Path(order["job_dir"]) / "trainer.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    os.dup2(log, 2)
    os.close(log)
    return order, import_error


def library_versions() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}


def split_eval(examples: list, training, seed: int) -> tuple[list, list]:
    """A held-out split: min(eval_max_examples, eval_fraction * n), chosen by seed, never the whole set."""
    import random

    n_eval = min(training.eval_max_examples, int(training.eval_fraction * len(examples)))
    if n_eval <= 0 or len(examples) - n_eval < 1:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def choose_parent(cfg, adapter_dir: Path, base_dir: Path, resumed_parent: int | None) -> tuple[int | None, str | None]:
    """mode continue: the adapter's latest version (same base model), else train from the base."""
    if resumed_parent is not None:
        return resumed_parent, None
    if cfg.training.mode != "continue":
        return None, None
    latest = publish.latest_version(adapter_dir)
    if latest is None:
        return None, None
    meta = publish.read_metadata(adapter_dir, latest)
    if meta.get("base_model_path") and Path(meta["base_model_path"]) != base_dir:
        return None, (f"latest version v{latest} was trained on {meta['base_model_path']}, not {base_dir}: "
                      "training from the base model instead")
    return latest, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m daemon.trainer.main")
    ap.add_argument("job_dir", type=Path, nargs="?")
    ap.add_argument("--standby", action="store_true",
                    help="import the training stack, then wait for a job on stdin (daemon/standby.py)")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--lifeline-fd", type=int)
    ap.add_argument("--parent-pid", type=int, help="the daemon's pid: exit if it is already gone")
    ap.add_argument("--micro-batch", type=int, help="override after an out-of-memory retry")
    args = ap.parse_args(argv)
    die_with_parent(args.parent_pid)
    if args.lifeline_fd is not None:
        watch_lifeline(args.lifeline_fd)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: _stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides what a Ctrl-C means
    import_error = None
    if args.standby:
        order, import_error = wait_for_job()
        if order is None:
            return protocol.DONE  # the daemon closed our stdin: no job for us
        args.job_dir, args.micro_batch = Path(order["job_dir"]), order.get("micro_batch")
    elif args.job_dir is None:
        ap.error("JOB_DIR is required without --standby")
    job_dir, layout = args.job_dir.resolve(), Layout.at(args.root)
    try:
        if import_error is not None:
            raise import_error  # the job learns why its trainer cannot train, in its own error.json
        return run(job_dir, layout, args.micro_batch)
    except Exception as e:  # the last line of defence: the daemon gets the full traceback, never a truncated one
        # ENOSPC can come from anywhere (a library's save, report.json, the warm stop's checkpoint): it is a
        # full disk, not a bug. DiskFull is the free-space floor's own exception (checkpoint.py).
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or type(e).__name__ == "DiskFull"
        try:
            write_error(job_dir, "disk_full" if full else "error", f"{type(e).__name__}: {e}")
        except OSError:
            pass  # the disk itself may be the problem: the exit status still tells the daemon
        traceback.print_exc()
        return protocol.DISK_FULL if full else protocol.FAILED


def run(job_dir: Path, layout: Layout, micro_batch: int | None) -> int:
    from daemon.config import from_dict

    job = json.loads((job_dir / "job.json").read_text())
    job_id, adapter = job["id"], job["adapter"]
    adapter_dir = layout.adapter_dir(adapter)
    done_version = publish.find_version_of_job(adapter_dir, job_id)
    if done_version is not None and rank() > 0:
        return protocol.DONE
    if done_version is not None:  # published before a crash: finish the job, do not train twice
        publish.repair_latest(adapter_dir)
        durable.write_json(job_dir / "result.json", {"version": done_version,
                                                     "path": str(adapter_dir / f"v{done_version}"), "recovered": True})
        emit({"event": "published", "version": done_version, "path": str(adapter_dir / f"v{done_version}")})
        return protocol.DONE

    snapshot = json.loads((job_dir / "config.json").read_text())
    cfg = from_dict(snapshot)
    if micro_batch and micro_batch < cfg.training.micro_batch_size:
        # After an out-of-memory retry: a smaller micro-batch, more accumulation, the same effective batch.
        cfg.training.gradient_accumulation *= cfg.training.micro_batch_size // micro_batch
        cfg.training.micro_batch_size = micro_batch
    faults.set_context(micro_batch=cfg.training.micro_batch_size, job_id=job_id)
    started_at = now_iso()

    from daemon.config import resolve_base_model

    base_dir = resolve_base_model(cfg.base_model)
    emit({"event": "phase", "phase": "validating"})
    faults.check("validate")
    from transformers import AutoTokenizer

    from daemon.trainer.data import validate_file

    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=cfg.trust_remote_code)
    t = cfg.training
    report = validate_file(job_dir / "input.jsonl", tokenizer, max_length=t.max_length,
                           max_line_bytes=cfg.intake.max_line_bytes, train_on_inputs=t.train_on_inputs,
                           too_long=t.too_long, min_examples=t.min_examples, keep_examples=True)
    report.file = job["original_name"]  # the user's name for it, not the job folder's copy
    if rank() == 0:  # every rank validates the same file alike
        durable.write_json(job_dir / "report.json", report.to_dict())
    if not report.ok:
        durable.write_json(job_dir / "error.json", {"kind": "bad_input", "message": report.render(), "at": now_iso()})
        emit({"event": "invalid", "message": report.render()})
        return protocol.BAD_INPUT
    emit({"event": "validated", "examples": report.examples, "tokens": report.tokens, "skipped": report.skipped})
    if _stop.is_set() and "WORLD_SIZE" not in os.environ:  # ranks agree on a stop only once they can talk (recipe)
        return protocol.STOPPED

    train_ex, eval_ex = split_eval(report.examples_list, t, t.seed)
    from daemon.trainer import checkpoint
    from daemon.trainer import distributed
    import torch

    from daemon.trainer.recipe import Diverged, LoRARecipe, StopRequested

    resumed_parent = None
    found = checkpoint.complete_checkpoints(job_dir / "resume")
    if found:
        resumed_parent = json.loads((found[0] / "progress.json").read_text()).get("parent_version")
    parent, note = choose_parent(cfg, adapter_dir, base_dir, resumed_parent)
    if note:
        emit({"event": "log", "message": note})
    emit({"event": "phase", "phase": "loading"})
    faults.check("load")
    checkpoint.check_free_space(job_dir, cfg.limits.min_free_disk_mb)
    recipe = LoRARecipe(cfg, emit=emit, job_dir=job_dir, stop_flag=_stop.is_set)
    try:
        recipe.setup(train_ex, eval_ex, base_dir=base_dir,
                     adapter_dir=adapter_dir / f"v{parent}" if parent else None, config_snapshot=snapshot)
        recipe.progress.parent_version = parent
        emit({"event": "phase", "phase": "training", "total_steps": recipe.progress.total_steps,
              "examples": len(train_ex), "eval_examples": len(eval_ex), "plan": recipe.plan})
        recipe.train()
    except StopRequested:
        emit({"event": "phase", "phase": "saving"})
        recipe.save_checkpoint()
        distributed.shutdown()
        return protocol.STOPPED
    except Diverged as e:
        write_error(job_dir, "diverged", str(e))
        return protocol.BAD_INPUT
    except torch.OutOfMemoryError as e:
        write_error(job_dir, "out_of_memory", f"out of memory at micro-batch {cfg.training.micro_batch_size}: {e}")
        return protocol.OUT_OF_MEMORY
    except checkpoint.DiskFull as e:
        write_error(job_dir, "disk_full", str(e))
        return protocol.DISK_FULL

    if not recipe.world.is_main:  # rank 0 publishes; a sharded adapter needs every rank to gather it
        recipe.save_adapter(None)
        recipe.cleanup()
        distributed.shutdown()
        return protocol.DONE
    emit({"event": "phase", "phase": "saving"})
    faults.check("publish")
    try:
        version, path = publish_version(recipe, cfg, job, adapter_dir, base_dir, parent, report, started_at, len(eval_ex))
    except checkpoint.DiskFull as e:
        write_error(job_dir, "disk_full", str(e))
        return protocol.DISK_FULL
    durable.write_json(job_dir / "result.json", {"version": version, "path": str(path), **recipe.summary()})
    emit({"event": "published", "version": version, "path": str(path)})
    recipe.cleanup()
    distributed.shutdown()
    return protocol.DONE


def publish_version(recipe, cfg, job, adapter_dir, base_dir, parent, report, started_at, n_eval):
    import shutil

    import torch

    from daemon.trainer import checkpoint

    checkpoint.check_free_space(adapter_dir.parent, cfg.limits.min_free_disk_mb)
    staged = publish.staging_dir(adapter_dir, job["id"])
    try:
        recipe.save_adapter(staged)
        summary = recipe.summary()
        p = recipe.progress
        loss_plot = None
        try:
            from daemon.trainer.plots import plot_loss

            plot_loss(p.losses, p.evals, staged / "loss.png", f"{job['adapter']} job {job['id']}")
            loss_plot = "loss.png"
        except ImportError:
            pass
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
        meta = {
            "adapter": job["adapter"], "parent_version": parent, "base_model": cfg.base_model,
            "base_model_path": str(base_dir), "job_id": job["id"], "source_file": job["original_name"],
            "source_sha256": job["sha256"], "examples_trained": len(report.examples_list) - n_eval,
            "eval_examples": n_eval, "examples_skipped": report.skipped, "examples_truncated": report.truncated,
            "tokens_trained": summary["tokens_trained"], "trainable_tokens_trained": summary["trainable_tokens_trained"],
            "epochs": cfg.training.epochs, "steps": summary["steps"],
            "first_train_loss": summary["first_train_loss"], "final_train_loss": summary["final_train_loss"],
            "eval_loss": summary["eval_loss"],
            "lora": cfg.lora.model_dump(), "optimizer": {"name": "adamw", "learning_rate": cfg.training.learning_rate,
                                                        "weight_decay": cfg.training.weight_decay,
                                                        "lr_scheduler": cfg.training.lr_scheduler,
                                                        "warmup_ratio": cfg.training.warmup_ratio,
                                                        "max_grad_norm": cfg.training.max_grad_norm,
                                                        "micro_batch_size": summary["micro_batch_size"],
                                                        "gradient_accumulation": summary["gradient_accumulation"]},
            "mode": cfg.training.mode, "started_at": started_at, "finished_at": now_iso(),
            "training_seconds": summary["training_seconds"], "device": device,
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if torch.cuda.is_available() else None,
            "plan": summary["plan"], "loss_plot": loss_plot, "libraries": library_versions(),
            "loss_history": p.losses, "eval_history": p.evals,
        }
        return publish.publish(adapter_dir, staged, meta)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


if __name__ == "__main__":
    code = main()
    # Python's own teardown (module finalisers, torch's atexit work) takes ~0.7 s and frees nothing that the
    # process exit does not: every file that matters was fsynced, the process group was left. Flush and go.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
