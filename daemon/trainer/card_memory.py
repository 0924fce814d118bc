"""GPU memory as the card sees it (NVML), beside the allocator's own figures, and the allocator's settings.

torch.cuda.max_memory_allocated is what tensors held; the card shows more: the CUDA context and the kernels of
the libraries loaded into it (cuBLAS, flash attention, Triton/Liger), NCCL's buffers, and what the caching
allocator reserved but does not use (fragmentation). Measured on an H100: llama-3.1-8b at 2048 tokens under a
24 GiB cap showed 21.3 GiB on the card (NVML) for an 18.9 GiB allocator peak. `CardMemory` reads the card's
figure for this process so that metadata and progress events can show both (daemon/trainer/memory_plan.py budgets
the card's figure).

The reading is NVML's per-process usedGpuMemory for our pid on our device. Where NVML does not list our pid (in a
container NVML reports the host's pids), it is the device's used memory minus the reading taken before this
process touched the GPU (`baseline()`): other processes' memory that came or went since counts too, which
`source` says. Without NVML (no pynvml, no driver, CPU) every reading is None and nothing else changes.
"""

from __future__ import annotations

import os
import threading

GIB = 1024**3

EXPANDABLE = "expandable_segments:True"
ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the new name first; the old is a deprecated alias


# --------------------------------------------------------------------------- the allocator's settings
def allocator_settings(environ=None) -> dict:
    """What the trainer's CUDA caching allocator should run with: the user's PYTORCH_ALLOC_CONF (or the older
    PYTORCH_CUDA_ALLOC_CONF) when either is set, whatever it says; expandable segments otherwise.

    Expandable segments map more physical memory into one growing virtual segment instead of cudaMalloc'ing
    fixed-size blocks, so a freed block can serve a request of another size: less memory reserved but unused
    (the fragmentation the memory plan budgets). Safe for this trainer: it shares no CUDA tensor between
    processes (CUDA IPC of expandable segments is where the known issues are, pytorch#130330 and #198305), uses
    no MemPool/symmetric memory (which refuse them, pytorch#147851), and ranks talk through NCCL collectives
    on ordinary tensors. torch 2.9.1 ignored expandable_segments in PYTORCH_ALLOC_CONF (pytorch#183387, fixed
    by 2.11), so they are also set through the allocator's runtime API (`configure_allocator`)."""
    environ = os.environ if environ is None else environ
    for name in ALLOC_ENV:
        if environ.get(name):
            return {"variable": name, "value": environ[name], "set_by": "user",
                    "expandable_segments": _says_expandable(environ[name])}
    return {"variable": ALLOC_ENV[0], "value": EXPANDABLE, "set_by": "daemon", "expandable_segments": True}


def _says_expandable(value: str) -> bool:
    for item in value.split(","):
        key, _, val = item.partition(":")
        if key.strip() == "expandable_segments":
            return val.strip().lower() == "true"
    return False


def expandable_in_force(environ=None) -> bool:
    """Whether this process's allocator was told to make expandable segments (the environment, or the runtime
    setting configure_allocator made)."""
    environ = os.environ if environ is None else environ
    if any(_says_expandable(environ.get(name) or "") for name in ALLOC_ENV):
        return True
    try:
        import torch

        return _says_expandable(torch._C._accelerator_getAllocatorSettings())
    except Exception:
        return False


def configure_allocator(environ=None) -> dict:
    """Apply `allocator_settings` to this process (before the model loads; segments made earlier keep their kind)
    and to its children; returns them, with `applied` False where torch refused the runtime setting. Once per
    process: a second call (the next recipe in one process, bench/run.py) returns what the first one did."""
    global _configured
    if environ is None and _configured is not None:
        return _configured
    settings = _configure(os.environ if environ is None else environ)
    if environ is None:
        _configured = settings
    return settings


_configured: dict | None = None


def _configure(environ) -> dict:
    settings = allocator_settings(environ)
    if settings["set_by"] != "daemon":
        return settings
    import torch

    if not torch.cuda.is_available():  # no CUDA allocator to configure (CPU): the environment stays as it is
        return {**settings, "applied": False}
    environ[settings["variable"]] = settings["value"]
    applied = True
    try:
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        if setter is None:  # before torch 2.9
            setter = torch.cuda.memory._set_allocator_settings
        setter(settings["value"])
    except Exception:  # an allocator or a build that does not take the setting: the default allocator runs
        applied = False
    return {**settings, "applied": applied}


# --------------------------------------------------------------------------- NVML
_nvml = None
_nvml_lock = threading.Lock()


def _nvml_module():
    """pynvml, initialised once; None without it or without a driver."""
    global _nvml
    with _nvml_lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception:
                _nvml = False
        return _nvml or None


