"""Tests of the data layer of the generative models (nerfstudio_splat_ext.generative.data).

Generator (determinism, disjoint splits, format, atomic / resumable writes, camera geometry), loaders
(our format, SRN and Blender round trips, GSO / zero123 renders checked by visual-hull consistency),
and the multi-object datamanager. All on the CPU, on small generated objects.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nerfstudio_splat_ext.generative.data import generator as gen
from nerfstudio_splat_ext.generative.data.cli import ObjectsConfig, main
from nerfstudio_splat_ext.generative.data.datamanager import MultiObjectDataManager, MultiObjectDataManagerConfig
from nerfstudio_splat_ext.generative.data.generator import (
    ObjectDatasetSpec,
    ObjectRenderSpec,
    generate_dataset,
    generate_object,
    list_split,
    object_camera_poses,
    render_views,
)
from nerfstudio_splat_ext.generative.data.loaders import (
    GSO_CAMERA_ANGLE_X,
    ObjectViews,
    detect_format,
    export_blender_object,
    export_srn_object,
    load_blender_object,
    load_generated_object,
    load_gso_object,
    load_object,
    load_srn_object,
)
from nerfstudio_splat_ext.generative.data.shapes import FAMILIES, build_object
from nerfstudio_splat_ext.synth.renderer import RenderSettings, render_view
from conftest import shared_dataset

RES, VIEWS = 32, 8
RENDER = ObjectRenderSpec(views=VIEWS, resolution=RES, supersample=2, num_points=2048)
SPEC = ObjectDatasetSpec(render=RENDER, num_train=6, num_heldout=3, train_seed_start=0, heldout_seed_start=500)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this module runs on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objects") / "root"
    stats = generate_dataset(root, SPEC)
    assert stats["generated"] == 9 and stats["skipped"] == 0
    return root


def _all_object_dirs(root: Path):
    return list_split(root, "train") + list_split(root, "heldout")


def project(c2w: torch.Tensor, intrinsics: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates [V, N, 2] and depths [V, N] of world points x [N, 3] (OpenGL cameras)."""
    w2c = torch.linalg.inv(c2w.double())
    xc = torch.einsum("vij,nj->vni", w2c[:, :3, :3], x.double()) + w2c[:, None, :3, 3]
    depth = -xc[..., 2]  # the camera looks along -z
    k = intrinsics.double()
    u = k[:, None, 0] * xc[..., 0] / depth + k[:, None, 2]
    v = -k[:, None, 1] * xc[..., 1] / depth + k[:, None, 3]  # image rows go down, camera y goes up
    return torch.stack([u, v], -1), depth


