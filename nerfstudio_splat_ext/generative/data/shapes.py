"""Seeded procedural objects for the multi-object dataset: shape families built from SDF primitives.

This extends :mod:`nerfstudio_splat_ext.synth.scene` without changing it:

* four more primitives (``cylinder``, ``cone``, ``ellipsoid``, ``octahedron``) on top of the
  sphere / torus / rounded box / capsule of ``scene.py``;
* three more solid textures (``solid``, ``dots``, ``gradient``) on top of stripes / checker /
  rings / noise;
* six shape families, chosen per object from its seed:

  - ``blob``: the original single-scene generator (:func:`synth.scene.build_scene`) with a random
    number of primitives and blend radius;
  - ``cluster``: a central body with satellites of every primitive kind;
  - ``creature``: a mirror-symmetric body with a head, legs, ears and sometimes a tail;
  - ``furniture``: tables, chairs, stools and shelves (boxes and cylinders, little blending);
  - ``stack``: 2-4 axially symmetric parts stacked along ``z`` (snowmen, lamps, vases, trophies);
  - ``single``: one primitive of any kind.

Upright families (creature, furniture, stack) stand on world ``+z`` with a random yaw. Every object
is normalised by a similarity transform so that its surface touches the unit ball (its surface
points are inside ``|x| <= extent`` and the farthest one is at ``extent``, measured from the centre
of its bounding box): the framing of all objects is the same, whatever the family.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_splat_ext.synth.scene import (
    PATTERN_KINDS,
    PRIMITIVE_KINDS,
    Pattern,
    Primitive,
    ProceduralScene,
    SceneSpec,
    _palette,
    _random_direction,
    _random_rotation,
    _smoothstep,
    build_scene,
    sdf_capsule,
    sdf_rounded_box,
    sdf_torus,
)

EXTRA_PRIMITIVE_KINDS: Tuple[str, ...] = ("cylinder", "cone", "ellipsoid", "octahedron")
EXTRA_PATTERN_KINDS: Tuple[str, ...] = ("solid", "dots", "gradient")
ALL_PRIMITIVE_KINDS: Tuple[str, ...] = PRIMITIVE_KINDS + EXTRA_PRIMITIVE_KINDS
ALL_PATTERN_KINDS: Tuple[str, ...] = PATTERN_KINDS + EXTRA_PATTERN_KINDS

FAMILIES: Tuple[str, ...] = ("blob", "cluster", "creature", "furniture", "stack", "single")
FAMILY_WEIGHTS: Tuple[float, ...] = (0.2, 0.2, 0.15, 0.15, 0.15, 0.15)

_OBJECT_SEED_TAG = 0x0B1EC7  # separates the object streams from synth.scene's own seed stream
_IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
_MIRROR_Y = np.diag([1.0, -1.0, 1.0])

Color = Tuple[float, float, float]


# ---------------------------------------------------------------------------------------------
# extra primitives and patterns
# ---------------------------------------------------------------------------------------------


@dataclass
class ShapePrimitive(Primitive):
    """A :class:`Primitive` that also knows the extra kinds.

    params: cylinder ``(half_height, radius, rounding)`` along local z; cone ``(half_height,
    r_bottom, r_top)`` along local z; ellipsoid ``(rx, ry, rz)``; octahedron ``(size,)``.
    """

    def bounding_radius(self) -> float:
        p = self.params
        if self.kind == "cylinder":
            return math.hypot(p[0], p[1])
        if self.kind == "cone":
            return math.hypot(p[0], max(p[1], p[2]))
        if self.kind == "ellipsoid":
            return max(p)
        if self.kind == "octahedron":
            return p[0]
        return super().bounding_radius()


def sdf_cylinder(q: Tensor, half_height: float, radius: float, rounding: float) -> Tensor:
    """Exact SDF of a cylinder along local z with rounded rims."""
    dx = torch.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2) - radius + rounding
    dz = q[:, 2].abs() - half_height + rounding
    inside = torch.maximum(dx, dz).clamp(max=0.0)
    outside = torch.sqrt(dx.clamp(min=0.0) ** 2 + dz.clamp(min=0.0) ** 2)
    return inside + outside - rounding


def sdf_cone(q: Tensor, half_height: float, r_bottom: float, r_top: float) -> Tensor:
    """Exact SDF of a capped cone along local z (Inigo Quilez's ``sdCappedCone``)."""
    h, r1, r2 = half_height, r_bottom, r_top
    qx = torch.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2)
    qy = q[:, 2]
    rad = torch.where(qy < 0.0, torch.full_like(qy, r1), torch.full_like(qy, r2))
    ca_x = qx - torch.minimum(qx, rad)
    ca_y = qy.abs() - h
    k2x, k2y = r2 - r1, 2.0 * h
    t = (((r2 - qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0.0, 1.0)
    cb_x = qx - r2 + k2x * t
    cb_y = qy - h + k2y * t
    sign = torch.where((cb_x < 0.0) & (ca_y < 0.0), -1.0, 1.0)
    return sign * torch.sqrt(torch.minimum(ca_x**2 + ca_y**2, cb_x**2 + cb_y**2))


def sdf_ellipsoid(q: Tensor, radii: Sequence[float]) -> Tensor:
    """Ellipsoid distance bound ``(|q / r| - 1) * min(r)``: exact zero set, 1-Lipschitz (safe to trace)."""
    r = torch.tensor(radii, dtype=q.dtype, device=q.device)
    return (torch.linalg.vector_norm(q / r, dim=-1) - 1.0) * float(min(radii))


def sdf_octahedron(q: Tensor, size: float) -> Tensor:
    """Octahedron distance bound (exact on the faces, 1-Lipschitz)."""
    return (q.abs().sum(dim=-1) - size) * (1.0 / math.sqrt(3.0))


class ObjectScene(ProceduralScene):
    """A :class:`ProceduralScene` with the extra primitives / patterns and a similarity transform.

    The stored primitives live in "inner" coordinates ``y``; world points are ``x = (y - offset) *
    scale``, so ``sdf(x) = scale * sdf_inner(x / scale + offset)`` stays a (bound on the) distance
    and the albedo moves with the geometry. The synth renderer only calls ``sdf``, ``albedo`` and
    ``bounding_radius``, so it renders these objects unchanged.
    """

    def __init__(
        self,
        primitives: Sequence[Primitive],
        patterns: Sequence[Pattern],
        blend: float = 0.0,
        albedo_sharpness: float = 0.04,
        offset: Sequence[float] = (0.0, 0.0, 0.0),
        scale: float = 1.0,
        family: str = "",
    ) -> None:
        super().__init__(primitives, patterns, blend=blend, albedo_sharpness=albedo_sharpness)
        self.offset = tuple(float(v) for v in offset)
        self.scale = float(scale)
        self.family = family

    def normalized(self, offset: Sequence[float], scale: float) -> "ObjectScene":
        """The same object moved by ``-offset`` (inner coordinates) and scaled by ``scale``."""
        return ObjectScene(
            self.primitives, self.patterns, self.blend, self.albedo_sharpness, offset, scale, self.family
        )

    def _inner(self, x: Tensor) -> Tensor:
        if self.scale == 1.0 and self.offset == (0.0, 0.0, 0.0):
            return x
        return x / self.scale + torch.tensor(self.offset, dtype=x.dtype, device=x.device)

    def bounding_radius(self) -> float:
        off = np.asarray(self.offset)
        inner = max(float(np.linalg.norm(np.asarray(p.center) - off)) + p.bounding_radius() for p in self.primitives)
        return (inner + 0.25 * self.blend) * self.scale

    def primitive_sdfs(self, x: Tensor) -> List[Tensor]:
        out = []
        for i, p in enumerate(self.primitives):
            if p.kind == "sphere":
                c = self._frames(x.dtype, x.device)[i][0]
                out.append(torch.linalg.vector_norm(x - c, dim=-1) - p.params[0])
                continue
            q = self._local(x, i)
            if p.kind == "torus":
                out.append(sdf_torus(q, p.params[0], p.params[1]))
            elif p.kind == "rounded_box":
                out.append(sdf_rounded_box(q, p.params[:3], p.params[3]))
            elif p.kind == "capsule":
                out.append(sdf_capsule(q, p.params[0], p.params[1]))
            elif p.kind == "cylinder":
                out.append(sdf_cylinder(q, *p.params[:3]))
            elif p.kind == "cone":
                out.append(sdf_cone(q, *p.params[:3]))
            elif p.kind == "ellipsoid":
                out.append(sdf_ellipsoid(q, p.params[:3]))
            elif p.kind == "octahedron":
                out.append(sdf_octahedron(q, p.params[0]))
            else:
                raise ValueError(f"unknown primitive kind {p.kind!r}")
        return out

    def _pattern(self, x: Tensor, i: int) -> Tensor:
        pat = self.patterns[i]
        if pat.kind not in EXTRA_PATTERN_KINDS:
            return super()._pattern(x, i)
        q = self._local(x, i)
        cols = torch.tensor(pat.colors, dtype=x.dtype, device=x.device)
        if pat.kind == "solid":
            return cols[0].expand_as(q)
        if pat.kind == "gradient":
            axis = torch.tensor(pat.axis, dtype=x.dtype, device=x.device)
            w = _smoothstep(-1.0, 1.0, pat.frequency * (q @ axis) + pat.phase)
            return torch.lerp(cols[0].expand_as(q), cols[1].expand_as(q), w[:, None])
        if pat.kind == "dots":
            # polka dots on a cubic lattice of spacing 1 / frequency
            cell = pat.frequency * q + pat.phase
            d = torch.linalg.vector_norm(cell - torch.round(cell), dim=-1)
            w = _smoothstep(0.3, 0.22, d)
            return torch.lerp(cols[0].expand_as(q), cols[1].expand_as(q), w[:, None])
        raise ValueError(f"unknown pattern kind {pat.kind!r}")

    def sdf(self, x: Tensor) -> Tensor:
        return self.scale * super().sdf(self._inner(x))

    def albedo(self, x: Tensor) -> Tensor:
        return super().albedo(self._inner(x))


# ---------------------------------------------------------------------------------------------
# random building blocks
# ---------------------------------------------------------------------------------------------


def _object_palette(rng: np.random.Generator) -> List[Color]:
    """Six colours: usually the contrasting palette of synth.scene, sometimes one hue (monochrome)."""
    if rng.uniform() < 0.25:
        h = rng.uniform()
        return [
            tuple(float(c) for c in colorsys.hsv_to_rgb((h + rng.uniform(-0.04, 0.04)) % 1.0, rng.uniform(0.3, 0.9), v))
            for v in np.linspace(0.35, 0.95, 6)[rng.permutation(6)]
        ]
    return _palette(rng, 6)


def _rot_tuple(m: np.ndarray) -> Tuple[Tuple[float, float, float], ...]:
    return tuple(tuple(float(v) for v in row) for row in m)


def _axis_rotation(axis: np.ndarray) -> np.ndarray:
    """A rotation whose local z axis (third column) is ``axis``."""
    z = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


def _yaw(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _prim(
    kind: str, center: Sequence[float], rotation: np.ndarray | None = None, params: Sequence[float] = ()
) -> ShapePrimitive:
    rot = _IDENTITY if rotation is None else _rot_tuple(rotation)
    return ShapePrimitive(kind, tuple(float(c) for c in center), rot, tuple(float(p) for p in params))


def _random_params(rng: np.random.Generator, kind: str, size: float) -> Tuple[float, ...]:
    """Random parameters of a primitive whose bounding radius is about ``size``."""
    if kind == "sphere":
        return (size * rng.uniform(0.8, 1.0),)
    if kind == "torus":
        minor = size * rng.uniform(0.2, 0.35)
        return (size - minor, minor)
    if kind == "rounded_box":
        half = rng.uniform(0.35, 1.0, size=3)
        half = half / np.linalg.norm(half) * size
        return (*[float(h) for h in half], float(min(half) * rng.uniform(0.05, 0.4)))
    if kind == "capsule":
        r = size * rng.uniform(0.25, 0.5)
        return (size - r, r)
    if kind == "cylinder":
        r = size * rng.uniform(0.3, 0.85)
        h = math.sqrt(max(size * size - r * r, 1e-4))
        return (h, r, min(r, h) * rng.uniform(0.02, 0.3))
    if kind == "cone":
        h = size * rng.uniform(0.45, 0.8)
        rmax = math.sqrt(max(size * size - h * h, 1e-4))
        r1, r2 = rmax, rmax * rng.uniform(0.0, 0.6)
        if rng.uniform() < 0.3:
            r1, r2 = r2, r1
        return (h, r1, r2)
    if kind == "ellipsoid":
        r = rng.uniform(0.35, 1.0, size=3)
        return tuple(float(v) for v in r / r.max() * size)
    if kind == "octahedron":
        return (size,)
    raise ValueError(kind)


def _random_pattern(rng: np.random.Generator, kind: str, palette: Sequence[Color]) -> Pattern:
    idx = rng.choice(len(palette), size=3, replace=False)
    colors = tuple(palette[i] for i in idx)
    if kind == "stripes":
        return Pattern(
            kind, colors, float(rng.uniform(2.0, 5.0)), tuple(_random_direction(rng)), float(rng.uniform(0, 6.3))
        )
    if kind == "checker":
        return Pattern(kind, colors, float(rng.uniform(3.5, 7.5)), phase=float(rng.uniform(0, 6.3)))
    if kind == "rings":
        centre = tuple(float(c) for c in _random_direction(rng) * rng.uniform(0.3, 0.7))
        return Pattern(kind, colors, float(rng.uniform(2.0, 4.5)), centre, float(rng.uniform(0, 6.3)))
    if kind == "noise":
        waves = []
        for _ in range(8):
            w = _random_direction(rng) * rng.uniform(3.0, 10.0)
            waves.append((float(w[0]), float(w[1]), float(w[2]), float(rng.uniform(0, 6.3))))
        return Pattern(kind, colors, waves=tuple(waves))
    if kind == "solid":
        return Pattern(kind, colors)
    if kind == "gradient":
        return Pattern(
            kind, colors, float(rng.uniform(1.0, 3.0)), tuple(_random_direction(rng)), float(rng.uniform(-0.5, 0.5))
        )
    if kind == "dots":
        return Pattern(kind, colors, float(rng.uniform(4.0, 8.0)), phase=float(rng.uniform(0, 1.0)))
    raise ValueError(kind)


def _pattern_kinds(rng: np.random.Generator, n: int) -> List[str]:
    order = [str(k) for k in rng.permutation(ALL_PATTERN_KINDS)]
    return [order[i % len(order)] for i in range(n)]


def _surface_distance(prim: Primitive, direction: np.ndarray) -> float:
    """Distance from ``prim.center`` to its surface along ``direction`` (by marching its SDF)."""
    body = ObjectScene([prim], [Pattern("solid", ((0.5, 0.5, 0.5),) * 3)])
    ts = torch.linspace(0.0, 2.0, 401, dtype=torch.float64)
    pts = torch.tensor(prim.center, dtype=torch.float64) + ts[:, None] * torch.from_numpy(
        np.asarray(direction, dtype=np.float64)
    )
    outside = torch.nonzero(body.sdf(pts) > 0)
    return float(ts[outside[0, 0]]) if outside.numel() else 0.5


# ---------------------------------------------------------------------------------------------
# families: each returns (primitives, patterns, blend) of an object of roughly unit size
# ---------------------------------------------------------------------------------------------

Parts = Tuple[List[Primitive], List[Pattern], float]


def _family_blob(rng: np.random.Generator, palette: Sequence[Color]) -> Parts:
    spec = SceneSpec(
        seed=int(rng.integers(2**31)), num_primitives=int(rng.integers(2, 7)), blend=float(rng.uniform(0.05, 0.2))
    )
    scene = build_scene(spec)
    return list(scene.primitives), list(scene.patterns), scene.blend


def _family_cluster(rng: np.random.Generator, palette: Sequence[Color]) -> Parts:
    body_kind = str(rng.choice(["sphere", "rounded_box", "ellipsoid", "cylinder", "octahedron"]))
    body = _prim(
        body_kind,
        rng.uniform(-0.05, 0.05, size=3),
        _random_rotation(rng),
        _random_params(rng, body_kind, rng.uniform(0.45, 0.6)),
    )
    prims: List[Primitive] = [body]
    for _ in range(int(rng.integers(2, 6))):
        kind = str(rng.choice(ALL_PRIMITIVE_KINDS))
        params = _random_params(rng, kind, rng.uniform(0.18, 0.35))
        sat = _prim(kind, (0.0, 0.0, 0.0), _random_rotation(rng), params)
        direction = _random_direction(rng)
        dist = _surface_distance(body, direction) + sat.bounding_radius() * rng.uniform(0.2, 0.7)
        sat.center = tuple(float(c) for c in np.asarray(body.center) + direction * dist)
        prims.append(sat)
    kinds = _pattern_kinds(rng, len(prims))
    return prims, [_random_pattern(rng, k, palette) for k in kinds], float(rng.uniform(0.04, 0.15))


def _mirrored(prim: Primitive) -> Primitive:
    """Mirror image of ``prim`` through the plane y = 0 (a left-handed local frame mirrors it exactly)."""
    rot = _MIRROR_Y @ np.asarray(prim.rotation)
    return _prim(prim.kind, _MIRROR_Y @ np.asarray(prim.center), rot, prim.params)


def _family_creature(rng: np.random.Generator, palette: Sequence[Color]) -> Parts:
    prims: List[Primitive] = []
    patterns: List[Pattern] = []
    skin = _random_pattern(rng, str(rng.choice(ALL_PATTERN_KINDS)), palette)
    limb = _random_pattern(rng, str(rng.choice(["solid", "stripes", "gradient", "noise"])), palette)
    # body along x
    bx, by, bz = rng.uniform(0.5, 0.75), rng.uniform(0.25, 0.4), rng.uniform(0.22, 0.38)
    body_z = rng.uniform(0.0, 0.15)
    if rng.uniform() < 0.6:
        prims.append(_prim("ellipsoid", (0, 0, body_z), None, (bx, by, bz)))
    else:
        r = min(by, bz)
        prims.append(_prim("capsule", (0, 0, body_z), _axis_rotation(np.array([1.0, 0, 0])), (bx - r, r)))
    patterns.append(skin)
    # head at the front, raised
    hr = rng.uniform(0.18, 0.3)
    head_c = np.array([bx * rng.uniform(0.75, 1.05), 0.0, body_z + bz * rng.uniform(0.5, 1.4)])
    head_kind = str(rng.choice(["sphere", "ellipsoid", "rounded_box"]))
    prims.append(_prim(head_kind, head_c, _yaw(rng.uniform(-0.3, 0.3)), _random_params(rng, head_kind, hr)))
    patterns.append(skin)
    # ears / horns on the head, mirrored
    if rng.uniform() < 0.7:
        ear_kind = str(rng.choice(["cone", "sphere", "capsule"]))
        tilt = np.array([rng.uniform(-0.3, 0.3), rng.uniform(0.2, 0.7), 1.0])
        ear = _prim(
            ear_kind,
            head_c + np.array([0.0, hr * 0.6, hr * 0.8]),
            _axis_rotation(tilt),
            _random_params(rng, ear_kind, hr * rng.uniform(0.4, 0.7)),
        )
        if ear.kind == "cone":  # pointed end up
            h, r1, r2 = ear.params
            ear.params = (h, max(r1, r2), min(r1, r2) * 0.3)
        prims += [ear, _mirrored(ear)]
        patterns += [limb, limb]
    # legs: 1 or 2 mirrored pairs from the belly down to the ground
    leg_kind = str(rng.choice(["capsule", "cylinder"]))
    leg_r = rng.uniform(0.06, 0.12)
    leg_len = rng.uniform(0.3, 0.55)
    xs = [bx * 0.55, -bx * 0.55] if rng.uniform() < 0.75 else [0.0]
    for x in xs:
        top = body_z - bz * 0.5
        c = np.array([x + rng.uniform(-0.05, 0.05), by * rng.uniform(0.4, 0.75), top - 0.5 * leg_len])
        params = (0.5 * leg_len, leg_r) if leg_kind == "capsule" else (0.5 * leg_len, leg_r, leg_r * 0.3)
        leg = _prim(leg_kind, c, None, params)
        prims += [leg, _mirrored(leg)]
        patterns += [limb, limb]
    if rng.uniform() < 0.5:  # tail
        tail_dir = np.array([-1.0, 0.0, rng.uniform(0.2, 1.2)])
        tail_len = rng.uniform(0.15, 0.3)
        c = np.array([-bx * 0.9, 0.0, body_z]) + tail_dir / np.linalg.norm(tail_dir) * tail_len
        prims.append(_prim("capsule", c, _axis_rotation(tail_dir), (tail_len, rng.uniform(0.04, 0.08))))
        patterns.append(limb)
    return prims, patterns, float(rng.uniform(0.05, 0.12))


def _family_furniture(rng: np.random.Generator, palette: Sequence[Color]) -> Parts:
    prims: List[Primitive] = []
    wood = _random_pattern(rng, str(rng.choice(["stripes", "solid", "noise", "gradient"])), palette)
    accent = _random_pattern(rng, str(rng.choice(ALL_PATTERN_KINDS)), palette)
    patterns: List[Pattern] = []
    kind = str(rng.choice(["table", "chair", "stool", "shelf"]))
    round_r = rng.uniform(0.01, 0.04)

    def legs(half_x: float, half_y: float, top_z: float, length: float, radius: float, cyl: bool) -> None:
        for sx in (1.0, -1.0):
            leg_kind = "cylinder" if cyl else "rounded_box"
            params = (length / 2, radius, radius * 0.3) if cyl else (radius, radius, length / 2, radius * 0.3)
            leg = _prim(leg_kind, (sx * half_x, half_y, top_z - length / 2), None, params)
            prims.extend([leg, _mirrored(leg)])
            patterns.extend([wood, wood])

    if kind in ("table", "chair"):
        sx, sy = rng.uniform(0.35, 0.7), rng.uniform(0.3, 0.6)
        thick = rng.uniform(0.03, 0.07)
        top_z = rng.uniform(0.0, 0.25) if kind == "table" else rng.uniform(-0.15, 0.05)
        prims.append(_prim("rounded_box", (0, 0, top_z), None, (sx, sy, thick, min(round_r, thick * 0.9))))
        patterns.append(accent if kind == "chair" else wood)
        leg_len = rng.uniform(0.45, 0.8)
        if kind == "table" and rng.uniform() < 0.3:  # pedestal table
            prims.append(
                _prim("cylinder", (0, 0, top_z - leg_len / 2), None, (leg_len / 2, rng.uniform(0.05, 0.1), 0.01))
            )
            prims.append(_prim("cylinder", (0, 0, top_z - leg_len), None, (0.03, rng.uniform(0.2, 0.35), 0.02)))
            patterns += [wood, wood]
        else:
            legs(sx * 0.85, sy * 0.8, top_z, leg_len, rng.uniform(0.03, 0.06), bool(rng.uniform() < 0.5))
        if kind == "chair":
            back_h = rng.uniform(0.35, 0.6)
            tilt = rng.uniform(0.0, 0.25)  # leaning back (towards -x)
            c, s = math.cos(tilt), math.sin(tilt)
            rot_y = np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])
            centre = np.array([-sx * 0.95, 0.0, top_z]) + rot_y[:, 2] * back_h
            prims.append(_prim("rounded_box", centre, rot_y, (thick, sy, back_h, min(round_r, thick * 0.9))))
            patterns.append(accent)
    elif kind == "stool":
        seat_r = rng.uniform(0.3, 0.45)
        top_z = rng.uniform(0.1, 0.3)
        prims.append(_prim("cylinder", (0, 0, top_z), None, (rng.uniform(0.04, 0.08), seat_r, 0.02)))
        patterns.append(accent)
        n_legs = int(rng.integers(3, 5))
        leg_len = rng.uniform(0.5, 0.8)
        splay = rng.uniform(0.0, 0.3)
        for i in range(n_legs):
            a = 2 * math.pi * i / n_legs
            d = np.array([math.cos(a), math.sin(a), 0.0])
            axis = np.array([0.0, 0.0, 1.0]) - splay * d
            c = d * seat_r * 0.7 + np.array([0, 0, top_z]) - axis / np.linalg.norm(axis) * leg_len / 2
            prims.append(_prim("capsule", c, _axis_rotation(axis), (leg_len / 2, rng.uniform(0.03, 0.05))))
            patterns.append(wood)
    else:  # shelf: two side boards and a few shelves
        w, d, h = rng.uniform(0.4, 0.7), rng.uniform(0.2, 0.35), rng.uniform(0.6, 0.9)
        thick = rng.uniform(0.025, 0.05)
        side = _prim("rounded_box", (0, w, 0), None, (d, thick, h, thick * 0.5))
        prims += [side, _mirrored(side)]
        patterns += [wood, wood]
        n = int(rng.integers(2, 5))
        for z in np.linspace(-h + thick, h - thick, n):
            prims.append(_prim("rounded_box", (0, 0, z), None, (d, w, thick, thick * 0.5)))
            patterns.append(accent if rng.uniform() < 0.3 else wood)
    return prims, patterns, float(rng.uniform(0.01, 0.04))


def _family_stack(rng: np.random.Generator, palette: Sequence[Color]) -> Parts:
    prims: List[Primitive] = []
    n = int(rng.integers(2, 5))
    z = 0.0
    for i in range(n):
        kind = str(rng.choice(["sphere", "cylinder", "cone", "torus", "ellipsoid"]))
        size = rng.uniform(0.2, 0.45) * (1.0 if i == 0 else rng.uniform(0.6, 1.1))
        if kind == "sphere":
            params: Tuple[float, ...] = (size,)
            half = size
        elif kind == "cylinder":
            r, hh = size, size * rng.uniform(0.15, 1.2)
            params, half = (hh, r, min(r, hh) * rng.uniform(0.05, 0.3)), hh
        elif kind == "cone":
            hh = size * rng.uniform(0.5, 1.2)
            r1, r2 = size, size * rng.uniform(0.0, 0.7)
            if rng.uniform() < 0.4:
                r1, r2 = r2, r1
            params, half = (hh, r1, r2), hh
        elif kind == "torus":
            minor = size * rng.uniform(0.2, 0.35)
            params, half = (size - minor, minor), minor
        else:
            rz = size * rng.uniform(0.4, 1.2)
            params, half = (size, size, rz), rz
        z += half * (1.0 if i == 0 else rng.uniform(0.7, 1.0))
        prims.append(_prim(kind, (0.0, 0.0, z), None, params))
        z += half
    kinds = _pattern_kinds(rng, n)
    return prims, [_random_pattern(rng, k, palette) for k in kinds], float(rng.uniform(0.03, 0.12))


def _family_single(rng: np.random.Generator, palette: Sequence[Color]) -> Parts:
    kind = str(rng.choice(ALL_PRIMITIVE_KINDS))
    prim = _prim(kind, (0.0, 0.0, 0.0), _random_rotation(rng), _random_params(rng, kind, 0.8))
    return [prim], [_random_pattern(rng, str(rng.choice(ALL_PATTERN_KINDS)), palette)], 0.0


_FAMILY_BUILDERS: Dict[str, Callable[[np.random.Generator, Sequence[Color]], Parts]] = {
    "blob": _family_blob,
    "cluster": _family_cluster,
    "creature": _family_creature,
    "furniture": _family_furniture,
    "stack": _family_stack,
    "single": _family_single,
}
_UPRIGHT = {"creature", "furniture", "stack"}


def _apply_rotation(prims: List[Primitive], rot: np.ndarray) -> List[Primitive]:
    """Rotate whole object: centres by ``rot``, local frames ``rot @ R`` (``local = (x - c) @ R``)."""
    return [
        replace(
            p,
            center=tuple(float(v) for v in rot @ np.asarray(p.center)),
            rotation=_rot_tuple(rot @ np.asarray(p.rotation)),
        )
        for p in prims
    ]


# ---------------------------------------------------------------------------------------------
# object construction and normalisation
# ---------------------------------------------------------------------------------------------


def object_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _OBJECT_SEED_TAG]))


