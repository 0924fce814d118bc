"""Several small jobs through the real daemon: all dropped at once, timed until the last is published.

    python bench/parallel_jobs.py --model qwen2.5-1.5b --adapters 2 --files-per-adapter 2 \
        --variant one-after-another:gpus_per_job=all --variant side-by-side:gpus_per_job=1 --out parallel.json

For each variant (a set of top-level config keys, `NAME:KEY=VALUE[,KEY=VALUE]`) a fresh root and a fresh daemon
(`training_daemon.py run`) get the same files: `--adapters` adapters x `--files-per-adapter` files of
`--examples` text examples (seeded log-normal lengths around 300 tokens of a small word vocabulary), all renamed
into the inbox at once (a variant still running at `--timeout` is measured on the jobs that ended by then:
`ended`). Figures per variant: wall time from the drop to the last job's end, jobs per hour,
tokens trained per second of wall time over all jobs, each job's training tokens/s and when it started and
ended, the share of wall time in which at least one optimizer step was running (from when each trainer's first
step began, its first_step event less the step's own seconds, to its last progress event;
`share_of_wall_after_first_step` leaves the first step out, as figures before it was timed did), and the daemon's
GPU check after every job. For jobs that run one after another, each job's `gap_s`: its first optimizer step's end
minus the end of the job before it (the daemon's job_done/job_failed line, written once that job's trainer has
exited), `gap_to_step_began_s` the same to when that step began, and the variant's medians; with
`validated_s`, whether the next job was prepared before the GPU was free. The base model is random-weight in the
named shape, saved once (`--base PATH` uses an existing model folder instead, e.g. the tests' tiny model for a
CPU smoke run with `--variant two:max_parallel_jobs=2`).

No gap between jobs (issue 14 item 2: the next job's trainer imports, validates and tokenizes while a job
trains, and trains once the GPU is free; daemon/supervisor/standby.py), before and after in one call, on the
common case of one adapter's files dropped back to back:

    python bench/parallel_jobs.py --model qwen2.5-1.5b --adapters 1 --files-per-adapter 20 --examples 200 \
        --variant before:trainer_prestart=false --variant after:trainer_prestart=true --out no-gap.json

Compare `gap_s_median`, `share_of_wall_in_steps` and `jobs_per_hour` of the two variants (targets: a gap <= 3 s,
>= 50% of wall time in optimizer steps).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
from bench.daemon_e2e import EventTail  # noqa: E402


def write_files(folder: Path, adapters: int, per_adapter: int, examples: int, seed: int, words: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    for f in range(per_adapter):
        for a in range(adapters):
            lengths = np.clip(rng.lognormal(np.log(words) - 0.245, 0.7, examples).astype(int), 4, 3 * words)
            lines = [json.dumps({"text": " ".join(f"w{w}" for w in rng.integers(0, 1000, n))}) for n in lengths]
            path = folder / f"{f:02d}-{a:02d}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            files.append(path)
    return files


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, keys = text.partition(":")
    return name, {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in keys.split(",") if item)}


def run_variant(args, name: str, keys: dict, files: list[Path], base: Path) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"td-par-{name}-"))
    (root / "config").mkdir(parents=True)
    cfg = {"base_model": str(base), "intake": {"settle_seconds": 0.2, "rescan_seconds": 1, "duplicate_policy": "train"},
           "training": {"max_length": args.max_length, "micro_batch_size": args.micro_batch, "epochs": 1,
                        "gradient_accumulation": 1, "eval_fraction": 0.0, "checkpoint_every_steps": 1000,
                        "learning_rate": 1e-4},
           "status": {"progress_every_steps": 1, "web": {"enabled": False}}, **keys}
    config = root / "config" / "daemon.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, TRAINING_DAEMON_LOG_LEVEL="debug")
    daemon = subprocess.Popen([sys.executable, str(PROJECT / "training_daemon.py"), "run", "--root", str(root),
                               "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=env)
    events_path = root / "events.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (root / "status.json").exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"{name}: the daemon did not start")
            time.sleep(0.1)
        time.sleep(args.settle)  # let the early trainer (if any) finish its imports, as an idle daemon would
        inbox = root / "inbox"
        for a in range(args.adapters):
            (inbox / f"a{a}").mkdir(exist_ok=True)  # inbox/<adapter>/<file> trains <adapter>
        time.sleep(2)  # the new folders are seen before the files
        t_drop = time.time()
        for i, path in enumerate(files):
            folder = inbox / f"a{i % args.adapters}"
            part = folder / f".{path.name}.part"
            part.write_bytes(path.read_bytes())
            os.rename(part, folder / path.name)
        done_kinds = ("job_done", "job_failed")
        deadline = time.monotonic() + args.timeout
        tail = EventTail(events_path)  # events carry whole seconds: each is stamped when this process sees it
        while True:
            tail.poll()
            events = tail.events
            ended = [e for e in events if e.get("event") in done_kinds]
            checks = [e for e in events if e.get("event") == "gpu_memory"]
            if len(ended) >= len(files) and len(checks) >= len(files):
                break
            if time.monotonic() > deadline:  # what ended so far is still a measurement: jobs/hour from it
                print(f"{name}: {len(ended)} of {len(files)} jobs ended in {args.timeout}s", file=sys.stderr)
                break
            time.sleep(0.05)
        t_end = max((_unix(e) for e in ended), default=time.time())
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
    return summarise(name, keys, root, events, t_drop, t_end, len(files))


def _unix(event: dict) -> float:
    return event["seen_unix"]


def summarise(name, keys, root, events, t_drop, t_end, n_files) -> dict:
    jobs: dict[int, dict] = {}
    for e in events:
        jid = e.get("job_id")
        if jid is None:
            continue
        j = jobs.setdefault(jid, {"job_id": jid, "adapter": e.get("adapter")})
        kind = e.get("event")
        if kind == "job_started":
            j.setdefault("started_s", round(_unix(e) - t_drop, 2))
        elif kind == "first_step":
            j.setdefault("first_step_s", round(_unix(e) - t_drop, 2))
            if e.get("seconds") is not None:  # the step's own duration: when the GPU began training
                j.setdefault("first_step_began_s", round(_unix(e) - e["seconds"] - t_drop, 2))
        elif kind == "validated":
            j.setdefault("validated_s", round(_unix(e) - t_drop, 2))
        elif kind == "gpu_go":
            j.setdefault("gpu_go_s", round(_unix(e) - t_drop, 2))
        elif kind == "progress":
            j["last_progress_s"] = round(_unix(e) - t_drop, 2)
            j.setdefault("tokens_per_s", []).append(e.get("tokens_per_s"))
        elif kind in ("job_done", "job_failed"):
            j["ended_s"], j["ok"] = round(_unix(e) - t_drop, 2), kind == "job_done"
        elif kind == "gpu_memory":
            j["gpu_check"] = e.get("message")
        elif kind == "phase" and e.get("phase") == "waiting_for_gpu":
            j["cuda_initialized_while_waiting"] = bool(e.get("cuda_initialized"))
        elif kind == "log" and "CUDA was initialised before the go" in str(e.get("message")):
            j["cuda_initialized_before_go"] = True
    tokens = 0
    for meta in root.glob("checkpoints/*/v*/metadata.json"):
        m = json.loads(meta.read_text())
        tokens += m.get("tokens_trained") or 0
        if m.get("job_id") in jobs:
            jobs[m["job_id"]]["seconds"] = m.get("seconds")  # the trainer's own laps (daemon/trainer/timings.py)
            jobs[m["job_id"]]["compile"] = (m.get("plan") or {}).get("compile")
            jobs[m["job_id"]]["lora_attached"] = (m.get("plan") or {}).get("lora_attached")
    for j in jobs.values():
        tps = [t for t in j.pop("tokens_per_s", []) if t]
        j["tokens_per_s_median"] = sorted(tps)[len(tps) // 2] if tps else None
        if "ended_s" in j and "last_progress_s" in j:
            j["after_last_step_s"] = round(j["ended_s"] - j["last_progress_s"], 2)
    laps: dict[str, list[float]] = {}
    for j in jobs.values():
        for lap, took in (j.get("seconds") or {}).items():
            laps.setdefault(lap, []).append(took)
    # Seconds in which some optimizer step ran: the union of [first step began, last progress] over the jobs
    # (the first step's own time counted; older trainers say only when it ended); and, comparable with figures
    # taken before the first step's duration was known, the union from the first step's end.
    # Spans end at the end of the measured wall time (a variant cut off at --timeout has jobs still training).
    end = t_end - t_drop
    timed = [j for j in jobs.values() if "first_step_s" in j and "last_progress_s" in j]
    busy = union_seconds([(j.get("first_step_began_s", j["first_step_s"]), j["last_progress_s"]) for j in timed],
                         end)
    busy_after_first = union_seconds([(j["first_step_s"], j["last_progress_s"]) for j in timed], end)
    gaps = gaps_between(list(jobs.values()))
    began_gaps = [j["gap_to_step_began_s"] for j in jobs.values() if "gap_to_step_began_s" in j]
    wall = t_end - t_drop
    n_ended = sum("ended_s" in j for j in jobs.values())
    return {"variant": name, "config": keys, "root": str(root), "files": n_files, "ended": n_ended,
            "wall_s": round(wall, 2), "jobs_per_hour": round(n_ended / wall * 3600, 1), "tokens_trained": tokens,
            "tokens_per_s_wall": round(tokens / wall, 1), "share_of_wall_in_steps": round(busy / wall, 3),
            "share_of_wall_after_first_step": round(busy_after_first / wall, 3),
            "gap_s_median": round(float(np.median(gaps)), 2) if gaps else None,
            "gap_to_step_began_s_median": round(float(np.median(began_gaps)), 2) if began_gaps else None,
            "gap_s_max": round(max(gaps), 2) if gaps else None,
            "seconds_median": {lap: round(float(np.median(v)), 3) for lap, v in laps.items()},
            "after_last_step_s_median": _median([j.get("after_last_step_s") for j in jobs.values()]),
            "all_ok": all(j.get("ok") for j in jobs.values()) and n_ended == n_files,
            "cuda_before_go": sum(bool(j.get("cuda_initialized_while_waiting") or j.get("cuda_initialized_before_go"))
                                  for j in jobs.values()),
            "lora_attached_early": sum(j.get("lora_attached") == "while waiting for the GPU" for j in jobs.values()),
            "jobs": sorted(jobs.values(), key=lambda j: j["job_id"])}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 2) if values else None


def union_seconds(spans: list[tuple[float, float]], until: float = float("inf")) -> float:
    """Seconds up to `until` covered by at least one of the [start, end] spans."""
    busy, cur = 0.0, None
    for a, b in sorted((a, min(b, until)) for a, b in spans if a < until):
        if cur is None or a > cur[1]:
            busy += (cur[1] - cur[0]) if cur else 0.0
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return busy + ((cur[1] - cur[0]) if cur else 0.0)


def gaps_between(jobs: list[dict]) -> list[float]:
    """Each job's `gap_s` (set on it): its first step minus the end of the job before it, where jobs ran one
    after another (the one before had ended when this one's first step came; side by side, no gap is set).
    Also `prepared_before_free`: the job was validated before the job before it ended. Returns the gaps."""
    order = sorted((j for j in jobs if "first_step_s" in j), key=lambda j: j["first_step_s"])
    gaps = []
    for prev, job in zip(order, order[1:]):
        if prev.get("ended_s") is None or prev["ended_s"] > job["first_step_s"]:
            continue
        job["gap_s"] = round(job["first_step_s"] - prev["ended_s"], 2)
        if "first_step_began_s" in job:
            job["gap_to_step_began_s"] = round(job["first_step_began_s"] - prev["ended_s"], 2)
        if job.get("validated_s") is not None:
            job["prepared_before_free"] = job["validated_s"] < prev["ended_s"]
        gaps.append(job["gap_s"])
    return gaps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b", help="a shape of bench/common.py, saved with random weights")
    ap.add_argument("--base", type=Path, help="an existing model folder instead of --model")
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--files-per-adapter", type=int, default=2)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--words", type=int, default=300, help="mean words per example (log-normal)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--variant", action="append", required=True, help="NAME:KEY=VALUE[,KEY=VALUE] (top-level keys)")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds between the daemon's start and the drop")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="td-par-data-"))
    if args.base:
        base = args.base.resolve()
    else:
        from bench import common

        base = common.save_random_model(args.model, work / "base")
        # bench/common's word-level tokenizer encodes ordinary text to nothing, which the daemon's validation rightly
        # refuses: the tests' byte-level BPE (with a chat template) stands in for the model's own.
        sys.path.insert(0, str(PROJECT / "tests"))
        from tiny_model import build_tokenizer

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (base / name).unlink(missing_ok=True)
        build_tokenizer().save_pretrained(base)
    files = write_files(work, args.adapters, args.files_per_adapter, args.examples, seed=0, words=args.words)
    results = {"model": str(args.base or args.model), "adapters": args.adapters,
               "files_per_adapter": args.files_per_adapter, "examples_per_file": args.examples, "variants": []}
    for text in args.variant:
        name, keys = parse_variant(text)
        results["variants"].append(run_variant(args, name, keys, files, base))
        print(json.dumps({k: v for k, v in results["variants"][-1].items() if k != "jobs"}), flush=True)
    first = results["variants"][0]
    for v in results["variants"][1:]:
        v["wall_speedup_vs_first"] = round(first["wall_s"] / v["wall_s"], 2)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if all(v["all_ok"] for v in results["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