def lookup(masks: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """masks [V, H, W] bool at the pixels containing uv [V, N, 2]; False outside the image."""
    v_, h, w = masks.shape
    ui, vi = uv[..., 0].floor().long(), uv[..., 1].floor().long()
    inside = (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    return masks[torch.arange(v_)[:, None], vi.clamp(0, h - 1), ui.clamp(0, w - 1)] & inside


# ---------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------


def test_generator_deterministic(dataset: Path, tmp_path: Path):
    # the same seed regenerated elsewhere gives the same files (images, cameras, points)
    for split, seed in (("train", 2), ("heldout", 501)):
        generate_object(seed, split, tmp_path, RENDER)
        a, b = dataset / split / gen.object_id(seed), tmp_path / gen.object_id(seed)
        for i in range(VIEWS):
            assert np.array_equal(
                np.asarray(Image.open(a / "rgba" / f"{i:03d}.png")), np.asarray(Image.open(b / "rgba" / f"{i:03d}.png"))
            )
        assert json.loads((a / "cameras.json").read_text()) == json.loads((b / "cameras.json").read_text())
        with np.load(a / "points.npz") as pa, np.load(b / "points.npz") as pb:
            assert all(np.array_equal(pa[k], pb[k]) for k in ("xyz", "rgb", "normals"))
    # different seeds: different objects and cameras
    v0, v1 = (
        load_generated_object(dataset / "train" / "00000000"),
        load_generated_object(dataset / "train" / "00000001"),
    )
    assert (v0.images - v1.images).abs().mean() > 0.02
    assert not torch.allclose(v0.c2w, v1.c2w)


def test_batched_renderer_matches_synth_renderer():
    # render_views reuses the synth sphere tracer: same pixels as render_view, view by view
    scene = build_object(3)
    c2w = torch.from_numpy(object_camera_poses(3, RENDER)[:2]).float()
    settings = RenderSettings(supersample=2)
    batched = render_views(scene, c2w, RES, RES, RENDER.camera_angle_x, settings)
    for i in range(2):
        single = render_view(scene, c2w[i], RES, RES, RENDER.camera_angle_x, settings)
        assert torch.allclose(batched[i], single, atol=1e-5)


def test_families_are_varied_and_normalised():
    seen = set()
    for seed in range(40):
        scene = build_object(seed)
        seen.add(scene.family)
        # the object fits the unit ball; the renderer's bound really bounds it
        pts = gen.sample_surface(scene, 512, torch.Generator().manual_seed(seed))
        r = torch.linalg.vector_norm(pts, dim=-1)
        assert r.max() <= 1.0 + 1e-3 and r.max() > 0.9
        assert scene.bounding_radius() >= r.max() - 1e-4
        assert scene.sdf(pts).abs().max() < 2e-3
    assert seen == set(FAMILIES)
    for fam in FAMILIES:  # every family can be forced and renders something
        scene = build_object(7, family=fam)
        img = render_views(
            scene, torch.from_numpy(object_camera_poses(7, RENDER)[:1]).float(), 24, 24, RENDER.camera_angle_x
        )
        assert 0.03 < img[..., 3].mean() < 0.9, fam


def test_train_heldout_disjoint(dataset: Path):
    index = gen.read_index(dataset)
    train, held = index["splits"]["train"]["object_ids"], index["splits"]["heldout"]["object_ids"]
    assert len(train) == 6 and len(held) == 3 and not set(train) & set(held)
    assert sorted(p.name for p in (dataset / "train").iterdir()) == train
    assert sorted(p.name for p in (dataset / "heldout").iterdir()) == held
    # seed ranges that overlap are refused
    with pytest.raises(ValueError, match="overlap"):
        ObjectDatasetSpec(num_train=10, num_heldout=5, heldout_seed_start=8).validate()
    # the default spec supports >= 2000 training objects beside the held-out ones
    big = ObjectDatasetSpec(num_train=5000, num_heldout=500)
    big.validate()
    assert not set(big.seeds("train")) & set(big.seeds("heldout"))


def test_file_format(dataset: Path):
    index = json.loads((dataset / "index.json").read_text())
    assert index["format"] == "splat-ext-objects" and index["settings"]["views"] == VIEWS
    assert index["settings"]["resolution"] == RES and index["splits"]["heldout"]["seed_start"] == 500
    for obj in _all_object_dirs(dataset):
        cams = json.loads((obj / "cameras.json").read_text())
        assert cams["object_id"] == obj.name and cams["width"] == cams["height"] == RES
        assert cams["cx"] == cams["cy"] == RES / 2 and cams["fx"] == cams["fy"]
        assert math.isclose(cams["fx"], 0.5 * RES / math.tan(0.5 * RENDER.camera_angle_x))
        assert [f["file_path"] for f in cams["frames"]] == [f"rgba/{i:03d}.png" for i in range(VIEWS)]
        c2w = np.array([f["transform_matrix"] for f in cams["frames"]])
        rot = c2w[:, :3, :3]
        assert np.allclose(rot @ rot.transpose(0, 2, 1), np.eye(3), atol=1e-6) and np.allclose(np.linalg.det(rot), 1.0)
        assert np.allclose(np.linalg.norm(c2w[:, :3, 3], axis=-1), RENDER.camera_radius)
        elev = np.degrees(np.arcsin(c2w[:, 2, 3] / RENDER.camera_radius))
        assert elev.min() >= RENDER.min_elevation_deg - 1e-6 and elev.max() <= RENDER.max_elevation_deg + 1e-6
        for i in range(VIEWS):
            with Image.open(obj / "rgba" / f"{i:03d}.png") as im:
                assert im.mode == "RGBA" and im.size == (RES, RES)
        with np.load(obj / "points.npz") as pts:
            assert set(pts.files) == {"xyz", "rgb", "normals"}
            assert all(pts[k].shape == (RENDER.num_points, 3) and pts[k].dtype == np.float32 for k in pts.files)
            assert pts["rgb"].min() >= 0 and pts["rgb"].max() <= 1
            assert np.allclose(np.linalg.norm(pts["normals"], axis=-1), 1.0, atol=1e-4)
    leftovers = [p for p in dataset.rglob(".*") if p.name != "index.json"]
    assert not leftovers


def test_resume_and_atomic_writes(tmp_path: Path, monkeypatch):
    spec = ObjectDatasetSpec(
        render=ObjectRenderSpec(views=4, resolution=16, supersample=1, num_points=256), num_train=3, num_heldout=1
    )
    root = tmp_path / "root"
    assert generate_dataset(root, spec)["generated"] == 4
    first = root / "train" / "00000000"
    mtime = (first / "cameras.json").stat().st_mtime_ns

    # a second run skips everything and changes nothing
    stats = generate_dataset(root, spec)
    assert stats["generated"] == 0 and stats["skipped"] == 4
    assert (first / "cameras.json").stat().st_mtime_ns == mtime

    # a crash while writing an object leaves neither a half object nor a temporary folder
    real_savez = np.savez

    def failing_savez(path, **arrays):
        if "00000001" in str(path):
            raise OSError("disk full (simulated)")
        real_savez(path, **arrays)

    shutil.rmtree(root / "train" / "00000001")
    monkeypatch.setattr(gen.np, "savez", failing_savez)
    with pytest.raises(OSError, match="simulated"):
        generate_dataset(root, spec)
    assert not (root / "train" / "00000001").exists()
    assert not list((root / "train").glob(".tmp-*"))
    monkeypatch.setattr(gen.np, "savez", real_savez)
    with pytest.raises(FileNotFoundError, match="resumes"):
        list_split(root, "train")  # the loader names the fix
    assert len(list_split(root, "train", require_complete=False)) == 2

    # a temporary folder of a killed run and an incomplete object are cleaned up / redone
    stale = root / "train" / ".tmp-00000002-99999"
    (stale / "rgba").mkdir(parents=True)
    (root / "train" / "00000002" / "rgba" / "003.png").unlink()
    stats = generate_dataset(root, spec)
    assert stats["generated"] == 2 and stats["skipped"] == 2
    assert not stale.exists() and len(list_split(root, "train")) == 3
    assert (root / "train" / "00000002" / "rgba" / "003.png").is_file()

    # growing the dataset keeps the existing objects
    more = ObjectDatasetSpec(render=spec.render, num_train=4, num_heldout=1)
    assert generate_dataset(root, more)["generated"] == 1
    assert (first / "cameras.json").stat().st_mtime_ns == mtime

    # other render settings on the same root are refused (the error says what to do)
    other = ObjectDatasetSpec(
        render=ObjectRenderSpec(views=5, resolution=16, supersample=1, num_points=256), num_train=1, num_heldout=1
    )
    with pytest.raises(ValueError, match="--overwrite"):
        generate_dataset(root, other)


def test_cameras_look_at_the_object(dataset: Path):
    offsets = []
    for obj in _all_object_dirs(dataset):
        views = load_generated_object(obj)
        alpha = views.images[..., 3]
        assert (alpha.sum((1, 2)) > 4).all(), f"{obj}: an empty view"
        # the object stays inside the frame: no coverage on the border
        border = torch.cat([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], dim=1)
        assert border.max() == 0, f"{obj}: the object touches the image border"
        # the alpha centroid is near the image centre (the object is centred on the origin)
        ys, xs = torch.meshgrid(torch.arange(RES) + 0.5, torch.arange(RES) + 0.5, indexing="ij")
        w = alpha.sum((1, 2))
        cx, cy = (alpha * xs).sum((1, 2)) / w, (alpha * ys).sum((1, 2)) / w
        offsets.append(torch.stack([cx - RES / 2, cy - RES / 2], -1).norm(dim=-1))

        # surface points projected with the saved cameras land inside the alpha masks ...
        uv, depth = project(views.c2w, views.intrinsics, views.points)
        assert (depth > 0).all()
        mask = alpha > 0
        dilated = F.max_pool2d(mask.float()[:, None], 3, 1, 1)[:, 0] > 0  # silhouette pixels partly missed by the rays
        assert lookup(mask, uv).float().mean() > 0.95, obj
        assert lookup(dilated, uv).float().mean() > 0.999, obj
        # ... and cover them (all points project, occluded ones too, so they fill the silhouette)
        px = uv.floor().long().clamp(0, RES - 1)
        hit = torch.zeros_like(mask)
        for v in range(VIEWS):
            hit[v, px[v, :, 1], px[v, :, 0]] = True
        solid = alpha > 0.5
        assert (hit & solid).sum() >= 0.95 * solid.sum(), obj
        # controls: OpenCV-read cameras look away from the object; another view's camera misses the mask
        _, depth_cv = project(
            views.c2w @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])), views.intrinsics, views.points
        )
        assert (depth_cv < 0).all()
        uv_other, _ = project(views.c2w.roll(1, 0), views.intrinsics, views.points)
        assert lookup(dilated, uv_other).float().mean() < 0.99
    offsets = torch.cat(offsets)
    assert offsets.mean() < 0.06 * RES and offsets.max() < 0.2 * RES


