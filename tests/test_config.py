"""The config's values as a user meets them: ranges, whole numbers and choices, every error at once, unknown keys.

The files themselves (YAML, base models, per-adapter overrides, `config check`) are tests/test_config_files.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from daemon.config import ConfigError, DaemonConfig, effective_dict, from_dict, load_config


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
        "gradient_checkpointing, fsdp, attention, micro_batch_tokens, liger_kernels, compile, dpo_beta, "
        "dpo_loss, dpo_sft_weight) [line 5]",
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
