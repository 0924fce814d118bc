"""Does replay keep an adapter from forgetting? Issue 11's measurement 6(b), on the embedded SmolLM2-135M-Instruct.

Teach fact A (the demo's: the capital of the planet Zorblax is Quintara), then, in continue mode, an unrelated fact
B of the same shape (the capital of the planet Vexolia is Marrowind), once per replay_fraction. Everything runs
through the real daemon (`run --once`), so the figures are the ones its judging writes into metadata.json: fact A's
probe answer (greedy), fact B's, the control question's, and the standing-set loss (the pool: fact A's held-out
split) of the new version and of v1 measured in the same process.

    .venv/bin/python bench/replay_forgetting.py                 # fractions 0, 0.2, 0.5 (about 10 min on 2 CPU cores)
    .venv/bin/python bench/replay_forgetting.py --fractions 0 0.2 --out bench/results/x.json

Writes bench/results/replay-forgetting-cpu.json and prints a markdown table (docs/trust.md has the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
FACT_A = PROJECT / "examples" / "made_up_fact.jsonl"
QUESTIONS = json.loads((PROJECT / "examples" / "questions.json").read_text())
PROBE_A = {"prompt": QUESTIONS["probe"]["question"], "expect": QUESTIONS["probe"]["expected"]}
PROBE_B = {"prompt": "What is the capital of the planet Vexolia?", "expect": "Marrowind"}
CONTROL = {"prompt": QUESTIONS["control"]["question"], "expect": QUESTIONS["control"]["expected"]}


def fact_b() -> bytes:
    """Fact A's file with another planet and capital: the same shape, an unrelated fact (the control lines stay)."""
    text = FACT_A.read_text()
    for old, new in (("Zorblax", "Vexolia"), ("zorblax", "vexolia"), ("Quintara", "Marrowind")):
        text = text.replace(old, new)
    return text.encode()


def config(replay_fraction: float) -> dict:
    """config/demo.yaml's training (12 steps of fact A), in continue mode, judged with the three probes."""
    cfg = yaml.safe_load((PROJECT / "config" / "demo.yaml").read_text())
    cfg["training"].update(mode="continue", eval_fraction=0.2, eval_max_examples=6)
    cfg["versions"] = {"replay_fraction": replay_fraction, "probes": [PROBE_A, PROBE_B, CONTROL],
                       "probe_max_new_tokens": 24}
    return cfg


def run_once(root: Path, cfg: dict, name: str, data: bytes) -> dict:
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "config" / "daemon.yaml").write_text(yaml.safe_dump(cfg))
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    (root / "inbox" / f".{name}.tmp").write_bytes(data)
    os.rename(root / "inbox" / f".{name}.tmp", root / "inbox" / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(PROJECT / "training_daemon.py"), "run", "--once", "--root", str(root)],
                       capture_output=True, text=True, env=env, cwd=root)
    if r.returncode != 0:
        raise SystemExit(f"run --once failed in {root}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    adapter = root / "checkpoints" / "default"
    newest = max(int(p.name[1:]) for p in adapter.glob("v*") if p.name[1:].isdigit())
    meta = json.loads((adapter / f"v{newest}" / "metadata.json").read_text())
    return {"version": newest, "seconds": round(time.monotonic() - t0, 1), "meta": meta}


def row(fraction: float, result: dict) -> dict:
    meta = result["meta"]
    judged, probes = meta["judgement"], {p["prompt"]: p for p in meta["judgement"]["probes"]}
    return {"replay_fraction": fraction, "version": result["version"], "seconds": result["seconds"],
            "replayed_examples": meta["replay"]["examples"], "examples_trained": meta["examples_trained"],
            "standing_set": judged["standing_set"],
            "standing_eval_loss": judged["new"]["standing_eval_loss"],
            "v1_standing_eval_loss": judged["incumbent"]["standing_eval_loss"],
            "own_eval_loss": judged["new"]["own_eval_loss"],
            "fact_a_answer": probes[PROBE_A["prompt"]]["answer"], "fact_a_ok": probes[PROBE_A["prompt"]]["passed"],
            "fact_a_answer_v1": probes[PROBE_A["prompt"]]["incumbent_answer"],
            "fact_b_answer": probes[PROBE_B["prompt"]]["answer"], "fact_b_ok": probes[PROBE_B["prompt"]]["passed"],
            "control_answer": probes[CONTROL["prompt"]]["answer"], "control_ok": probes[CONTROL["prompt"]]["passed"],
            "decision": meta["promotion"]["decision"], "reason": meta["promotion"]["reason"]}


def table(rows: list[dict]) -> str:
    out = ["| replay_fraction | replayed | standing loss v2 (v1) | fact A answer (A ok) | fact B ok | control ok | "
           "gate |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['replay_fraction']} | {r['replayed_examples']} | {r['standing_eval_loss']:.3f} "
                   f"({r['v1_standing_eval_loss']:.3f}) | {r['fact_a_answer']!r} ({r['fact_a_ok']}) | {r['fact_b_ok']} "
                   f"| {r['control_ok']} | {r['decision']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    ap.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" / "replay-forgetting-cpu.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="replay-forgetting-"))
    try:
        first = run_once(work / "a", config(0.0), "fact_a.jsonl", FACT_A.read_bytes())
        v1 = first["meta"]
        result = {"model": "embedded:smollm2-135m-instruct", "device": v1["device"], "libraries": v1["libraries"],
                  "config": config(0.2), "fact_a_v1": {p["prompt"]: p["answer"] for p in v1["judgement"]["probes"]},
                  "v1_seconds": first["seconds"], "rows": []}
        for f in args.fractions:
            root = work / f"b-{f}"
            shutil.copytree(work / "a", root, symlinks=True)
            result["rows"].append(row(f, run_once(root, config(f), "fact_b.jsonl", fact_b())))
            result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each row: a long run shows progress
            print(json.dumps(result["rows"][-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result["rows"]))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
