"""splat-ext-llff: the LLFF (poses_bounds.npy + images_N) dataparser, on small generated scenes and on real fern."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_dataset
from nerfstudio_splat_ext.dataparsers.llff_dataparser import LLFFDataParserConfig, average_pose
from nerfstudio_splat_ext.dataparsers.splat_ext_dataparser import DatasetError

BIN = Path(sys.executable).parent

H_ORIG, W_ORIG, F_ORIG = 40, 64, 50.0  # full-resolution hwf stored in the synthetic poses_bounds.npy
FACTOR = 4  # images_4 holds 16x10 images


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def opengl_to_llff(rot: np.ndarray, t: np.ndarray) -> np.ndarray:
    """OpenGL c2w (columns right, up, back) -> LLFF 3x4 (columns down, right, back)."""
    return np.concatenate([-rot[:, 1:2], rot[:, 0:1], rot[:, 2:3], t[:, None]], axis=1)


def write_scene(root: Path, c2ws_gl: list, bounds: np.ndarray, factor: int = FACTOR, num_images: int | None = None) -> Path:
    """poses_bounds.npy from OpenGL c2w (3x4 each) + images_{factor}/ with tiny PNGs."""
    rows = []
    for c2w, (near, far) in zip(c2ws_gl, bounds):
        llff = opengl_to_llff(c2w[:, :3], c2w[:, 3])
        mat = np.concatenate([llff, np.array([[H_ORIG], [W_ORIG], [F_ORIG]])], axis=1)
        rows.append(np.concatenate([mat.reshape(-1), [near, far]]))
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "poses_bounds.npy", np.array(rows))
    folder = root / ("images" if factor == 1 else f"images_{factor}")
    folder.mkdir()
    for i in range(len(c2ws_gl) if num_images is None else num_images):
        Image.fromarray(np.full((H_ORIG // factor, W_ORIG // factor, 3), i * 10 % 255, np.uint8)).save(folder / f"img_{i:03d}.png")
    return root


def forward_facing_poses(n: int, seed: int = 0) -> list:
    """Cameras on a small plane, all looking roughly along -z (plus a common tilt so recentring has work to do)."""
    rng = np.random.default_rng(seed)
    tilt = rotation("y", 20) @ rotation("x", -10)
    poses = []
    for _ in range(n):
        rot = tilt @ rotation("x", rng.uniform(-5, 5)) @ rotation("y", rng.uniform(-5, 5))
        t = np.array([3.0, -1.0, 2.0]) + tilt @ np.array([rng.uniform(-1, 1), rng.uniform(-0.5, 0.5), 0.0])
        poses.append(np.concatenate([rot, t[:, None]], axis=1))
    return poses


@pytest.fixture
def synth_scene(tmp_path) -> Path:
    n = 20
    bounds = np.stack([np.linspace(4.0, 6.0, n), np.linspace(30.0, 40.0, n)], axis=1)
    return write_scene(tmp_path / "scene", forward_facing_poses(n), bounds)


def parse(data: Path, split: str = "train", **kwargs):
    return LLFFDataParserConfig(data=data, downscale_factor=kwargs.pop("downscale_factor", FACTOR), **kwargs).setup().get_dataparser_outputs(split)


# ---------------------------------------------------------------- synthetic scenes
def test_axis_conversion_of_known_cameras(tmp_path):
    identity = np.concatenate([np.eye(3), np.array([[1.0], [2.0], [3.0]])], axis=1)
    rot = rotation("z", 30) @ rotation("x", 40)
    rotated = np.concatenate([rot, np.array([[-1.0], [0.5], [2.0]])], axis=1)
    root = write_scene(tmp_path / "s", [identity, rotated], np.array([[1.0, 10.0], [1.0, 10.0]]))
    # the LLFF matrix of the identity camera is [down=-y, right=x, back=z]
    llff = np.load(root / "poses_bounds.npy")[0, :15].reshape(3, 5)[:, :3]
    np.testing.assert_allclose(llff, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]])

    out = parse(root, "train", hold_out_every=0, center_poses=False, scale_by_near_bound=False)
    c2w = out.cameras.camera_to_worlds.double().numpy()
    np.testing.assert_allclose(c2w[0], identity, atol=1e-6)
    np.testing.assert_allclose(c2w[1], rotated, atol=1e-6)
    assert out.dataparser_scale == 1.0
    np.testing.assert_allclose(out.dataparser_transform.numpy(), np.eye(4)[:3], atol=1e-7)


def test_intrinsics_scaled_to_folder_resolution(synth_scene):
    out = parse(synth_scene)
    w, h = W_ORIG // FACTOR, H_ORIG // FACTOR
    assert (out.cameras.width == w).all() and (out.cameras.height == h).all()
    assert torch.allclose(out.cameras.fx, torch.tensor(F_ORIG * w / W_ORIG))
    assert torch.allclose(out.cameras.fy, torch.tensor(F_ORIG * w / W_ORIG))
    assert torch.allclose(out.cameras.cx, torch.tensor(w / 2)) and torch.allclose(out.cameras.cy, torch.tensor(h / 2))


def test_hold_out_every_eighth_image(synth_scene):
    names = sorted(p.name for p in (synth_scene / "images_4").iterdir())
    train, test, val = parse(synth_scene, "train"), parse(synth_scene, "test"), parse(synth_scene, "val")
    assert [p.name for p in test.image_filenames] == [names[0], names[8], names[16]]
    assert [p.name for p in val.image_filenames] == [names[0], names[8], names[16]]
    assert [p.name for p in train.image_filenames] == [n for i, n in enumerate(names) if i % 8 != 0]
    assert len(train.cameras) == 17 and len(test.cameras) == 3
    assert train.metadata["near_far"].shape == (17, 2) and test.metadata["near_far"].shape == (3, 2)
    assert train.alpha_color is None


def test_recentring_and_near_bound_scaling(synth_scene):
    original = np.load(synth_scene / "poses_bounds.npy")
    near_min = original[:, 15].min()
    # all images of the scene, so that the mean pose is over every camera
    unscaled = parse(synth_scene, "train", hold_out_every=0, scale_by_near_bound=False)
    c2w = unscaled.cameras.camera_to_worlds.double().numpy()
    avg = average_pose(c2w)
    np.testing.assert_allclose(avg[:, :3], np.eye(3), atol=1e-5)
    np.testing.assert_allclose(avg[:, 3], 0.0, atol=1e-5)
    assert unscaled.dataparser_scale == 1.0
    # the reported transform maps the (axis-converted) input poses onto the output poses
    raw_gl = np.load(synth_scene / "poses_bounds.npy")[:, :15].reshape(-1, 3, 5)[:, :, :4]
    raw_gl = np.concatenate([raw_gl[:, :, 1:2], -raw_gl[:, :, 0:1], raw_gl[:, :, 2:4]], axis=2)
    transform = unscaled.dataparser_transform.double().numpy()
    np.testing.assert_allclose(transform[:, :3] @ raw_gl[:, :, :3], c2w[:, :, :3], atol=1e-5)
    np.testing.assert_allclose(transform[:, :3] @ raw_gl[:, :, 3:] + transform[:, 3:], c2w[:, :, 3:], atol=1e-4)

    scaled = parse(synth_scene, "train", hold_out_every=0)
    scale = 1.0 / (near_min * 0.75)
    assert scaled.dataparser_scale == pytest.approx(scale)
    np.testing.assert_allclose(scaled.cameras.camera_to_worlds[:, :, 3].double().numpy(), c2w[:, :, 3] * scale, atol=1e-5)
    np.testing.assert_allclose(scaled.cameras.camera_to_worlds[:, :, :3].double().numpy(), c2w[:, :, :3], atol=1e-6)
    near_far = scaled.metadata["near_far"].double().numpy()
    np.testing.assert_allclose(near_far, original[:, 15:] * scale, rtol=1e-5)
    assert near_far[:, 0].min() == pytest.approx(1 / 0.75)
    # scene_scale multiplies in
    assert parse(synth_scene, "train", scene_scale=2.0).dataparser_scale == pytest.approx(2 * scale)


def test_scene_box_encloses_cameras_and_far_points(synth_scene):
    out = parse(synth_scene, "train", hold_out_every=0)
    c2w = out.cameras.camera_to_worlds
    far = out.metadata["near_far"][:, 1:2]
    lo, hi = out.scene_box.aabb
    for pts in (c2w[:, :, 3], c2w[:, :, 3] - far * c2w[:, :, 2]):
        assert ((pts >= lo) & (pts <= hi)).all()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith("splat-ext: error:")
    return message


def test_missing_poses_bounds_is_one_line_error(synth_scene):
    (synth_scene / "poses_bounds.npy").unlink()
    with pytest.raises(DatasetError) as err:
        parse(synth_scene)
    assert "poses_bounds.npy" in one_line(err) and str(synth_scene) in str(err.value)


def test_missing_images_folder_names_the_available_ones(synth_scene):
    with pytest.raises(DatasetError) as err:
        parse(synth_scene, downscale_factor=8)
    message = one_line(err)
    assert str(synth_scene / "images_8") in message and "images_4" in message and "--downscale-factor 4" in message
    with pytest.raises(DatasetError) as err:
        parse(synth_scene, downscale_factor=1)
    assert str(synth_scene / "images") in one_line(err)


def test_image_count_mismatch_is_one_line_error(tmp_path):
    root = write_scene(tmp_path / "s", forward_facing_poses(6), np.tile([[2.0, 20.0]], (6, 1)), num_images=5)
    with pytest.raises(DatasetError) as err:
        parse(root)
    message = one_line(err)
    assert str(root / "images_4") in message and "5 images" in message and "6 poses" in message


def test_registered_as_dataparser_entry_point():
    eps = {ep.name: ep for ep in entry_points(group="nerfstudio.dataparser_configs")}
    assert "splat-ext-llff" in eps
    assert isinstance(eps["splat-ext-llff"].load().config, LLFFDataParserConfig)


# ---------------------------------------------------------------- real fern
@pytest.fixture(scope="module")
def fern_dir() -> Path:
    return shared_dataset("nerf_llff_fern")


def test_fern_splits_and_forward_facing_cameras(fern_dir):
    train = parse(fern_dir, "train", downscale_factor=16)
    test = parse(fern_dir, "test", downscale_factor=16)
    names = sorted(p.name for p in (fern_dir / "images_16").iterdir())
    assert len(names) == 20
    assert [p.name for p in test.image_filenames] == [names[0], names[8], names[16]]
    assert len(train.image_filenames) == 17 and not set(train.image_filenames) & set(test.image_filenames)
    assert (train.cameras.width == 252).all() and (train.cameras.height == 189).all()
    # hwf in poses_bounds.npy: 3024x4032, f=3260.53 -> f * 252 / 4032
    assert torch.allclose(train.cameras.fx, torch.tensor(3260.526 * 252 / 4032), rtol=1e-4)

    c2w = torch.cat([train.cameras.camera_to_worlds, test.cameras.camera_to_worlds])
    axes = -c2w[:, :, 2]  # optical axes (OpenGL cameras look along -z)
    mean = torch.nn.functional.normalize(axes.mean(0), dim=0)
    angles = torch.rad2deg(torch.arccos((axes @ mean).clamp(-1, 1)))
    assert angles.max() < 30.0
    # recentred: the mean viewing direction is -z
    assert torch.allclose(mean, torch.tensor([0.0, 0.0, -1.0]), atol=1e-3)

    lo, hi = train.scene_box.aabb
    for out in (train, test):
        cams = out.cameras.camera_to_worlds
        near_far = out.metadata["near_far"]
        assert near_far.min() >= 1 / 0.75 - 1e-4
        for depth in (near_far[:, 0:1], near_far[:, 1:2]):
            pts = cams[:, :, 3] - depth * cams[:, :, 2]
            assert ((pts >= lo) & (pts <= hi)).all()


def test_fern_sfm_points_land_on_their_pixels(fern_dir):
    """The COLMAP points, moved into the parser's frame, project onto image pixels of their own colour."""
    import numpy as np
    from PIL import Image

    out = parse(fern_dir, "train", downscale_factor=16)
    xyz, rgb = out.metadata["points3D_xyz"], out.metadata["points3D_rgb"].float()
    assert xyz.shape[0] > 1000 and rgb.shape == xyz.shape
    cams = out.cameras
    correlations = []
    for i in range(0, len(out.image_filenames), 4):
        c2w = cams.camera_to_worlds[i]
        local = (xyz - c2w[:, 3]) @ c2w[:, :3]  # camera frame, OpenGL axes (looking along -z)
        depth = -local[:, 2]
        assert (depth > 0).float().mean() > 0.99
        u = cams.fx[i] * local[:, 0] / depth + cams.cx[i]
        v = -cams.fy[i] * local[:, 1] / depth + cams.cy[i]
        w, h = int(cams.width[i]), int(cams.height[i])
        inside = (depth > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        assert inside.float().mean() > 0.9
        image = torch.from_numpy(np.asarray(Image.open(out.image_filenames[i]).convert("RGB"))).float()
        seen = image[v[inside].long(), u[inside].long()]
        a, b = seen.flatten() - seen.mean(), rgb[inside].flatten() - rgb[inside].mean()
        correlations.append(float((a * b).sum() / (a.norm() * b.norm())))
    # measured 0.56-0.58 at this size; the same points mirrored or shifted by 10% of the width give 0.21-0.24
    assert min(correlations) > 0.45, correlations


def test_sfm_points_can_be_switched_off(fern_dir):
    out = parse(fern_dir, "train", downscale_factor=16, load_sfm_points=False)
    assert "points3D_xyz" not in out.metadata
