"""GPU correctness checks for the fast paths (run on the device before timing anything).

Packed varlen attention vs padded SDPA, the chunked loss vs the plain HF loss from full logits, and the compiled
decoder layers (training.compile: Inductor, Liger off, the batch padded to the run's fixed shape, the fused
loss chunk) in each
mode given by --compile-modes (default: "default"; "reduce-overhead" adds CUDA graphs): loss and LoRA gradients
must agree with an fp32 reference to bf16 rounding (loss within 1e-2 relative, gradients at most twice the
plain HF bf16 path's error).

    python bench/gpu_check.py [--compile-modes default,reduce-overhead] [smollm2-135m qwen2.5-1.5b]
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from daemon.trainer import compiled  # noqa: E402
from daemon.trainer import loss  # noqa: E402
from daemon.trainer import model as dm  # noqa: E402
from daemon.trainer import packing  # noqa: E402


def grads(pm, batch, loss_sum=loss.token_loss_sum):
    pm.zero_grad(set_to_none=True)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    value = loss_sum(pm, batch)
    value.backward()
    g = torch.cat([p.grad.float().flatten() for p in pm.parameters() if p.requires_grad])
    return value.item(), g


def hf_loss_sum(pm, batch):
    """The plain HF path: the model's own forward, full logits, one cross entropy."""
    return loss.hf_loss_sum(loss._causal_lm(pm), batch)


def rel(a, b):
    return float((a - b).norm() / b.norm()) if torch.is_tensor(a) else abs(a - b) / abs(b)


def set_lora_b(pm) -> None:
    """Non-zero LoRA B weights (fresh ones are zero), the same values in every model of one shape."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.float32) * 0.02)


def compiled_grads(name, ex, ex2, cfg, mode):
    """Loss and LoRA gradients through the compiled layers, on batches padded to a run's fixed shape, and how far
    a repeat of the same call and two accumulated micro-batches (stable .grad buffers, as the recipe keeps them
    under CUDA graphs) land from the first call and from the sum of single calls. Run before any eager model of
    the same architecture: Liger, once applied, patches the module for the whole process."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled.MODE = mode
    ccfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"compile": "true"})})
    pm, _, plan = dm.prepare_model(common.build_model(name, device="cuda"), None, ccfg, "cuda")
    if not plan["compile"]:
        return None, None, {"problem": plan["compile_reason"]}
    pm.train()  # the compiled code runs for training steps only (compiled._train_only)
    set_lora_b(pm)
    counts = [len(e.input_ids) for e in ex + ex2]
    shape = compiled.fixed_shape(counts, [[list(range(len(ex))), list(range(len(ex), len(counts)))]],
                                 token_budget=8 * 1024, max_length=1024)
    b1, b2 = (packing.pad_fixed(packing.collate(e, packing=True, pad_id=0), **shape) for e in (ex, ex2))

    fused_loss = functools.partial(loss.token_loss_sum, fused=True)  # the loss compiled runs use (step.py)

    def call(batch, model=pm):
        compiled.mark_step()
        return grads(model, batch, fused_loss)

    value, g = call(b1)
    value2, g2 = call(b1)  # the compiled code (and graphs) replayed
    _, gb = call(b2)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    for batch in (b1, b2):
        compiled.mark_step()
        fused_loss(pm, {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}).backward()
    g_acc = torch.cat([p.grad.float().flatten() for p in trainable])
    stats = {"repeat_loss": abs(value - value2) / abs(value), "repeat_grad": rel(g2, g),
             "accumulated_grad": rel(g_acc, g + gb)}
    del pm
    torch.cuda.empty_cache()
    compiled.MODE = "default"
    return value, g, stats


