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
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402


def run_ours(name: str, args, examples, *, cap_gib: float | None = None, busy: bool = False,
             max_length: int | None = None, precision: str = "auto", quantized_dir: Path | None = None,
             overrides: dict | None = None) -> dict:
    """The daemon's path; `overrides`: config settings of a variant ({"training": {"attention": "sdpa"}})."""
    from daemon.trainer.recipe import LoRARecipe

    overrides = overrides or {}
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
        if step == args.warmup:
            torch.cuda.synchronize()
            marks["t0"], marks["tok0"] = time.perf_counter(), recipe.progress.tokens_seen
        if step == args.steps:
            torch.cuda.synchronize()
            marks["t1"], marks["tok1"] = time.perf_counter(), recipe.progress.tokens_seen
        marks["loss"] = event["loss"]
        if prof:
            prof.step(step)

    try:
        recipe = LoRARecipe(cfg, emit=emit)
        if quantized_dir is not None:
            recipe.setup(examples, [], base_dir=quantized_dir)
        else:
            model = common.build_model(name, device="cuda")
            recipe.setup(examples, [], model=model, tokenizer=common.FakeTokenizer())
        n_matmul = common.matmul_params(recipe.accelerator.unwrap_model(recipe.model))
        recipe.train()
        if prof:
            prof.close()
        out = {"path": "daemon", "model": name, "max_length": max_length, "plan": recipe.plan,
               "micro_batch_size": recipe.micro_batch_size, "accumulation": recipe.accum,
               "matmul_params": n_matmul, "final_loss": marks.get("loss"),
               "peak_gib": torch.cuda.max_memory_allocated() / common.GIB,
               "cap_gib": cap_gib, "config": overrides}
        if "t1" in marks:
            out["tokens_per_s"] = (marks["tok1"] - marks["tok0"]) / (marks["t1"] - marks["t0"])
            out["step_s"] = (marks["t1"] - marks["t0"]) / (args.steps - args.warmup)
        if prof:
            out["gpu_busy"] = prof.busy_fraction()
        return out
    except torch.OutOfMemoryError as e:
        return {"path": "daemon", "model": name, "max_length": max_length, "error": f"OOM: {str(e)[:200]}",
                "cap_gib": cap_gib, "config": overrides}
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


def run_reference(name: str, args, examples, *, gradient_checkpointing: bool = False) -> dict:
    """transformers.Trainer + PEFT, as a user would write it: bf16, SDPA, pad to longest, batch 8."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    common.reset_gpu(None)
    model = common.build_model(name, device="cuda", attn="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    n_matmul = common.matmul_params(model)
    counter = {"tokens": 0}

    def collate(batch):
        width = max(len(x["input_ids"]) for x in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, x in enumerate(batch):
            n = len(x["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
            counter["tokens"] += n
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

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
                              gradient_checkpointing=gradient_checkpointing, seed=0, disable_tqdm=True)
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Timer()])
    try:
        trainer.train()
        out = {"path": "reference", "model": name, "gradient_checkpointing": gradient_checkpointing,
               "matmul_params": n_matmul, "peak_gib": torch.cuda.max_memory_allocated() / common.GIB,
               "tokens_per_s": (marks["tok1"] - marks["tok0"]) / (marks["t1"] - marks["t0"]),
               "step_s": (marks["t1"] - marks["t0"]) / (args.steps - args.warmup)}
    except torch.OutOfMemoryError as e:
        out = {"path": "reference", "model": name, "gradient_checkpointing": gradient_checkpointing,
               "error": f"OOM: {str(e)[:200]}"}
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


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
    ap.add_argument("--busy", action="store_true", help="profile GPU busy fraction on the first model")
    ap.add_argument("--variants", default="",
                    help="extra daemon runs, each with other config settings: a comma list of "
                         "SECTION.KEY=VALUE[+SECTION.KEY=VALUE], e.g. training.attention=sdpa+lora.dtype=fp32")
    ap.add_argument("--variant-models", default="", help="models the variants run on (default: all)")
    ap.add_argument("--qlora-steps", type=int, default=12)
    ap.add_argument("--cap-plan", action="store_true", help="llama-3.1-8b, max length 2048, 24 GiB cap")
    ap.add_argument("--qlora", action="store_true", help="llama-3.1-8b 4-bit under a 10 GiB cap")
    ap.add_argument("--daemon-e2e", action="store_true",
                    help="also time the real daemon end to end (bench/daemon_e2e.py: drop to first step, GPU "
                         "memory back at baseline) on the embedded model, in a fresh process")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    results = {"env": common.environment(), "matmul_tflops": common.matmul_tflops(),
               "args": vars(args) | {"out": str(args.out)}}
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
    # References first: Liger patches module-level functions (RoPE) once applied, and the reference is plain HF.
    for name in [] if args.no_reference else names:
        ref = run_reference(name, args, examples)
        if "error" in ref:
            record(ref)
            ref = run_reference(name, args, examples, gradient_checkpointing=True)
        record(ref)
    for i, name in enumerate(names):
        record(run_ours(name, args, examples, busy=args.busy and i == 0))
        if args.variant_models and name not in args.variant_models.split(","):
            continue
        for variant in [v for v in args.variants.split(",") if v]:
            record(run_ours(name, args, examples, overrides=common.parse_overrides(variant)))
    if args.cap_plan:
        long = common.synthetic_examples(args.examples, max_length=2048, seed=1, mean=600)
        record(run_ours("llama-3.1-8b", args, long, cap_gib=24.0, max_length=2048))
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
