"""Multi-GPU scaling: tokens/s of the daemon's trainer on 1, 2, 4 ... GPUs, the same job on each.

    python bench/scaling.py --gpus 1,2,4 --models qwen2.5-1.5b,llama-3.1-8b --out bench/results/scaling.json

For each model and GPU count the ranks are started by the daemon's own launcher (daemon/supervisor/launch.py: the
environment torchrun would give, one process group) and each runs LoRARecipe.setup/train on a random-weight
model of the named shape, as bench/run.py does on one GPU. The job is fixed, not the per-GPU work: the same
synthetic data and the same effective batch (--micro-batch x --accumulation micro-batches of --max-length
tokens per optimizer step) whatever the count, so N GPUs each train accumulation/N micro-batches per step.
Figures: real (non-pad) tokens/s over all GPUs between step --warmup and the last, tokens/s per GPU, scaling
efficiency (tokens/s on N / (N x tokens/s on 1)), MFU per GPU (4 x matmul params per token over the bf16
matmul rate rank 0 measures after its run), rank 0's peak memory, and the plan (FSDP or not, micro-batch).
`--device cpu` runs the same plumbing with gloo processes on a tiny shape (`--models tiny`): a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
from bench import common  # noqa: E402

common.SHAPES.setdefault("tiny", ("llama", dict(vocab_size=32768, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                tie_word_embeddings=False, max_position_embeddings=4096)))


def worker(args) -> None:
    """One rank: train, time it, and (rank 0) print one JSON line."""
    import torch

    from daemon.trainer.recipe import LoRARecipe

    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    cfg = common.daemon_config(types.SimpleNamespace(micro_batch=args.micro_batch, lora_dropout=0.0),
                               max_length=args.max_length, steps=args.steps)
    cfg.training.gradient_accumulation = args.accumulation
    if args.fsdp:
        cfg.training.fsdp = "true"
    examples = common.synthetic_examples(args.examples, max_length=args.max_length, seed=0)
    marks: dict = {}
    recipe = None

    def emit(event: dict) -> None:
        if event.get("event") != "progress" or event["step"] not in (args.warmup, args.steps):
            return
        if cuda:
            torch.cuda.synchronize()
        key = "0" if event["step"] == args.warmup else "1"
        marks["t" + key], marks["tok" + key] = time.perf_counter(), recipe.progress.tokens_seen

    recipe = LoRARecipe(cfg, emit=emit)
    model = common.build_model(args.model, device=f"cuda:{local}" if cuda else "cpu")
    recipe.setup(examples, [], model=model, tokenizer=common.FakeTokenizer())
    n_matmul = common.matmul_params(recipe.accelerator.unwrap_model(recipe.model))
    recipe.train()
    if not recipe.world.is_main:
        return
    out = {"model": args.model, "gpus": recipe.world.size, "max_length": args.max_length, "plan": recipe.plan,
           "micro_batch_size": recipe.micro_batch_size, "accumulation": recipe.accum, "matmul_params": n_matmul,
           "peak_gib": torch.cuda.max_memory_allocated() / common.GIB if cuda else None,
           **(recipe.memory_report() if cuda else {})}  # the card's (NVML) peak of rank 0 beside the allocator's
    if "t1" in marks:
        out["tokens_per_s"] = (marks["tok1"] - marks["tok0"]) / (marks["t1"] - marks["t0"])
        out["step_s"] = (marks["t1"] - marks["t0"]) / (args.steps - args.warmup)
    if cuda:
        out["matmul_tflops"] = common.matmul_tflops()
    print(json.dumps(out, default=str), flush=True)


def run(args, model: str, n: int) -> dict:
    """Start n ranks of `worker` through the daemon's launcher; rank 0's JSON line, or what went wrong."""
    from daemon.supervisor import gpu
    from daemon.supervisor import launch

    if args.device == "cuda":
        visible = gpu.visible_devices()
        if visible is None:  # no NVML (pynvml missing): ask torch, which counts without starting CUDA
            import torch

            visible = [str(i) for i in range(torch.cuda.device_count())]
        grant = launch.grant(n, 1, visible)
        if grant.devices is None:
            raise RuntimeError("no GPU visible")
    else:
        grant = launch.grant("all", n, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--examples", str(args.examples),
           "--max-length", str(args.max_length), "--micro-batch", str(args.micro_batch),
           "--accumulation", str(args.accumulation)] + (["--fsdp"] if args.fsdp else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as logs:
        ranks = launch.start(cmd, grant, env, Path(logs), pass_fds=(), cwd=PROJECT)
        lines = ranks.stdout.read().decode(errors="replace").splitlines()
        rc = ranks.wait()
        log = (Path(logs) / "trainer.log").read_text(errors="replace")
    results = [json.loads(line) for line in lines if line.startswith("{")]
    if rc != 0 or not results:
        return {"model": model, "gpus": n, "error": f"exit status {rc}: {log[-2000:]}"}
    return results[-1]


def table(runs: list[dict]) -> str:
    lines = ["| model | GPUs | tokens/s | per GPU | scaling efficiency | MFU per GPU | peak GiB (rank 0) | plan |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    single = {r["model"]: r["tokens_per_s"] for r in runs if r.get("gpus") == 1 and r.get("tokens_per_s")}
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['gpus']} | {r['error'].splitlines()[0][:80]} | | | | | |")
            continue
        tps, n = r.get("tokens_per_s", 0.0), r["gpus"]
        eff = f"{tps / (n * single[r['model']]):.0%}" if single.get(r["model"]) else ""
        mfu = (f"{tps / n * 4 * r['matmul_params'] / (r['matmul_tflops'] * 1e12):.1%}"
               if r.get("matmul_tflops") else "")
        plan = r.get("plan") or {}
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else ""
        lines.append(f"| {r['model']} | {n} | {tps:,.0f} | {tps / n:,.0f} | {eff} | {mfu} | {peak} | "
                     f"mb {r['micro_batch_size']} x {r['accumulation']} per step over all GPUs, "
                     f"ckpt {plan.get('gradient_checkpointing')}, fsdp {plan.get('fsdp')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts (processes with --device cpu)")
    ap.add_argument("--models", default="qwen2.5-1.5b,llama-3.1-8b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run (timed after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step, over all GPUs")
    ap.add_argument("--fsdp", action="store_true", help="shard the base with FSDP (training.fsdp: true)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for model in [m for m in args.models.split(",") if m]:
        for n in [int(g) for g in args.gpus.split(",") if g]:
            try:
                r = run(args, model, n)
            except Exception as e:  # e.g. more GPUs asked for than there are: say so, go on with the rest
                r = {"model": model, "gpus": n, "error": f"{type(e).__name__}: {e}"}
            results["runs"].append(r)
            print(json.dumps(r, default=str), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results["runs"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
