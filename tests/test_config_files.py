"""The config files as a user meets them: the YAML file itself, base models, per-adapter overrides, `config check`.

The values inside them (ranges, choices, every error at once) are tests/test_config.py, whose helpers this uses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import test_config
from daemon.base_model import resolve_base_model
from daemon.config import (SHIPPED_CONFIG, ConfigError, DaemonConfig, adapter_config, config_check_command,
                           default_config_path, effective_dict, from_dict, load_config)
from helpers import PROJECT, cli
from test_config import config_file, errors_of, write

model = test_config.model  # the fixture: a folder that passes as a model folder


# ------------------------------------------------------------------ the file itself
def test_yaml_syntax_error_names_line_and_column(root):
    path = write(root / "daemon.yaml", "base_model: x\ntraining:\n  epochs: 1\n   lr: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    (err,) = exc.value.errors
    assert err["message"].startswith("YAML syntax error at line 4, column ")
    assert str(path) in str(exc.value)


def test_missing_file_not_a_mapping_and_duplicate_keys(root, model):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(root / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping of keys"):
        load_config(write(root / "list.yaml", "- a\n- b\n"))
    dup = write(root / "dup.yaml", f"base_model: {model}\ntraining:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"training.epochs: given twice \(first at line 3\) \[line 4\]"):
        load_config(dup)


def test_shipped_config_matches_the_defaults_and_loads(root, tmp_path, monkeypatch):
    """Every value written in the shipped file is the code's default: the comments document the truth."""
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    assert shipped["base_model"] == "embedded:smollm2-135m-instruct"
    assert from_dict(shipped).model_dump() == DaemonConfig(base_model=shipped["base_model"]).model_dump()
    monkeypatch.setenv("TRAINING_DAEMON_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(ConfigError, match=r"run `bash scripts/setup.sh` to convert the embedded model"):
        load_config(SHIPPED_CONFIG)
    write(tmp_path / "models" / "smollm2-135m-instruct" / "config.json", "{}")
    cfg = load_config()  # no config in the root: the shipped one
    assert cfg.source_path == SHIPPED_CONFIG.resolve()


def test_default_config_path_prefers_the_roots_config(root, model):
    assert default_config_path(root) == SHIPPED_CONFIG
    config_file(root, model)
    assert default_config_path(root) == root / "config" / "daemon.yaml"
    assert default_config_path(None) == root / "config" / "daemon.yaml"  # None: the current directory


def test_relative_paths_are_relative_to_the_config_file(root, model, tmp_path):
    path = write(tmp_path / "etc" / "daemon.yaml", {"base_model": "../models/base", "root": "../data"})
    cfg = load_config(path)
    assert cfg.base_model == str(model) and cfg.root == str(tmp_path / "data")
    assert load_config(path, root=Path("elsewhere")).root == str(root / "elsewhere")  # --root wins


def test_snapshot_round_trip(root, model):
    cfg = load_config(config_file(root, model, training={"epochs": 3}, lora={"alpha": 8.5}))
    snapshot = json.loads(json.dumps(effective_dict(cfg)))
    assert snapshot["training"]["epochs"] == 3 and snapshot["lora"]["alpha"] == 8.5
    assert "source" not in json.dumps(snapshot)
    assert effective_dict(from_dict(snapshot)) == snapshot
    snapshot["base_model"] = "/gone/since"  # a job resumed after the model moved: the trainer reports it later
    assert from_dict(snapshot).base_model == "/gone/since"


# ------------------------------------------------------------------ base models
def test_base_model_folder(root, model, tmp_path):
    assert resolve_base_model(str(model)) == model
    (tmp_path / "empty").mkdir()
    for value, message in [(str(tmp_path / "empty"), "holds no config.json"), ("/no/such/dir", "does not exist")]:
        with pytest.raises(ConfigError) as exc:
            load_config(config_file(root, Path(value), training={"epochs": 0}))
        assert set(errors_of(exc)) == {"base_model", "training.epochs"}  # reported together
        assert message in errors_of(exc)["base_model"]["message"]


def hub_repo(cache: Path, repo: str, ref: bool = True) -> Path:
    """The layout huggingface_hub leaves: models--org--name/{refs/main, snapshots/<rev>/...}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / "0123abcd"
    write(snap / "config.json", "{}")
    if ref:
        write(base / "refs" / "main", "0123abcd")
    return snap


def test_base_model_in_the_hf_cache(root, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snap = hub_repo(tmp_path / "hf" / "hub", "Org/Model-1.5")
    assert resolve_base_model("Org/Model-1.5") == snap
    cfg = load_config(write(root / "c.yaml", {"base_model": "Org/Model-1.5"}))
    assert cfg.base_model == "Org/Model-1.5"  # kept as named; resolved where it is used

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache2"))
    snap2 = hub_repo(tmp_path / "cache2", "a/b", ref=False)
    assert resolve_base_model("a/b") == snap2  # downloaded by revision: one snapshot, no refs/main
    with pytest.raises(ConfigError, match=r"Org/Model-1.5 is not in the local Hugging Face cache .*cache2"):
        resolve_base_model("Org/Model-1.5")


def test_base_model_embedded(root, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINING_DAEMON_MODELS_DIR", str(tmp_path / "emb"))
    with pytest.raises(ConfigError, match="run `bash scripts/setup.sh`"):
        resolve_base_model("embedded:smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="unknown embedded model 'tiny'.*embedded:smollm2-135m-instruct"):
        resolve_base_model("embedded:tiny")  # setup.sh converts only the one model: no advice to run it
    write(tmp_path / "emb" / "tiny" / "config.json", "{}")
    assert resolve_base_model("embedded:tiny") == tmp_path / "emb" / "tiny"
    with pytest.raises(ConfigError, match="embedded model's name"):
        resolve_base_model("embedded:../tiny")


# ------------------------------------------------------------------ per-adapter overrides
def test_override_merges_over_the_daemon_config(root, model, tmp_path):
    path = config_file(root, model, training={"epochs": 2, "learning_rate": 1e-3}, lora={"r": 8})
    other = tmp_path / "models" / "other"
    write(other / "config.json", "{}")
    write(root / "config" / "adapters" / "bot.yaml",
          {"training": {"epochs": 5}, "lora": {"target_modules": ["q_proj"]}, "base_model": "../../../models/other"})
    cfg = load_config(path)
    bot = adapter_config(cfg, "bot")
    assert (bot.training.epochs, bot.training.learning_rate, bot.lora.r) == (5, 1e-3, 8)
    assert bot.lora.target_modules == ["q_proj"] and bot.base_model == str(other)
    assert bot.source_path == path.resolve()
    plain = adapter_config(cfg, "default", path)
    assert plain.training.epochs == 2 and plain is not cfg
    assert cfg.training.epochs == 2  # the daemon config is untouched


def test_override_errors_name_the_override_file(root, model):
    path = config_file(root, model)
    bad = write(root / "config" / "adapters" / "bot.yaml", "training:\n  epochs: 0\n  lr: 1\n")
    cfg = load_config(path)
    with pytest.raises(ConfigError) as exc:
        adapter_config(cfg, "bot")
    text = str(exc.value)
    assert text.startswith(f"config {bad.resolve()} has 2 errors:")
    assert "training.epochs: too small (got 0; allowed: a whole number from 1 to 1000) [line 2]" in text
    assert "training.lr: unknown key" in text
    write(bad, "limits:\n  max_attempts: 5\n")
    only = r"\(only base_model, training, lora, versions, gpus_per_job\)"
    with pytest.raises(ConfigError, match=r"limits: cannot be set per adapter " + only):
        adapter_config(cfg, "bot")
    write(bad, "base_model: /no/such/model\n")
    with pytest.raises(ConfigError, match="base_model: the folder /no/such/model does not exist"):
        adapter_config(cfg, "bot")
    with pytest.raises(Exception, match="invalid adapter name"):
        adapter_config(cfg, "../x")


# ------------------------------------------------------------------ `config check` and staying light
def test_config_check_prints_the_effective_config(root, model, capsys):
    path = config_file(root, model, training={"epochs": 3})
    write(root / "config" / "adapters" / "bot.yaml", {"lora": {"r": 4}})
    assert config_check_command(path, None) == 0
    out = capsys.readouterr().out
    assert f"# base_model resolves to {model}" in out and "# adapter overrides: bot" in out
    printed = yaml.safe_load(out)
    assert printed["training"]["epochs"] == 3 and printed["training"]["learning_rate"] == 2e-4
    assert from_dict(printed) == from_dict(effective_dict(load_config(path)))

    write(root / "config" / "adapters" / "bot.yaml", {"lora": {"r": 0}})
    assert config_check_command(path, None) == 2
    assert "bot.yaml has 1 error:\n  lora.r: too small" in capsys.readouterr().err


def test_config_check_cli_reports_every_error_and_exits_2(root, model):
    config_file(root, model, training={"epochs": 0, "max_length": 1})
    result = cli(root, "config", "check", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "training.epochs: too small" in result.stderr and "training.max_length: too small" in result.stderr


def test_loading_never_imports_torch_and_is_fast(root, model):
    path = config_file(root, model)
    code = ("import sys, daemon.config as c; c.config_check_command(__import__('pathlib').Path(sys.argv[1]), None); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=PROJECT, capture_output=True, text=True,
                            timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 1.0, f"loading the config took {elapsed:.2f}s"


@pytest.mark.parametrize("bomb, says", [
    ("a: &a [x, x, x]\n" + "".join(f"a{i}: &a{i} [*a, *a]\n" for i in range(9)), "more than 16 aliases"),
    ("loop: &l {self: *l}\n", "recursive alias"),
    ("deep: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
    (f"a: &a {'[' * 20}1{']' * 20}\nb: {'[' * 16}*a{']' * 16}\n", "aliases are expanded"),
])
def test_yaml_aliases_and_nesting_are_bounded(tmp_path, model, bomb, says):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"base_model: {model}\n{bomb}")
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert time.monotonic() - start < 2
    assert len(e.value.errors) == 1 and says in e.value.errors[0]["message"]


def test_a_shown_value_is_cut_without_serialising_it_whole():
    from daemon.config_errors import issue

    loop: list = [1]
    loop.append(loop)
    deep: list = []
    for _ in range(50_000):
        deep = [deep]
    for value in (loop, deep, list(range(10**6)), "x" * 10**6, 10**5000):
        got = issue("k", "bad", value)["got"]
        assert len(got) <= 80