def _tiny_cli_config(root: Path, workers: int = 1) -> ObjectsConfig:
    """Three objects (two train, one held-out) of 4 views at 16x16."""
    return ObjectsConfig(
        output_dir=root,
        num_train=2,
        num_heldout=1,
        views=4,
        resolution=16,
        supersample=1,
        num_points=128,
        device="cpu",
        workers=workers,
    )


def test_cli_main(tmp_path: Path, capsys):
    cfg = _tiny_cli_config(tmp_path / "cli")
    stats = main(cfg)
    assert stats["generated"] == 3
    out = capsys.readouterr().out
    assert "train 1/3" in out and "heldout 3/3" in out and "s/object" in out
    assert main(cfg)["skipped"] == 3
    assert "3 already there" in capsys.readouterr().out


def test_cli_workers_write_the_same_dataset(tmp_path: Path, capsys):
    one_root, two_root = tmp_path / "one", tmp_path / "two"
    assert main(_tiny_cli_config(one_root))["generated"] == 3
    stats = main(_tiny_cli_config(two_root, workers=2))
    assert stats["generated"] == 3 and stats["skipped"] == 0
    assert "(2 processes)" in capsys.readouterr().out
    one = sorted(p.relative_to(one_root) for p in one_root.rglob("*") if p.is_file())
    two = sorted(p.relative_to(two_root) for p in two_root.rglob("*") if p.is_file())
    assert one == two and len(one) == 1 + 3 * (4 + 2)  # index.json; per object: 4 images, cameras, points
    for rel in one:
        assert (one_root / rel).read_bytes() == (two_root / rel).read_bytes(), rel
    # resuming with workers skips what is there
    assert main(_tiny_cli_config(two_root, workers=2))["skipped"] == 3
    with pytest.raises(ValueError, match="--device cpu"):
        main(ObjectsConfig(output_dir=tmp_path / "gpu", device="cuda", workers=2))


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------


