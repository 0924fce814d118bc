"""/metrics: the Prometheus collector of the status page (daemon/supervisor/web.py), read from the daemon's files.

At every scrape it reads status.json, counts the queue folders and reads the versions' metadata, as the page
does, so the metrics never disagree with `training-daemon status`. prometheus-client is imported by the caller.
"""

from __future__ import annotations

from daemon.durable import read_json
from daemon.paths import ADAPTER_NAME
from daemon.supervisor.job import JobStatus
from daemon.supervisor.spool import Spool
from daemon.supervisor.status import running_jobs
from daemon.version_states import summary
from daemon.versions import damaged_versions

# A running job's readings in status.json: (key, metric name after training_daemon_current_ / _job_, HELP).
_JOB_READINGS = (("job_id", "job_id", "Id of the job being trained"),
                 ("step", "step", "Optimizer step"),
                 ("total_steps", "total_steps", "Total steps"),
                 ("loss", "loss", "Latest training loss"),
                 ("eval_loss", "eval_loss", "Latest eval loss"),
                 ("reward_accuracy", "reward_accuracy",
                  "Latest step's reward accuracy (preference jobs): pairs whose chosen answer wins"),
                 ("lr", "learning_rate", "Current learning rate"),
                 ("tokens_per_s", "tokens_per_second", "Training throughput"),
                 ("eta_s", "eta_seconds", "Estimated seconds left"),
                 ("gpu_mem_gib", "gpu_memory_gib", "GPU memory the trainer holds (torch)"),
                 ("gpu_peak_card_gib", "gpu_card_peak_gib",
                  "Peak GPU memory the card shows for the trainer (NVML): allocator reserve and CUDA context included"))
# The current_* HELP texts as they always were (the others read the same for either family).
_CURRENT_HELP = {"step": "Optimizer step of the current job", "total_steps": "Total steps of the current job"}


class FileCollector:
    """A prometheus-client Collector that reads the daemon's files at every scrape."""

    def __init__(self, spool: Spool):
        self.layout = spool.layout
        self.spool = spool

    @staticmethod
    def _per_job(G, running: list[dict]):
        """One series per running job, labelled with its job_id and adapter (slot and executor on job_info)."""
        info = G("training_daemon_job_info", "1 per running job: where it trains and its phase",
                 labels=["job_id", "adapter", "phase", "slot", "executor"])
        families = {key: G(f"training_daemon_job_{name}", f"{doc}, per running job", labels=["job_id", "adapter"])
                    for key, name, doc in _JOB_READINGS if key != "job_id"}
        for job in running:
            labels = [str(job.get("job_id", "")), str(job.get("adapter", ""))]
            info.add_metric(labels + [str(job.get("phase") or "training"), str(job.get("slot") or ""),
                                      str(job.get("executor") or "local")], 1)
            for key, family in families.items():
                if isinstance(job.get(key), (int, float)):
                    family.add_metric(labels, job[key])
        yield info
        yield from families.values()

    def collect(self):
        import time

        from prometheus_client.core import GaugeMetricFamily as G

        status = read_json(self.layout.status_json) or {}
        d = status.get("daemon") or {}
        jobs = G("training_daemon_jobs", "Jobs by state (counted from the queue folders)", labels=["state"])
        for s in JobStatus:
            jobs.add_metric([s.value], self.spool.count(s))
        yield jobs
        info = G("training_daemon_info", "The daemon's version and pid", labels=["version", "pid", "state"])
        info.add_metric([str(d.get("version", "")), str(d.get("pid", "")), str(d.get("state", "unknown"))], 1)
        yield info
        if status.get("updated_unix"):
            yield G("training_daemon_status_age_seconds", "Seconds since status.json was written (about 1 while the "
                    "daemon lives)", value=max(0.0, time.time() - status["updated_unix"]))
        running = running_jobs(status)
        cur = running[0] if running else {}
        yield G("training_daemon_training", "1 while a job is training", value=1 if cur else 0)
        if status:
            parallel = d.get("parallel") or {}
            # `running` counts early trainers prepared and waiting for the GPU too; parallel tells them apart.
            yield G("training_daemon_running_jobs", "Jobs training now",
                    value=parallel.get("running", len(running)))
            yield G("training_daemon_prepared_jobs", "Jobs prepared by an early trainer, waiting for the GPU",
                    value=parallel.get("prepared", 0))
            # A daemon of the previous version wrote no `parallel`: it ran one job at a time.
            at_most = parallel.get("max", 1)
            if isinstance(at_most, (int, float)):
                yield G("training_daemon_max_parallel_jobs", "Jobs that may train at the same time", value=at_most)
        # The oldest running job as `current_*`, as before there were several; every one as `job_*`.
        for key, name, doc in _JOB_READINGS:
            if isinstance(cur.get(key), (int, float)):
                g = G(f"training_daemon_current_{name}", _CURRENT_HELP.get(key, doc), labels=["adapter"])
                g.add_metric([str(cur.get("adapter", ""))], cur[key])
                yield g
        if running:
            yield from self._per_job(G, running)
        gpu = status.get("gpu") or {}
        for key, name, doc, scale in (("mem_used_gib", "gpu_memory_used_bytes", "GPU memory in use", 2**30),
                                      ("mem_total_gib", "gpu_memory_total_bytes", "GPU memory in total", 2**30),
                                      ("util_percent", "gpu_utilization_percent", "GPU busy percentage", 1)):
            if isinstance(gpu.get(key), (int, float)):
                yield G(f"training_daemon_{name}", doc, value=gpu[key] * scale)
        latest = G("training_daemon_adapter_latest_version", "The version `latest` points at (promoted)",
                   labels=["adapter"])
        newest = G("training_daemon_adapter_newest_version", "Newest published version, held or not",
                   labels=["adapter"])
        held = G("training_daemon_adapter_held_versions", "Versions the promotion gate held and nobody promoted since",
                 labels=["adapter"])
        for name, a in summary(self.layout.checkpoints).items():
            for gauge, value in ((latest, a["latest"]), (newest, a["newest"]), (held, len(a["held"]))):
                if value is not None:
                    gauge.add_metric([name], value)
        yield from (latest, newest, held)
        damaged = G("training_daemon_adapter_damaged_versions", "Version folders with a file missing or of another "
                    "size than published, or no metadata.json (never trained on)", labels=["adapter"])
        for adapter_dir in sorted(self.layout.checkpoints.glob("*")):
            if adapter_dir.is_dir() and ADAPTER_NAME.match(adapter_dir.name):
                damaged.add_metric([adapter_dir.name], len(damaged_versions(adapter_dir)))
        yield damaged
