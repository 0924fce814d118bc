"""The config as a user meets it: YAML files, every error at once, overrides, base models, `config check`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon.base_model import resolve_base_model
from daemon.config import (SHIPPED_CONFIG, ConfigError, DaemonConfig, adapter_config, config_check_command,
                           default_config_path, effective_dict, from_dict, load_config)
from helpers import PROJECT, cli


@pytest.fixture
def model(tmp_path) -> Path:
    """A folder that passes as a model folder: only config.json is checked at load time."""
    d = tmp_path / "models" / "base"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def config_file(root: Path, model: Path, **sections) -> Path:
    return write(root / "config" / "daemon.yaml", {"base_model": str(model), **sections})


def errors_of(exc: pytest.ExceptionInfo) -> dict[str, dict]:
    return {e["path"]: e for e in exc.value.errors}


def set_key(d: dict, dotted: str, value) -> dict:
    *sections, key = dotted.split(".")
    node = d
    for s in sections:
        node = node.setdefault(s, {})
    node[key] = value
    return d


# ------------------------------------------------------------------ ranges: each guarded key at and past its bounds
RANGES = [  # key, lowest allowed, highest allowed (None: unbounded), whole numbers only
    ("intake.settle_seconds", 0, 3600, False), ("intake.rescan_seconds", 1, 86400, False),
    ("intake.max_line_bytes", 1024, 1 << 31, True),
    ("training.max_length", 128, 32768, True), ("training.learning_rate", 1e-6, 1e-2, False),
    ("training.micro_batch_size", 1, 128, True), ("training.gradient_accumulation", 1, 128, True),
    ("training.epochs", 1, 1000, True), ("training.max_steps", 1, None, True),
    ("training.warmup_ratio", 0, 0.5, False), ("training.weight_decay", 0, 1, False),
    ("training.seed", 0, 2**32 - 1, True), ("training.min_examples", 1, None, True),
    ("training.eval_fraction", 0, 0.5, False), ("training.eval_max_examples", 0, 100000, True),
    ("training.checkpoint_every_steps", 1, None, True), ("training.checkpoint_every_seconds", 10, None, False),
    ("training.keep_checkpoints", 1, 100, True), ("training.micro_batch_tokens", 128, 1 << 20, True),
    ("lora.r", 1, 1024, True), ("lora.alpha", 1, 4096, False), ("lora.dropout", 0, 1, False),
    ("limits.max_attempts", 1, 100, True), ("limits.oom_retries", 0, 10, True),
    ("limits.min_free_disk_mb", 0, None, True), ("limits.stop_timeout_seconds", 1, 3600, False),
    ("limits.max_diverged_steps", 1, 100, True),
    ("status.progress_every_steps", 1, None, True), ("status.web.port", 0, 65535, True),
]


def below(x, whole):
    return x - 1 if whole else math.nextafter(x, -math.inf)


def above(x, whole):
    return x + 1 if whole else math.nextafter(x, math.inf)


@pytest.mark.parametrize("key,lo,hi,whole", RANGES, ids=[r[0] for r in RANGES])
def test_range_boundaries(key, lo, hi, whole):
    for ok in [lo] + ([hi] if hi is not None else []):
        cfg = from_dict(set_key({"base_model": "/m"}, key, ok))
        assert effective_dict(cfg)[key.split(".")[0]] is not None
    for bad in [below(lo, whole)] + ([above(hi, whole)] if hi is not None else []):
        with pytest.raises(ConfigError) as exc:
            from_dict(set_key({"base_model": "/m"}, key, bad))
        (err,) = exc.value.errors
        assert err["path"] == key
        assert err["message"] in ("too small", "too large")
        assert (str(int(lo)) if float(lo).is_integer() else f"{lo:g}") in err["allowed"]


def test_max_grad_norm_positive_or_null():
    assert from_dict({"base_model": "/m", "training": {"max_grad_norm": None}}).training.max_grad_norm is None
    assert from_dict({"base_model": "/m", "training": {"max_grad_norm": 1e-9}}).training.max_grad_norm == 1e-9
    with pytest.raises(ConfigError, match=r"training.max_grad_norm: too small \(got 0; allowed: a number, "
                                          r"above 0, or null\)"):
        from_dict({"base_model": "/m", "training": {"max_grad_norm": 0}})


def test_whole_numbers_and_booleans_are_not_mixed_up():
    with pytest.raises(ConfigError) as exc:
        from_dict({"base_model": "/m", "training": {"epochs": 1.5, "micro_batch_size": True, "packing": "maybe"}})
    errs = errors_of(exc)
    assert errs["training.epochs"]["message"] == "must be a whole number"
    assert "true/false" in errs["training.micro_batch_size"]["message"]
    assert errs["training.packing"]["allowed"] == "true or false"
    # YAML 1.1 reads `2e-4` as text; it still means the number the user wrote.
    assert from_dict({"base_model": "/m", "training": {"learning_rate": "2e-4"}}).training.learning_rate == 2e-4


def test_choices():
    cfg = from_dict({"base_model": "/m", "training": {"gradient_checkpointing": True, "mode": "fresh"}})
    assert cfg.training.gradient_checkpointing == "true" and cfg.training.mode == "fresh"
    assert from_dict({"base_model": "/m", "training": {"gradient_checkpointing": False}}) \
        .training.gradient_checkpointing == "false"
    with pytest.raises(ConfigError) as exc:
        from_dict({"base_model": "/m", "training": {"lr_scheduler": "step", "precision": "fp16", "too_long": "x"},
                   "intake": {"duplicate_policy": "always"}})
    errs = errors_of(exc)
    assert errs["training.lr_scheduler"]["allowed"] == "one of cosine, linear, constant"
    assert errs["training.precision"]["allowed"] == "one of auto, bf16, fp32"
    assert errs["training.too_long"]["allowed"] == "one of skip, truncate"
    assert errs["intake.duplicate_policy"]["allowed"] == "one of skip, train"


def test_how_a_job_trains_is_config_and_lands_in_the_snapshot():
    """Attention, LoRA dtype, micro-batch token budget and Liger kernels: keys, not environment switches."""
    defaults = effective_dict(from_dict({"base_model": "/m"}))
    assert (defaults["training"]["attention"], defaults["training"]["micro_batch_tokens"],
            defaults["training"]["liger_kernels"], defaults["lora"]["dtype"]) == ("auto", None, True, "base")
    chosen = effective_dict(from_dict({"base_model": "/m", "lora": {"dtype": "fp32"},
                                       "training": {"attention": "sdpa", "micro_batch_tokens": 4096,
                                                    "liger_kernels": False}}))
    assert chosen["training"]["attention"] == "sdpa" and chosen["training"]["micro_batch_tokens"] == 4096
    assert chosen["training"]["liger_kernels"] is False and chosen["lora"]["dtype"] == "fp32"
    with pytest.raises(ConfigError) as exc:
        from_dict({"base_model": "/m", "training": {"attention": "flash"}, "lora": {"dtype": "fp16"}})
    errs = errors_of(exc)
    assert errs["training.attention"]["allowed"] == "one of auto, daemon_varlen, sdpa, eager"
    assert errs["lora.dtype"]["allowed"] == "one of base, fp32"


def test_a_snapshot_from_before_an_upgrade_still_loads_but_a_users_config_may_not_use_a_retired_key(root, model):
    """A job started by an older version has `training.log_every_steps` in its config.json: it must resume."""
    old_snapshot = effective_dict(from_dict({"base_model": "/m"}))
    old_snapshot["training"]["log_every_steps"] = 10
    assert from_dict(old_snapshot).training.max_steps == DaemonConfig(base_model="/m").training.max_steps
    (root / "config").mkdir(exist_ok=True)
    path = root / "config" / "daemon.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(model), "training": {"log_every_steps": 10}}))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "training.log_every_steps" in errors_of(exc)


def test_target_modules_and_gpus():
    cfg = from_dict({"base_model": "/m", "lora": {"target_modules": ["q_proj", "v_proj"]}, "gpus": [1, 0, 1]})
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.gpus == [1, 0]
    assert from_dict({"base_model": "/m"}).gpus == "all"
    for bad in ([], "q_proj", [""], [3]):
        with pytest.raises(ConfigError, match="lora.target_modules: must be \"all-linear\" or a non-empty list"):
            from_dict({"base_model": "/m", "lora": {"target_modules": bad}})
    assert from_dict({"base_model": "/m", "gpus": 2}).gpus == 2
    for bad in ("some", [-1], [0.5], [True], [], 0, True):
        with pytest.raises(ConfigError, match="gpus: must be `all`, a number of GPUs"):
            from_dict({"base_model": "/m", "gpus": bad})


# ------------------------------------------------------------------ every error at once, in plain words
def test_every_error_reported_at_once_with_paths_values_ranges_and_lines(root, model):
    path = write(root / "config" / "daemon.yaml", f"""\