def test_srn_roundtrip(dataset: Path, tmp_path: Path):
    ours = load_generated_object(dataset / "train" / "00000001")
    srn_dir = export_srn_object(ours, tmp_path / "srn" / "obj")
    assert detect_format(srn_dir) == "srn"
    # the files follow SRN's conventions independently of our reader
    first = (srn_dir / "intrinsics.txt").read_text().splitlines()[0].split()
    assert len(first) == 4 and math.isclose(float(first[0]), float(ours.intrinsics[0, 0]), rel_tol=1e-6)
    pose = np.loadtxt(srn_dir / "pose" / "000000.txt").reshape(4, 4)  # OpenCV camera-to-world
    centre = pose[:3, 3]
    assert np.dot(pose[:3, 2], -centre / np.linalg.norm(centre)) > 0.999  # +z looks at the object
    assert pose[2, 1] < 0  # +y points down the image (world z is up)
    with Image.open(srn_dir / "rgb" / "000000.png") as im:
        assert im.mode == "RGB"

    back = load_srn_object(srn_dir)
    assert back.num_views == VIEWS and back.source_format == "srn"
    assert torch.allclose(back.c2w, ours.c2w, atol=1e-6)
    assert torch.allclose(back.intrinsics, ours.intrinsics, atol=1e-4)
    white = ours.composite((1.0, 1.0, 1.0))
    assert (back.images[..., :3] - white).abs().max() <= 0.5 / 255 + 1e-6
    assert ((back.images[..., 3] > 0) == (ours.images[..., 3] > 0)).float().mean() > 0.99

    # intrinsics written for another resolution (SRN's 512 px renders) are rescaled to the PNGs
    k = ours.intrinsics[0]
    (srn_dir / "intrinsics.txt").write_text(
        f"{4 * float(k[0])} {4 * float(k[2])} {4 * float(k[3])} 0.\n0. 0. 0.\n1.\n{4 * RES} {4 * RES}\n"
    )
    assert torch.allclose(load_srn_object(srn_dir).intrinsics, ours.intrinsics, atol=1e-4)
    # a world-to-camera flag on line 5 inverts the poses
    (srn_dir / "intrinsics.txt").write_text(
        f"{float(k[0])} {float(k[2])} {float(k[3])} 0.\n0. 0. 0.\n1.\n{RES} {RES}\n1\n"
    )
    for i in range(VIEWS):
        p = srn_dir / "pose" / f"{i:06d}.txt"
        p.write_text(" ".join(f"{v:.12g}" for v in np.linalg.inv(np.loadtxt(p).reshape(4, 4)).reshape(-1)))
    assert torch.allclose(load_srn_object(srn_dir).c2w, ours.c2w, atol=1e-5)


