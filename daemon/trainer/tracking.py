"""TensorBoard logs of a job (status.tensorboard), through accelerate's tracker API, written by rank 0 only.

checkpoints/<adapter>/tensorboard/job-<id>/: loss, grad norm, learning rate, tokens/s and GPU memory at each
progress event, the eval loss, and the judging's standing-set losses. Without the tensorboard package the job
logs one warning and trains without them.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.protocol import Event


class Tracker:
    def __init__(self, where: tuple[Path, str] | None, emit):
        self.where, self.emit = where, emit
        self.accelerator = None

    def accelerator_kwargs(self) -> dict:
        """What Accelerator() needs for the tracker: nothing when off, on another rank, or not installed."""
        if self.where is None or int(os.environ.get("RANK", "0")) != 0:
            return {}
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            self.emit({"event": Event.LOG, "level": "warning", "message": "status.tensorboard is on but the "
                       "tensorboard package is not installed (pip install tensorboard): no TensorBoard logs"})
            return {}
        self.where[0].mkdir(parents=True, exist_ok=True)
        return {"log_with": "tensorboard", "project_dir": str(self.where[0])}

    def start(self, accelerator) -> None:
        if self.where is not None and accelerator.log_with:
            accelerator.init_trackers(self.where[1])
            self.accelerator = accelerator

    def log(self, values: dict, step: int) -> None:
        if self.accelerator is not None and values:
            self.accelerator.log(values, step=step)

    def end(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None
