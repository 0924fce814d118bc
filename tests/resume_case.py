"""One small job that every interrupted-run test trains, and the adapter an uninterrupted run of it gives.

8 optimizer steps (16 examples, micro-batch 2, no packing), a checkpoint every 2 steps, on CPU in fp32: an
interrupted run that resumes from a complete checkpoint must publish bit-for-bit the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import chat_lines, cli, drop, write_config

NAME = "resume.jsonl"
LINES = chat_lines(16, "resume")
STEPS = 8
SETTINGS = {"training": {"packing": False, "micro_batch_size": 2, "gradient_accumulation": 1,
                         "checkpoint_every_steps": 2, "keep_checkpoints": 2, "precision": "fp32", "seed": 7}}
# After the step-2 checkpoint each micro-batch takes at least this long, so a test can act while a step is in
# flight and well before the last one (no effect on the math).
SLOW_STEPS = {"point": "train_step", "kind": "sleep", "seconds": 0.4, "min_step": 2}

_reference: dict[str, torch.Tensor] | None = None


def configure(root: Path, model_dir: Path, **sections) -> Path:
    merged = {k: {**v, **sections.pop(k, {})} for k, v in SETTINGS.items()}
    return write_config(root, model_dir, **merged, **sections)


def adapter(root: Path, version: int = 1) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / "default" / f"v{version}" / "adapter_model.safetensors"))


def reference(tmp_path_factory, model_dir: Path) -> dict[str, torch.Tensor]:
    """The uninterrupted run's adapter, trained once per test session by the real daemon."""
    global _reference
    if _reference is None:
        root = tmp_path_factory.mktemp("uninterrupted")
        configure(root, model_dir)
        drop(root, NAME, LINES)
        r = cli(root, "run", "--once")
        assert r.returncode == 0, r.stdout + r.stderr
        _reference = adapter(root)
    return _reference


def assert_same_adapter(root: Path, expected: dict[str, torch.Tensor]) -> None:
    got = adapter(root)
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"resumed adapter differs from the uninterrupted one in {different}"
