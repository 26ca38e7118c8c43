"""Shared fixtures: the real datasets beside the project (../shared/data) and small generated scenes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPLAT_EXT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"needs the real dataset {path} (../shared/data beside the project; present in CI, absent on user machines)")
    return path


@pytest.fixture(scope="session")
def lego_dir() -> Path:
    return shared_dataset("nerf_synthetic_lego")


@pytest.fixture(scope="session")
def fox_dir() -> Path:
    return shared_dataset("instant_ngp_fox")


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A small generated Blender-layout scene (the project's own data): 24 train, 2 val, 6 test views, 48x48."""
    from nerfstudio_splat_ext.synth.writer import DatasetSpec, write_dataset

    out = tmp_path_factory.mktemp("synth") / "tiny"
    write_dataset(out, DatasetSpec(num_train=24, num_val=2, num_test=6, resolution=48, supersample=1))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tests on tiny tensors: threads gain little and thrash on a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
