"""Unsloth on the same shapes and data as bench/run.py: the user's best-known fast LoRA trainer, side by side.

    PYTHONPATH=/tmp/site_unsloth:$PYTHONPATH python bench/unsloth_bench.py --models smollm2-135m,qwen2.5-1.5b \
        --steps 16 --warmup 4 --out unsloth.json

Unsloth must be imported before transformers, and it patches transformers, peft and the Trainer for the whole
process: this runs in a process of its own. Each model: random weights in the model's shape saved to disk
(bench/common.py, seeded as bench/run.py's), `FastLanguageModel.from_pretrained` on that folder (bf16, no
4-bit), `FastLanguageModel.get_peft_model` with LoRA r16 alpha 32 on all linear layers (q,k,v,o,gate,up,down),
no gradient checkpointing (the daemon's runs of these shapes need none), then transformers' Trainer on the same
4,000 synthetic examples as bench/run.py, batch 8 padded to the longest (Unsloth's own attention without
flash-attn/xformers on the device: it cannot pack documents apart there), and Unsloth's patched forward computing
its fused loss. Tokens/s are real tokens between step `warmup` and the last, as in bench/run.py. When Unsloth
cannot be imported or run, the JSON says exactly what stopped it (the exception and the last lines of its
traceback), and the exit status is still 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {str(e)[:1500]}", "traceback": traceback.format_exc()[-4000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-1.5b")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result: dict = {"args": vars(args) | {"out": str(args.out)}, "runs": []}

    def write():
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))

    # The device reaches no network: no usage statistics, no hub look-ups.
    for key in ("UNSLOTH_DISABLE_STATISTICS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    t0 = time.perf_counter()
    try:
        import unsloth  # noqa: F401  (first: it patches transformers before anything imports it)
        from unsloth import FastLanguageModel
    except BaseException as e:  # ImportError, and the NotImplementedError / SystemExit some checks raise
        result["import"] = _error(e)
        print("unsloth import failed:", result["import"]["error"], flush=True)
        write()
        return 0
    result["import"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
    from importlib.metadata import version

    result["versions"] = {}
    for pkg in ("unsloth", "unsloth_zoo", "torch", "transformers", "peft", "trl", "bitsandbytes", "xformers",
                "triton", "torchao", "cut_cross_entropy"):
        try:
            result["versions"][pkg] = version(pkg)
        except Exception:
            result["versions"][pkg] = None
    print("unsloth imported", result["versions"], flush=True)
    write()

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import common

    result["matmul_tflops"] = common.matmul_tflops()
    examples = common.synthetic_examples(args.examples, max_length=args.max_length, seed=0)
    for name in [m for m in args.models.split(",") if m]:
        try:
            r = run_one(name, args, examples, FastLanguageModel, common)
        except BaseException as e:
            r = {"model": name, **_error(e)}
            print(f"{name}: unsloth failed: {r['error'][:300]}", flush=True)
        r = common.with_mfu(r, result["matmul_tflops"])
        result["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}, default=str), flush=True)
        write()
        torch.cuda.empty_cache()
    return 0


def run_one(name, args, examples, FastLanguageModel, common) -> dict:
    import gc

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    path = common.save_random_model(name, Path(f"/tmp/unsloth_bench_{name}"))
    common.reset_gpu(None)
    t0 = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=args.max_length,
                                                         dtype=torch.bfloat16, load_in_4bit=False,
                                                         local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                                             use_gradient_checkpointing=False, random_state=0)
    load_s = time.perf_counter() - t0
    n_matmul = common.matmul_params(model)
    counter = {"tokens": 0}

    collate = common.padded_collate(counter)

    marks: dict = {}

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == 1:
                torch.cuda.synchronize()
                marks["first"] = time.perf_counter()
            if state.global_step in (args.warmup, args.steps):
                torch.cuda.synchronize()
                key = "0" if state.global_step == args.warmup else "1"
                marks["t" + key], marks["tok" + key] = time.perf_counter(), counter["tokens"]

    targs = TrainingArguments(output_dir="/tmp/bench_unsloth", per_device_train_batch_size=8, bf16=True,
                              max_steps=args.steps, learning_rate=1e-4, logging_steps=10**6, save_strategy="no",
                              report_to=[], remove_unused_columns=False, dataloader_num_workers=0, seed=0,
                              disable_tqdm=True)
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Timer()])
    start = time.perf_counter()
    trainer.train()
    out = {"path": "unsloth", "model": name, "matmul_params": n_matmul, "load_s": round(load_s, 2),
           "first_step_s": marks["first"] - start if "first" in marks else None,
           "peak_gib": torch.cuda.max_memory_allocated() / common.GIB,
           "tokens_per_s": (marks["tok1"] - marks["tok0"]) / (marks["t1"] - marks["t0"]),
           "step_s": (marks["t1"] - marks["t0"]) / (args.steps - args.warmup), "padding": "longest, batch 8",
           "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    del trainer, model
    gc.collect()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
