"""An early trainer's head start on loading: the base model built in host memory while it waits for the GPU,
and its CUDA context made in a thread at the go while the main thread does the CPU work that comes next.

Waiting at the GPU gate (gpu_gate.wait) the process may use the CPU and host memory but never the GPU, so
`Preload` runs `from_pretrained` on the CPU there and attaches a fresh LoRA (lora_attach.py), in a thread (the
go is acted on at once either way). After the go, model.load_for_training takes that model instead of loading
again, if the memory plan wants what was built: not a 4-bit base (bitsandbytes loads onto the GPU itself) and
the same dtype; otherwise the preload is dropped and the usual path loads. On a CPU-only host the same head
start applies (the CPU is then the device). Host memory is bounded: a preload is made only when the weights
take at most 1/PRELOAD_SHARE of the memory available, so several waiting trainers never crowd the host.

`EarlyCuda` reads the card's baseline and sets the allocator (card_memory.py: both must come before the
context), then a thread makes the context and loads cuBLAS while the main thread reads the standing set and
chooses the parent version and replay. torch's lazy init is thread-safe: the first CUDA call of the main thread
waits for the thread's if it is still under way.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

from daemon.trainer import warm

PRELOAD_SHARE = 8  # a preload may take at most this share of MemAvailable


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes (the qlora extra) can be imported. Importing it (peft does, at its own import) asks
    torch for every visible GPU's capability, which selects each device, and CUDA 12 makes a device's context when
    it is selected: so where it is installed, nothing imports peft before the GPU go."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def mem_available() -> int | None:
    """/proc/meminfo's MemAvailable in bytes, or None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def preload_device():
    """Where the job will train: "cuda" where torch sees a GPU (asked without creating a context), else "cpu"."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preload_dtype(precision: str, device):
    """The dtype load_for_training will want (model.resolve_dtype), decided without creating a CUDA context:
    on a GPU bf16 for auto and bf16 (a GPU without bf16 makes load_for_training drop the preload), fp32 for fp32;
    on the CPU fp32 unless bf16 was asked for."""
    import torch

    precision = str(precision).lower()
    if device.type == "cuda":
        return torch.float32 if precision == "fp32" else torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else torch.float32


def parameter_count(files: list[Path]) -> int:
    """The tensors' elements in these safetensors files, from their headers (no weights read); ValueError for
    a file without a readable header (a Git LFS pointer, a truncated file)."""
    from daemon.trainer.fingerprint import safetensors_header

    total = 0
    for path in files:
        header = json.loads(safetensors_header(path) or b"null")
        if not isinstance(header, dict):
            raise ValueError(f"{path.name} has no safetensors header")
        for name, tensor in header.items():
            if name != "__metadata__":
                if not isinstance(tensor, dict) or not isinstance(tensor.get("shape"), list):
                    raise ValueError(f"{path.name}: {name} has no shape")
                total += math.prod(tensor["shape"])
    return total


def loaded_files(base_dir: Path) -> list[Path]:
    """The safetensors files from_pretrained reads: those an index names (model.safetensors.index.json) where
    there is one, else every .safetensors file; [] when the weights are in another format."""
    files = warm.weight_files(base_dir)
    if not files or not all(p.name.endswith(".safetensors") for p in files):
        return []
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return files
        return [p for p in files if p.name in named] or files
    return files


def why_not_preload(base_dir: Path, cfg, available: int | None, device, dtype,
                    card_total: int | None = None) -> str | None:
    """Why the base is not built in host memory while waiting (None: it is). Host memory: the weights as they
    will be held (in `dtype`), for every rank of the job on this host (each preloads its own), at most
    1/PRELOAD_SHARE of what is available. On a GPU of `card_total` bytes, weights of more than half of it are
    likely loaded in 4 bits or sharded by the memory plan: not preloaded in full."""
    import torch

    files = loaded_files(base_dir)
    if not files:
        return "no safetensors weights"
    try:
        size = parameter_count(files) * torch.finfo(dtype).bits // 8
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        return f"the weights' headers are unreadable here ({e})"
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if available is None or size * ranks * PRELOAD_SHARE > available:
        return (f"the weights ({size / 2**30:.1f} GiB{f' x {ranks} processes' if ranks > 1 else ''}) would take "
                f"more than 1/{PRELOAD_SHARE} of the host memory available "
                f"({'unknown' if available is None else f'{available / 2**30:.1f} GiB'})")
    if device.type == "cuda" and card_total and size > card_total / 2:
        return (f"the weights ({size / 2**30:.1f} GiB) take more than half of the GPU's {card_total / 2**30:.0f} GiB: "
                "the memory plan may load them in 4 bits or shard them")
    return None


def card_total_bytes() -> int | None:
    """The memory of this rank's GPU, from NVML (no CUDA context); None without NVML."""
    from daemon.trainer import card_memory

    handle = card_memory.nvml_handle(int(os.environ.get("LOCAL_RANK", "0") or 0))
    return None if handle is None else card_memory.device_total(handle)


