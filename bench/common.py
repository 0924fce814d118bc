"""Benchmark plumbing: synthetic data, random-weight models of known shapes, rates, GPU busy time, the table."""

from __future__ import annotations

import gc
import platform
import time
import types
from pathlib import Path

import numpy as np
import torch
import yaml

GIB = 1024**3

# Shapes of the public models (from their config.json files); weights are random.
SHAPES = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                                   max_position_embeddings=131072, rms_norm_eps=1e-5)),
}


def model_config(name: str):
    from transformers import AutoConfig

    kind, kw = SHAPES[name]
    return AutoConfig.for_model(kind, **kw)


def build_model(name: str, *, device: str = "cuda", attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(name), dtype=torch.bfloat16, attn_implementation=attn)
    return model


def save_random_model(name: str, path: Path) -> Path:
    """A random-weight checkpoint on disk (bf16 safetensors + a small tokenizer), for the 4-bit loading path."""
    if (path / "config.json").exists():
        return path
    model = build_model(name, device="cuda")
    model.save_pretrained(path, safe_serialization=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    small_tokenizer().save_pretrained(path)
    return path


def small_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class FakeTokenizer:
    """What the recipe needs of a tokenizer when it is handed a built model (pad/eos ids)."""
    pad_token_id = 0
    eos_token_id = 1


def padded_collate(counter: dict, width: int | None = None):
    """The HF references' collate: a batch padded to `width` (None: its longest example), labels -100 on the
    padding; counts the real tokens into counter["tokens"]."""

    def collate(batch):
        w = width or max(len(x["input_ids"]) for x in batch)
        ids = torch.zeros(len(batch), w, dtype=torch.long)
        labels = torch.full((len(batch), w), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), w, dtype=torch.long)
        for i, x in enumerate(batch):
            n = len(x["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
            counter["tokens"] += n
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def synthetic_examples(n: int, *, max_length: int, seed: int, mean: float = 300.0, sigma: float = 0.7):
    """Log-normal lengths with the given mean (clipped to [16, max_length]); random ids; 30% prompt masked."""
    rng = np.random.default_rng(seed)
    mu = np.log(mean) - sigma**2 / 2
    lengths = np.clip(rng.lognormal(mu, sigma, n).astype(int), 16, max_length)
    out = []
    for n_tok in lengths:
        ids = rng.integers(3, 32000, int(n_tok)).tolist()
        prompt = int(0.3 * n_tok)
        out.append(types.SimpleNamespace(input_ids=ids, labels=[-100] * prompt + ids[prompt:]))
    return out


def daemon_config(args, *, max_length: int, steps: int, precision: str = "auto", overrides: dict | None = None):
    """The daemon's config for a bench run; `overrides` ({"training": {"attention": "sdpa"}, ...}) is merged over
    it, so that a variant is a config setting like any job's, validated as the daemon validates it."""
    from daemon.config import from_dict

    training = dict(seed=0, micro_batch_size=args.micro_batch, gradient_accumulation=1, epochs=1, max_steps=steps,
                    learning_rate=1e-4, weight_decay=0.0, lr_scheduler="linear", warmup_ratio=0.0,
                    max_length=max_length, packing=True, max_grad_norm=1.0, checkpoint_every_steps=10**9,
                    checkpoint_every_seconds=10**9, keep_checkpoints=1, precision=precision,
                    gradient_checkpointing="auto", eval_fraction=0.0, eval_max_examples=0)
    lora = dict(r=16, alpha=32, dropout=args.lora_dropout, target_modules="all-linear")
    config = {"base_model": "/nonexistent", "training": training, "lora": lora, "limits": {"min_free_disk_mb": 1},
              "status": {"progress_every_steps": 1}}
    for section, values in (overrides or {}).items():
        config[section] = {**config.get(section, {}), **values}
    return from_dict(config)


def parse_overrides(text: str) -> dict:
    """"training.attention=sdpa+lora.dtype=fp32" -> {"training": {"attention": "sdpa"}, "lora": {"dtype": "fp32"}};
    values are read as YAML (4096 is a number, false a boolean, null nothing)."""
    out: dict = {}
    for item in text.split("+"):
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def reset_gpu(cap_gib: float | None) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total) if cap_gib else 1.0)
    torch.cuda.reset_peak_memory_stats()


