"""RPO on the sign-off proof: the DPO recipe in-process on examples/signoff_preferences.jsonl with the config of
tests/test_dpo_real_model.py, for each --weight of `training.dpo_sft_weight`; then the greedy answers to the
unseen prompts and the control question (docs/dpo.md's proof section). CPU, fp32:

    python bench/dpo_rpo_signoff.py --weight 0 --out bench/results/rpo-w0.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from daemon import embedded
    from daemon.config import from_dict
    from transformers import AutoTokenizer

    from daemon.trainer.dpo_recipe import DPORecipe
    from daemon.trainer.data import validate_for_config
    from daemon.trainer.main import split_eval
    from test_dpo_real_model import CONFIG, CONTROL, DATA, UNSEEN, greedy_answer

    base_dir = embedded.embedded_model_path()
    training = {**CONFIG["training"], "dpo_sft_weight": args.weight}
    cfg = from_dict({"base_model": str(base_dir), "training": training, "lora": CONFIG["lora"],
                     "limits": {"min_free_disk_mb": 1}, "status": {"progress_every_steps": 1}})
    report = validate_for_config(DATA, AutoTokenizer.from_pretrained(base_dir), cfg, base_dir=base_dir,
                                 keep_examples=True)
    train_ex, eval_ex = split_eval(report.examples_list, cfg.training, cfg.training.seed)
    steps: list = []
    recipe = DPORecipe(cfg, emit=lambda e: steps.append(e) if e.get("event") == "progress" else None)
    t0 = time.perf_counter()
    recipe.setup(train_ex, eval_ex, base_dir=base_dir)
    recipe.train()
    model = recipe.accelerator.unwrap_model(recipe.model).eval()
    answers = {q: greedy_answer(model, recipe.tokenizer, q) for q in UNSEEN + [CONTROL[0]]}
    out = {"weight": args.weight, "train_pairs": len(train_ex), "eval": recipe.summary()["preference"],
           "progress": [{k: e.get(k) for k in ("step", "loss", "reward_accuracy")} for e in steps],
           "answers": answers, "seconds": round(time.perf_counter() - t0)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
