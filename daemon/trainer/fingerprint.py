"""A base model's identity by content, cheaply: the same folder path can hold another model tomorrow.

The fingerprint is a sha256 over what decides whether an adapter fits a base and means the same on it:
config.json's bytes, each safetensors file's name, size and JSON header (every tensor's name, dtype, shape and
offsets), the name and size of any other weight file (only when there is no safetensors file: from_pretrained
loads safetensors first, so a .bin or .gguf added beside them later changes nothing), and the names and sizes of
the tokenizer files. No
weights are read: a 70B base costs a few small reads, not minutes of hashing. Two bases with the same
architecture but different weights in files of identical layout are not told apart; a fine-tuned checkpoint
re-saved by another tool usually is (its headers' metadata and offsets differ). No torch here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import struct
from pathlib import Path

TOKENIZER_FILES = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.*", "*.tiktoken", "spiece.model")
OTHER_WEIGHT_FILES = ("*.bin", "*.pt", "*.pth", "*.gguf")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on its header


def base_fingerprint(base_dir: Path) -> str:
    """The hex sha256 identifying the model in `base_dir` (its top-level files, as from_pretrained reads them)."""
    digest = hashlib.sha256()

    def part(*fields) -> None:
        for f in fields:
            data = f if isinstance(f, bytes) else str(f).encode()
            digest.update(struct.pack("<Q", len(data)) + data)  # length-prefixed: no two field lists collide

    files = sorted(p for p in Path(base_dir).iterdir() if p.is_file())
    has_safetensors = any(p.name.endswith(".safetensors") for p in files)
    for path in files:
        name = path.name
        if name == "config.json":
            part("config", path.read_bytes())
        elif name.endswith(".safetensors"):
            part("safetensors", name, path.stat().st_size, safetensors_header(path))
        elif _matches(name, OTHER_WEIGHT_FILES) and not has_safetensors:
            part("weights", name, path.stat().st_size)
        elif _matches(name, TOKENIZER_FILES):
            part("tokenizer", name, path.stat().st_size)
    return digest.hexdigest()


def safetensors_header(path: Path) -> bytes:
    """The JSON header at the start of a .safetensors file (a little-endian u64 length, then the JSON);
    empty when the file is too short or malformed to have one (loading it will say what is wrong)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return b""
        (size,) = struct.unpack("<Q", head)
        return f.read(size) if size <= MAX_HEADER_BYTES else b""


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)
