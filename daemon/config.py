"""The daemon's configuration: YAML validated by pydantic, every error reported at once in plain words.

The daemon process imports this module, so it must stay light: no torch, no transformers (`training-daemon
config check` answers in a fraction of a second). Relative paths in a config file (`root:`, a folder
`base_model:`) are relative to the folder of the file that names them, so a systemd unit started from `/`
reads the same config a user tested from their shell; loading rewrites them to absolute paths, which is
what job snapshots (`config.json`) carry. This file is the only switchboard of a job: every setting that
changes how it trains is a key here, so the snapshot (and the version's metadata) records it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from daemon.base_model import BASE_MODEL_ALLOWED, base_model_kind, resolve_base_model
from daemon.config_errors import ConfigError, issue, line_of, validation_issues
from daemon.config_cluster import GpusPerJob, SlurmConfig, time_limit_problem
from daemon.config_hooks import HookConfig
from daemon.config_versions import VersionsConfig
from daemon.config_yaml import read_yaml
from daemon.paths import PROJECT_DIR, UserError, check_adapter_name, root_problem

SHIPPED_CONFIG = PROJECT_DIR / "config" / "daemon.yaml"
OVERRIDABLE = ("base_model", "training", "lora", "versions", "gpus_per_job")


# ------------------------------------------------------------------ the schema
def _not_bool(v):
    # pydantic would read `epochs: yes` as 1; a boolean where a number belongs is always a mistake.
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


def Int(ge=None, le=None, gt=None):
    return Annotated[int, BeforeValidator(_not_bool), Field(ge=ge, le=le, gt=gt)]


def Num(ge=None, le=None, gt=None):
    return Annotated[float, BeforeValidator(_not_bool), Field(ge=ge, le=le, gt=gt)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntakeConfig(Section):
    settle_seconds: Num(0, 3600) = 2.0
    rescan_seconds: Num(1, 86400) = 30.0
    polling: bool = False
    duplicate_policy: Literal["skip", "train"] = "skip"
    max_line_bytes: Int(1024, 1 << 31) = 16 * 1024 * 1024
    max_file_bytes: Int(1024, 1 << 44) = 16 * 1024 ** 3  # `submit` refuses larger files (and stops reading there)
    ignore_suffixes: list[Annotated[str, Field(min_length=1)]] = [".tmp", ".part"]


class TrainingConfig(Section):
    mode: Literal["continue", "fresh"] = "continue"
    max_length: Int(128, 32768) = 2048
    learning_rate: Num(1e-6, 1e-2) = 2.0e-4
    micro_batch_size: Int(1, 128) = 4
    gradient_accumulation: Int(1, 128) = 4
    epochs: Int(1, 1000) = 1
    max_steps: Int(ge=1) | None = None
    warmup_ratio: Num(0, 0.5) = 0.03
    weight_decay: Num(0, 1) = 0.0
    max_grad_norm: Num(gt=0) | None = 1.0
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    seed: Int(0, 2**32 - 1) = 42
    train_on_inputs: bool = False
    too_long: Literal["skip", "truncate"] = "skip"
    min_examples: Int(ge=1) = 1
    eval_fraction: Num(0, 0.5) = 0.05
    eval_max_examples: Int(0, 100_000) = 100
    packing: bool = True
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    checkpoint_every_steps: Int(ge=1) = 50
    checkpoint_every_seconds: Num(ge=10) = 600.0
    keep_checkpoints: Int(1, 100) = 2
    # A string, so consumers compare one type; YAML's bare true/false are accepted and normalised.
    gradient_checkpointing: Literal["auto", "true", "false"] = "auto"
    # Shard the base model's weights over the job's processes (FSDP); auto: only when it does not fit one GPU.
    fsdp: Literal["auto", "true", "false"] = "auto"
    # auto: varlen flash attention for packed rows on a GPU that has it, else SDPA (daemon/trainer/model.py).
    attention: Literal["auto", "daemon_varlen", "sdpa", "eager"] = "auto"
    # Tokens per micro-batch at most (micro_batch_size halves until it fits); null: micro_batch_size x max_length.
    micro_batch_tokens: Int(128, 1 << 20) | None = None
    # Liger's fused RMSNorm/SwiGLU/RoPE kernels, on a GPU where liger-kernel is installed.
    liger_kernels: bool = True
    # torch.compile of each decoder layer over fixed-shape packed micro-batches, Liger off (daemon/trainer/compiled.py):
    # auto: on a GPU for models under 3B parameters (host-bound; measured faster), eager on CPU and for larger models.
    compile: Literal["auto", "true", "false"] = "auto"
    # Preference files (prompt/chosen/rejected) train with DPO: beta weighs the log-ratio to the job's starting
    # point (higher: stay closer to it); loss sigmoid (DPO) or ipo (docs/dpo.md); sft_weight: RPO's weight of the
    # chosen answers' mean token NLL added to the loss (keeps where they stop likely); 0: plain DPO.
    dpo_beta: Num(0.01, 10) = 0.1
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    dpo_sft_weight: Num(0, 10) = 1.0

    @field_validator("gradient_checkpointing", "fsdp", "compile", mode="before")
    @classmethod
    def _bool_to_word(cls, v):
        return str(v).lower() if isinstance(v, bool) else v


class LoraConfig(Section):
    r: Int(1, 1024) = 16
    alpha: Num(1, 4096) = 32.0
    dropout: Num(0, 1) = 0.05
    # base: LoRA weights in the base model's dtype (bf16 on a GPU: faster, less memory); fp32: fp32 adapters.
    dtype: Literal["base", "fp32"] = "base"
    target_modules: Union[str, list[str]] = Field(
        "all-linear", json_schema_extra={"allowed": '"all-linear" or a non-empty list of module names'})

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v):
        if v == "all-linear" or (isinstance(v, list) and v and all(isinstance(x, str) and x for x in v)):
            return v
        raise ValueError('must be "all-linear" or a non-empty list of module names like [q_proj, v_proj]')


class LimitsConfig(Section):
    max_attempts: Int(1, 100) = 3
    oom_retries: Int(0, 10) = 3
    min_free_disk_mb: Int(ge=0) = 1024
    stop_timeout_seconds: Num(1, 3600) = 120.0
    # A trainer that says nothing (no event) for this long is stalled, killed, and its attempt counted as failed.
    # 20 min covers loading a large base from a slow disk, a checkpoint's save and progress_every_steps slow
    # steps; a job whose progress lines come slower than that gets three times its own pace.
    stall_timeout_seconds: Num(5, 604800) = 1200.0
    start_timeout_seconds: Num(5, 604800) = 600.0  # to the trainer's first event: importing torch & co
    max_diverged_steps: Int(1, 100) = 3


class WebConfig(Section):
    enabled: bool = True
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Int(0, 65535) = 8765
    # The page may never starve the daemon: connections beyond this get a 503 (and the server also keeps it
    # under a quarter of the process's open-file limit); a silent or dribbling client is dropped.
    max_connections: Int(1, 4096) = 64
    idle_timeout_seconds: Num(0.5, 3600) = 10.0
    request_timeout_seconds: Num(1, 3600) = 30.0


class StatusConfig(Section):
    progress_every_steps: Int(ge=1) = 10
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    web: WebConfig = WebConfig()
    # TensorBoard event files per job under checkpoints/<adapter>/tensorboard/job-<id> (needs `tensorboard`).
    tensorboard: bool = False


class DaemonConfig(Section):
    root: str | None = None
    base_model: str = Field(json_schema_extra={"allowed": BASE_MODEL_ALLOWED})
    trust_remote_code: bool = False
    intake: IntakeConfig = IntakeConfig()
    training: TrainingConfig = TrainingConfig()
    lora: LoraConfig = LoraConfig()
    limits: LimitsConfig = LimitsConfig()
    status: StatusConfig = StatusConfig()
    versions: VersionsConfig = VersionsConfig()
    hooks: list[HookConfig] = []
    gpus: Union[str, int, list[int]] = Field(
        "all", json_schema_extra={"allowed": "all, a number of GPUs like 2, or a list of GPU indices like [0, 1]"})
    # Without a visible GPU a job still trains on one process unless this asks for more (gloo on CPU): what
    # the multi-process tests run in CI, and a way to try the multi-GPU code paths without GPUs.
    cpu_processes: Int(1, 64) = 1
    # Start the next job's trainer while waiting for a file (daemon/supervisor/standby.py); auto: on a GPU host only.
    trainer_prestart: Literal["auto", "true", "false"] = "auto"
    # Several jobs at once (config_cluster.py): how many GPUs of `gpus` one job takes (per adapter too), and
    # how many jobs may train at once (None: as many as the GPUs allow, 1 on the CPU; 4 Slurm jobs).
    gpus_per_job: GpusPerJob = "all"
    max_parallel_jobs: Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=256)] | None = None
    executor: Literal["local", "slurm"] = "local"
    slurm: SlurmConfig = SlurmConfig()

    _source: Path | None = PrivateAttr(default=None)  # the file it came from: overrides live next to it

    @property
    def source_path(self) -> Path | None:
        return self._source

    @field_validator("root")
    @classmethod
    def _root(cls, v):
        problem = root_problem(v) if v else None
        if problem:  # `root: /` would create /inbox, /queue, /state and /checkpoints
            raise ValueError(problem)
        return v

    @field_validator("trainer_prestart", mode="before")
    @classmethod
    def _prestart_word(cls, v):
        return str(v).lower() if isinstance(v, bool) else v

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v):
        if v == "all":
            return v
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
        if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            return list(dict.fromkeys(v))
        raise ValueError("must be `all`, a number of GPUs (1 or more), or a non-empty list of GPU indices like [0, 1]")


# ------------------------------------------------------------------ paths in the file
def _absolutize(data: dict, folder: Path) -> None:
    """Relative `root:` and folder `base_model:` are relative to the config file that names them."""
    if isinstance(data.get("root"), str) and data["root"]:
        data["root"] = str((folder / Path(data["root"]).expanduser()).resolve())
    bm = data.get("base_model")
    if isinstance(bm, str) and base_model_kind(bm) == "folder":
        data["base_model"] = str((folder / Path(bm).expanduser()).resolve())
    versions = data.get("versions")
    if isinstance(versions, dict) and isinstance(versions.get("eval_file"), str) and versions["eval_file"]:
        versions["eval_file"] = str((folder / Path(versions["eval_file"]).expanduser()).resolve())


def _validate(data: dict, lines: dict, source: Path | None, check_base_model: bool) -> DaemonConfig:
    issues = []
    try:
        cfg = DaemonConfig.model_validate(data)
    except ValidationError as e:
        cfg, issues = None, validation_issues(e, DaemonConfig, lines)
    if check_base_model and isinstance(data.get("base_model"), str):
        try:
            resolve_base_model(data["base_model"])
        except ConfigError as e:
            issues += [dict(i, line=line_of(lines, ("base_model",))) for i in e.errors]
    eval_file = (data.get("versions") or {}).get("eval_file") if isinstance(data.get("versions"), dict) else None
    if check_base_model and isinstance(eval_file, str) and eval_file and not Path(eval_file).is_file():
        issues.append(issue("versions.eval_file", "must be an existing JSONL file (the standing eval set)",
                            eval_file, line=line_of(lines, ("versions", "eval_file"))))
    if cfg is not None and source is not None and (short := time_limit_problem(cfg)):  # not a job's snapshot
        issues.append(issue("slurm.time_limit", short, cfg.slurm.time_limit,
                            line=line_of(lines, ("slurm", "time_limit"))))
    if issues:  # in the order a reader meets them in the file
        raise ConfigError(sorted(issues, key=lambda i: i["line"] or 1 << 30), source)
    cfg._source = source
    return cfg


# ------------------------------------------------------------------ public API
def default_config_path(root: Path | None) -> Path:
    """ROOT/config/daemon.yaml if there is one, else the shipped config/daemon.yaml."""
    candidate = Path(root if root is not None else Path.cwd()).expanduser() / "config" / "daemon.yaml"
    return candidate if candidate.is_file() else SHIPPED_CONFIG


def load_config(path: Path | None = None, root: Path | None = None) -> DaemonConfig:
    """Read, validate and check a daemon config; raises ConfigError listing every problem. `root` overrides `root:`."""
    path = Path(path if path is not None else default_config_path(root)).expanduser().resolve()
    data, lines = read_yaml(path)
    _absolutize(data, path.parent)
    if root is not None:
        data["root"] = str(Path(root).expanduser().resolve())
    return _validate(data, lines, path, check_base_model=True)


def override_path(config_path: Path, adapter: str) -> Path:
    return Path(config_path).parent / "adapters" / f"{check_adapter_name(adapter)}.yaml"


def adapter_config(cfg: DaemonConfig, adapter: str, config_path: Path | None = None) -> DaemonConfig:
    """`cfg` with config/adapters/<adapter>.yaml (if any) deep-merged over it; errors name that file.

    Read at every call, so an edited override applies from the next job without restarting the daemon.
    """
    config_path = config_path or cfg.source_path
    file = override_path(config_path, adapter) if config_path else None
    if file is None or not file.is_file():
        return cfg.model_copy(deep=True)
    file = file.resolve()
    data, lines = read_yaml(file)
    stray = [issue(k, f"cannot be set per adapter (only {', '.join(OVERRIDABLE)})", data[k], line=lines.get((k,)))
             for k in data if k not in OVERRIDABLE]
    if stray:
        raise ConfigError(stray, file)
    _absolutize(data, file.parent)
    merged = _merge(cfg.model_dump(), data)
    out = _validate(merged, lines, file, check_base_model="base_model" in data)
    out._source = cfg.source_path or Path(config_path)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def effective_dict(cfg: DaemonConfig) -> dict:
    """Every setting, defaults included, JSON-able; from_dict() reads it back."""
    return cfg.model_dump(mode="json")


# Keys an older version wrote into every job's config.json snapshot and this one no longer has. A user's config
# that sets one is refused ("unknown key"), but a snapshot of a job started before an upgrade must still load,
# or that job could never resume.
RETIRED_SNAPSHOT_KEYS = {"training": ("log_every_steps",)}


def from_dict(d: dict) -> DaemonConfig:
    """Re-validate a snapshot (a job's config.json) without checking that the base model still exists."""
    d = dict(d)
    for section, keys in RETIRED_SNAPSHOT_KEYS.items():
        if isinstance(d.get(section), dict):
            d[section] = {k: v for k, v in d[section].items() if k not in keys}
    return _validate(d, {}, None, check_base_model=False)


# ------------------------------------------------------------------ `training-daemon config check`
def config_check_command(config_path: Path | None, root: Path | None) -> int:
    """Print the effective config as YAML (0), or every error (2). Also checks every adapter override.

    Like the other commands, honours $TRAINING_DAEMON_CONFIG and $TRAINING_DAEMON_ROOT when no option is given.
    """
    root = root or (Path(os.environ["TRAINING_DAEMON_ROOT"]) if os.environ.get("TRAINING_DAEMON_ROOT") else None)
    if config_path is None and os.environ.get("TRAINING_DAEMON_CONFIG"):
        config_path = Path(os.environ["TRAINING_DAEMON_CONFIG"])
    try:
        cfg = load_config(config_path, root)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    failed = False
    overrides = []
    for file in sorted((cfg.source_path.parent / "adapters").glob("*.yaml")):
        try:
            adapter_config(cfg, file.stem)
            overrides.append(file.stem)
        except UserError as e:  # a ConfigError, or a file name that is no valid adapter name
            print(f"Error: {e}", file=sys.stderr)
            failed = True
    if failed:
        return 2
    print(f"# effective config from {cfg.source_path}")
    print(f"# base_model resolves to {resolve_base_model(cfg.base_model)}")
    print(f"# adapter overrides: {', '.join(overrides) if overrides else 'none'}")
    print(yaml.safe_dump(effective_dict(cfg), sort_keys=False, default_flow_style=False), end="")
    return 0
