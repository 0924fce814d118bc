"""The memory plan budgets what the card shows (NVML), and the card's reading degrades cleanly without NVML.

CPU only: the arithmetic of daemon/trainer/memory_plan.py and the NVML plumbing of daemon/trainer/card_memory.py
against a fake pynvml. The caps themselves are checked on a GPU by `bench/run.py --cap-plan`.
"""

from __future__ import annotations

import types

import pytest

from daemon.trainer import card_memory, memory_plan
from daemon.trainer.memory_plan import GIB

LLAMA_8B = memory_plan.Shape(n_params=8_030_000_000, n_layers=32, hidden=4096, intermediate=14336, vocab=128256,
                             n_kv_heads=8, head_dim=128)
CONTEXT = int(0.47 * GIB)  # an H100's CUDA context on NVML (docs/performance.md)


def on_card(cap_gib: float, **kw):
    """The plan on a card of `cap_gib` (or under that cap): the context is in use, the rest is free."""
    return memory_plan.plan_memory(LLAMA_8B, free_bytes=int(cap_gib * GIB) - CONTEXT, outside_bytes=CONTEXT,
                                   max_length=2048, micro_batch_size=8, **kw)


@pytest.mark.parametrize("expandable", [False, True])
def test_llama_8b_at_2048_fits_a_24_gib_card_as_the_card_sees_it(expandable):
    plan = on_card(24, expandable_segments=expandable)
    assert plan.gradient_checkpointing and not plan.quantize_4bit and 1 <= plan.micro_batch_size < 8
    assert plan.estimated_peak_gib <= plan.budget_gib
    assert plan.card_peak_gib <= 24
    assert plan.card_peak_gib > plan.estimated_peak_gib + 0.47  # the context, libraries, fragmentation on top
    assert "the card" in plan.reason and plan.expandable_segments is expandable


@pytest.mark.parametrize("expandable", [False, True])
def test_llama_8b_at_2048_under_16_gib_takes_the_4bit_base(expandable):
    plan = on_card(16, can_quantize=True, expandable_segments=expandable)
    assert plan.quantize_4bit and plan.gradient_checkpointing and plan.micro_batch_size >= 1
    assert plan.card_peak_gib <= 16
    # 15 GiB of bf16 weights and a context leave nothing for a bf16 base: without bitsandbytes nothing fits.
    assert on_card(16, expandable_segments=expandable).estimated_peak_gib is None


def test_the_card_peak_is_the_allocated_peak_plus_what_the_allocator_does_not_count():
    peak = 10 * GIB
    plain = memory_plan.card_peak_bytes(peak, outside_bytes=CONTEXT)
    assert plain == pytest.approx(CONTEXT + memory_plan.LIBRARY_OVERHEAD + peak * (1 + memory_plan.FRAGMENTATION))
    assert memory_plan.card_peak_bytes(peak, outside_bytes=CONTEXT, expandable_segments=True) < plain
    assert memory_plan.card_peak_bytes(peak) == pytest.approx(  # no reading: the CUDA_CONTEXT default
        plain - CONTEXT + memory_plan.CUDA_CONTEXT)
    # The budget is the inverse: an allocated peak at the budget puts the card exactly at free + context.
    for world, sharded, expandable in [(1, False, False), (1, False, True), (4, False, False), (4, True, True)]:
        free = 20 * GIB
        budget = memory_plan.allocated_budget_bytes(free, world_size=world, sharded=sharded,
                                                    expandable_segments=expandable)
        card = memory_plan.card_peak_bytes(budget, outside_bytes=CONTEXT, world_size=world, sharded=sharded,
                                           expandable_segments=expandable)
        assert card == pytest.approx(free + CONTEXT)


def test_several_processes_budget_nccl_buffers_and_fsdp_fragmentation():
    one = memory_plan.card_peak_bytes(10 * GIB, outside_bytes=CONTEXT)
    data_parallel = memory_plan.card_peak_bytes(10 * GIB, outside_bytes=CONTEXT, world_size=4)
    fsdp = memory_plan.card_peak_bytes(10 * GIB, outside_bytes=CONTEXT, world_size=4, sharded=True)
    assert data_parallel - one == pytest.approx(memory_plan.NCCL_BUFFERS)
    assert fsdp - data_parallel == pytest.approx(10 * GIB * memory_plan.FRAGMENTATION_FSDP_EXTRA)
    # 16 GB of bf16 weights cannot fit 12 GiB whole: sharded over 4, with NCCL's buffers, the card still fits.
    plan = memory_plan.plan_memory(LLAMA_8B, free_bytes=12 * GIB - CONTEXT, outside_bytes=CONTEXT, max_length=1024,
                                   micro_batch_size=8, world_size=4)
    assert plan.fsdp and plan.card_peak_gib <= 12


def test_the_constants_cover_what_was_measured():
    # llama-3.1-8b at 2048 under a 24 GiB cap (H100, default allocator): NVML 21.3 GiB, allocator peak 18.9 GiB.
    assert memory_plan.card_peak_bytes(18.9 * GIB, outside_bytes=CONTEXT) >= 21.3 * GIB
    # ... and the plan's own estimate of that run's allocated peak stays above the measured one.
    assert on_card(24).estimated_peak_gib >= 18.9
    # QLoRA llama-3.1-8b under a 10 GiB cap, micro-batch 2 x 1024: 7.0 GiB measured. bitsandbytes keeps the
    # embedding and the head in bf16 (2 GiB of the 8B's weights), which the estimate now counts.
    qlora = memory_plan.plan_memory(LLAMA_8B, free_bytes=10 * GIB - CONTEXT, outside_bytes=CONTEXT,
                                    max_length=1024, micro_batch_size=8, can_quantize=True)
    assert qlora.quantize_4bit and qlora.micro_batch_size == 2 and qlora.estimated_peak_gib >= 7.0
    assert qlora.card_peak_gib <= 10


