"""NVML readings: which GPUs a job may have, memory summed over them, and clean degradation without NVML.

There is no GPU here, so NVML is a stand-in module with two cards; the real one ran on the H100 machine
(docs/performance.md: the daemon's GPU memory check before and after each job).
"""

from __future__ import annotations

import sys
import types

import pytest

from daemon.supervisor import gpu


class FakeNVML(types.ModuleType):
    def __init__(self):
        super().__init__("pynvml")
        self.open_sessions = 0
        self.cards = [dict(name="NVIDIA H100 80GB HBM3", used=2 * gpu.GIB, total=80 * gpu.GIB, util=90, pids=[111]),
                      dict(name="NVIDIA H100 80GB HBM3", used=1 * gpu.GIB, total=80 * gpu.GIB, util=10, pids=[])]

    def nvmlInit(self):
        self.open_sessions += 1

    def nvmlShutdown(self):
        self.open_sessions -= 1

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.cards[i]

    def nvmlDeviceGetMemoryInfo(self, card):
        return types.SimpleNamespace(used=card["used"], total=card["total"])

    def nvmlDeviceGetName(self, card):
        return card["name"].encode()

    def nvmlDeviceGetUtilizationRates(self, card):
        return types.SimpleNamespace(gpu=card["util"])

    def nvmlDeviceGetComputeRunningProcesses(self, card):
        return [types.SimpleNamespace(pid=p) for p in card["pids"]]


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield fake
    assert fake.open_sessions == 0  # every reading shuts NVML down again


def test_every_card_counts_unless_cuda_visible_devices_narrows_it(nvml, monkeypatch):
    assert gpu.visible_devices() == ["0", "1"]
    snap = gpu.snapshot()
    assert snap == {"name": "NVIDIA H100 80GB HBM3", "count": 2, "mem_used_gib": 3.0, "mem_total_gib": 160.0,
                    "util_percent": 50.0}
    assert gpu.processes_using_gpu() == [111]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu.visible_devices() == ["1"]
    assert gpu.snapshot()["mem_used_gib"] == 1.0 and gpu.processes_using_gpu() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu.snapshot() is None  # no GPU granted: "no GPU", not a reading of a card we may not use


def test_a_failing_driver_reads_as_no_gpu(nvml):
    def broken(*_):
        raise RuntimeError("NVML: driver/library version mismatch")

    nvml.nvmlDeviceGetCount = broken
    assert gpu.visible_devices() is None and gpu.snapshot() is None and gpu.processes_using_gpu() is None


def test_without_nvml_everything_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert gpu.visible_devices() is None and gpu.snapshot() is None and gpu.processes_using_gpu() is None


def test_memory_back_to_the_reading_before_the_trainer(nvml):
    before = gpu.snapshot()
    nvml.cards[0]["used"] += gpu.GIB // 8  # within the slack: the driver's own bookkeeping
    message, level, fields = gpu.release_report(before)
    assert fields["released"] and level == "info" and fields["seconds"] < 1
    assert message.startswith("GPU memory before 3.00 GiB, after 3.12 GiB (back in ")


def test_memory_a_dead_trainer_left_behind_is_reported(nvml):
    before = gpu.snapshot()
    nvml.cards[1]["used"] += 2 * gpu.GIB
    fields = gpu.wait_for_release(before, timeout=0.3)
    assert fields == {"before_gib": 3.0, "after_gib": 5.0, "released": False, "seconds": fields["seconds"]}
    assert fields["seconds"] >= 0.3


def test_no_gpu_no_memory_check():
    assert gpu.release_report(None) == ("GPU memory not checked: no GPU visible to NVML", "info", {"released": None})
