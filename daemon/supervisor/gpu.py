"""GPU readings through NVML, for the daemon (which never imports torch).

pynvml (nvidia-ml-py) is absent or finds no driver on CPU machines: every function then returns None,
so callers print "no GPU" rather than fail.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

GIB = 1024**3


@contextmanager
def _nvml():
    """pynvml, initialised for the block and shut down after it; None without NVML or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def visible_indices(nvml) -> list[int]:
    count = nvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return list(range(count)) if visible is None else []
    indices = []
    for part in visible.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            indices.append(int(part))
    return indices


# Every GPU visible_devices() has named in this process. With several jobs at once, a GPU that drops off the bus
# (or NVML not answering for a moment) must not shrink the pool or turn it into CPU slots while other jobs use
# the GPUs: gone_devices() names what was seen and is missing now, and the gate blocks the queue on it.
_seen: dict[str, None] = {}


def visible_devices() -> list[str] | None:
    """The GPUs a job may be granted, as CUDA_VISIBLE_DEVICES entries (indices, or UUIDs if that is how the
    variable names them); None without NVML, [] when CUDA_VISIBLE_DEVICES hides every GPU."""
    now = _visible_now()
    for entry in now or ():
        _seen[entry] = None
    return now


def gone_devices() -> list[str]:
    """The GPUs this process saw visible earlier and does not see now (NVML silent counts as none seen)."""
    now = set(visible_devices() or ())
    return [entry for entry in _seen if entry not in now]


def _visible_now() -> list[str] | None:
    with _nvml() as nvml:
        if nvml is None:
            return None
        try:
            count = nvml.nvmlDeviceGetCount()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is None:
                return [str(i) for i in range(count)]
            entries = [p.strip() for p in visible.split(",") if p.strip()]
            return [e for e in entries if not e.isdigit() or int(e) < count]
        except Exception:
            return None


def _chosen(nvml, index: int, handle, devices) -> bool:
    """Whether GPU `index` is one of `devices` (CUDA_VISIBLE_DEVICES entries: indices or UUIDs); None: all."""
    if devices is None or str(index) in devices:
        return True
    try:
        uuid = nvml.nvmlDeviceGetUUID(handle)
    except Exception:
        return False
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    return any(uuid.startswith(d) for d in devices if not d.isdigit())


def snapshot(devices: list[str] | tuple[str, ...] | None = None) -> dict | None:
    """Memory and utilisation summed over the visible GPUs (only `devices` of them, if given: one job's GPUs
    while others train on the rest), or None without NVML."""
    with _nvml() as nvml:
        if nvml is None:
            return None
        try:
            names, used, total, util = [], 0, 0, []
            for i in visible_indices(nvml):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                if not _chosen(nvml, i, handle, devices):
                    continue
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                names.append(name.decode() if isinstance(name, bytes) else name)
                used += mem.used
                total += mem.total
                try:
                    util.append(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except Exception:
                    pass
            if not names:
                return None
            return {
                "name": names[0] if len(set(names)) == 1 else ", ".join(names),
                "count": len(names),
                "mem_used_gib": round(used / GIB, 3),
                "mem_total_gib": round(total / GIB, 3),
                "util_percent": round(sum(util) / len(util), 1) if util else None,
            }
        except Exception:
            return None


def processes_using_gpu() -> list[int] | None:
    """PIDs holding GPU memory (compute processes), or None without NVML."""
    with _nvml() as nvml:
        if nvml is None:
            return None
        try:
            return [proc.pid for i in visible_indices(nvml)
                    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(i))]
        except Exception:
            return None


def wait_for_release(before: dict, slack_gib: float = 0.25, timeout: float = 15.0, devices=None) -> dict:
    """After a trainer exited: wait until the GPUs' memory is back to the `before` reading (give or take
    `slack_gib`; the driver frees a dead process's memory a moment after it is reaped). Returns the
    verdict: {"before_gib", "after_gib" (None if NVML stopped answering), "released", "seconds"}."""
    start = time.monotonic()
    after = snapshot(devices)
    while after and after["mem_used_gib"] > before["mem_used_gib"] + slack_gib and time.monotonic() - start < timeout:
        time.sleep(0.25)
        after = snapshot(devices)
    released = after is not None and after["mem_used_gib"] <= before["mem_used_gib"] + slack_gib
    return {"before_gib": before["mem_used_gib"], "after_gib": after["mem_used_gib"] if after else None,
            "released": released, "seconds": round(time.monotonic() - start, 2)}


def release_report(before: dict | None, devices=None) -> tuple[str, str, dict]:
    """The daemon's GPU check after a trainer exited, as (message, level, fields) for its status line;
    `before`: the snapshot taken before the trainer started (None: no GPU to check), of `devices` (the job's
    GPUs; None: every visible one), the same ones read now: other jobs' GPUs must not blur the reading."""
    if before is None:
        return "GPU memory not checked: no GPU visible to NVML", "info", {"released": None}
    check = wait_for_release(before, devices=devices)
    after = f"{check['after_gib']:.2f}" if check["after_gib"] is not None else "nan"
    message = (f"GPU memory before {check['before_gib']:.2f} GiB, after {after} GiB"
               + (f" (back in {check['seconds']:.1f}s)" if check["released"] else " - NOT released"))
    return message, "info" if check["released"] else "warning", check
