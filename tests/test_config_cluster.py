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
