"""Host time per training step of nerfstudio's per-step writer calls (the three timing scalars and
`write_out_storage`), with tensorboard enabled or not, and with splat-ext's `EveryNStepsTimings` wrapper.

    python benchmarks/writer_overhead.py --steps 3000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from nerfstudio.configs.base_config import LocalWriterConfig, LoggingConfig
from nerfstudio.utils import writer
from nerfstudio.utils.writer import EventName, TimeWriter

from nerfstudio_splat_ext.engine.trainer import EveryNStepsTimings


def ms_per_step(tensorboard: bool, thinned: bool, steps: int) -> float:
    writer.EVENT_WRITERS.clear()
    writer.EVENT_STORAGE.clear()
    writer.setup_event_writer(is_wandb_enabled=False, is_tensorboard_enabled=tensorboard, is_comet_enabled=False,
                              log_dir=Path(tempfile.mkdtemp()), experiment_name="writer_overhead")
    # The console writer is left out: it prints every steps_per_log steps in both cases.
    writer.setup_local_writer(LoggingConfig(local_writer=LocalWriterConfig(enable=False)), max_iter=steps)
    if thinned:
        writer.EVENT_WRITERS[:] = [EveryNStepsTimings(w, 10) for w in writer.EVENT_WRITERS]
    t0 = time.perf_counter()
    for step in range(steps):  # what nerfstudio's Trainer.train does around each iteration
        with TimeWriter(writer, EventName.ITER_TRAIN_TIME, step=step) as timer:
            pass
        if step > 1:
            writer.put_time(name=EventName.TRAIN_RAYS_PER_SEC, duration=1.0 / max(timer.duration, 1e-6), step=step)
        writer.write_out_storage()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    for label, tb, thin in [("no event writer", False, False), ("tensorboard", True, False),
                            ("tensorboard, timings every 10 steps", True, True)]:
        print(f"{label}: {ms_per_step(tb, thin, args.steps):.3f} ms per step", flush=True)


if __name__ == "__main__":
    main()
