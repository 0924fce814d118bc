"""What a `base_model:` value names, resolved to a model folder: the one place that knows the rules.

Three kinds of value, told apart by their look alone (never by what happens to exist on disk):
`embedded:NAME` (a converted model under the models folder, daemon/embedded.py), a folder path, or the exact
repo `org/name` in the local Hugging Face cache. Resolving never touches the network and never scans.
No torch here: the daemon resolves base models while it checks a config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from daemon import embedded
from daemon.config_errors import ConfigError, issue

BASE_MODEL_ALLOWED = "a folder holding config.json, org/name in the local Hugging Face cache, or embedded:NAME"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EMBEDDED_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def base_model_kind(value: str) -> str:
    """"embedded", "folder" or "hub"; `./org/name` is the way to write a folder that looks like a repo."""
    if value.startswith(embedded.PREFIX):
        return "embedded"
    if value.startswith(("/", "~", "./", "../")) or value in (".", ".."):
        return "folder"
    return "hub" if HUB_ID.match(value) else "folder"


def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads, by the same environment variables it reads."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "huggingface" / "hub"


def resolve_base_model(value: str) -> Path:
    """The folder a base_model value names; raises ConfigError (path base_model) if there is none."""
    def fail(message: str):
        raise ConfigError([issue("base_model", message, value, BASE_MODEL_ALLOWED)])

    kind = base_model_kind(value)
    if kind == "embedded":
        return _embedded_folder(value[len(embedded.PREFIX):], fail)
    if kind == "hub":
        return _cached_snapshot(value, fail)
    folder = Path(value).expanduser()
    if not folder.is_dir():
        fail(f"the folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        fail(f"the folder {folder} holds no config.json, so it is not a model folder")
    return folder.resolve()


def _embedded_folder(name: str, fail) -> Path:
    if not EMBEDDED_NAME.match(name):
        fail("an embedded model's name is letters, digits, '.', '-' or '_'")
    folder = embedded.embedded_model_dir() / name
    if (folder / "config.json").is_file():
        return folder.resolve()
    if name != embedded.EMBEDDED_NAME:  # setup.sh would not help: say which name it does set up
        fail(f"unknown embedded model {name!r}: there is no {folder}; the embedded model setup converts is "
             f"{embedded.PREFIX}{embedded.EMBEDDED_NAME}")
    fail(f"the embedded model is not set up at {folder}: run `bash scripts/setup.sh` to convert the embedded "
         f"model (or `{embedded.SETUP_COMMAND}` for that step alone)")


def _cached_snapshot(repo_id: str, fail) -> Path:
    """The snapshot refs/main points at (or the only one) of `repo_id` in the local Hugging Face cache."""
    cache = hf_hub_cache()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        fail(f"{repo_id} is not in the local Hugging Face cache ({cache}); nothing is downloaded at run time: "
             f"download it there once (e.g. `hf download {repo_id}`), or point base_model at a folder "
             f"(write ./{repo_id} for a folder by that relative path)")
    ref = repo / "refs" / "main"
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    if ref.is_file():
        folder = repo / "snapshots" / ref.read_text().strip()
    elif len(snapshots) == 1:  # downloaded by revision: no refs/main, but no ambiguity either
        folder = snapshots[0]
    else:
        fail(f"{repo} has no refs/main and {len(snapshots)} snapshots: point base_model at one snapshot folder")
    if not (folder / "config.json").is_file():
        fail(f"the cached snapshot {folder} holds no config.json (an incomplete download?)")
    return folder.resolve()
