"""Checkpoints load with torch's weights_only default; writes are atomic; LPIPS degrades gracefully offline."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import nerfstudio_splat_ext  # noqa: F401  (registers the numpy types for torch's safe loader)
from nerfstudio_splat_ext.engine.trainer import atomic_torch_save
from nerfstudio_splat_ext.utils.lpips import LazyLPIPS


def test_scheduler_state_with_numpy_scalars_loads_with_default_torch_load(tmp_path):
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([param], lr=1e-3)
    sched = ExponentialDecaySchedulerConfig(lr_final=1e-5, max_steps=100).setup().get_scheduler(opt, lr_init=1e-3)
    for _ in range(3):
        opt.step()
        sched.step()
    state = {"schedulers": {"means": sched.state_dict()}, "extra": np.float64(0.5), "arr_dtype": np.dtype("float32")}
    # nerfstudio's scheduler really stores numpy scalars: the case torch's safe loader rejects by default
    assert isinstance(state["schedulers"]["means"]["_last_lr"][0], np.floating)
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    # without the plugin imported, a fresh interpreter cannot load it (so the fix below is what makes it work)
    import subprocess, sys

    probe = subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, map_location='cpu')"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "weights_only" in probe.stderr
    loaded = torch.load(path, map_location="cpu")  # torch's default weights_only=True on torch >= 2.6
    assert float(loaded["extra"]) == 0.5
    assert loaded["schedulers"]["means"]["last_epoch"] == 3


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    ckpt_dir = tmp_path / "nerfstudio_models"
    ckpt_dir.mkdir()
    target = ckpt_dir / "step-000000001.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(4)}, target)
    atomic_torch_save({"step": 2, "w": torch.arange(5)}, target)
    assert torch.load(target)["step"] == 2
    assert [p.name for p in ckpt_dir.iterdir()] == [target.name]
    assert not any((tmp_path / "nerfstudio_models.partial").iterdir())


def test_atomic_save_failure_keeps_previous_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "nerfstudio_models"
    ckpt_dir.mkdir()
    target = ckpt_dir / "step-000000001.ckpt"
    atomic_torch_save({"step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("simulated crash while writing")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target)["step"] == 1  # the old checkpoint is intact, not truncated


def test_lazy_lpips_reports_skip_when_weights_cannot_load(monkeypatch):
    import torchmetrics.image.lpip as lpip

    def offline(*args, **kwargs):
        raise OSError("simulated: cannot download AlexNet weights")

    monkeypatch.setattr(lpip, "LearnedPerceptualImagePatchSimilarity", offline)
    metric = LazyLPIPS()
    assert metric.available is None
    x = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert metric(x, x) is None
    assert metric.available is False and "LPIPS skipped" in metric.skipped_reason
    assert metric(x, x) is None  # no second construction attempt
