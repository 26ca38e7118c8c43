"""Seeded procedural SDF object with a procedural (solid-texture) albedo.

The object is a smooth union of a few signed-distance primitives (sphere, torus, rounded box,
capsule) placed around the origin so that it fits inside roughly ``[-1, 1]^3``. Its colour is a
3D solid texture (stripes, checkers, concentric rings, smooth noise) built from a seeded palette
of distinct colours; each primitive carries its own pattern, and patterns are blended smoothly
where primitives meet. Everything is expressed as batched torch ops on ``(N, 3)`` points.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

PRIMITIVE_KINDS: Tuple[str, ...] = ("sphere", "torus", "rounded_box", "capsule")
PATTERN_KINDS: Tuple[str, ...] = ("stripes", "checker", "rings", "noise")


@dataclass
class SceneSpec:
    """Parameters of the procedural object. Two specs that compare equal give the same object."""

    seed: int = 0
    """Random seed of the object (shapes, placement, colours, patterns)."""
    num_primitives: int = 5
    """Number of SDF primitives in the smooth union (the first one is a central body)."""
    extent: float = 1.0
    """The object is kept inside the ball of this radius (hence inside ``[-extent, extent]^3``)."""
    blend: float = 0.12
    """Smooth-union radius ``k`` of the polynomial smooth minimum."""
    num_colors: int = 6
    """Size of the colour palette."""


@dataclass
class Primitive:
    """One SDF primitive in its own local frame (``local = (x - center) @ rotation``)."""

    kind: str
    center: Tuple[float, float, float]
    rotation: Tuple[Tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    """3x3 matrix whose columns are the local axes expressed in world coordinates."""
    params: Tuple[float, ...] = ()
    """sphere: (r,), torus: (R, r), rounded_box: (bx, by, bz, rounding), capsule: (half_length, r)."""

    def bounding_radius(self) -> float:
        """Radius of a ball around ``center`` that contains the primitive."""
        p = self.params
        if self.kind == "sphere":
            return p[0]
        if self.kind == "torus":
            return p[0] + p[1]
        if self.kind == "rounded_box":
            return math.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2)
        if self.kind == "capsule":
            return p[0] + p[1]
        raise ValueError(f"unknown primitive kind {self.kind!r}")


@dataclass
class Pattern:
    """A solid texture evaluated in the local frame of a primitive."""

    kind: str
    colors: Tuple[Tuple[float, float, float], ...]
    frequency: float = 4.0
    axis: Tuple[float, float, float] = (0.0, 0.0, 1.0)
    """stripes: normal of the stripe planes; rings: centre of the concentric shells."""
    phase: float = 0.0
    # random Fourier features for the "noise" pattern: rows (wx, wy, wz, phase)
    waves: Tuple[Tuple[float, float, float, float], ...] = ()


# ---------------------------------------------------------------------------------------------
# SDF building blocks
# ---------------------------------------------------------------------------------------------


def _length(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def sdf_sphere(q: Tensor, r: float) -> Tensor:
    return _length(q) - r


def sdf_torus(q: Tensor, major: float, minor: float) -> Tensor:
    qxy = torch.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2) - major
    return torch.sqrt(qxy**2 + q[:, 2] ** 2) - minor


def sdf_rounded_box(q: Tensor, half: Sequence[float], rounding: float) -> Tensor:
    b = torch.tensor(half, dtype=q.dtype, device=q.device) - rounding
    d = q.abs() - b
    outside = _length(d.clamp(min=0.0))
    inside = d.max(dim=-1).values.clamp(max=0.0)
    return outside + inside - rounding


def sdf_capsule(q: Tensor, half_length: float, r: float) -> Tensor:
    z = q[:, 2].clamp(-half_length, half_length)
    d = q.clone()
    d[:, 2] = q[:, 2] - z
    return _length(d) - r


def smooth_min(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum (lowers the minimum by at most ``k / 4``)."""
    if k <= 0:
        return torch.minimum(a, b)
    h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smoothstep(e0: float, e1: float, x: Tensor) -> Tensor:
    t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ---------------------------------------------------------------------------------------------
