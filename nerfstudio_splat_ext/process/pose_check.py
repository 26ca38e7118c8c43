"""Compare the camera poses of two transforms.json files (ours vs a reference) up to a similarity transform.

SfM recovers poses only up to rotation, translation and scale, so the camera centres are first aligned with the
least-squares similarity (Umeyama 1991); errors are then reported relative to the reference cameras' spread (RMS
distance of the reference centres from their mean) and as rotation angles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np


def load_poses(transforms: Path) -> Dict[str, np.ndarray]:
    """file name -> 4x4 camera-to-world (OpenGL camera axes, as nerfstudio and NeRF write them)."""
    meta = json.loads(Path(transforms).read_text())
    return {Path(f["file_path"]).name: np.asarray(f["transform_matrix"], dtype=np.float64) for f in meta["frames"]}


def umeyama(src: np.ndarray, dst: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
    """s, R, t minimising sum |s R src_i + t - dst_i|^2 (src, dst: [N, 3])."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign) / xs.var(0).sum())
    return scale, rot, mu_d - scale * rot @ mu_s


def compare(ours: Path, reference: Path) -> Dict[str, float]:
    mine, ref = load_poses(ours), load_poses(reference)
    names = sorted(set(mine) & set(ref))
    if len(names) < 3:
        raise ValueError(f"only {len(names)} frames in common between {ours} and {reference}")
    c_mine = np.stack([mine[n][:3, 3] for n in names])
    c_ref = np.stack([ref[n][:3, 3] for n in names])
    scale, rot, trans = umeyama(c_mine, c_ref)
    aligned = scale * c_mine @ rot.T + trans
    spread = float(np.sqrt(((c_ref - c_ref.mean(0)) ** 2).sum(1).mean()))
    centre_err = np.linalg.norm(aligned - c_ref, axis=1) / spread
    angles = []
    for n in names:
        r_mine = rot @ mine[n][:3, :3]
        cos = (np.trace(ref[n][:3, :3].T @ r_mine) - 1.0) / 2.0
        angles.append(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    return {
        "frames_compared": float(len(names)),
        "centre_error_median_frac": float(np.median(centre_err)),
        "centre_error_max_frac": float(centre_err.max()),
        "rotation_error_median_deg": float(np.median(angles)),
        "rotation_error_max_deg": float(np.max(angles)),
    }


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m nerfstudio_splat_ext.process.pose_check OURS/transforms.json REFERENCE/transforms.json")
    print(json.dumps(compare(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))
