"""nerfstudio's Trainer with crash-safe checkpoints and a training iteration without host synchronisations.

nerfstudio writes `step-N.ckpt` in place: a crash or a full disk during the write leaves a truncated file that
`--load-dir` then picks as the newest. We write to a temporary file beside the checkpoint folder and rename it
into place (atomic on POSIX), and only then delete older checkpoints.

nerfstudio's `train_iteration` reads the mixed-precision grad scaler's scale twice per step (two GPU-to-host
reads, each waiting for the step's kernels) to skip the schedulers on a step the scaler skipped. Ours always steps
the schedulers: the scaler skips a step only on inf/NaN gradients, a handful of times at the start of fp16 training,
so the schedule shifts by that many steps of tens of thousands, and the host can queue the next step's work while
the GPU finishes this one. Fused Adam optimizers take a leaner step (engine/direct_adam.py), and learning rates are
logged every `steps_per_log` steps like the losses, not on every step.

nerfstudio's loop also hands three timing scalars (time per step, ETA, rays per second: running means over 20 steps)
to every event writer on every step: with tensorboard about 0.38 ms of host time per step, 0.05 ms thinned as below
(benchmarks/writer_overhead.py). During our training they reach tensorboard / wandb / comet every
`steps_per_log` steps, like the losses; the console writer is unchanged.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Type

import torch
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.writer import EventName

from nerfstudio_splat_ext.engine.direct_adam import direct_adam_step, supports_direct_step


@dataclass
class SplatExtTrainerConfig(TrainerConfig):
    _target: Type = field(default_factory=lambda: SplatExtTrainer)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to `path` through a temporary file in a sibling folder, fsync'ed and renamed into place."""
    path = Path(path)
    # A sibling folder (not the checkpoint folder itself) so that a leftover temporary file can never be mistaken
    # for a checkpoint by nerfstudio's `--load-dir`, which parses every file name in that folder.
    tmp_dir = path.parent.parent / (path.parent.name + ".partial")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp_path = tmp_dir / (path.name + f".{os.getpid()}.tmp")
    with open(tmp_path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


# Per-step running means that nerfstudio's training loop puts on every step.
PER_STEP_TIMINGS = frozenset(e.value for e in (EventName.ITER_TRAIN_TIME, EventName.ETA, EventName.TRAIN_RAYS_PER_SEC))


class EveryNStepsTimings:
    """An event writer that passes the per-step timing scalars on to `inner` only every `every` steps, and
    everything else always."""

    def __init__(self, inner, every: int) -> None:
        self.inner, self.every = inner, max(1, int(every))

    def write_scalar(self, name: str, scalar, step: int) -> None:
        if name in PER_STEP_TIMINGS and step % self.every != 0:
            return
        self.inner.write_scalar(name, scalar, step)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class SplatExtTrainer(Trainer):
    config: SplatExtTrainerConfig

    def train(self) -> None:
        every = self.config.logging.steps_per_log
        original = list(writer.EVENT_WRITERS)
        writer.EVENT_WRITERS[:] = [
            w if isinstance(w, writer.LocalWriter) else EveryNStepsTimings(w, every) for w in original
        ]
        try:
            super().train()
        finally:
            writer.EVENT_WRITERS[:] = original

    def save_checkpoint(self, step: int) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path: Path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        atomic_torch_save(
            {
                "step": step,
                "pipeline": pipeline.state_dict(),  # type: ignore[union-attr]
                "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
                "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
                "scalers": self.grad_scaler.state_dict(),
            },
            ckpt_path,
        )
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("*.ckpt"):
                if old != ckpt_path:
                    old.unlink()

    def train_iteration(self, step: int):
        if self.config.log_gradients:  # per-parameter gradient norms: nerfstudio's own loop
            return super().train_iteration(step)
        optimizers = self.optimizers
        every = self.gradient_accumulation_steps
        groups = list(optimizers.parameters.keys())
        optimizers.zero_grad_some([g for g in groups if step % every[g] == 0])
        device_type = self.device.split(":")[0]
        with torch.autocast(device_type="cpu" if device_type == "mps" else device_type, enabled=self.mixed_precision):
            _, loss_dict, metrics_dict = self.pipeline.get_train_loss_dict(step=step)
            loss = functools.reduce(torch.add, loss_dict.values())
        self.grad_scaler.scale(loss).backward()
        stepping = [g for g in groups if step % every[g] == every[g] - 1]
        direct = [g for g in stepping if self._steps_directly(g)]
        direct_adam_step([optimizers.optimizers[g] for g in direct])
        optimizers.optimizer_scaler_step_some(self.grad_scaler, [g for g in stepping if g not in direct])
        self.grad_scaler.update()
        log = step % self.config.logging.steps_per_log == 0
        for name, scheduler in optimizers.schedulers.items():
            scheduler.step()
            if log:  # nerfstudio logs every step; one tensorboard write per scheduler and step costs host time
                writer.put_scalar(name=f"learning_rate/{name}", scalar=scheduler.get_last_lr()[0], step=step)
        return loss, loss_dict, metrics_dict

    def _steps_directly(self, group: str) -> bool:
        """Whether `group`'s optimizer takes the lean fused-Adam step (engine/direct_adam.py): no gradient scaler,
        no gradient clipping, and an optimizer it reproduces exactly."""
        if self.grad_scaler.is_enabled() or self.optimizers.config[group]["optimizer"].max_norm is not None:
            return False
        return supports_direct_step(self.optimizers.optimizers[group])
