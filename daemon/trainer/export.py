"""`training-daemon export ADAPTER[@VERSION] --merge OUT`: a standalone model with the adapter folded in.

The merged folder loads with plain AutoModelForCausalLM.from_pretrained (no peft needed), e.g. for
serving or converting to GGUF. It is written under a temporary name beside OUT and renamed into place
when complete, so OUT is either absent or a whole model. The version is checked first (resolve_version): a
damaged one, or one whose base folder now holds another model, is refused in one line. Runs in the CLI
process, never in the daemon.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from daemon import durable
from daemon.paths import Layout, UserError
from daemon.timefmt import now_iso


def export_merged(layout: Layout, spec: str, out: Path) -> Path:
    from daemon.trainer.generate import resolve_version

    version_dir, meta = resolve_version(layout.checkpoints, spec)
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose a new one")
    base = meta.get("base_model_path")
    if not base or not Path(base).is_dir():
        raise UserError(f"{version_dir}/metadata.json names base model folder {base!r}, which is not there; "
                        "the base model is needed to merge")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The base's own dtype (e.g. bf16): the merged model is the size of the base, not twice it.
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    model = PeftModel.from_pretrained(model, version_dir)
    merged = model.merge_and_unload()
    has_tokenizer = (version_dir / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(version_dir if has_tokenizer else base)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch.no_grad():
            merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        durable.write_json(tmp / "export.json", {
            "adapter": meta.get("adapter"), "version": meta.get("version"), "source": str(version_dir),
            "base_model": meta.get("base_model"), "base_model_path": str(base),
            "base_model_fingerprint": meta.get("base_model_fingerprint"), "exported_at": now_iso(),
            "job_id": meta.get("job_id"), "source_file": meta.get("source_file"), "lora": meta.get("lora"),
        })
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            out.rmdir()  # empty (checked above): rename cannot replace a folder on every filesystem
        durable.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

