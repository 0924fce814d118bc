"""`training-daemon export ADAPTER[@VERSION] --merge OUT`: a standalone model with the adapter folded in.

The merged folder loads with plain AutoModelForCausalLM.from_pretrained (no peft needed), e.g. for
serving or converting to GGUF. It is written under a temporary name beside OUT and renamed into place
when complete, so OUT is either absent or a whole model. The version is checked first (resolve_version): a
damaged one, or one whose base folder now holds another model, is refused in one line. Runs in the CLI
process, never in the daemon. `--gguf OUT` (daemon/trainer/gguf_export.py) shares the loading and the
folder handling.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from daemon import durable
from daemon.paths import VIRTUAL_TREES, Layout, UserError
from daemon.timefmt import now_iso


def export_merged(layout: Layout, spec: str, out: Path) -> Path:
    out = prepare_destination(out, "the merged model")
    merged, tokenizer, _, provenance = load_merged(layout, spec)

    def write(tmp: Path) -> None:
        import torch

        with torch.no_grad():
            merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        durable.write_json(tmp / "export.json", provenance)

    return write_folder(out, "the merged model", write)


def prepare_destination(out: Path, what: str) -> Path:
    """OUT as an absolute path, refused at once (before minutes of loading) when it cannot receive the folder."""
    out = Path(out).expanduser().absolute()
    _check_destination(out, what)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose a new one")
    return out


def load_merged(layout: Layout, spec: str, merge: bool = True):
    """(merged model, its tokenizer, the folder the tokenizer came from, provenance for export.json) for an
    adapter version, after the version checks; merge=False: the base model instead of the merged one."""
    from daemon.trainer.generate import resolve_version

    version_dir, meta = resolve_version(layout.checkpoints, spec)
    base = meta.get("base_model_path")
    if not base or not Path(base).is_dir():
        raise UserError(f"{version_dir}/metadata.json names base model folder {base!r}, which is not there; "
                        "the base model is needed to merge")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The base's own dtype (e.g. bf16): the merged model is the size of the base, not twice it. A base that ships
    # its own code is loaded with the library's code for its type (trust_remote_code stays off here).
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the base model {base}: {(str(e).strip().splitlines() or [''])[0][:300]}") \
            from None
    merged = PeftModel.from_pretrained(model, version_dir).merge_and_unload() if merge else model
    tokenizer_dir = version_dir if (version_dir / "tokenizer_config.json").exists() else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    provenance = {
        "adapter": meta.get("adapter"), "version": meta.get("version"), "source": str(version_dir),
        "base_model": meta.get("base_model"), "base_model_path": str(base),
        "base_model_fingerprint": meta.get("base_model_fingerprint"), "exported_at": now_iso(),
        "job_id": meta.get("job_id"), "source_file": meta.get("source_file"), "lora": meta.get("lora"),
    }
    return merged, tokenizer, tokenizer_dir, provenance


def write_folder(out: Path, what: str, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a fresh temporary folder beside OUT, flush it, rename it to OUT: OUT is whole or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            out.rmdir()  # empty (checked before): rename cannot replace a folder on every filesystem
        durable.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {what} to {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_destination(out: Path, what: str) -> None:
    """Refuse, before minutes of loading, a folder that cannot hold the model (/proc/out, a read-only place)."""
    real = out.resolve()
    if any(real == Path(tree) or Path(tree) in real.parents for tree in VIRTUAL_TREES):
        raise UserError(f"cannot write {what} to {out}: {real} is in a system folder")
    parent = next(p for p in real.parents if p.exists())  # the folder mkdir would create it in
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} to {out}: {parent} is not a folder this user can write to")
