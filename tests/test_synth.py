"""Tests of the procedural dataset generator (nerfstudio_splat_ext.synth)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerfstudio_splat_ext.synth.cli import SynthConfig, main
from nerfstudio_splat_ext.synth.renderer import RenderSettings, focal_from_angle, render_view, sphere_trace
from nerfstudio_splat_ext.synth.scene import ProceduralScene, SceneSpec, build_scene, make_albedo, make_sdf
from nerfstudio_splat_ext.synth.writer import (
    CAMERA_ANGLE_X,
    DatasetSpec,
    camera_positions,
    is_complete,
    look_at,
    write_dataset,
)

RES = 48
REPO_ROOT = Path(__file__).resolve().parents[1]


def _small_spec(seed: int = 0) -> DatasetSpec:
    return DatasetSpec(scene=SceneSpec(seed=seed), num_train=6, num_val=2, num_test=3, resolution=RES, supersample=2)


def _render(scene: ProceduralScene, position, res: int = RES, supersample: int = 2) -> torch.Tensor:
    c2w = torch.from_numpy(look_at(np.asarray(position, dtype=np.float64))).float()
    return render_view(scene, c2w, res, res, CAMERA_ANGLE_X, RenderSettings(supersample=supersample))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "scene"
    assert write_dataset(out, _small_spec())
    return out


# ---------------------------------------------------------------------------------------------
# scene / determinism
# ---------------------------------------------------------------------------------------------


def test_scene_deterministic_per_seed():
    pos = camera_positions("train", 3)[1]
    a = _render(build_scene(SceneSpec(seed=0)), pos)
    b = _render(build_scene(SceneSpec(seed=0)), pos)
    c = _render(build_scene(SceneSpec(seed=1)), pos)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.02

    x = torch.rand(500, 3) * 2 - 1
    assert torch.equal(make_sdf(SceneSpec(seed=3))(x), make_sdf(SceneSpec(seed=3))(x))
    assert not torch.allclose(make_sdf(SceneSpec(seed=3))(x), make_sdf(SceneSpec(seed=4))(x))


def test_scene_albedo_has_several_colours_and_fits_extent():
    spec = SceneSpec(seed=0)
    scene = build_scene(spec)
    assert scene.bounding_radius() <= spec.extent + 1e-6
    # points on the surface: project random points with a few Newton steps of the SDF
    x = torch.randn(4000, 3) * 0.6
    for _ in range(30):
        x = x.requires_grad_(True)
        d = scene.sdf(x)
        (g,) = torch.autograd.grad(d.sum(), x)
        x = (x - d[:, None] * g / g.norm(dim=-1, keepdim=True).clamp(min=1e-6)).detach()
    on_surface = scene.sdf(x).abs() < 1e-3
    assert on_surface.float().mean() > 0.5
    col = make_albedo(spec)(x[on_surface])
    assert col.shape[1] == 3 and col.min() >= 0 and col.max() <= 1
    # several distinct colours: coarse colour quantisation gives many occupied bins
    bins = torch.unique((col * 3.999).long(), dim=0)
    assert len(bins) >= 6
    assert col.std(dim=0).mean() > 0.1


# ---------------------------------------------------------------------------------------------
# renderer: analytic check on a sphere
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [(0.0, 0.0, 0.0), (0.4, 0.25, 0.1)])
@pytest.mark.parametrize("size", [(48, 48), (64, 40)])
def test_sphere_silhouette_matches_projection(center, size):
    width, height = size
    radius = 0.6
    scene = ProceduralScene.single_sphere(radius, center)
    c2w = look_at(np.array([3.2, 1.5, 1.8]))
    img = render_view(scene, torch.from_numpy(c2w).float(), width, height, CAMERA_ANGLE_X, RenderSettings())
    alpha = img[..., 3].double()
    f = focal_from_angle(width, CAMERA_ANGLE_X)

    # sphere centre in camera coordinates (OpenGL: looking along -z)
    w2c = np.linalg.inv(c2w)
    pc = w2c[:3, :3] @ np.asarray(center) + w2c[:3, 3]
    dist = np.linalg.norm(pc)
    sin_a = radius / dist
    cos_t = -pc[2] / dist
    # the silhouette of a sphere is an ellipse (a disk when on the optical axis)
    k = cos_t**2 - sin_a**2
    semi_major = f * sin_a * math.sqrt(1 - sin_a**2) / k
    semi_minor = f * sin_a / math.sqrt(k)
    area = math.pi * semi_major * semi_minor
    assert abs(alpha.sum().item() / area - 1.0) < 0.03

    proj = np.array([width / 2 + f * pc[0] / -pc[2], height / 2 - f * pc[1] / -pc[2]])
    # exact centre of the ellipse: along the radial direction of the projected centre
    sin_t = math.sqrt(max(0.0, 1 - cos_t**2))
    radial = proj - np.array([width / 2, height / 2])
    ell = np.array([width / 2, height / 2])
    if np.linalg.norm(radial) > 1e-9:
        ell = ell + radial / np.linalg.norm(radial) * f * sin_t * cos_t / k
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64) + 0.5, torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij"
    )
    centroid = np.array([(alpha * xs).sum().item(), (alpha * ys).sum().item()]) / alpha.sum().item()
    assert np.linalg.norm(centroid - ell) < 0.15
    assert np.linalg.norm(centroid - proj) < 0.6
    if np.allclose(center, 0):
        assert np.linalg.norm(centroid - np.array([width / 2, height / 2])) < 0.05

    # straight alpha: covered pixels keep the full (shaded) colour, background is RGB 0
    bg = img[..., 3] == 0
    assert img[bg][:, :3].abs().max() == 0
    inner = img[..., 3] == 1
    assert inner.any() and (img[..., 3] > 0).sum() > inner.sum()  # anti-aliased rim


# ---------------------------------------------------------------------------------------------
# cameras
# ---------------------------------------------------------------------------------------------


def test_camera_sets_differ_and_cover_upper_hemisphere():
    train = camera_positions("train", 100)
    val = camera_positions("val", 10)
    test = camera_positions("test", 25)
    for a, b in [(train, test), (train, val), (val, test)]:
        d = np.linalg.norm(a[:, None] - b[None], axis=-1)
        assert d.min() > 0.05
    assert np.allclose(np.linalg.norm(train, axis=-1), 4.0)
    assert (train[:, 2] > 0).mean() > 0.7 and (train[:, 2] < 0).any()
    assert train[:, 2].max() > 3.5  # views from high above
    # azimuths spread all around
    az = np.arctan2(train[:, 1], train[:, 0])
    assert np.histogram(az, bins=8, range=(-np.pi, np.pi))[0].min() > 5
    assert np.array_equal(camera_positions("train", 100), train)


def test_look_at_is_opengl_convention():
    pos = np.array([4.0, 0.0, 0.0])
    c2w = look_at(pos)
    assert np.allclose(c2w[:3, 3], pos)
    assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-9)
    assert np.allclose(-c2w[:3, 2], [-1.0, 0.0, 0.0])  # looks along -z, at the origin
    assert np.allclose(c2w[:3, 1], [0.0, 0.0, 1.0])  # image up is world up


# ---------------------------------------------------------------------------------------------
# written dataset, loaded by nerfstudio
# ---------------------------------------------------------------------------------------------


def test_dataset_layout(dataset: Path):
    for split, n in [("train", 6), ("val", 2), ("test", 3)]:
        meta = json.loads((dataset / f"transforms_{split}.json").read_text())
        assert meta["camera_angle_x"] == pytest.approx(CAMERA_ANGLE_X)
        assert len(meta["frames"]) == n
        for i, frame in enumerate(meta["frames"]):
            assert frame["file_path"] == f"./{split}/r_{i}"
            assert np.asarray(frame["transform_matrix"]).shape == (4, 4)
            img = Image.open(dataset / split / f"r_{i}.png")
            assert img.mode == "RGBA" and img.size == (RES, RES)
    arr = np.asarray(Image.open(dataset / "train" / "r_0.png"))
    alpha = arr[..., 3]
    assert (alpha == 0).mean() > 0.3  # transparent background
    assert (alpha == 255).sum() > 50  # opaque object
    assert arr[alpha == 0][:, :3].max() == 0  # background RGB 0
    assert arr[alpha == 255][:, :3].max() > 100
    assert json.loads((dataset / "synth_config.json").read_text())["seed"] == 0


@pytest.mark.parametrize("split,n", [("train", 6), ("test", 3)])
def test_dataset_loads_with_blender_dataparser(dataset: Path, split: str, n: int):
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    outputs = BlenderDataParserConfig(data=dataset).setup().get_dataparser_outputs(split)
    assert len(outputs.image_filenames) == n
    cams = outputs.cameras
    assert cams.camera_to_worlds.shape == (n, 3, 4)
    assert torch.all(cams.width == RES) and torch.all(cams.height == RES)
    centres = cams.camera_to_worlds[:, :, 3]
    assert torch.allclose(centres.norm(dim=-1), torch.full((n,), 4.0), atol=1e-4)
    # optical axes (-z) point at the origin
    fwd = -cams.camera_to_worlds[:, :, 2]
    assert torch.allclose((fwd * -centres / 4.0).sum(-1), torch.ones(n), atol=1e-4)

    # the object lies inside the scene box (and roughly in [-1, 1]^3)
    aabb = outputs.scene_box.aabb
    scene = build_scene(SceneSpec(seed=0))
    g = torch.linspace(-1.6, 1.6, 65)
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
    occupied = grid[scene.sdf(grid) < 0]
    assert occupied.shape[0] > 1000
    assert torch.all(occupied >= aabb[0]) and torch.all(occupied <= aabb[1])
    assert occupied.abs().max() <= 1.05

    # nerfstudio's own rays of camera 0 see the object where the stored image has it
    rays = cams[0:1].generate_rays(camera_indices=0)
    o = rays.origins.reshape(-1, 3).float()
    d = rays.directions.reshape(-1, 3).float()
    d = d / d.norm(dim=-1, keepdim=True)
    f = focal_from_angle(RES, CAMERA_ANGLE_X)
    _, hit = sphere_trace(scene, o, d, RenderSettings(), 0.05 / f)
    alpha = np.asarray(Image.open(outputs.image_filenames[0]))[..., 3].reshape(-1)
    agree = (hit.numpy() == (alpha >= 128)).mean()
    assert agree > 0.97


def test_skip_and_overwrite(tmp_path: Path):
    out = tmp_path / "d"
    spec = DatasetSpec(scene=SceneSpec(seed=2), num_train=2, num_val=1, num_test=1, resolution=16)
    assert write_dataset(out, spec)
    assert is_complete(out, spec)
    assert not write_dataset(out, spec)  # complete with the same settings: skipped
    assert write_dataset(out, spec, overwrite=True)
    other = DatasetSpec(scene=SceneSpec(seed=3), num_train=1, num_val=1, num_test=1, resolution=16)
    assert not is_complete(out, other)
    assert write_dataset(out, other)  # different settings: regenerated
    assert not (out / "train" / "r_1.png").exists()  # stale frames removed
    (out / "test" / "r_0.png").unlink()
    assert not is_complete(out, other)


def test_cli_main(tmp_path: Path, capsys):
    cfg = SynthConfig(output_dir=tmp_path / "cli", num_train=2, num_val=1, num_test=1, resolution=16)
    path = main(cfg)
    text = capsys.readouterr().out
    assert path == (tmp_path / "cli").resolve()
    assert all(s in text for s in ("train", "val", "test")) and str(path) in text
    assert is_complete(path, cfg.dataset_spec())
    main(cfg)
    assert "already" in capsys.readouterr().out


def test_python_dash_m(tmp_path: Path):
    out = tmp_path / "m"
    args = ["--output-dir", str(out), "--num-train", "1", "--num-val", "1", "--num-test", "1", "--resolution", "12"]
    res = subprocess.run(
        [sys.executable, "-m", "nerfstudio_splat_ext.synth", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert (out / "transforms_test.json").is_file() and (out / "synth_config.json").is_file()
