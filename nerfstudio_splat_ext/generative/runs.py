"""Rebuild the model of a finished nerfstudio run from its ``config.yml`` and a checkpoint.

Only the model is built, not the run's datamanager, so the training data need not be on this machine (inference,
or a student loading its teacher).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def latest_checkpoint(directory: Path, hint: str = "train the run first or pass a checkpoint") -> Path:
    ckpts = sorted(Path(directory).glob("step-*.ckpt"), key=lambda p: int(p.stem.split("-")[-1]))
    if not ckpts:
        raise FileNotFoundError(f"no step-*.ckpt in {directory}; {hint}")
    return ckpts[-1]


def load_run_model(
    config_path: Path,
    checkpoint: Optional[Path] = None,
    device: str = "cpu",
    required_method: str = "predict_gaussians",
    missing_hint: str = "pass the config.yml of a trained run (--load-config)",
    wrong_run_hint: str = "use a splat-ext-image or splat-ext-diffusion run",
) -> torch.nn.Module:
    """The model of the run, in eval mode on ``device``. Its class must have ``required_method``; the hints end the
    error messages for a missing config or checkpoint and for a run of another method."""
    import yaml
    from nerfstudio.data.scene_box import SceneBox

    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist; {missing_hint}")
    trainer_config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    model_config = trainer_config.pipeline.model
    if not hasattr(model_config._target, required_method):
        raise ValueError(
            f"{config_path} is a {trainer_config.method_name!r} run, whose model has no {required_method}; "
            f"{wrong_run_hint}"
        )
    # config.yml sits in the run's base dir; its checkpoints in <base dir>/<relative_model_dir>
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(
        config_path.parent / trainer_config.relative_model_dir, missing_hint
    )
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["pipeline"]
    prefix = "_model."
    weights = {}
    for key, value in state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.startswith(prefix):
            weights[key[len(prefix) :]] = value
    if not weights:
        raise ValueError(f"{ckpt} holds no model weights (no '_model.*' keys in its pipeline state)")
    model = model_config.setup(scene_box=SceneBox(torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=0, metadata={})
    model.load_state_dict(weights)
    return model.to(device).eval()
