"""Where a training step's time goes: host (CPU) vs device, per op, for one model shape.

    python bench/profile_step.py --model smollm2-135m --steps 6 [--compile [--mode reduce-overhead]]
        [--chunk-elements 67108864,134217728]

Prints the per-micro-batch wall time of forward+loss+backward alone (no optimizer), the GPU busy share of it,
the top ops by host time and by device time, and the top Python functions by own time (cProfile). The loss is
the one the recipe runs (fused chunks when compiled); `--chunk-elements` first times it at each loss chunk size
(logits per chunk, loss.CHUNK_ELEMENTS), and profiles at the last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from daemon.trainer import compiled  # noqa: E402
from daemon.trainer import loss  # noqa: E402
from daemon.trainer import model as dm  # noqa: E402
from daemon.trainer import packing  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--compile", action="store_true", help="the compiled path (training.compile: true, fixed shape)")
    ap.add_argument("--mode", default=compiled.MODE, help="compiled.MODE with --compile: default | reduce-overhead")
    ap.add_argument("--chunk-elements", default="", help="comma list of loss.CHUNK_ELEMENTS values to time")
    args = ap.parse_args(argv)
    compiled.MODE = args.mode
    cfg = common.daemon_config(types.SimpleNamespace(micro_batch=8, lora_dropout=0.0), max_length=1024, steps=1,
                               overrides={"training": {"gradient_checkpointing": "false",
                                                       "compile": "true" if args.compile else "false"}})
    pm, _, plan = dm.prepare_model(common.build_model(args.model), None, cfg, "cuda")
    ex = common.synthetic_examples(2000, max_length=1024, seed=0)
    plan_mb = packing.plan_micro_batches([len(e.input_ids) for e in ex], token_budget=args.tokens, max_examples=8,
                                         packing=True, seed=0, epoch=0)
    batches = [packing.collate([ex[i] for i in mb], packing=True, pad_id=0) for mb in plan_mb[:args.steps + 3]]
    if plan.get("compile"):
        counts = [len(e.input_ids) for e in ex]
        shape = compiled.fixed_shape(counts, [plan_mb[:args.steps + 3]], token_budget=args.tokens, max_length=1024)
        batches = [packing.pad_fixed(b, **shape) for b in batches]

    # Gradients in buffers of their own, zeroed in place, as the recipe keeps them under CUDA graphs (step.py):
    # a .grad made by a graph's backward lives in its pool, which the next replay overwrites.
    for q in pm.parameters():
        if q.requires_grad:
            q.grad = torch.zeros_like(q)

    def step(b):
        pm.zero_grad(set_to_none=False)
        if plan.get("compile"):
            compiled.mark_step()
        b = {k: v.to("cuda", non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        loss.token_loss_sum(pm, b, fused=bool(plan.get("compile"))).backward()

    print(f"{args.model}: {plan}")
    for chunk in [int(c) for c in args.chunk_elements.split(",") if c] or [loss.CHUNK_ELEMENTS]:
        loss.CHUNK_ELEMENTS = chunk
        torch.cuda.reset_peak_memory_stats()
        for b in batches[:3]:
            step(b)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches[3:]:
            step(b)
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        print(f"loss chunk {chunk} logits ({loss._chunk_size(pm.config.vocab_size)} tokens): per micro-batch: "
              f"host {host / args.steps * 1e3:.1f} ms, wall {wall / args.steps * 1e3:.1f} ms, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    prof_busy = common.BusyProfiler(start_step=0, steps=1)
    prof_busy.step(0)
    for b in batches[3:]:
        step(b)
    prof_busy.step(1)
    print(f"GPU busy (kernels / wall): {prof_busy.busy_fraction():.1%}")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for b in batches[3:5]:
            step(b)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))

    pr = cProfile.Profile()
    pr.enable()
    for b in batches[3:]:
        step(b)
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