def test_4bit_weights_leave_the_embedding_and_head_in_bf16():
    untied = memory_plan.weight_bytes(LLAMA_8B, quantize=True)
    embed = 2 * 128256 * 4096
    assert untied == pytest.approx((8_030_000_000 - embed) * 0.56 + embed * 2)
    tied = memory_plan.Shape(**{**LLAMA_8B.__dict__, "tied_embeddings": True})
    assert memory_plan.weight_bytes(tied, quantize=True) < untied
    assert memory_plan.weight_bytes(LLAMA_8B, quantize=False) == 8_030_000_000 * 2


def test_no_reading_plans_as_before():
    plan = memory_plan.plan_memory(LLAMA_8B, free_bytes=None, max_length=1024, micro_batch_size=8)
    assert (plan.micro_batch_size, plan.card_peak_gib, plan.budget_gib) == (8, None, None)


# --------------------------------------------------------------------------- the allocator's settings
def test_expandable_segments_unless_the_user_chose():
    assert card_memory.allocator_settings({}) == {"variable": "PYTORCH_ALLOC_CONF", "value": "expandable_segments:True",
                                                  "set_by": "daemon", "expandable_segments": True}
    user = card_memory.allocator_settings({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})
    assert user["set_by"] == "user" and user["value"] == "max_split_size_mb:128" and not user["expandable_segments"]
    new = card_memory.allocator_settings({"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6,"
                                                                "expandable_segments:True",
                                          "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"})
    assert new["variable"] == "PYTORCH_ALLOC_CONF" and new["expandable_segments"]
    assert card_memory.expandable_in_force({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})


def test_configure_allocator_leaves_a_cpu_process_alone(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env: dict = {}
    assert card_memory.configure_allocator(env)["applied"] is False and env == {}
    env = {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}
    assert card_memory.configure_allocator(env)["set_by"] == "user"
    assert env == {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}


# --------------------------------------------------------------------------- the card's reading
NOT_AVAILABLE = (1 << 64) - 1


def fake_nvml(procs, used):
    """A pynvml with one device: `procs` [(pid, usedGpuMemory)], `used` the device's used memory (a list, so
    a test can change it)."""
    handles = {}

    def by_index(i):
        return handles.setdefault(("index", i), f"h{i}")

    return types.SimpleNamespace(
        nvmlDeviceGetHandleByIndex=by_index,
        nvmlDeviceGetHandleByUUID=lambda u: handles.setdefault(("uuid", u), f"h-{u}"),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=used[0]),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=p, usedGpuMemory=m)
                                                        for p, m in procs],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: [])


def test_without_nvml_every_reading_is_none(monkeypatch):
    monkeypatch.setattr(card_memory, "_nvml", False)
    card = card_memory.CardMemory(0)
    assert card.handle is None and card.sample() is None and card.peak is None and card.outside_allocator() is None
    assert card_memory.card_reading(None, 1, None) == (None, None)


def test_the_process_figure_first_then_the_device_less_its_baseline(monkeypatch):
    import os

    used = [3 * GIB]
    monkeypatch.setattr(card_memory, "_nvml", fake_nvml([(os.getpid(), 2 * GIB), (1, 5 * GIB)], used))
    card = card_memory.CardMemory(0, environ={})
    assert card.baseline == 3 * GIB
    assert card.sample() == 2 * GIB and card.source == "nvml_process"

    # In a container NVML lists the host's pids (or no figure): the device's used memory less the baseline.
    monkeypatch.setattr(card_memory, "_nvml", fake_nvml([(os.getpid(), NOT_AVAILABLE)], used))
    used[0] = 7 * GIB
    assert card.sample() == 4 * GIB and card.source == "nvml_device_minus_baseline" and card.peak == 4 * GIB
    used[0] = 5 * GIB
    assert card.sample() == 2 * GIB and card.peak == 4 * GIB  # the peak stays
    card.reset_peak()
    assert card.peak is None
    no_baseline = card_memory.CardMemory(0, environ={}, baseline=False)
    assert no_baseline.sample() is None  # no per-process figure and no baseline: unknown, not a guess


def test_the_device_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(card_memory, "_nvml", fake_nvml([], [0]))
    assert card_memory.nvml_handle(1, {"CUDA_VISIBLE_DEVICES": "3,5"}) == "h5"
    assert card_memory.nvml_handle(0, {"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == "h-GPU-abc"
    assert card_memory.nvml_handle(0, {"CUDA_VISIBLE_DEVICES": "MIG-abc"}) is None
    assert card_memory.nvml_handle(2, {}) == "h2"


def test_metadata_and_progress_carry_the_card_beside_the_allocator_on_cpu():
    from daemon.trainer.publish_step import card_memory_fields
    from daemon.trainer.recipe import LoRARecipe

    recipe = LoRARecipe.__new__(LoRARecipe)
    assert recipe.memory_report() == {}  # before setup, and on CPU: nothing
    fields = card_memory_fields(recipe)
    assert fields == {"gpu_peak_card_gib": None, "gpu_peak_reserved_gib": None, "gpu_card_source": None,
                      "gpu_allocator": None}
