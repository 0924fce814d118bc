"""GPU benchmark: the daemon's trainer against a reference HF Trainer + PEFT run, on the same synthetic data.

    python bench/run.py --models smollm2-135m,qwen2.5-1.5b,llama-3.1-8b --steps 30 --out bench.json

Models are built from config with random weights (the shapes of the named models: no downloads). Data:
seeded log-normal lengths (mean ~300 tokens, at most --max-length), random token ids, the first 30% of
each example masked as a prompt. For each model: (a) the daemon's own path, LoRARecipe.setup/train from
daemon/trainer/recipe.py (packing, loss, model prep, the memory plan), timed from its own progress events after
warm-up steps; (b) transformers.Trainer + PEFT (bf16, SDPA, padding to the longest in a batch of 8,
LoRA r16 on all linear layers). Figures: real (non-pad) tokens/s, MFU (4 x matmul params per token over a
bf16 matmul rate measured in this run), peak GPU memory, ratio (a)/(b); `--busy` adds the GPU busy fraction
of (a) from a profiler trace; `--cap-plan` runs llama-3.1-8b at max length 2048 under a 24 GiB cap and
`--qlora` the 4-bit plan of llama-3.1-8b under a 10 GiB cap (needs bitsandbytes).

Memory as the card sees it: every daemon run records the allocator's peak (`peak_gib`), its reserved peak
(`reserved_peak_gib`), the card's (NVML) peak of this process polled every 50 ms (`card_peak_gib`) and at the
recipe's progress events (`card_peak_sampled_gib`), and the plan's prediction (`plan.estimated_card_peak_gib`).
A cap (set_per_process_memory_fraction) stands for a card of that size: `--cap-plan` runs llama-3.1-8b at 2048
tokens under 24 GiB (bf16 base) and 16 GiB (a bf16 base does not fit: the 4-bit one, needs bitsandbytes) and
writes `caps` into the results: NVML peak against the cap (`within_cap`). The trainer's allocator runs with
expandable segments, as the daemon's does (daemon/trainer/card_memory.py); `--no-expandable` runs without.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from daemon.trainer import card_memory  # noqa: E402


def run_ours(name: str, args, examples, *, cap_gib: float | None = None, busy: bool = False,
             max_length: int | None = None, precision: str = "auto", quantized_dir: Path | None = None,
             overrides: dict | None = None, compile_mode: str | None = None, reset_dynamo: bool = True) -> dict:
    """The daemon's path; `overrides`: config settings of a variant ({"training": {"attention": "sdpa"}});
    `compile_mode`: compiled.MODE for a compiled run ("default" or "reduce-overhead"); `reset_dynamo`: False
    keeps Dynamo's in-process cache from an earlier run (what a second job of the same shape finds on disk is
    measured with True: the disk caches of Inductor stay)."""
    from daemon.trainer import compiled
    from daemon.trainer.recipe import LoRARecipe

    overrides = overrides or {}
    compiled.MODE = compile_mode or "default"
    if reset_dynamo:
        import torch._dynamo

        torch._dynamo.reset()
    common.reset_gpu(cap_gib)
    max_length = max_length or args.max_length
    cfg = common.daemon_config(args, max_length=max_length, steps=args.steps, precision=precision,
                               overrides=overrides)
    marks: dict = {}
    recipe = None
    prof = common.BusyProfiler(start_step=args.warmup, steps=min(10, args.steps - args.warmup)) if busy else None

    def emit(event: dict) -> None:
        if event.get("event") != "progress":
            return
        step = event["step"]
        if step == 1:  # the first step: Liger's Triton kernels, or the compile of the layers, happen here
            torch.cuda.synchronize()
            marks["first_step_s"] = time.perf_counter() - marks["train_start"]
        if step == args.warmup:
            torch.cuda.synchronize()
            marks["t0"], marks["tok0"] = time.perf_counter(), recipe.progress.tokens_seen
        if step == args.steps:
            torch.cuda.synchronize()
            marks["t1"], marks["tok1"] = time.perf_counter(), recipe.progress.tokens_seen
        marks["loss"] = event["loss"]
        if prof:
            prof.step(step)

    card = card_memory.for_device(0)
    card.reset_peak()
    try:
        with card_memory.Poller(card):
            recipe = LoRARecipe(cfg, emit=emit)
            if quantized_dir is not None:
                recipe.setup(examples, [], base_dir=quantized_dir)
            else:
                model = common.build_model(name, device="cuda")
                recipe.setup(examples, [], model=model, tokenizer=common.FakeTokenizer())
            n_matmul = common.matmul_params(recipe.accelerator.unwrap_model(recipe.model))
            marks["train_start"] = time.perf_counter()
            recipe.train()
            sampled = recipe.memory_report()  # what the progress events said (sampled at each one)
        if prof:
            prof.close()
        out = {"path": "daemon", "model": name, "max_length": max_length, "plan": recipe.plan,
               "micro_batch_size": recipe.micro_batch_size, "accumulation": recipe.accum,
               "matmul_params": n_matmul, "final_loss": marks.get("loss"),
               "peak_gib": torch.cuda.max_memory_allocated() / common.GIB,
               "reserved_peak_gib": torch.cuda.max_memory_reserved() / common.GIB,
               "card_peak_gib": None if card.peak is None else card.peak / common.GIB,
               "card_peak_sampled_gib": sampled.get("gpu_peak_card_gib"), "card_source": card.source,
               "allocator": sampled.get("allocator"), "cap_gib": cap_gib, "config": overrides,
               "first_step_s": marks.get("first_step_s"), "compile_mode": compile_mode,
               "compile_reason": (recipe.plan or {}).get("compile_reason")}
        if marks.get("first_step_s") is not None and "t1" in marks:
            # the first step's time beyond an ordinary step's: compile (or kernel build) seconds
            out["first_step_extra_s"] = marks["first_step_s"] - (marks["t1"] - marks["t0"]) / (args.steps - args.warmup)
        if "t1" in marks:
            out["tokens_per_s"] = (marks["tok1"] - marks["tok0"]) / (marks["t1"] - marks["t0"])
            out["step_s"] = (marks["t1"] - marks["t0"]) / (args.steps - args.warmup)
        if prof:
            out["gpu_busy"] = prof.busy_fraction()
        return out
    except torch.OutOfMemoryError as e:
        return {"path": "daemon", "model": name, "max_length": max_length, "error": f"OOM: {str(e)[:200]}",
                "cap_gib": cap_gib, "config": overrides,
                "card_peak_gib": None if card.peak is None else card.peak / common.GIB}
    except Exception as e:  # a variant that breaks must not end the whole benchmark
        import traceback

        traceback.print_exc()
        return {"path": "daemon", "model": name, "max_length": max_length, "config": overrides,
                "error": f"{type(e).__name__}: {str(e)[:200]}", "cap_gib": cap_gib}
    finally:
        if recipe is not None:
            recipe.cleanup()
        recipe = None  # the model's GPU memory goes back before the next run
        gc.collect()
        torch.cuda.empty_cache()


def run_reference(name: str, args, examples, *, gradient_checkpointing: bool = False, tuned: bool = False) -> dict:
    """transformers.Trainer + PEFT, as a user would write it: bf16, SDPA, pad to longest, batch 8.

    `tuned`: what a user gets by turning Liger on (issue 14's "tuned HF"): `TrainingArguments(use_liger_kernel=True)`
    (fused RMSNorm/SwiGLU/RoPE and the fused linear cross entropy, no full logits), every batch padded to max
    length (one shape), batch 8. Liger patches transformers' modules for the rest of the process: run it last."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    common.reset_gpu(None)
    model = common.build_model(name, device="cuda", attn="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    n_matmul = common.matmul_params(model)
    counter = {"tokens": 0}

    collate = common.padded_collate(counter, args.max_length if tuned else None)

    marks: dict = {}

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step in (args.warmup, args.steps):
                torch.cuda.synchronize()
                key = "0" if state.global_step == args.warmup else "1"
                marks["t" + key], marks["tok" + key] = time.perf_counter(), counter["tokens"]

    targs = TrainingArguments(output_dir="/tmp/bench_ref", per_device_train_batch_size=8, bf16=True,
                              max_steps=args.steps, learning_rate=1e-4, logging_steps=10**6, save_strategy="no",
                              report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
                              gradient_checkpointing=gradient_checkpointing, seed=0, disable_tqdm=True,
                              **({"use_liger_kernel": True} if tuned else {}))
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Timer()])
    path = "reference_tuned" if tuned else "reference"
    try:
        trainer.train()
        out = {"path": path, "model": name, "gradient_checkpointing": gradient_checkpointing,
               "matmul_params": n_matmul, "peak_gib": torch.cuda.max_memory_allocated() / common.GIB,
               "tokens_per_s": (marks["tok1"] - marks["tok0"]) / (marks["t1"] - marks["t0"]),
               "step_s": (marks["t1"] - marks["t0"]) / (args.steps - args.warmup)}
        if tuned:
            out["padding"] = f"max_length {args.max_length}"
    except torch.OutOfMemoryError as e:
        out = {"path": path, "model": name, "gradient_checkpointing": gradient_checkpointing,
               "error": f"OOM: {str(e)[:200]}"}
    except Exception as e:  # Liger missing or refusing the model: the table says so
        out = {"path": path, "model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def cap_check(r: dict) -> dict:
    """One capped run's memory against its cap: the card's (NVML) peak, the allocator's, the plan's prediction."""
    plan = r.get("plan") or {}
    card = r.get("card_peak_gib")
    return {"model": r["model"], "max_length": r.get("max_length"), "cap_gib": r["cap_gib"],
            "card_peak_gib": card, "card_peak_sampled_gib": r.get("card_peak_sampled_gib"),
            "card_source": r.get("card_source"), "allocated_peak_gib": r.get("peak_gib"),
            "reserved_peak_gib": r.get("reserved_peak_gib"),
            "predicted_card_peak_gib": plan.get("estimated_card_peak_gib"),
            "predicted_allocated_peak_gib": plan.get("estimated_peak_gib"),
            "plan": {k: plan.get(k) for k in ("micro_batch_size", "gradient_checkpointing", "quantized_4bit",
                                              "expandable_segments", "memory_plan")},
            "error": r.get("error"),
            "within_cap": None if card is None or "error" in r else card <= r["cap_gib"]}


def run_capped_4bit(args, examples, cap_gib: float, max_length: int) -> dict:
    """llama-3.1-8b from a random-weight checkpoint on disk, so that the plan may load it in 4 bits."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        return {"path": "daemon", "model": "llama-3.1-8b", "max_length": max_length, "cap_gib": cap_gib,
                "error": f"needs bitsandbytes (a bf16 llama-3.1-8b is 15 GiB of weights): {e}"[:200]}
    common.reset_gpu(None)
    path = common.save_random_model("llama-3.1-8b", Path("/tmp/bench_llama8b"))
    qargs = argparse.Namespace(**{**vars(args), "steps": args.qlora_steps, "warmup": min(args.warmup, 4)})
    return run_ours("llama-3.1-8b", qargs, examples, cap_gib=cap_gib, quantized_dir=path, max_length=max_length)


def run_daemon_e2e() -> dict:
    """The daemon's own overheads, from bench/daemon_e2e.py in a separate process (it starts the daemon,
    which must not share this process's CUDA context or its memory readings)."""
    import subprocess
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="td-bench-")) / "e2e.json"
    here = Path(__file__).resolve().parent
    subprocess.run([sys.executable, str(here / "daemon_e2e.py"), "--jobs", "2", "--out", str(out)],
                   stdout=subprocess.DEVNULL, check=False)
    if not out.exists():
        return {"error": "bench/daemon_e2e.py wrote no result"}
    result = json.loads(out.read_text())
    for job in result["jobs"]:
        print(f"daemon: {job['file']}: drop to first step {job['drop_to_first_step_s']} s, GPU memory back at "
              f"baseline {job['gpu_back_to_baseline_s_after_done']} s after the job", flush=True)
    return result