def test_blender_roundtrip(dataset: Path, tmp_path: Path):
    ours = load_generated_object(dataset / "heldout" / "00000500")
    out = export_blender_object(ours, tmp_path / "blender" / "obj")
    meta = json.loads((out / "transforms.json").read_text())
    assert math.isclose(meta["camera_angle_x"], RENDER.camera_angle_x, rel_tol=1e-6)
    assert np.allclose(
        np.array(meta["frames"][3]["transform_matrix"]), ours.c2w[3].numpy(), atol=1e-6
    )  # Blender = OpenGL
    back = load_object(out)  # auto-detected
    assert back.source_format == "blender"
    assert torch.allclose(back.c2w, ours.c2w, atol=1e-6)
    assert torch.allclose(back.intrinsics, ours.intrinsics, atol=1e-4)
    assert (back.images - ours.images).abs().max() <= 0.5 / 255 + 1e-6
    # a subset of views and its indices
    sub = load_blender_object(out, views=[5, 1])
    assert sub.view_indices.tolist() == [5, 1] and torch.equal(sub.images, back.images[[5, 1]])


def test_loader_errors_name_the_file(dataset: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_object(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the dataset layout"):
        load_object(tmp_path / "empty")
    obj = tmp_path / "obj"
    shutil.copytree(dataset / "train" / "00000000", obj)
    (obj / "rgba" / "002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"002\.png.*corrupt"):
        load_generated_object(obj)
    (obj / "cameras.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"cameras\.json is not valid JSON"):
        load_generated_object(obj)
    (obj / "cameras.json").write_text(json.dumps({"width": RES}))
    with pytest.raises(ValueError, match="missing or bad key"):
        load_generated_object(obj)
    srn = export_srn_object(load_generated_object(dataset / "train" / "00000003"), tmp_path / "srn")
    (srn / "pose" / "000004.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"000004\.txt is missing"):
        load_srn_object(srn)
    (tmp_path / "bad_index").mkdir()
    (tmp_path / "bad_index" / "index.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        gen.read_index(tmp_path / "bad_index")


# ---------------------------------------------------------------------------------------------
# GSO / zero123 renders: pose convention and FOV checked by visual-hull consistency
# ---------------------------------------------------------------------------------------------


def _visual_hull_check(views: ObjectViews, res: int = 96, img: int = 128, bound: float = 0.75):
    """Carve a hull from views 0-9, re-project it into views 10-24; (mean IoU, hull bbox size)."""
    masks = F.interpolate(views.images[..., 3][:, None], size=(img, img), mode="area")[:, 0] > 0.5
    k = views.intrinsics * (img / views.width)
    g = (torch.arange(res, dtype=torch.float64) + 0.5) / res * 2 * bound - bound
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    occupied = torch.ones(grid.shape[0], dtype=torch.bool)
    for v in range(10):
        uv, depth = project(views.c2w[v : v + 1], k[v : v + 1], grid)
        occupied &= lookup(masks[v : v + 1], uv)[0] & (depth[0] > 0)
    pts = grid[occupied]
    if pts.shape[0] == 0:
        return 0.0, 0.0
    jitter = (torch.rand(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * (
        2 * bound / res
    )
    cloud = (pts[:, None] + jitter[None]).reshape(-1, 3)  # sub-voxel samples fill the silhouettes
    uv, _ = project(views.c2w[10:], k[10:], cloud)
    ious = []
    for v in range(uv.shape[0]):
        sil = torch.zeros(img, img, dtype=torch.bool)
        px = uv[v].floor().long()
        ok = (px >= 0).all(-1) & (px < img).all(-1)
        sil[px[ok, 1], px[ok, 0]] = True
        m = masks[10 + v]
        ious.append(float((sil & m).sum()) / float((sil | m).sum()))
    size = float((pts.max(0).values - pts.min(0).values).max()) + 2 * bound / res
    return float(np.mean(ious)), size


def test_gso_elephant_visual_hull():
    root = shared_dataset("gso_elephant")
    views = load_gso_object(root)
    assert views.num_views == 25 and views.height == views.width == 512 and views.source_format == "gso"
    centres = views.c2w[:, :3, 3]
    dist = centres.norm(dim=-1)
    assert dist.min() > 1.4 and dist.max() < 2.3  # zero123 samples radii in [1.5, 2.2]
    forward = -views.c2w[:, :3, 2]  # OpenGL: the camera looks along -z, towards the object at the origin
    assert ((forward * -centres / dist[:, None]).sum(-1) > 0.99).all()
    alpha = views.images[..., 3]
    assert ((alpha > 0) & (alpha < 1)).any() and 0.05 < (alpha > 0.5).float().mean() < 0.6

    iou, size = _visual_hull_check(views)
    assert iou > 0.85, f"hull from views 0-9 re-projects onto views 10-24 with IoU {iou:.3f}"
    # zero123 normalises objects to a unit cube: the hull's largest side is ~1 with the assumed FOV
    assert 0.95 < size < 1.06, size
    # the other common FOVs fit worse: smaller IoU and a hull of the wrong size
    for fov_deg in (39.6, 60.0):
        other = load_gso_object(root, camera_angle_x=math.radians(fov_deg))
        iou_other, size_other = _visual_hull_check(other)
        assert iou_other < iou - 0.005, (fov_deg, iou_other, iou)
        assert abs(size_other - 1.0) > 0.15, (fov_deg, size_other)
    # control: reading the poses with the OpenCV convention carves nothing consistent
    flipped = ObjectViews(views.images, views.c2w @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])), views.intrinsics)
    assert _visual_hull_check(flipped)[0] < 0.3
    assert math.isclose(math.degrees(GSO_CAMERA_ANGLE_X), 49.134, abs_tol=1e-3)


# ---------------------------------------------------------------------------------------------
# datamanager
# ---------------------------------------------------------------------------------------------


def _datamanager(root: Path, **kw) -> MultiObjectDataManager:
    cfg = MultiObjectDataManagerConfig(data=root, batch_size=4, eval_batch_size=2, num_target_views=3, seed=0, **kw)
    return cfg.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)


def test_datamanager_batches(dataset: Path):
    dm = _datamanager(dataset, load_points=True)
    assert len(dm.train_dataset) == 6 and len(dm.eval_dataset) == 3
    assert dm.get_datapath() == dataset and dm.get_param_groups() == {}
    assert dm.get_train_rays_per_batch() == 4 * 3 * RES * RES

    cameras, batch = dm.next_train(0)
    assert cameras.shape == (4, 4)
    assert batch["source_image"].shape == (4, RES, RES, 4) and batch["source_image"].dtype == torch.float32
    assert batch["target_images"].shape == (4, 3, RES, RES, 4)
    assert batch["source_c2w"].shape == (4, 4, 4) and batch["target_c2w"].shape == (4, 3, 4, 4)
    assert batch["source_intrinsics"].shape == (4, 4) and batch["target_intrinsics"].shape == (4, 3, 4)
    assert batch["points"].shape == (4, RENDER.num_points, 3) and batch["point_rgb"].shape == (4, RENDER.num_points, 3)
    assert 0.0 <= float(batch["target_images"].min()) and float(batch["target_images"].max()) <= 1.0
    assert torch.allclose(cameras.camera_to_worlds[:, 0], batch["source_c2w"][:, :3, :4])
    assert torch.allclose(cameras.fx[:, 1:, 0], batch["target_intrinsics"][..., 0])
    for b in range(4):
        src, tgt = int(batch["source_view"][b]), batch["target_views"][b].tolist()
        assert src not in tgt and len(set(tgt)) == 3
        # the images and cameras are those of the named object and views
        obj = load_generated_object(dataset / "train" / batch["object_ids"][b])
        assert torch.equal(batch["source_image"][b], obj.images[src])
        assert torch.equal(batch["target_images"][b], obj.images[tgt])
        assert torch.equal(batch["target_c2w"][b], obj.c2w[tgt])
        assert torch.equal(batch["points"][b], obj.points)

    # deterministic per step (a resumed run sees the same batches); other steps differ
    _, again = _datamanager(dataset).next_train(0)
    assert again["object_ids"] == batch["object_ids"] and torch.equal(again["target_views"], batch["target_views"])
    _, later = dm.next_train(5)
    assert later["object_ids"] != batch["object_ids"] or not torch.equal(later["target_views"], batch["target_views"])
    # every training object once per epoch (6 objects, 4 per step: steps 0-2 are two epochs)
    ids = sum((dm.next_train(s)[1]["object_ids"] for s in range(3)), [])
    assert sorted(ids[:6]) == sorted(ids[6:]) == sorted(dm.train_dataset.object_ids)


def test_datamanager_eval_uses_heldout_only(dataset: Path):
    dm = _datamanager(dataset)
    train_ids, held_ids = set(dm.train_dataset.object_ids), set(dm.eval_dataset.object_ids)
    assert held_ids == {"00000500", "00000501", "00000502"} and not train_ids & held_ids
    for step in range(4):
        cameras, batch = dm.next_eval(step)
        assert cameras.shape == (2, 4) and set(batch["object_ids"]) <= held_ids
    seen = []
    for step in range(3):
        cameras, batch = dm.next_eval_image(step)
        assert cameras.shape == (1, VIEWS) and batch["target_images"].shape == (1, VIEWS - 1, RES, RES, 4)
        assert int(batch["source_view"][0]) == 0
        seen += batch["object_ids"]
    assert sorted(seen) == sorted(held_ids)
    fixed = dm.fixed_indices_eval_dataloader
    assert len(fixed) == 3 and [b["object_ids"][0] for _, b in fixed] == dm.eval_dataset.object_ids
    assert dm.get_eval_iterable(2) is not None


def test_datamanager_other_layouts_and_errors(dataset: Path, tmp_path: Path):
    # an SRN-layout collection (train / heldout folders of objects) works the same way
    for split, ids in (("train", ["00000000", "00000001", "00000002"]), ("heldout", ["00000500"])):
        for oid in ids:
            export_srn_object(load_generated_object(dataset / split / oid), tmp_path / "srn" / split / oid)
    dm = _datamanager(tmp_path / "srn", format="srn")
    cameras, batch = dm.next_train(1)
    assert batch["target_images"].shape == (4, 3, RES, RES, 4) and len(dm.eval_dataset) == 1
    with pytest.raises(ValueError, match="lower num_target_views"):
        MultiObjectDataManagerConfig(data=dataset, num_target_views=VIEWS).setup(device="cpu")
    with pytest.raises(FileNotFoundError, match="splat-ext-objects --output-dir"):
        MultiObjectDataManagerConfig(data=tmp_path / "missing").setup(device="cpu")
