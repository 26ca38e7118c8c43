"""splat-ext's trainer hands nerfstudio's per-step timing scalars to the event writers (tensorboard, wandb) every
`steps_per_log` steps instead of every step; losses and everything else pass unchanged."""

from __future__ import annotations

import torch
from nerfstudio.configs.base_config import LocalWriterConfig, LoggingConfig
from nerfstudio.utils import writer
from nerfstudio.utils.writer import EventName, TimeWriter

from nerfstudio_splat_ext.engine.trainer import EveryNStepsTimings


class Recorder:
    def __init__(self) -> None:
        self.scalars = []
        self.images = []

    def write_scalar(self, name, scalar, step) -> None:
        self.scalars.append((name, step))

    def write_image(self, name, image, step) -> None:
        self.images.append((name, step))

    def steps_of(self, name: str) -> list:
        return [step for n, step in self.scalars if n == name]


def test_timings_reach_the_event_writers_every_n_steps_and_the_rest_always(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(writer, "EVENT_WRITERS", [EveryNStepsTimings(recorder, 10)])
    monkeypatch.setattr(writer, "EVENT_STORAGE", [])
    monkeypatch.setattr(writer, "GLOBAL_BUFFER", {})
    writer.setup_local_writer(LoggingConfig(local_writer=LocalWriterConfig(enable=False)), max_iter=100)
    for step in range(35):  # what nerfstudio's training loop puts on each step
        with TimeWriter(writer, EventName.ITER_TRAIN_TIME, step=step) as timer:
            pass
        writer.put_time(name=EventName.TRAIN_RAYS_PER_SEC, duration=1.0 / max(timer.duration, 1e-6), step=step)
        writer.put_scalar(name="Train Loss", scalar=1.0, step=step)
        writer.write_out_storage()
    writer.put_image(name="eval image", image=torch.zeros(2, 2, 3), step=7)
    writer.write_out_storage()

    for timing in (EventName.ITER_TRAIN_TIME, EventName.ETA, EventName.TRAIN_RAYS_PER_SEC):
        assert recorder.steps_of(timing.value) == [0, 10, 20, 30]
    assert recorder.steps_of("Train Loss") == list(range(35))
    assert recorder.images == [("eval image", 7)]  # other event kinds pass through