def main() -> int:
    import argparse

    from torch.nn.attention import varlen

    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-1.5b"])
    ap.add_argument("--compile-modes", default="default", help="comma list: default, reduce-overhead; '' for none")
    args = ap.parse_args()
    print("varlen_attn", inspect.signature(varlen.varlen_attn))
    print("get_per_process_memory_fraction", hasattr(torch.cuda, "get_per_process_memory_fraction"))
    cfg = common.daemon_config(types.SimpleNamespace(micro_batch=8, lora_dropout=0.0), max_length=1024, steps=1,
                               overrides={"training": {"gradient_checkpointing": "false", "compile": "false"}})
    ok = True
    # Compiled paths first, for every model: the eager models below apply Liger to their architecture's module.
    ex = common.synthetic_examples(8, max_length=1024, seed=3)
    ex2 = common.synthetic_examples(8, max_length=1024, seed=4)
    comp = {}
    for name in args.models:
        for mode in [m for m in args.compile_modes.split(",") if m]:
            try:
                comp[name, mode] = compiled_grads(name, ex, ex2, cfg, mode)
            except Exception as e:  # a mode that cannot run here: say why, fail the check
                import traceback

                traceback.print_exc()
                comp[name, mode] = (None, None, {"problem": f"{type(e).__name__}: {str(e)[:300]}"})
    for name in args.models:
        model = common.build_model(name, device="cuda")
        pm, _, plan = dm.prepare_model(model, None, cfg, "cuda")
        print(name, plan)
        set_lora_b(pm)
        packed = packing.collate(ex, packing=True, pad_id=0)
        padded = packing.collate(ex, packing=False, pad_id=0)
        lp, gp = grads(pm, packed)
        ld, gd = grads(pm, padded)
        lh, gh = grads(pm, padded, hf_loss_sum)
        # The truth: the same LoRA model in fp32, padded, plain HF loss. Each bf16 path must be as close to it
        # as the plain HF bf16 path is (bf16 rounding), whatever its attention kernel and loss.
        pm.float()
        lt, gt = grads(pm, padded, hf_loss_sum)
        n = packed["n_trainable"]
        print(f"{name}: per-token loss fp32 {lt / n:.5f} | bf16: packed {lp / n:.5f} padded {ld / n:.5f} "
              f"hf {lh / n:.5f}")
        base = rel(gh, gt)
        print(f"  grad error vs fp32: hf bf16 {base:.2e}, packed {rel(gp, gt):.2e}, padded {rel(gd, gt):.2e}")
        checks = {"loss packed": rel(lp, lt), "loss padded": rel(ld, lt),
                  "grad packed": rel(gp, gt) / max(base, 1e-3), "grad padded": rel(gd, gt) / max(base, 1e-3)}
        for (cname, mode), (lc, gc, stats) in comp.items():
            if cname != name:
                continue
            if lc is None:
                print(f"  compiled {mode}: FAIL ({stats['problem']})")
                ok = False
                continue
            print(f"  compiled {mode}: per-token loss {lc / n:.5f}, grad error vs fp32 {rel(gc, gt):.2e}; "
                  f"repeat: loss {stats['repeat_loss']:.1e} grads {stats['repeat_grad']:.2e}; two micro-batches "
                  f"accumulated vs the sum of single ones {stats['accumulated_grad']:.2e}")
            checks[f"loss compiled {mode}"] = rel(lc, lt)
            checks[f"grad compiled {mode}"] = rel(gc, gt) / max(base, 1e-3)
            # Run-to-run differences (atomics in attention's backward) stay inside bf16's error, as eager's do.
            checks[f"loss repeat compiled {mode}"] = stats["repeat_loss"] * 10  # < 1e-3
            checks[f"grad repeat compiled {mode}"] = stats["repeat_grad"] / max(base, 1e-3)
            checks[f"grad accumulated compiled {mode}"] = stats["accumulated_grad"] / max(base, 1e-3)
        for k, v in checks.items():
            good = v < (1e-2 if k.startswith("loss") else 1.0 if "repeat" in k or "accumulated" in k else 2.0)
            ok &= good
            print(f"  {k}: {v:.2e} {'ok' if good else 'FAIL'}")
        del pm, model
        torch.cuda.empty_cache()
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
