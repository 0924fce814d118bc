"""Ask a base model, or one of its adapter versions, a question (greedy, for demos and checks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(base_dir: Path, adapter_dir: Path | None = None, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daemon.paths import UserError

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        # Said outright: left unset, transformers asks on stdin whether to run a model's own code, and fails.
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir or base_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if trust_remote_code else " (a model that ships its own code needs trust_remote_code: true)"
        raise UserError(f"cannot load the model at {base_dir}: {first[:300]}{hint}") from None
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def answer(model, tokenizer, question: str, max_new_tokens: int = 48) -> str:
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    else:  # a base model without a chat template (trained on text or completions): the prompt as it is
        ids = tokenizer(question, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def resolve_version(adapter_root: Path, spec: str) -> tuple[Path, dict]:
    """ADAPTER or ADAPTER@VERSION (e.g. default@3) -> (version folder, its metadata), checked against the file
    digests it was published with. A damaged version named outright is an error; without a number the version
    `latest` is (never a newer, held one), or the newest sound promoted one below it when it is damaged, and each
    damaged one passed is named on stderr."""
    from daemon.paths import UserError, check_adapter_name
    from daemon.trainer.parent import promoted_sound_version
    from daemon.versions import problems

    name, _, version = spec.partition("@")
    adapter_dir = adapter_root / check_adapter_name(name)
    if version and not version.removeprefix("v").isdigit():  # "default@../x" names no folder, only a mistake
        raise UserError(f"bad version in {spec!r}: use ADAPTER or ADAPTER@N (e.g. default@3)")

    if version:
        v = int(version.removeprefix("v"))
        path = adapter_dir / f"v{v}"
        found = problems(path) if path.is_dir() else None
        if found:
            raise UserError(f"version {name}@{v} is damaged and cannot be used: {'; '.join(found)}")
    else:
        def skipped(v: int, found: list[str]) -> None:
            print(f"Warning: version {name}@{v} is damaged ({'; '.join(found)}): using an older one",
                  file=sys.stderr)

        v = promoted_sound_version(adapter_dir, skipped)
        path = adapter_dir / f"v{v}"
    if v is None or not path.is_dir():
        raise UserError(f"no published version {spec!r} under {adapter_root}")
    meta = json.loads((path / "metadata.json").read_text())
    check_same_base(meta, f"{name}@{v}")
    return path, meta


def check_same_base(meta: dict, label: str) -> None:
    """An adapter applied to another model than the one it was trained on answers nonsense (or fails on a shape):
    refuse when the folder it names now holds a different model (a version from before fingerprints: trusted)."""
    from daemon.paths import UserError
    from daemon.trainer.fingerprint import base_fingerprint

    recorded, base = meta.get("base_model_fingerprint"), meta.get("base_model_path")
    if not (recorded and base and Path(base).is_dir()):
        return  # a missing base is the caller's to report, in its own words
    now = base_fingerprint(Path(base))
    if now != recorded:
        raise UserError(f"{label} was trained on another model than the one now at {base} "
                        f"(base fingerprint {recorded[:12]}, now {now[:12]})")
