"""DPO beside SFT on one GPU: tokens/s and peak memory of the daemon's recipes on the same synthetic data.

    python bench/dpo_bench.py --model qwen2.5-1.5b --steps 30 --out bench/results/h200-dpo.json

The model is built from its config with random weights (bench/common.py's shapes: no downloads). SFT trains the
synthetic examples of bench/run.py (log-normal lengths, mean ~300 tokens, 30% prompt); DPO trains pairs made of
the same sequences, two by two, sharing the first one's prompt: the chosen answer is the first's, the rejected the
second's. Both run LoRARecipe / DPORecipe exactly as a job would (packing, chunked head, the memory plan), DPO
with its reference log-probs computed in setup (`setup_s`: DPO's minus SFT's is the reference pass). Tokens/s
counts every real token of the batch (chosen and rejected alike), timed from the progress events after --warmup
steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402


def preference_pairs(examples):
    from daemon.trainer.data import TokenizedExample
    from daemon.trainer.preference import PreferencePair

    out = []
    for a, b in zip(examples[0::2], examples[1::2]):
        prompt = a.labels.count(-100)
        chosen = TokenizedExample(list(a.input_ids), list(a.labels))
        answer = b.input_ids[b.labels.count(-100):]
        rejected = TokenizedExample(a.input_ids[:prompt] + answer, [-100] * prompt + answer)
        out.append(PreferencePair(chosen, rejected))
    return out


def run(method: str, name: str, args, data) -> dict:
    from daemon.trainer.dpo_recipe import DPORecipe
    from daemon.trainer.recipe import LoRARecipe

    common.reset_gpu(None)
    overrides = {"training": {"dpo_beta": 0.1}} if method == "dpo" else {}
    cfg = common.daemon_config(args, max_length=args.max_length, steps=args.steps, overrides=overrides)
    marks: dict = {}
    recipe = None

    def emit(event: dict) -> None:
        if event.get("event") != "progress":
            return
        if event["step"] in (args.warmup, args.steps):
            torch.cuda.synchronize()
            key = "0" if event["step"] == args.warmup else "1"
            marks["t" + key], marks["tok" + key] = time.perf_counter(), recipe.progress.tokens_seen
        marks["loss"], marks["reward_accuracy"] = event["loss"], event.get("reward_accuracy")

    recipe = (DPORecipe if method == "dpo" else LoRARecipe)(cfg, emit=emit)
    model = common.build_model(name, device="cuda")
    t_setup = time.perf_counter()
    recipe.setup(data, [], model=model, tokenizer=common.FakeTokenizer())
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - t_setup
    recipe.train()
    out = {"method": method, "model": name, "max_length": args.max_length, "plan": recipe.plan,
           "micro_batch_size": recipe.micro_batch_size, "accumulation": recipe.accum, "steps": args.steps,
           "setup_s": round(setup_s, 2), "final_loss": marks.get("loss"),
           "peak_gib": round(torch.cuda.max_memory_allocated() / common.GIB, 3)}
    if method == "dpo":
        out["pairs"] = len(data)
        out["final_reward_accuracy"] = marks.get("reward_accuracy")
    if "t1" in marks:
        out["tokens_per_s"] = round((marks["tok1"] - marks["tok0"]) / (marks["t1"] - marks["t0"]), 1)
        out["step_s"] = round((marks["t1"] - marks["t0"]) / (args.steps - args.warmup), 4)
    recipe.cleanup()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(common.SHAPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--examples", type=int, default=1200, help="SFT examples; DPO gets half as many pairs")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/dpo.json"))
    args = ap.parse_args(argv)

    examples = common.synthetic_examples(args.examples, max_length=args.max_length, seed=0)
    results = {"env": common.environment(), "args": vars(args) | {"out": str(args.out)}, "runs": []}
    for method, data in (("sft", examples), ("dpo", preference_pairs(examples))):
        r = run(method, args.model, args, data)
        results["runs"].append(r)
        print(json.dumps(r, default=str), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    sft, dpo_run = results["runs"]
    if "tokens_per_s" in sft and "tokens_per_s" in dpo_run:
        print(f"{args.model}: SFT {sft['tokens_per_s']:.0f} tok/s, {sft['peak_gib']:.2f} GiB; "
              f"DPO {dpo_run['tokens_per_s']:.0f} tok/s, {dpo_run['peak_gib']:.2f} GiB "
              f"(setup {sft['setup_s']} s vs {dpo_run['setup_s']} s: the reference pass)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