def compiles(name: str, overrides: dict, args) -> bool:
    """Whether a daemon run of this model with these settings will compile its layers (compiled.decide's rule,
    with the bench run's token count)."""
    from daemon.trainer import compiled
    from daemon.trainer.model import _count_params_from_config

    setting = str((overrides.get("training") or {}).get("compile", "auto")).lower()
    if setting != "auto":
        return setting == "true"
    tokens = args.steps * args.micro_batch * args.max_length
    return (_count_params_from_config(common.model_config(name)) < compiled.AUTO_MAX_PARAMS
            and tokens >= compiled.AUTO_MIN_TOKENS)


BF16_8B_MIN_CAP_GIB = 20.0  # below it a bf16 llama-3.1-8b (15 GiB of weights) leaves too little: the 4-bit path


def parse_caps(text: str) -> list[float]:
    return [float(c) for c in text.split(",") if c.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-1.5b,llama-3.1-8b")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (timed after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-tuned", action="store_true",
                    help="skip the tuned HF reference (Trainer + PEFT, use_liger_kernel=True, padded to max length)")
    ap.add_argument("--tuned-only", action="store_true", help="only the tuned HF reference runs (another process "
                                                               "or GPU than the rest, e.g. in parallel)")
    ap.add_argument("--compile-modes", default="default",
                    help="compiled runs (training.compile=true variants, or auto where it compiles): one run per "
                         "mode, default (Inductor) and/or reduce-overhead (Inductor + CUDA graphs)")
    ap.add_argument("--compile-warm", action="store_true",
                    help="run the first compiled run again after Dynamo's reset: its first step with Inductor's "
                         "disk caches warm (the daemon's next job of the same shape)")
    ap.add_argument("--busy", action="store_true", help="profile GPU busy fraction on the first model")
    ap.add_argument("--variants", default="",
                    help="extra daemon runs, each with other config settings: a comma list of "
                         "SECTION.KEY=VALUE[+SECTION.KEY=VALUE], e.g. training.attention=sdpa+lora.dtype=fp32")
    ap.add_argument("--variant-models", default="", help="models the variants run on (default: all)")
    ap.add_argument("--qlora-steps", type=int, default=12)
    ap.add_argument("--cap-plan", action="store_true",
                    help="llama-3.1-8b, max length 2048, under a 24 GiB cap (bf16) and a 16 GiB cap (4-bit, needs "
                         "bitsandbytes): the card's (NVML) peak against the cap in the results' `caps`")
    ap.add_argument("--caps", default="24,16", help="the caps --cap-plan runs, GiB (a bf16 base under 20 GiB and "
                                                    "over: 4-bit below that)")
    ap.add_argument("--no-expandable", action="store_true",
                    help="the allocator without expandable segments (the daemon's trainer turns them on)")
    ap.add_argument("--qlora", action="store_true", help="llama-3.1-8b 4-bit under a 10 GiB cap")
    ap.add_argument("--daemon-e2e", action="store_true",
                    help="also time the real daemon end to end (bench/daemon_e2e.py: drop to first step, GPU "
                         "memory back at baseline) on the embedded model, in a fresh process")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    # Inductor's caches start empty (unless set): the first compiled run's first step is a cold compile.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    # Before CUDA: the card's baseline for this process, and the allocator's settings the daemon's trainer uses.
    card_memory.CardMemory.before_cuda()
    if args.no_expandable:
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    allocator = card_memory.configure_allocator()
    results = {"env": common.environment(), "matmul_tflops": common.matmul_tflops(),
               "args": vars(args) | {"out": str(args.out)}, "allocator": allocator}
    print(json.dumps(results["env"]), f"bf16 matmul {results['matmul_tflops']:.0f} TFLOP/s", flush=True)
    runs = results["runs"] = []

    def record(r):
        r = common.with_mfu(r, results["matmul_tflops"])
        runs.append(r)
        print(json.dumps(r, default=str), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))

    examples = common.synthetic_examples(args.examples, max_length=args.max_length, seed=0)
    names = [m for m in args.models.split(",") if m]
    # Order matters: Liger patches transformers' modules for the rest of the process once applied (the daemon's
    # eager path and the tuned reference apply it), and neither the plain reference nor a compiled run may see
    # it. So: plain references, compiled daemon runs, eager daemon runs, tuned references.
    if args.tuned_only:
        for name in names:
            record(run_reference(name, args, examples, tuned=True))
        print(common.table(results), flush=True)
        return 0
    for name in [] if args.no_reference else names:
        ref = run_reference(name, args, examples)
        if "error" in ref:
            record(ref)
            ref = run_reference(name, args, examples, gradient_checkpointing=True)
        record(ref)
    specs = []  # (model, config overrides, busy)
    for i, name in enumerate(names):
        specs.append((name, {}, args.busy and i == 0))
        if args.variant_models and name not in args.variant_models.split(","):
            continue
        for variant in [v for v in args.variants.split(",") if v]:
            specs.append((name, common.parse_overrides(variant), args.busy and i == 0))
    modes = [m for m in args.compile_modes.split(",") if m]
    compiled_specs = [sp for sp in specs if compiles(sp[0], sp[1], args)]
    for m, mode in enumerate(modes):  # the first mode for every model first: if time runs out, the others go
        for n, (name, overrides, busy) in enumerate(compiled_specs):
            record(run_ours(name, args, examples, overrides=overrides, busy=busy, compile_mode=mode))
            if args.compile_warm and n == 0 and m == 0:
                # The same shape again after Dynamo's reset: what the next job finds in Inductor's disk caches.
                r = run_ours(name, args, examples, overrides=overrides, compile_mode=mode)
                r["compile_cache"] = "warm"
                record(r)
    for name, overrides, busy in specs:
        if (name, overrides, busy) not in compiled_specs:
            record(run_ours(name, args, examples, overrides=overrides, busy=busy))
    for name in [] if args.no_reference or args.no_tuned else names:
        record(run_reference(name, args, examples, tuned=True))
    if args.cap_plan:
        long = common.synthetic_examples(args.examples, max_length=2048, seed=1, mean=600)
        caps = results["caps"] = []
        for cap in parse_caps(args.caps):
            if cap >= BF16_8B_MIN_CAP_GIB:
                r = run_ours("llama-3.1-8b", args, long, cap_gib=cap, max_length=2048)
            else:
                r = run_capped_4bit(args, long, cap, 2048)
            record(r)
            caps.append(cap_check(r))
            print("cap:", json.dumps(caps[-1], default=str), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1, default=str))
    if args.qlora:
        common.reset_gpu(None)
        path = common.save_random_model("llama-3.1-8b", Path("/tmp/bench_llama8b"))
        qargs = argparse.Namespace(**{**vars(args), "steps": args.qlora_steps, "warmup": min(args.warmup, 4)})
        record(run_ours("llama-3.1-8b", qargs, examples, cap_gib=10.0, quantized_dir=path))
    print(common.table(results), flush=True)
    if args.daemon_e2e:
        results["daemon_e2e"] = run_daemon_e2e()
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