# Scene
# ---------------------------------------------------------------------------------------------


class ProceduralScene:
    """A smooth union of SDF primitives with a per-primitive solid texture."""

    def __init__(
        self,
        primitives: Sequence[Primitive],
        patterns: Sequence[Pattern] | None = None,
        blend: float = 0.0,
        albedo_sharpness: float = 0.04,
    ) -> None:
        if len(primitives) == 0:
            raise ValueError("a scene needs at least one primitive")
        self.primitives: List[Primitive] = list(primitives)
        if patterns is None:
            patterns = [Pattern("stripes", ((0.8, 0.8, 0.8), (0.8, 0.8, 0.8)))] * len(self.primitives)
        if len(patterns) != len(self.primitives):
            raise ValueError("need one pattern per primitive")
        self.patterns: List[Pattern] = list(patterns)
        self.blend = float(blend)
        self.albedo_sharpness = float(albedo_sharpness)
        self._cache: dict = {}

    # -- geometry -----------------------------------------------------------------------------

    def bounding_radius(self) -> float:
        """Radius of a ball around the origin that contains the whole object."""
        r = max(_norm3(p.center) + p.bounding_radius() for p in self.primitives)
        return r + 0.25 * self.blend

    def _frames(self, dtype: torch.dtype, device: torch.device) -> List[Tuple[Tensor, Tensor]]:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = [
                (
                    torch.tensor(p.center, dtype=dtype, device=device),
                    torch.tensor(p.rotation, dtype=dtype, device=device),
                )
                for p in self.primitives
            ]
        return self._cache[key]

    def _local(self, x: Tensor, i: int) -> Tensor:
        c, rot = self._frames(x.dtype, x.device)[i]
        return (x - c) @ rot

    def primitive_sdfs(self, x: Tensor) -> List[Tensor]:
        """Distance of ``x`` (N, 3) to each primitive, a list of (N,) tensors."""
        out = []
        for i, p in enumerate(self.primitives):
            if p.kind == "sphere":
                c = self._frames(x.dtype, x.device)[i][0]
                out.append(_length(x - c) - p.params[0])
                continue
            q = self._local(x, i)
            if p.kind == "torus":
                out.append(sdf_torus(q, p.params[0], p.params[1]))
            elif p.kind == "rounded_box":
                out.append(sdf_rounded_box(q, p.params[:3], p.params[3]))
            elif p.kind == "capsule":
                out.append(sdf_capsule(q, p.params[0], p.params[1]))
            else:
                raise ValueError(f"unknown primitive kind {p.kind!r}")
        return out

    def sdf(self, x: Tensor) -> Tensor:
        """Signed distance (N,) of points ``x`` (N, 3); negative inside."""
        ds = self.primitive_sdfs(x)
        d = ds[0]
        for other in ds[1:]:
            d = smooth_min(d, other, self.blend)
        return d

    # -- appearance -----------------------------------------------------------------------------

    def _pattern(self, x: Tensor, i: int) -> Tensor:
        pat = self.patterns[i]
        q = self._local(x, i)
        cols = torch.tensor(pat.colors, dtype=x.dtype, device=x.device)
        if pat.kind == "stripes":
            axis = torch.tensor(pat.axis, dtype=x.dtype, device=x.device)
            s = torch.sin(2.0 * math.pi * pat.frequency * (q @ axis) + pat.phase)
            w = _smoothstep(-0.35, 0.35, s)
            return torch.lerp(cols[0].expand_as(q), cols[1].expand_as(q), w[:, None])
        if pat.kind == "checker":
            s = torch.sin(math.pi * pat.frequency * q + pat.phase).prod(dim=-1)
            w = _smoothstep(-0.05, 0.05, s)
            return torch.lerp(cols[0].expand_as(q), cols[1].expand_as(q), w[:, None])
        if pat.kind == "rings":
            r = _length(q - torch.tensor(pat.axis, dtype=x.dtype, device=x.device))
            s = torch.sin(2.0 * math.pi * pat.frequency * r + pat.phase)
            w = _smoothstep(-0.3, 0.3, s)
            base = torch.lerp(cols[0].expand_as(q), cols[1].expand_as(q), w[:, None])
            # a third colour on thin bands
            band = _smoothstep(0.85, 0.95, torch.sin(math.pi * pat.frequency * r + pat.phase))
            return torch.lerp(base, cols[2].expand_as(q), band[:, None])
        if pat.kind == "noise":
            waves = torch.tensor(pat.waves, dtype=x.dtype, device=x.device)
            n = torch.sin(q @ waves[:, :3].T + waves[:, 3]).sum(dim=-1) / math.sqrt(len(pat.waves))
            w1 = _smoothstep(-0.45, 0.15, n)
            w2 = _smoothstep(0.35, 0.75, n)
            c = torch.lerp(cols[0].expand_as(q), cols[1].expand_as(q), w1[:, None])
            return torch.lerp(c, cols[2].expand_as(q), w2[:, None])
        raise ValueError(f"unknown pattern kind {pat.kind!r}")

    def albedo(self, x: Tensor) -> Tensor:
        """Diffuse albedo (N, 3) in [0, 1] at points ``x`` (N, 3) (meaningful near the surface)."""
        if len(self.primitives) == 1:
            return self._pattern(x, 0).clamp(0.0, 1.0)
        ds = torch.stack(self.primitive_sdfs(x), dim=-1)
        weights = torch.softmax(-ds / self.albedo_sharpness, dim=-1)
        out = torch.zeros_like(x)
        for i in range(len(self.primitives)):
            out = out + weights[:, i : i + 1] * self._pattern(x, i)
        return out.clamp(0.0, 1.0)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def single_sphere(
        cls,
        radius: float,
        center: Tuple[float, float, float] = (0.0, 0.0, 0.0),
        color: Tuple[float, float, float] = (0.8, 0.8, 0.8),
    ) -> "ProceduralScene":
        """A plain sphere of uniform colour (used for analytic checks of the renderer)."""
        prim = Primitive("sphere", tuple(float(c) for c in center), params=(float(radius),))
        return cls([prim], [Pattern("stripes", (color, color))], blend=0.0)


