"""Where the embedded default base model, SmolLM2-135M-Instruct, lives once converted: names and folders only.

`embedded:smollm2-135m-instruct` is what the shipped config trains on. Setting it up (downloading a GGUF
from PyPI and converting it with torch) is the trainer side's job, daemon/trainer/embedded_setup.py; this
module is in the shared core, which the daemon process imports, so it never imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.paths import PROJECT_DIR

EMBEDDED_NAME = "smollm2-135m-instruct"
PREFIX = "embedded:"
MODELS_DIR_ENV = "TRAINING_DAEMON_MODELS_DIR"
SOURCE_FILE = "embedded_source.json"  # the conversion's provenance, written last
SETUP_COMMAND = "python -m daemon.trainer.embedded_setup"


def embedded_model_dir() -> Path:
    """The folder holding converted embedded models: $TRAINING_DAEMON_MODELS_DIR or <project>/models."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser().resolve() if env else PROJECT_DIR / "models"


def embedded_model_path(name: str = EMBEDDED_NAME) -> Path:
    return embedded_model_dir() / name


def is_converted(path: Path) -> bool:
    # A conversion only ever appears under its final name complete (temp folder + rename), so any
    # folder there with its provenance file is whole.
    return (path / SOURCE_FILE).is_file() and (path / "config.json").is_file()