class Preload:
    """from_pretrained on the CPU in a thread; `take()` waits for it and hands the model over once."""

    def __init__(self, base_dir: Path, cfg, device=None):
        self.base_dir, self.cfg = base_dir, cfg
        self.device = preload_device() if device is None else device
        self.dtype = preload_dtype(cfg.training.precision, self.device)
        self.model = None
        self.error: str | None = None
        self.dropped: str | None = None  # why load_for_training did not take it
        self.base_only = bitsandbytes_installed()  # then the LoRA is attached after the go
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True, name="preload-base")

    @classmethod
    def start(cls, base_dir: Path, cfg, device=None) -> tuple["Preload | None", str | None]:
        """(the running preload, None), or (None, why not); `device`: where the job trains (default: a GPU if
        torch sees one)."""
        device = preload_device() if device is None else device
        reason = why_not_preload(base_dir, cfg, mem_available(), device, preload_dtype(cfg.training.precision, device),
                                 card_total_bytes() if device.type == "cuda" else None)
        if reason is not None:
            return None, reason
        preload = cls(base_dir, cfg, device)
        preload._thread.start()
        return preload, None

    def _run(self) -> None:
        from daemon.trainer import lora_attach
        from daemon.trainer.model import from_pretrained_kwargs

        t0 = time.monotonic()
        try:
            from transformers import AutoModelForCausalLM

            kwargs = from_pretrained_kwargs(self.cfg, self.device, self.dtype)
            model = AutoModelForCausalLM.from_pretrained(self.base_dir, **kwargs)
            # As prepare_model casts a loaded base, float buffers too (RoPE's inv_freq stays fp32 otherwise),
            # before the LoRA is attached (whose weights keep their own dtype: lora.dtype fp32).
            model = model.to(dtype=self.dtype)
            # The LoRA needs peft, which imports bitsandbytes where it is installed (bitsandbytes_installed).
            self.model = model if self.base_only else lora_attach.fresh_lora(model, self.cfg)
        except Exception as e:  # the load after the go will meet it again and say so in the job's error
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.monotonic() - t0

    def wait(self) -> None:
        """Until the thread is done. The trainer waits at its go, before anything else of the job runs: the
        thread seeds torch's global CPU generator for the LoRA's init, and transformers sets the global default
        dtype while it builds, so nothing else may run torch beside it."""
        self._thread.join()

    def take(self):
        """The model built on the CPU (None if the load failed), once: the preload holds no reference after."""
        self.wait()
        model, self.model = self.model, None
        return model

    def drop(self, why: str) -> None:
        self.wait()
        self.model, self.dropped = None, why

    def note(self) -> str:
        if self.error:
            return f"building the base in host memory failed ({self.error}); loading it after the go instead"
        built = (f"built the base in host memory while waiting for the GPU ({self.seconds:.1f} s; its LoRA after "
                 "the go: bitsandbytes is installed, and peft imports it)" if self.base_only else
                 f"built the base and its LoRA in host memory while waiting for the GPU ({self.seconds:.1f} s)")
        return f"{built}, not used: {self.dropped}" if self.dropped else built


class EarlyCuda:
    """The card's baseline and the allocator's settings now, then the CUDA context and cuBLAS in a thread;
    `note()` says how long it took or what failed (the main thread's first CUDA call meets a failure again)."""

    def __init__(self) -> None:
        from daemon.trainer import card_memory

        card_memory.CardMemory.before_cuda().reset_peak()
        card_memory.configure_allocator()
        self.index = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.seconds = 0.0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="early-cuda")
        self._thread.start()

    def _run(self) -> None:
        import torch

        t0 = time.monotonic()
        try:
            a = torch.ones(64, 64, device=f"cuda:{self.index}", dtype=torch.bfloat16)
            (a @ a).sum().item()  # loads cuBLAS and waits for the device: the context is whole after this
        except Exception as e:  # the main thread's first CUDA call meets it again and fails the job with it
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.monotonic() - t0

    def note(self) -> str:
        self._thread.join()
        if self.error:
            return f"making the CUDA context at the go failed: {self.error}"
        return f"the CUDA context was made at the go, beside the CPU work ({self.seconds:.2f} s)"