def _norm3(v: Sequence[float]) -> float:
    return math.sqrt(sum(float(c) ** 2 for c in v))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _palette(rng: np.random.Generator, n: int) -> List[Tuple[float, float, float]]:
    """``n`` clearly distinct colours: hues spread by the golden ratio, varied saturation/value."""
    h0 = rng.uniform()
    cols = []
    for i in range(n):
        h = (h0 + i * 0.618033988749895) % 1.0
        s = rng.uniform(0.45, 0.9)
        v = rng.uniform(0.55, 0.95) if i % 3 else rng.uniform(0.8, 1.0)
        cols.append(tuple(float(c) for c in colorsys.hsv_to_rgb(h, s, v)))
    # one near-white and one dark colour give strong luminance contrast
    if n >= 4:
        cols[1] = (0.86, 0.85, 0.8)
        cols[3] = tuple(float(c) for c in colorsys.hsv_to_rgb((h0 + 0.5) % 1.0, 0.7, 0.4))
    return cols


def _random_primitive(rng: np.random.Generator, kind: str, central: bool) -> Primitive:
    if kind == "sphere":
        params: Tuple[float, ...] = (rng.uniform(0.42, 0.52) if central else rng.uniform(0.22, 0.36),)
    elif kind == "torus":
        major = rng.uniform(0.45, 0.6) if central else rng.uniform(0.28, 0.42)
        params = (major, rng.uniform(0.1, 0.17))
    elif kind == "rounded_box":
        scale = 0.42 if central else 0.28
        half = rng.uniform(0.65, 1.0, size=3) * scale
        params = (*[float(h) for h in half], float(rng.uniform(0.03, 0.08)))
    elif kind == "capsule":
        params = (rng.uniform(0.25, 0.45) if central else rng.uniform(0.18, 0.32), rng.uniform(0.1, 0.18))
    else:
        raise ValueError(kind)
    rot = _random_rotation(rng)
    return Primitive(
        str(kind), (0.0, 0.0, 0.0), tuple(tuple(float(v) for v in row) for row in rot), tuple(float(p) for p in params)
    )