def nvml_handle(index: int, environ=None):
    """NVML's handle for CUDA device `index` of this process (CUDA_VISIBLE_DEVICES entries: indices or UUIDs);
    None without NVML, or for a MIG slice (NVML has no per-process memory there)."""
    nvml = _nvml_module()
    if nvml is None:
        return None
    environ = os.environ if environ is None else environ
    visible = [v.strip() for v in (environ.get("CUDA_VISIBLE_DEVICES") or "").split(",") if v.strip()]
    entry = visible[index] if index < len(visible) else str(index)
    try:
        if entry.startswith("MIG-"):
            return None
        if entry.startswith("GPU-"):
            return nvml.nvmlDeviceGetHandleByUUID(entry)
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    except Exception:
        return None


def device_used(handle) -> int | None:
    return _memory_info(handle, "used")


def device_total(handle) -> int | None:
    return _memory_info(handle, "total")


def _memory_info(handle, field: str) -> int | None:
    nvml = _nvml_module()
    try:
        return int(getattr(nvml.nvmlDeviceGetMemoryInfo(handle), field))
    except Exception:
        return None


def process_used(handle, pid: int) -> int | None:
    """NVML's usedGpuMemory of `pid` on the device; None where NVML does not list it or has no figure."""
    nvml = _nvml_module()
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nvml, query)(handle)
        except Exception:
            continue
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            if p.pid == pid and isinstance(used, int) and used < (1 << 62):  # NVML_VALUE_NOT_AVAILABLE is all ones
                return used
    return None


def card_reading(handle, pid: int, baseline: int | None) -> tuple[int | None, str | None]:
    """(bytes this process uses on the card, how that was read): NVML's per-process figure, or the device's used
    memory minus `baseline`."""
    if handle is None:
        return None, None
    used = process_used(handle, pid)
    if used is not None:
        return used, "nvml_process"
    total = device_used(handle)
    if total is None or baseline is None:
        return None, None
    return max(0, total - baseline), "nvml_device_minus_baseline"


class CardMemory:
    """The card's reading of this process's GPU memory, and its peak over `sample()` calls."""

    def __init__(self, index: int = 0, *, environ=None, baseline: bool = True):
        """`baseline`: read the device's used memory now, as what others use (only right before this process
        creates its CUDA context); without it only NVML's per-process figure is read."""
        self.index = index
        self.handle = nvml_handle(index, environ)
        self.baseline = device_used(self.handle) if self.handle is not None and baseline else None
        self.pid = os.getpid()
        self.peak: int | None = None
        self.source: str | None = None

    @classmethod
    def before_cuda(cls, environ=None) -> "CardMemory":
        """This process's reading of cuda:LOCAL_RANK (accelerate's device), its baseline taken now: call it before
        the process creates its CUDA context. for_device() hands the same one out afterwards."""
        environ = os.environ if environ is None else environ
        index = int(environ.get("LOCAL_RANK", "0") or 0)
        card = _cards.get(index)
        if card is None or card.baseline is None:
            card = _cards[index] = cls(index, environ=environ, baseline=_cuda_untouched())
        return card

    def reset_peak(self) -> None:
        self.peak = None

    def sample(self) -> int | None:
        used, source = card_reading(self.handle, self.pid, self.baseline)
        if used is not None:
            self.source = source
            self.peak = used if self.peak is None else max(self.peak, used)
        return used

    def outside_allocator(self) -> int | None:
        """What the card shows for this process beyond the allocator's reserved memory now: its CUDA context,
        the libraries' kernels and workspaces, NCCL's buffers."""
        used = self.sample()
        if used is None:
            return None
        import torch

        return max(0, used - torch.cuda.memory_reserved(self.index))

    def report(self) -> dict:
        """The keys progress events and metadata carry: the card's peak (NVML, sampled), the allocator's reserved
        peak (torch), and where the card's figure came from. Empty on CPU."""
        import torch

        if not torch.cuda.is_available():
            return {}
        self.sample()
        return {"gpu_peak_card_gib": None if self.peak is None else round(self.peak / GIB, 3),
                "gpu_peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.index) / GIB, 3),
                "gpu_card_source": self.source}


_cards: dict[int, CardMemory] = {}


def _cuda_untouched() -> bool:
    """No CUDA context yet in this process (the baseline is then others' memory only)."""
    try:
        import torch

        return not torch.cuda.is_initialized()
    except Exception:
        return True


def for_device(index: int) -> CardMemory:
    """This process's CardMemory of device `index`: the one made before CUDA (before_cuda), or one that reads
    NVML's per-process figure only."""
    card = _cards.get(index)
    if card is None:
        card = _cards[index] = CardMemory(index, baseline=_cuda_untouched())
    return card


class Poller:
    """Samples a CardMemory every `interval` seconds in a thread (bench/run.py: the card's true peak, not only at
    progress events)."""

    def __init__(self, card: CardMemory, interval: float = 0.05):
        self.card, self.interval = card, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CardMemory:
        self._thread.start()
        return self.card

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.card.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.card.sample()
