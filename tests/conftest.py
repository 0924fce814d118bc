"""Fixtures every test shares: a private root directory per test and one tiny model per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` / `import tiny_model` from tests

from tiny_model import build_tiny_model  # noqa: E402
from real_model_fixture import smollm2_fact  # noqa: E402, F401 - one daemon-trained SmolLM2 adapter per session
from slurm_cluster import slurm_cluster  # noqa: E402, F401 - the shared one-node Slurm cluster


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch) -> Path:
    """The test's own root directory, also the working directory; the hub is off-limits."""
    path = tmp_path / "root"
    path.mkdir()
    monkeypatch.chdir(path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a ChatML tokenizer, built once per session; treat it as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