def _random_pattern(rng: np.random.Generator, kind: str, palette: Sequence[Tuple[float, float, float]]) -> Pattern:
    idx = rng.choice(len(palette), size=3, replace=False)
    colors = tuple(palette[i] for i in idx)
    if kind == "stripes":
        return Pattern(kind, colors, float(rng.uniform(2.5, 4.5)), tuple(_random_direction(rng)), float(rng.uniform(0, 6.3)))
    if kind == "checker":
        return Pattern(kind, colors, float(rng.uniform(4.0, 7.0)), phase=float(rng.uniform(0, 6.3)))
    if kind == "rings":
        # concentric shells around an off-centre point (centred ones would be invisible on a sphere)
        centre = tuple(float(c) for c in _random_direction(rng) * rng.uniform(0.4, 0.7))
        return Pattern(kind, colors, float(rng.uniform(2.5, 4.0)), centre, float(rng.uniform(0, 6.3)))
    if kind == "noise":
        waves = []
        for _ in range(8):
            w = _random_direction(rng) * rng.uniform(4.0, 10.0)
            waves.append((float(w[0]), float(w[1]), float(w[2]), float(rng.uniform(0, 6.3))))
        return Pattern(kind, colors, waves=tuple(waves))
    raise ValueError(kind)


def build_scene(spec: SceneSpec) -> ProceduralScene:
    """Deterministically build the procedural object described by ``spec``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(spec.seed), 0x5EED]))
    n = max(1, int(spec.num_primitives))
    palette = _palette(rng, max(3, int(spec.num_colors)))

    central_kind = ("sphere", "rounded_box")[int(rng.integers(2))]  # a bulky body ...
    kinds = [str(central_kind)]
    # ... with satellites of every kind when there is room for them
    others = list(rng.permutation(PRIMITIVE_KINDS))
    while len(kinds) < n:
        kinds.append(str(others[(len(kinds) - 1) % len(others)]))
    pattern_order = [str(k) for k in rng.permutation(PATTERN_KINDS)]

    limit = float(spec.extent) - 0.25 * float(spec.blend)
    prims: List[Primitive] = []
    patterns: List[Pattern] = []
    for i, kind in enumerate(kinds):
        prim = _random_primitive(rng, kind, central=(i == 0))
        if i == 0:
            center = rng.uniform(-0.08, 0.08, size=3)
        else:
            # attach satellites on the surface of the central body, in varied directions
            direction = _random_direction(rng)
            body = ProceduralScene([prims[0]])
            ts = torch.linspace(0.0, 1.5, 301, dtype=torch.float64)
            pts = torch.tensor(prims[0].center, dtype=torch.float64) + ts[:, None] * torch.from_numpy(direction)
            outside = torch.nonzero(body.sdf(pts) > 0)
            surface = float(ts[outside[0, 0]]) if outside.numel() else 0.5
            center = np.asarray(prims[0].center) + direction * (surface + prim.bounding_radius() * rng.uniform(0.3, 0.8))
        # keep inside the extent ball
        rb = prim.bounding_radius()
        if rb > limit:
            raise AssertionError("primitive larger than the scene extent")
        cn = float(np.linalg.norm(center))
        if cn + rb > limit:
            center = center * (limit - rb) / max(cn, 1e-9)
        prim.center = tuple(float(c) for c in center)
        prims.append(prim)
        patterns.append(_random_pattern(rng, pattern_order[i % len(pattern_order)], palette))
    return ProceduralScene(prims, patterns, blend=spec.blend)


def make_sdf(spec: SceneSpec) -> Callable[[Tensor], Tensor]:
    """``sdf(x)``: (N, 3) -> (N,) signed distance of the object of ``spec``."""
    return build_scene(spec).sdf


def make_albedo(spec: SceneSpec) -> Callable[[Tensor], Tensor]:
    """``albedo(x)``: (N, 3) -> (N, 3) colour in [0, 1] of the object of ``spec``."""
    return build_scene(spec).albedo
