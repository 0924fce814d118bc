"""The keys that say where jobs run: several at once (`gpus_per_job`, `max_parallel_jobs`) and the executor."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daemon.config import ConfigError, adapter_config, load_config


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "models" / "base"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


def config(root: Path, model: Path, **keys) -> Path:
    path = root / "config" / "daemon.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"base_model": str(model), **keys}, sort_keys=False))
    return path


def test_defaults_keep_one_job_at_a_time_on_local_processes(root, model):
    cfg = load_config(config(root, model))
    assert (cfg.gpus_per_job, cfg.max_parallel_jobs, cfg.executor) == ("all", None, "local")
    assert cfg.slurm.nodes == 1 and cfg.slurm.requeue is True and cfg.slurm.extra_sbatch == []


def test_every_cluster_error_is_reported_at_once_with_its_key(root, model):
    path = config(root, model, gpus_per_job=0, max_parallel_jobs=True, executor="kubernetes",
                  slurm={"nodes": 0, "time_limit": "two hours", "extra_sbatch": ["--job-name=x", "rm -rf /"],
                         "partition": "gpu; rm", "poll_seconds": 0.01, "colour": "blue"})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    paths = {e["path"] for e in exc.value.errors}
    assert {"gpus_per_job", "max_parallel_jobs", "executor", "slurm.nodes", "slurm.time_limit",
            "slurm.partition", "slurm.poll_seconds", "slurm.colour"} <= paths
    assert any(p.startswith("slurm.extra_sbatch") for p in paths)
    text = str(exc.value)
    assert "gpus_per_job" in text and "a number of GPUs per job" in text


def test_slurm_settings_as_an_operator_writes_them(root, model):
    cfg = load_config(config(root, model, executor="slurm", max_parallel_jobs=8,
                             slurm={"partition": "gpu", "account": "ml-team", "time_limit": "1-12:00:00",
                                    "nodes": 2, "gpus_per_node": 4, "extra_sbatch": ["--constraint=h100"]}))
    assert cfg.executor == "slurm" and cfg.slurm.gpus_per_node == 4 and cfg.slurm.time_limit == "1-12:00:00"


def test_gpus_per_job_can_be_set_per_adapter(root, model):
    path = config(root, model, gpus_per_job=1)
    override = root / "config" / "adapters" / "big.yaml"
    override.parent.mkdir(parents=True)
    override.write_text("gpus_per_job: 4\n")
    cfg = load_config(path)
    assert adapter_config(cfg, "big").gpus_per_job == 4 and adapter_config(cfg, "small").gpus_per_job == 1
    override.write_text("executor: slurm\n")
    with pytest.raises(ConfigError, match="executor: cannot be set per adapter"):
        adapter_config(cfg, "big")


@pytest.mark.parametrize("line", ["--array=1-4", "--wait", "--clusters=other", "--ntasks=8", "--ntasks-per-node=2",
                                  "--nodes=3", "--signal=USR2@60", "--requeue", "--no-requeue", "--open-mode=truncate",
                                  "--hold", "--test-only", "--parsable", "--wrap=true", "--job-name=x", "--output=/x",
                                  "--error=/x", "--chdir=/x", "--ou=/x", "--arr=0-3", "--WAIT", "--ntasks-per=1"])
def test_extra_sbatch_refuses_what_the_daemon_sets_or_cannot_watch(root, model, line):
    """Each of these breaks one job per attempt, an answer at once, or the daemon's own settings; a getopt prefix
    (`--ou` is --output to sbatch) is refused like the whole name."""
    with pytest.raises(ConfigError) as exc:
        load_config(config(root, model, executor="slurm", slurm={"extra_sbatch": ["--exclusive", line]}))
    assert [e["path"] for e in exc.value.errors] == ["slurm.extra_sbatch"]
    assert "--array" in str(exc.value) and line in str(exc.value) and "--exclusive," not in str(exc.value)


def test_extra_sbatch_keeps_the_options_an_operator_needs(root, model):
    extra = ["--constraint=h100", "--exclusive", "--begin=now+60", "--nodelist=n1", "--gres=gpu:2", "--comment=x"]
    cfg = load_config(config(root, model, executor="slurm", slurm={"extra_sbatch": extra}))
    assert cfg.slurm.extra_sbatch == extra


def test_a_slurm_time_limit_too_short_for_a_warm_stop_and_a_start_is_refused_with_the_numbers(root, model):
    limits = {"stop_timeout_seconds": 120, "start_timeout_seconds": 600}
    with pytest.raises(ConfigError) as exc:
        load_config(config(root, model, executor="slurm", limits=limits, slurm={"time_limit": "13:00"}))
    (error,) = exc.value.errors
    assert error["path"] == "slurm.time_limit"
    assert "780 s" in error["message"] and "(120 s) + 60 s" in error["message"] and "(600 s)" in error["message"]
    for fine in ("14", "1-0", "0:13:01", "UNLIMITED"):  # 14 min > 13 min; a day; 781 s; no limit
        assert load_config(config(root, model, executor="slurm", limits=limits,
                                  slurm={"time_limit": fine})).slurm.time_limit == fine
    # Only Slurm's time limit: the local executor ignores the key.
    assert load_config(config(root, model, limits=limits, slurm={"time_limit": "1"})).executor == "local"
