"""Callbacks that recipes can name under ``trainer.callbacks``."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

from vlp.models.base import batch_size_of


class SpeedMonitor(pl.Callback):
    """Logs training throughput and prints a summary when ``fit`` ends.

    Every ``trainer.log_every_n_steps`` steps after ``warmup_steps`` it logs
    ``speed/samples_per_sec`` (summed over ranks) and ``speed/step_ms`` over that window;
    at the end it prints the mean over all counted steps and the peak accelerator memory.
    The device is synchronised only at window edges, so the monitor does not slow training.
    The first steps (compilation, autotuning, DataLoader start-up) and validation are left out.

    Args:
        warmup_steps: steps not counted.
    """

    def __init__(self, warmup_steps: int = 10) -> None:
        self.warmup_steps = warmup_steps
        self.summary: dict[str, float] = {}
        self._start: float | None = None
        self._window = (0.0, 0, 0)  # start time, steps, samples
        self._steps = self._samples = 0
        self._paused = 0.0  # seconds spent in validation inside the measured span
        self._val_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None and trainer.global_step >= self.warmup_steps:
            self._sync(pl_module)
            self._start = time.perf_counter()
            self._window = (self._start, 0, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        samples = batch_size_of(batch) * trainer.world_size
        self._steps += 1
        self._samples += samples
        start, steps, count = self._window
        steps, count = steps + 1, count + samples
        if steps >= max(1, trainer.log_every_n_steps):
            self._sync(pl_module)
            now = time.perf_counter()
            pl_module.log_dict(
                {"speed/samples_per_sec": count / (now - start), "speed/step_ms": 1e3 * (now - start) / steps},
                on_step=True,
                on_epoch=False,
                rank_zero_only=True,
            )
            self._window = (now, 0, 0)
        else:
            self._window = (start, steps, count)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._start is not None and not trainer.sanity_checking:
            spent = time.perf_counter() - self._val_start
            self._paused += spent
            start, steps, count = self._window
            self._window = (start + spent, steps, count)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._start is None or not self._steps:
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start - self._paused
        self.summary = {
            "steps": self._steps,
            "samples_per_sec": self._samples / elapsed,
            "step_ms": 1e3 * elapsed / self._steps,
        }
        if pl_module.device.type == "cuda":
            self.summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        if trainer.is_global_zero:
            parts = [f"{self.summary['samples_per_sec']:.1f} samples/s", f"{self.summary['step_ms']:.1f} ms/step"]
            if "peak_memory_gib" in self.summary:
                parts.append(f"peak memory {self.summary['peak_memory_gib']:.2f} GiB per device")
            print(f"speed over {self._steps} steps (after {self.warmup_steps} warm-up): " + ", ".join(parts))

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
