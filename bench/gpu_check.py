"""GPU correctness checks for the fast paths (run on the device before timing anything).

Packed varlen attention vs padded SDPA, and the chunked loss vs the plain HF loss from full logits: loss and
LoRA gradients must agree to bf16 rounding (relative error well under 2e-2).
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from daemon.trainer import loss
from daemon.trainer import model as dm
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


def main() -> int:
    from torch.nn.attention import varlen

    print("varlen_attn", inspect.signature(varlen.varlen_attn))
    print("get_per_process_memory_fraction", hasattr(torch.cuda, "get_per_process_memory_fraction"))
    cfg = common.daemon_config(types.SimpleNamespace(micro_batch=8, lora_dropout=0.0), max_length=1024, steps=1,
                               overrides={"training": {"gradient_checkpointing": "false"}})
    ok = True
    for name in sys.argv[1:] or ("smollm2-135m", "qwen2.5-1.5b"):
        model = common.build_model(name, device="cuda")
        pm, _, plan = dm.prepare_model(model, None, cfg, "cuda")
        print(name, plan)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        ex = common.synthetic_examples(8, max_length=1024, seed=3)
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
        for k, v in checks.items():
            good = v < (1e-2 if k.startswith("loss") else 2.0)  # grads: at most twice the plain bf16 error
            ok &= good
            print(f"  {k}: {v:.2e} {'ok' if good else 'FAIL'}")
        del pm, model
        torch.cuda.empty_cache()
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