def build_object_unnormalized(seed: int, family: Optional[str] = None) -> ObjectScene:
    """The raw object of ``seed`` (family drawn from the seed unless given), before normalisation."""
    rng = object_rng(seed)
    drawn = str(rng.choice(FAMILIES, p=np.asarray(FAMILY_WEIGHTS) / sum(FAMILY_WEIGHTS)))
    family = family or drawn
    if family not in _FAMILY_BUILDERS:
        raise ValueError(f"unknown shape family {family!r}; choose one of {FAMILIES}")
    palette = _object_palette(rng)
    prims, patterns, blend = _FAMILY_BUILDERS[family](rng, palette)
    if family in _UPRIGHT:
        prims = _apply_rotation(prims, _yaw(rng.uniform(0.0, 2.0 * math.pi)))
    return ObjectScene(prims, patterns, blend=blend, family=family)


def project_to_surface(scene: ProceduralScene, x: Tensor, iterations: int = 6, eps: float = 1e-4) -> Tensor:
    """Newton-project points onto the zero level set: ``x <- x - sdf(x) * grad / |grad|^2``."""
    k = torch.tensor(
        [[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device
    )
    for _ in range(iterations):
        d = scene.sdf(x)
        # tetrahedral finite differences: unnormalised gradient (distance bounds have |grad| < 1)
        f = scene.sdf((x[None] + eps * k[:, None, :]).reshape(-1, 3)).reshape(4, -1)
        g = (f[:, :, None] * k[:, None, :]).sum(0) / (4.0 * eps)
        x = x - (d / (g * g).sum(-1).clamp(min=1e-4))[:, None] * g
    return x


def sample_surface(
    scene: ProceduralScene,
    num_points: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    band: float = 0.03,
    radius: Optional[float] = None,
) -> Tensor:
    """About-uniform points (num_points, 3) on the object's surface.

    Uniform samples of the ball are kept when within ``band`` of the surface (a thin shell has
    volume ~ area x 2 band, so the kept points are spread by area), then Newton-projected onto the
    zero level set. Candidates are drawn on the CPU from ``generator``, so the points do not depend
    on the device.
    """
    radius = float(radius if radius is not None else scene.bounding_radius())
    kept: List[Tensor] = []
    total = 0
    for _ in range(200):
        cand = torch.rand(max(4 * num_points, 65536), 3, generator=generator, dtype=torch.float32) * 2.0 - 1.0
        cand = cand[torch.linalg.vector_norm(cand, dim=-1) <= 1.0] * radius
        cand = cand.to(device)
        near = cand[scene.sdf(cand).abs() < band]
        kept.append(near)
        total += near.shape[0]
        if total >= num_points:
            break
    pts = torch.cat(kept)
    if pts.shape[0] < num_points:
        raise RuntimeError(
            f"found only {pts.shape[0]} of {num_points} surface points (object too thin for band={band})"
        )
    perm = torch.randperm(pts.shape[0], generator=generator)[:num_points].to(pts.device)
    return project_to_surface(scene, pts[perm])


def _push_to_extreme(
    scene: ProceduralScene, x: Tensor, axis: Optional[Tensor] = None, iterations: int = 12, step: float = 0.02
) -> Tensor:
    """Move surface points towards a local maximum of ``x . axis`` (or of ``|x|`` if no axis) on the surface.

    Each iteration pushes the points along the axis (or radially) and projects them back onto the
    surface. Tips of cones / octahedra, which uniform samples rarely hit, are found this way.
    """
    for _ in range(iterations):
        d = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-9) if axis is None else axis.expand_as(x)
        x = project_to_surface(scene, x + step * d, iterations=4)
    return x


def build_object(
    seed: int, extent: float = 1.0, family: Optional[str] = None, num_probe_points: int = 4096
) -> ObjectScene:
    """The normalised object of ``seed``: centred on its bounding box, farthest surface point at ``extent``.

    The bounding box / radius are measured on ``num_probe_points`` surface samples (seeded, CPU)
    whose extreme ones (along the axes and radially) are pushed to the local extremes of the
    surface; a 0.5% margin covers what remains.
    """
    raw = build_object_unnormalized(seed, family)
    gen = torch.Generator().manual_seed(int(seed) * 2 + 1)
    with torch.no_grad():
        pts = sample_surface(raw, num_probe_points, gen, band=0.03 * raw.bounding_radius())
        extremes = [pts]
        for axis in range(3):
            for sign in (1.0, -1.0):
                e = torch.zeros(3, dtype=pts.dtype)
                e[axis] = sign
                top = pts[torch.topk(pts @ e, 16).indices]
                extremes.append(_push_to_extreme(raw, top, e))
        pts = torch.cat(extremes)
        lo, hi = pts.min(0).values, pts.max(0).values
        centre = 0.5 * (lo + hi)
        rel = pts - centre
        far = rel[torch.topk(torch.linalg.vector_norm(rel, dim=-1), 32).indices]
        far = _push_to_extreme(raw.normalized(tuple(float(c) for c in centre), 1.0), far)
        r = (
            float(torch.cat([torch.linalg.vector_norm(rel, dim=-1), torch.linalg.vector_norm(far, dim=-1)]).max())
            * 1.005
        )
    return raw.normalized(tuple(float(c) for c in centre), float(extent) / r)