base_model: {model}
training:
  learning_rate: 0.5
  epochs: 0
  learning_rat: 0.001
lora:
  r: 2000
status:
  web:
    port: -1
limits: 3
""")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.exit_code == 2
    lines = str(exc.value).splitlines()
    assert lines[0] == f"config {path} has 6 errors:"
    assert lines[1:] == [
        "  training.learning_rate: too large (got 0.5; allowed: a number from 1e-06 to 0.01) [line 3]",
        "  training.epochs: too small (got 0; allowed: a whole number from 1 to 1000) [line 4]",
        "  training.learning_rat: unknown key, did you mean learning_rate? (got 0.001; allowed: keys: mode, "
        "max_length, learning_rate, micro_batch_size, gradient_accumulation, epochs, max_steps, warmup_ratio, "
        "weight_decay, max_grad_norm, lr_scheduler, seed, train_on_inputs, too_long, min_examples, eval_fraction, "
        "eval_max_examples, packing, precision, checkpoint_every_steps, checkpoint_every_seconds, keep_checkpoints, "
        "gradient_checkpointing, fsdp, attention, micro_batch_tokens, liger_kernels, dpo_beta, dpo_loss, "
        "dpo_sft_weight) [line 5]",
        "  lora.r: too large (got 2000; allowed: a whole number from 1 to 1024) [line 7]",
        "  status.web.port: too small (got -1; allowed: a whole number from 0 to 65535) [line 10]",
        "  limits: must be a section of keys (got 3; allowed: a section with keys max_attempts, oom_retries, "
        "min_free_disk_mb, stop_timeout_seconds, stall_timeout_seconds, start_timeout_seconds, "
        "max_diverged_steps) [line 11]",
    ]
    assert exc.value.errors[0] == {"path": "training.learning_rate", "message": "too large", "got": "0.5",
                                   "allowed": "a number from 1e-06 to 0.01", "line": 3}


@pytest.mark.parametrize("data,path,hint", [
    ({"trainig": {}}, "trainig", "did you mean training?"),
    ({"intake": {"settle_second": 1}}, "intake.settle_second", "did you mean settle_seconds?"),
    ({"lora": {"lora_alpha": 16}}, "lora.lora_alpha", "did you mean alpha?"),
    ({"status": {"web": {"prot": 1}}}, "status.web.prot", "did you mean port?"),
    ({"limits": {"whatever": 1}}, "limits.whatever", None),
])
def test_unknown_keys_are_rejected_with_a_suggestion(data, path, hint):
    with pytest.raises(ConfigError) as exc:
        from_dict({"base_model": "/m", **data})
    (err,) = exc.value.errors
    assert err["path"] == path
    assert err["message"] == (f"unknown key, {hint}" if hint else "unknown key")
    assert err["allowed"].startswith("keys: ")


def test_base_model_is_required(root):
    path = write(root / "config" / "daemon.yaml", "")
    with pytest.raises(ConfigError, match=r"base_model: required \(allowed: a folder holding config.json"):
        load_config(path)


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