def matmul_params(model) -> int:
    """Parameters that do a matmul per token: every Linear's base weight, the lm_head included (tied or not)."""
    total = 0
    for name, mod in model.named_modules():
        if "lora_" in name:
            continue
        weight = getattr(mod, "weight", None)
        if weight is not None and (isinstance(mod, torch.nn.Linear)
                                   or type(mod).__name__ in ("Linear4bit", "Linear8bitLt")):
            quant = getattr(weight, "quant_state", None)  # 4-bit weights are stored packed: count the real shape
            total += int(np.prod(quant.shape)) if quant is not None else weight.numel()
    return total


def matmul_tflops(n: int = 8192, reps: int = 30) -> float:
    """bf16 dense matmul rate measured now, on this GPU (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / float(np.median(times)) / 1e12


def with_mfu(r: dict, tflops: float) -> dict:
    if r.get("tokens_per_s") and r.get("matmul_params"):
        r["mfu"] = r["tokens_per_s"] * 4 * r["matmul_params"] / (tflops * 1e12)
    return r


class BusyProfiler:
    """Fraction of wall time the GPU runs anything, over `steps` optimizer steps after `start_step`."""

    def __init__(self, *, start_step: int, steps: int):
        self.start, self.end = start_step, start_step + steps
        self.prof = None
        self.wall = None

    def step(self, step: int) -> None:
        if step == self.start:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif step == self.end and self.prof is not None and self.wall is None:
            torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)

    def close(self) -> None:
        if self.prof is not None and self.wall is None:
            self.step(self.end)

    def busy_fraction(self) -> float | None:
        if self.prof is None or not self.wall:
            return None
        spans = []
        for e in self.prof.profiler.kineto_results.events():
            if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0:
                spans.append((e.start_ns(), e.start_ns() + e.duration_ns()))
        spans.sort()
        busy, cur_s, cur_e = 0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            busy += cur_e - cur_s
        return busy / 1e9 / self.wall


def environment() -> dict:
    import accelerate
    import peft
    import transformers

    env = {"device": torch.cuda.get_device_name(0), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
           "accelerate": accelerate.__version__}
    for mod in ("liger_kernel", "bitsandbytes", "triton"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod.replace("_", "-"))
        except Exception:
            env[mod] = None
    return env


def table(results: dict) -> str:
    refs = {r["model"]: r for r in results["runs"] if r["path"] == "reference" and "tokens_per_s" in r}
    tuned = {r["model"]: r for r in results["runs"] if r["path"] == "reference_tuned" and "tokens_per_s" in r}
    lines = [f"bf16 matmul: {results['matmul_tflops']:.0f} TFLOP/s on {results['env']['device']}",
             "| model | path | max len | tokens/s | MFU | peak GiB (allocator / card) | vs ref | vs tuned HF | "
             "GPU busy | first step s | plan |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        plan = r.get("plan") or {}
        variant = r.get("config") or {}  # runs before the variants were config settings recorded "env"
        what = r["path"] + "".join(f" {section}.{k}={v}" for section, kv in variant.items() for k, v in kv.items())
        if plan.get("compile"):
            what += f" [compiled {plan['compile']}{', warm cache' if r.get('compile_cache') == 'warm' else ''}]"
        if r.get("gradient_checkpointing"):
            what += " (ckpt)"
        if r.get("cap_gib"):
            what += f" cap {r['cap_gib']:.0f} GiB"
        ratio = _ratio(r, refs.get(r["model"]))
        ratio_tuned = _ratio(r, tuned.get(r["model"]))
        plan_s = (f"mb {plan.get('micro_batch_size')}, ckpt {plan.get('gradient_checkpointing')}, "
                  f"{plan.get('attn_implementation')}, 4bit {plan.get('quantized_4bit')}, liger {plan.get('liger')}"
                  ) if plan else r.get("padding", "")
        if "error" in r:
            lines.append(f"| {r['model']} | {what} | {r.get('max_length', '')} | {r['error'][:60]} | | | | | | | |")
            continue
        busy = f"{r['gpu_busy']:.0%}" if r.get("gpu_busy") is not None else ""
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else ""
        lines.append(f"| {r['model']} | {what} | {r.get('max_length', '')} | {r.get('tokens_per_s', 0):,.0f} | "
                     f"{r.get('mfu', 0):.1%} | {_peaks(r)} | {ratio} | {ratio_tuned} | {busy} | {first} | {plan_s} |")
    return "\n".join(lines)


def _ratio(r: dict, ref: dict | None) -> str:
    return f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and r.get("tokens_per_s") else ""


def _peaks(r: dict) -> str:
    """The allocator's peak, and the card's (NVML) where it was read."""
    card = r.get("card_peak_gib")
    return f"{r['peak_gib']:.2f}" + (f" / {card:.2f}" if card is not None else "")
