"""splat-ext-data: layout detection, background metadata, and one-line errors that name the bad file."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nerfstudio_splat_ext.dataparsers.splat_ext_dataparser import DatasetError, SplatExtDataParserConfig


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_blender_layout_detected_with_white_background(tiny_synth):
    out = SplatExtDataParserConfig(data=tiny_synth).setup().get_dataparser_outputs("train")
    assert len(out.image_filenames) == 24
    assert out.metadata["dataset_layout"] == "blender"
    assert torch.equal(out.metadata["background_color"], torch.ones(3))
    test = SplatExtDataParserConfig(data=tiny_synth).setup().get_dataparser_outputs("test")
    assert len(test.image_filenames) == 6


def test_nerfstudio_layout_holds_out_every_eighth_frame(fox_dir):
    parser = SplatExtDataParserConfig(data=fox_dir, check_images=False).setup()
    train, test = parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("test")
    n_frames = len(json.loads((fox_dir / "transforms.json").read_text())["frames"])
    assert len(train.image_filenames) + len(test.image_filenames) == n_frames
    assert len(test.image_filenames) == (n_frames + 7) // 8
    assert not set(train.image_filenames) & set(test.image_filenames)
    # photographs (JPEG, no alpha): no background colour is imposed on the model
    assert "background_color" not in train.metadata


def test_nerfstudio_layout_with_rgba_images_gets_white_background(tiny_synth, tmp_path):
    """Blender frames rewritten as a single nerfstudio transforms.json keep their alpha, so the white background
    applies; the same frames flattened to RGB get none."""
    meta = json.loads((tiny_synth / "transforms_train.json").read_text())
    from PIL import Image

    for mode in ("RGBA", "RGB"):
        root = tmp_path / mode
        root.mkdir()
        frames = []
        for i, frame in enumerate(meta["frames"][:8]):
            img = Image.open(tiny_synth / (frame["file_path"].replace("./", "") + ".png")).convert(mode)
            img.save(root / f"{i:03d}.png")
            frames.append({"file_path": f"{i:03d}.png", "transform_matrix": frame["transform_matrix"]})
        w = img.width
        focal = 0.5 * w / math.tan(0.5 * meta["camera_angle_x"])
        (root / "transforms.json").write_text(json.dumps(
            {"fl_x": focal, "fl_y": focal, "cx": w / 2, "cy": w / 2, "w": w, "h": w, "frames": frames}))
        out = SplatExtDataParserConfig(data=root).setup().get_dataparser_outputs("train")
        assert out.metadata["dataset_layout"] == "nerfstudio"
        if mode == "RGBA":
            assert torch.equal(out.metadata["background_color"], torch.ones(3))
        else:
            assert "background_color" not in out.metadata


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_scene"
    with pytest.raises(DatasetError) as err:
        SplatExtDataParserConfig(data=missing).setup().get_dataparser_outputs("train")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_png_names_the_file(tiny_synth, tmp_path):
    data = _copy(tiny_synth, tmp_path / "scene")
    bad = data / "train" / "r_3.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    with pytest.raises(DatasetError) as err:
        SplatExtDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert str(bad) in str(err.value) and "corrupt" in str(err.value)


def test_first_corrupt_file_in_dataset_order_is_named(tiny_synth, tmp_path):
    """The images are decoded in parallel; the error still names the first bad frame of the transforms file."""
    data = _copy(tiny_synth, tmp_path / "scene")
    frames = [f["file_path"] for f in json.loads((data / "transforms_train.json").read_text())["frames"]]
    first, later = (data / (frames[i].replace("./", "") + ".png") for i in (5, 17))
    for bad in (later, first):
        bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetError) as err:
        SplatExtDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert str(first) in str(err.value) and str(later) not in str(err.value)


def test_nerfstudio_layout_decodes_each_image_once_for_both_splits(tiny_synth, tmp_path, monkeypatch):
    """A nerfstudio-layout dataset lists every frame for each split; the check decodes each file once."""
    from nerfstudio_splat_ext.dataparsers import splat_ext_dataparser

    meta = json.loads((tiny_synth / "transforms_train.json").read_text())
    data = tmp_path / "scene"
    data.mkdir()
    frames = []
    for i, frame in enumerate(meta["frames"][:10]):
        shutil.copy(tiny_synth / (frame["file_path"].replace("./", "") + ".png"), data / f"{i}.png")
        frames.append({"file_path": f"{i}.png", "transform_matrix": frame["transform_matrix"]})
    (data / "transforms.json").write_text(json.dumps({"fl_x": 50.0, "fl_y": 50.0, "cx": 32.0, "cy": 32.0, "w": 64, "h": 64, "frames": frames}))
    decoded = []
    original = splat_ext_dataparser._check_image
    monkeypatch.setattr(splat_ext_dataparser, "_check_image", lambda path: (decoded.append(path), original(path)))
    parser = SplatExtDataParserConfig(data=data).setup()
    parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("test")
    assert sorted(decoded) == sorted(data / f["file_path"] for f in frames)


def test_transforms_without_frames_names_the_file(tiny_synth, tmp_path):
    data = _copy(tiny_synth, tmp_path / "scene")
    transforms = data / "transforms_train.json"
    meta = json.loads(transforms.read_text())
    meta["frames"] = []
    transforms.write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as err:
        SplatExtDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert str(transforms) in str(err.value) and "no frames" in str(err.value)


def test_malformed_json_names_the_file(tiny_synth, tmp_path):
    data = _copy(tiny_synth, tmp_path / "scene")
    transforms = data / "transforms_train.json"
    transforms.write_text(transforms.read_text()[:-10])
    with pytest.raises(DatasetError) as err:
        SplatExtDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert str(transforms) in str(err.value) and "not valid JSON" in str(err.value)


def _ns_train_error(data: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    ns_train = Path(sys.executable).parent / "ns-train"
    return subprocess.run(
        [str(ns_train), "splat-ext", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--vis", "tensorboard",
         "--max-num-iterations", "1"],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("case", ["missing", "corrupt_png", "no_frames"])
def test_ns_train_reports_bad_input_in_one_line(case, tiny_synth, tmp_path):
    data = tmp_path / "scene"
    if case == "missing":
        named = data
    else:
        _copy(tiny_synth, data)
        if case == "corrupt_png":
            named = data / "train" / "r_0.png"
            named.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        else:
            named = data / "transforms_train.json"
            named.write_text(json.dumps({"camera_angle_x": 0.69}))
    proc = _ns_train_error(data, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("splat-ext: error:") and str(named) in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
