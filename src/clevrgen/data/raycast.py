"""The ray caster behind the renderer: scene model, analytic intersections, shading, images.

Scenes follow CLEVR's generator as i-CLEVR used it (see ``shared/clevr_reference/README.md``):
a fixed camera on a 4:3 frame squashed to 64x64, three jittered area lamps and a sun, a matte
floor that curves up into a backdrop, matte objects. Light powers, backdrop and object colors
are fitted to the real images (``benchmarks/render_calibrate.py``, ``docs/renderer.md``).

Speed comes from doing per-pixel work only where it matters. The floor and its soft shadows are
smooth, so they are shaded at half the output resolution, the shadows only inside each object's
screen box grown to hold them. Objects are ray cast at ``supersample`` x the output resolution,
only inside their own boxes; every pixel list is flattened across the batch into one ragged
list, so there is no loop over pixels and only a loop over the (<= 5) object slots. Hits are
analytic (sphere, upright cylinder, yawed box), each ray tested only against the shape in each
slot; floor shadows are analytic too, with a penumbra that widens with distance to the occluder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
import torch.nn.functional as F

from clevrgen.data.iclevr import IMAGE_SIZE
from clevrgen.labels import COLORS, SHAPES

CUBE, SPHERE, CYLINDER = (SHAPES.index(s) for s in ("cube", "sphere", "cylinder"))
COLOR_SRGB = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
# CLEVR's generator hands these 0-255 numbers to Blender as linear albedo (c / 255).
ALBEDO = torch.tensor([COLOR_SRGB[c] for c in COLORS], dtype=torch.float32) / 255.0
CAMERA = (7.48, -6.51, 5.34)
TAN_HALF_FOV = 16.0 / 35.0  # 35 mm lens, 32 mm wide sensor
ASPECT = 0.75  # the real images were 320x240 before being squashed to 64x64
LAMPS = ((6.45, -2.91, 4.26), (-4.67, -4.01, 3.01), (-1.17, 2.65, 5.82))  # key, fill, back
LAMP_TINT = ((1.0, 0.93, 0.82), (0.76, 0.82, 1.0), (1.0, 1.0, 1.0))
SUN = (0.415, -0.193, 0.889)
MAX_OBJECTS = 5
SHADOW_REACH = 1.5  # shadows are drawn out to this many object heights
_INF = float("inf")


@dataclass(frozen=True)
class SceneStyle:
    """How scenes are drawn. The defaults are what i-CLEVR used, measured on its images."""

    sizes: tuple[float, ...] = (0.61,)
    """Object sizes (sphere radius) to choose from; CLEVR's generator used (0.7, 0.35)."""
    metal_probability: float = 0.0
    cube_scale: float = 0.93
    """Cube half-edge / size: about 1 in i-CLEVR, 1/sqrt(2) in the generator."""
    cylinder_height: float = 0.97
    """Cylinder half-height / radius."""
    first_at_origin: bool = True
    ring: float = 2.5
    """Later objects keep at least this distance from the first along x or y (a square ring)."""
    extent: float = 3.0
    gap: float = 0.25
    """Least clearance between two objects (centre distance minus both bounding radii)."""
    spacing: float = 2.5
    """Least centre distance between any two objects."""
    camera_jitter: float = 0.0
    light_jitter: float = 1.0
    min_pixels: float = 11.0
    """Visible pixels each object must cover at 64x64 (re-drawn otherwise)."""
    lamp_power: tuple[float, float, float] = (6.98, 2.33, 3.50)
    sun_power: float = 0.176
    bounce: float = 0.8
    """Light bounced from the floor onto objects, as a fraction of the floor's own light."""
    ambient: float = 0.0
    """Light from all around (the lit floor and backdrop), as a fraction of the floor's own light."""
    gloss: float = 0.06
    penumbra: tuple[float, float] = (0.4, 0.35)
    """Shadow softness: a constant blur plus a widening per unit distance to the occluder."""
    floor_albedo: float = 0.8
    wall_light: float = 0.0067
    """Extra light on the upright part of the backdrop (matched to the real images' top rows)."""
    floor_scale: int = 2
    """The floor and its shadows are shaded at 1/floor_scale of the output resolution."""
    shadow_lights: tuple[int, ...] = (0, 2, 3)
    """Lights whose shadows are drawn (key, fill, back lamps, sun): the dim fill's are skipped."""
    contact: tuple[float, float] = (0.0, 0.4)
    """Darkening of the floor right around an object (strength, reach): light it hides from all sides."""
    floor_ambient: float = 0.0
    """Light on the floor from everywhere (bounces), in units of floor radiance."""
    backdrop: tuple[float, float] = (7.5, 5.0)
    """Where the floor starts curving up (distance behind the origin, away from the camera)
    and the radius of that curve."""
    exposure: float = 1.0
    noise: float = 1.3
    """Render grain, std in 0-255 levels (measured on the real images' flat floor)."""
    object_gain: float = 0.98
    """Extra light on objects: the bounces a one-bounce model misses (matched to real colors)."""


@dataclass
class Scenes:
    """A batch of scenes: B scenes, K object slots (``present`` marks the real ones)."""

    shape: torch.Tensor  # [B, K] long
    color: torch.Tensor  # [B, K] long
    xy: torch.Tensor  # [B, K, 2]
    size: torch.Tensor  # [B, K] sphere and cylinder radius; a cube's half-edge is size * cube_scale
    yaw: torch.Tensor  # [B, K]
    metal: torch.Tensor  # [B, K] bool
    present: torch.Tensor  # [B, K] bool
    camera: torch.Tensor  # [B, 3]
    lamps: torch.Tensor  # [B, 3, 3]
    seed: torch.Tensor  # [B] int64, for the grain
    style: SceneStyle = field(default_factory=SceneStyle)

    def __len__(self) -> int:
        return self.shape.shape[0]

    def to(self, device: torch.device | str) -> "Scenes":
        return replace(self, **{k: getattr(self, k).to(device) for k in _TENSOR_FIELDS})

    def index(self, rows: torch.Tensor) -> "Scenes":
        return replace(self, **{k: getattr(self, k)[rows] for k in _TENSOR_FIELDS})


_TENSOR_FIELDS = ("shape", "color", "xy", "size", "yaw", "metal", "present", "camera", "lamps", "seed")


# ---------------------------------------------------------------- geometry


def _camera_frame(camera: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, right and up unit vectors [B, 3] of cameras aimed at the origin."""
    forward = F.normalize(-camera, dim=-1)
    z = torch.zeros_like(forward)
    z[:, 2] = 1.0
    right = F.normalize(torch.linalg.cross(forward, z), dim=-1)
    up = torch.linalg.cross(right, forward)
    return forward, right, up


def _ray_dirs(camera: torch.Tensor, b: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
              height: int, width: int) -> torch.Tensor:
    """Unit directions [P, 3] through pixel centres (y, x) of an height x width grid on the 4:3 frame."""
    forward, right, up = (v[b] for v in _camera_frame(camera))
    u = ((x.float() + 0.5) / width * 2 - 1) * TAN_HALF_FOV
    v = (1 - (y.float() + 0.5) / height * 2) * TAN_HALF_FOV * ASPECT
    return F.normalize(forward + u[:, None] * right + v[:, None] * up, dim=-1)


def object_height(scenes: Scenes) -> torch.Tensor:
    st = scenes.style
    scale = torch.where(scenes.shape == CUBE, torch.full_like(scenes.size, st.cube_scale),
                        torch.where(scenes.shape == CYLINDER, torch.full_like(scenes.size, st.cylinder_height),
                                    torch.ones_like(scenes.size)))
    return 2 * scenes.size * scale


def _half_width(scenes: Scenes) -> torch.Tensor:
    """Half-extent in the floor plane: radius, or cube half-edge."""
    return scenes.size * torch.where(scenes.shape == CUBE, scenes.style.cube_scale, 1.0)


def bound_radius(scenes: Scenes) -> torch.Tensor:
    return _half_width(scenes) * torch.where(scenes.shape == CUBE, math.sqrt(2.0), 1.0)


def _hit_sphere(ox, oy, oz, dx, dy, dz, half, height, yaw):
    sz = oz - half  # centre at height `half`
    bq = ox * dx + oy * dy + sz * dz
    disc = bq * bq - (ox * ox + oy * oy + sz * sz - half * half)
    t = -bq - disc.clamp_min(0).sqrt()
    t = torch.where((disc > 0) & (t > 1e-4), t, _INF)
    tt = t.nan_to_num(0, 0, 0)
    n = torch.stack([ox + tt * dx, oy + tt * dy, sz + tt * dz], -1) / half[:, None]
    return t, n


def _hit_cylinder(ox, oy, oz, dx, dy, dz, half, height, yaw):
    a = (dx * dx + dy * dy).clamp_min(1e-12)
    bq = ox * dx + oy * dy
    disc = bq * bq - a * (ox * ox + oy * oy - half * half)
    t_side = (-bq - disc.clamp_min(0).sqrt()) / a
    z_side = oz + t_side * dz
    t_side = torch.where((disc > 0) & (t_side > 1e-4) & (z_side >= 0) & (z_side <= height), t_side, _INF)
    t_cap = (height - oz) / torch.where(dz.abs() > 1e-9, dz, torch.full_like(dz, -1e-9))
    px, py = ox + t_cap * dx, oy + t_cap * dy
    t_cap = torch.where((t_cap > 1e-4) & (px * px + py * py <= half * half), t_cap, _INF)
    on_cap = t_cap <= t_side
    t = torch.where(on_cap, t_cap, t_side)
    tt = t.nan_to_num(0, 0, 0)
    side = torch.stack([(ox + tt * dx) / half, (oy + tt * dy) / half, torch.zeros_like(t)], -1)
    n = torch.where(on_cap[:, None], torch.tensor([0.0, 0.0, 1.0], device=t.device), side)
    return t, n


def _hit_box(ox, oy, oz, dx, dy, dz, half, height, yaw):
    """A cube of half-edge ``half`` yawed about z: the slab test in its own frame."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    q = torch.stack([c * ox + s * oy, -s * ox + c * oy, oz - half], -1)
    e = torch.stack([c * dx + s * dy, -s * dx + c * dy, dz], -1)
    e = torch.where(e.abs() > 1e-9, e, torch.full_like(e, 1e-9))
    t1, t2 = (-half[:, None] - q) / e, (half[:, None] - q) / e
    t_near, axis = torch.minimum(t1, t2).max(-1)
    t_far = torch.maximum(t1, t2).min(-1).values
    t = torch.where((t_near < t_far) & (t_near > 1e-4), t_near, _INF)
    local = -torch.sign(e) * F.one_hot(axis, 3).to(e.dtype)
    n = torch.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], -1)
    return t, n


_HITS = {CUBE: _hit_box, SPHERE: _hit_sphere, CYLINDER: _hit_cylinder}


def _nearest_hit(scenes: Scenes, b: torch.Tensor, o: torch.Tensor, d: torch.Tensor,
                 pixels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """(t [P], unit normal [P, 3], slot [P], -1 for none) of the nearest object along each ray.

    Each ray is tested only against the shape that sits in each slot of its scene, and with
    ``pixels`` = (y, x, pixel boxes [B, K, 4]) only against the objects whose box holds it.
    """
    t_best = torch.full_like(d[:, 0], _INF)
    n_best = torch.zeros_like(d)
    k_best = torch.full_like(b, -1)
    half, height = _half_width(scenes), object_height(scenes)
    for k in range(scenes.shape.shape[1]):
        if pixels is not None:
            y, x, box = pixels
            x0, y0, x1, y1 = box[b, k].unbind(-1)
            ray = ((x >= x0) & (x < x1) & (y >= y0) & (y < y1) & scenes.present[b, k]).nonzero().flatten()
        else:
            ray = scenes.present[b, k].nonzero().flatten()
        shape = scenes.shape[b[ray], k]
        for kind, hit in _HITS.items():
            idx = ray[shape == kind]
            if len(idx) == 0:
                continue
            bi = b[idx]
            oi, di = o[idx], d[idx]
            t, n = hit(oi[:, 0] - scenes.xy[bi, k, 0], oi[:, 1] - scenes.xy[bi, k, 1], oi[:, 2],
                       di[:, 0], di[:, 1], di[:, 2], half[bi, k], height[bi, k], scenes.yaw[bi, k])
            closer = t < t_best[idx]
            idx, t, n = idx[closer], t[closer], n[closer]
            t_best[idx] = t
            n_best[idx] = n
            k_best[idx] = k
    return t_best, n_best, k_best


def _occlusion(p, to_light, dist, shape, cx, cy, half, height, yaw, penumbra):
    """Soft occlusion in [0, 1] of floor points p [P, 3] toward a light (unit ``to_light``)."""
    rx, ry = cx - p[:, 0], cy - p[:, 1]
    lx, ly, lz = to_light[:, 0], to_light[:, 1], to_light[:, 2]
    # sphere: closest approach of the shadow ray to the centre
    rz = half - p[:, 2]
    along = rx * lx + ry * ly + rz * lz
    miss = (rx * rx + ry * ry + rz * rz - along * along).clamp_min(0).sqrt() - half
    pen = penumbra[0] + penumbra[1] * along.clamp_min(0)
    occ_sph = ((0.5 - miss / pen).clamp(0, 1)) * (along > 0) * (along < dist)
    # cube and cylinder as vertical prisms: the ray's horizontal pass and its height inside
    flat = (lx * lx + ly * ly).clamp_min(1e-12).sqrt()
    ux, uy = lx / flat, ly / flat
    along_h = rx * ux + ry * uy
    perp = (ry * ux - rx * uy).abs()
    c, s = torch.cos(yaw), torch.sin(yaw)
    width = torch.where(shape == CUBE, half * ((-uy * c + ux * s).abs() + (uy * s + ux * c).abs()), half)
    enter = along_h - (width * width - perp * perp).clamp_min(0).sqrt()
    miss_xy = perp - width
    miss_z = enter * (lz / flat) - height
    pen = penumbra[0] + penumbra[1] * along_h.clamp_min(0) / flat
    occ_prism = (0.5 - miss_xy / pen).clamp(0, 1) * (0.5 - miss_z / pen).clamp(0, 1) * (along_h > 0)
    return torch.where(shape == SPHERE, occ_sph, occ_prism)


# ---------------------------------------------------------------- shading


def _lights(scenes: Scenes, b: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """(position [P, 3] or None for the sun, direction-or-None, rgb power [3]) for each light."""
    st = scenes.style
    device = scenes.lamps.device
    out = []
    for i in range(3):
        power = torch.tensor(LAMP_TINT[i], device=device) * st.lamp_power[i]
        out.append((scenes.lamps[b, i], None, power))
    sun = F.normalize(torch.tensor(SUN, device=device), dim=0)
    out.append((None, sun, torch.full((3,), st.sun_power, device=device)))
    return out


def _irradiance(p, n, lights):
    """Per-light (unit direction [P, 3], distance [P], rgb irradiance [P, 3]) at points p with normals n."""
    out = []
    for pos, sun, power in lights:
        if pos is None:
            l = sun.expand_as(p)
            dist = torch.full_like(p[:, 0], _INF)
            e = (n @ sun).clamp_min(0)[:, None] * power
        else:
            l = pos - p
            d2 = (l * l).sum(-1)
            dist = d2.sqrt()
            l = l / dist[:, None]
            # an area lamp aimed at the origin: a flat emitter, dimmer away from its axis
            aim = (l * F.normalize(pos, dim=-1)).sum(-1).clamp_min(0)
            e = ((n * l).sum(-1).clamp_min(0) * aim / d2)[:, None] * power
        out.append((l, dist, e))
    return out


def _backdrop(o: torch.Tensor, d: torch.Tensor, backdrop: tuple[float, float]):
    """Hit points and normals of the floor, which curves up into a wall far behind the origin."""
    start, radius = backdrop
    g = F.normalize(-o[:, :2], dim=-1)  # away from the camera, in the floor plane
    w_o, w_d = (o[:, :2] * g).sum(-1), (d[:, :2] * g).sum(-1)
    t_floor = -o[:, 2] / d[:, 2].clamp_max(-1e-6)
    t_floor = torch.where(d[:, 2] < 0, t_floor, _INF)
    # the curve: a circle in the (w, z) plane centred at (start, radius)
    a = w_d * w_d + d[:, 2] * d[:, 2]
    bq = (w_o - start) * w_d + (o[:, 2] - radius) * d[:, 2]
    cq = (w_o - start) ** 2 + (o[:, 2] - radius) ** 2 - radius * radius
    disc = bq * bq - a * cq
    t_curve = (-bq + disc.clamp_min(0).sqrt()) / a
    t_wall = (start + radius - w_o) / w_d.clamp_min(1e-6)
    on_floor = (w_o + t_floor * w_d) <= start
    z_curve = torch.where(disc > 0, o[:, 2] + t_curve * d[:, 2], _INF)
    t = torch.where(on_floor, t_floor, torch.where(z_curve <= radius, t_curve, t_wall))
    p = o + t[:, None] * d
    w = (p[:, :2] * g).sum(-1)
    nw = torch.where(on_floor, 0.0, torch.where(z_curve <= radius, -(w - start) / radius, -1.0))
    nz = torch.where(on_floor, 1.0, torch.where(z_curve <= radius, (radius - p[:, 2]) / radius, 0.0))
    n = torch.cat([nw[:, None] * g, nz[:, None]], -1)
    return p, n


def _floor(scenes: Scenes, b: torch.Tensor, d: torch.Tensor, shadows: bool) -> torch.Tensor:
    """Linear rgb [P, 3] of the floor and backdrop seen along d from the camera of scene b."""
    st = scenes.style
    p, n = _backdrop(scenes.camera[b], d, st.backdrop)
    if shadows:
        present = scenes.present[b]
        prim = dict(shape=scenes.shape[b], cx=scenes.xy[b, :, 0], cy=scenes.xy[b, :, 1], half=_half_width(scenes)[b],
                    height=object_height(scenes)[b], yaw=scenes.yaw[b])
    floor = torch.zeros_like(p)
    for i, (l, dist, e) in enumerate(_irradiance(p, n, _lights(scenes, b))):
        if shadows and i in st.shadow_lights:
            lit = torch.ones_like(dist)
            for k in range(scenes.shape.shape[1]):
                occ = _occlusion(p, l, dist, penumbra=st.penumbra, **{key: v[:, k] for key, v in prim.items()})
                lit = lit * (1 - occ * present[:, k])
            e = e * lit[:, None]
        floor = floor + e
    # the far wall of the backdrop is brighter and flatter than the lamps alone make it
    floor = floor * st.floor_albedo + st.floor_ambient + st.wall_light * (1 - n[:, 2:3])
    if shadows and st.contact[0] > 0:  # contact shadows: the floor around an object sees less light
        for k in range(scenes.shape.shape[1]):
            gap = ((p[:, 0] - prim["cx"][:, k]) ** 2 + (p[:, 1] - prim["cy"][:, k]) ** 2).sqrt() - prim["half"][:, k]
            near = st.contact[0] * torch.exp(-gap.clamp_min(0) / st.contact[1]) * present[:, k]
            floor = floor * (1 - near)[:, None]
    return floor


def _object_color(scenes: Scenes, b: torch.Tensor, d: torch.Tensor, t: torch.Tensor, n: torch.Tensor,
                  k: torch.Tensor) -> torch.Tensor:
    """Linear rgb [P, 3] of object k of scene b hit at distance t along d, with normal n."""
    st = scenes.style
    lights = _lights(scenes, b)
    p = scenes.camera[b] + t[:, None] * d
    view = -d
    albedo = ALBEDO.to(d.device)[scenes.color[b, k]]
    metal = scenes.metal[b, k][:, None]
    diffuse = torch.zeros_like(p)
    spec = torch.zeros_like(p)
    for l, dist, e in _irradiance(p, n, lights):
        h = F.normalize(l + view, dim=-1)
        diffuse = diffuse + e
        spec = spec + e * (n * h).sum(-1).clamp_min(0).pow(30)[:, None]
    # light bounced off the floor (as lit at the object's foot) reaches the sides and undersides
    B, K = scenes.shape.shape
    foot = torch.cat([scenes.xy, torch.zeros_like(scenes.xy[..., :1])], -1).view(B * K, 3)
    up = torch.zeros_like(foot)
    up[:, 2] = 1.0
    rows = torch.arange(B, device=d.device).repeat_interleave(K)
    floor_light = sum(e for _, _, e in _irradiance(foot, up, _lights(scenes, rows))).view(B, K, 3)[b, k]
    ambient = (st.bounce * (1 - n[:, 2:3]) * 0.5 + st.ambient) * (floor_light * st.floor_albedo + st.floor_ambient)
    rubber = albedo * (diffuse + ambient) + st.gloss * spec
    # metal: a tinted mirror of a mid-gray world, with sharp tinted highlights
    env = torch.where(n[:, 2:3] > 0, 0.12, 0.06) * (1 + (n * view).sum(-1, keepdim=True))
    shiny = albedo * (env + 0.15 * ambient + 6.0 * spec) + 0.03 * diffuse
    return torch.where(metal, shiny, rubber) * st.object_gain


# ---------------------------------------------------------------- rendering


def screen_boxes(scenes: Scenes, shadows: bool) -> torch.Tensor:
    """[B, K, 4] (x0, y0, x1, y1) in [0, 1] frame units: each object's box, grown to hold its shadows."""
    B, K = scenes.shape.shape
    R = bound_radius(scenes)
    H = object_height(scenes)
    sx = torch.tensor([-1.0, 1.0, 1.0, -1.0], device=R.device)
    sy = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=R.device)
    cx = scenes.xy[..., 0:1] + R[..., None] * sx
    cy = scenes.xy[..., 1:2] + R[..., None] * sy
    base = torch.stack([cx, cy, torch.zeros_like(cx)], -1)  # [B, K, 4, 3]
    top = base.clone()
    top[..., 2] = H[..., None]
    points = [base, top]
    if shadows:
        sun = F.normalize(torch.tensor(SUN, device=R.device), dim=0)
        for i in range(4):
            if i < 3:
                lamp = scenes.lamps[:, i][:, None, None, :]
                reach = top - lamp
                reach = reach * (H[..., None] / (lamp[..., 2] - H[..., None]).clamp_min(0.3))[..., None]
            else:
                reach = -sun * (H[..., None, None] / sun[2])
            # far shadow tails are faint: cut them at a few object heights
            length = reach[..., :2].norm(dim=-1, keepdim=True).clamp_min(1e-6)
            points.append(top * torch.tensor([1.0, 1.0, 0.0], device=R.device)
                          + reach * (length.clamp_max(SHADOW_REACH * H[..., None, None]) / length))
    pts = torch.cat(points, 2)  # [B, K, N, 3]
    forward, right, up = _camera_frame(scenes.camera)
    rel = pts - scenes.camera[:, None, None, :]
    depth = (rel * forward[:, None, None]).sum(-1).clamp_min(1e-3)
    u = (rel * right[:, None, None]).sum(-1) / depth / TAN_HALF_FOV * 0.5 + 0.5
    v = 0.5 - (rel * up[:, None, None]).sum(-1) / depth / (TAN_HALF_FOV * ASPECT) * 0.5
    return torch.stack([u.amin(-1), v.amin(-1), u.amax(-1), v.amax(-1)], -1)


def _pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Frame-unit boxes [B, K, 4] -> grid pixel bounds (x0, y0, x1, y1), end exclusive."""
    scale = torch.tensor([width, height, width, height], device=boxes.device)
    lo = (boxes[..., :2] * scale[:2]).floor()
    hi = (boxes[..., 2:] * scale[2:]).ceil()
    return torch.minimum(torch.cat([lo, hi], -1).clamp_min(0), scale)


def _box_rays(scenes: Scenes, boxes: torch.Tensor, height: int, width: int):
    """(b, y, x) of every grid pixel inside some present object's box, each pixel once."""
    B, K = scenes.shape.shape
    x0, y0, x1, y1 = _pixel_boxes(boxes, height, width).unbind(-1)
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    mask = torch.zeros(B, height, width, dtype=torch.bool, device=boxes.device)
    for k in range(K):
        my = (ys >= y0[:, k, None]) & (ys < y1[:, k, None]) & scenes.present[:, k, None]
        mx = (xs >= x0[:, k, None]) & (xs < x1[:, k, None])
        mask |= my[:, :, None] & mx[:, None, :]
    return mask.nonzero(as_tuple=True)


def _dense_rays(B: int, height: int, width: int, device):
    b, y, x = torch.meshgrid(torch.arange(B, device=device), torch.arange(height, device=device),
                             torch.arange(width, device=device), indexing="ij")
    return b.flatten(), y.flatten(), x.flatten()


def _to_srgb(linear: torch.Tensor) -> torch.Tensor:
    x = linear.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(1e-8).pow(1 / 2.4) - 0.055)


def render_scenes(scenes: Scenes, shown: torch.Tensor | None = None, size: int = IMAGE_SIZE,
                  supersample: int = 2) -> torch.Tensor:
    """uint8 images [B, 3, size, size] of ``scenes``; ``shown`` [B, K] picks the objects drawn."""
    if shown is not None:
        scenes = replace(scenes, present=scenes.present & shown)
    B = len(scenes)
    device = scenes.shape.device
    # the floor and the soft shadows on it are smooth: shade them at a lower resolution,
    # the shadows only where some object may cast one
    low = max(size // scenes.style.floor_scale, 1)
    b, y, x = _dense_rays(B, low, low, device)
    floor = _floor(scenes, b, _ray_dirs(scenes.camera, b, y, x, low, low), shadows=False).view(B, low, low, 3)
    b, y, x = _box_rays(scenes, screen_boxes(scenes, shadows=True), low, low)
    if len(b):
        floor[b, y, x] = _floor(scenes, b, _ray_dirs(scenes.camera, b, y, x, low, low), shadows=True)
    grid = size * supersample
    image = F.interpolate(floor.permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", align_corners=False)
    # the objects, supersampled, only inside their own boxes and only where a ray hits one
    boxes = screen_boxes(scenes, shadows=False)
    b, y, x = _box_rays(scenes, boxes, grid, grid)
    d = _ray_dirs(scenes.camera, b, y, x, grid, grid)
    t, n, k = _nearest_hit(scenes, b, scenes.camera[b], d, (y, x, _pixel_boxes(boxes, grid, grid)))
    hit = (k >= 0).nonzero().flatten()
    if len(hit):
        b, y, x = b[hit], y[hit], x[hit]
        image[b, :, y, x] = _object_color(scenes, b, d[hit], t[hit], n[hit], k[hit])
    image = F.avg_pool2d(image, supersample) if supersample > 1 else image
    srgb = _to_srgb(image * scenes.style.exposure) * 255
    if scenes.style.noise > 0:
        srgb = srgb + scenes.style.noise * _grain(scenes.seed * (MAX_OBJECTS + 1) + scenes.present.sum(1), srgb.shape)
    return srgb.round().clamp(0, 255).to(torch.uint8)


@lru_cache(maxsize=4)
def _grain_table(device: torch.device, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(20171231)
    return torch.randn(64, 3, size, size, generator=g).to(device)


def _grain(seed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Unit-variance noise [B, C, H, W] that depends only on each image's seed: one of 64 fixed
    noise images, shifted by a seed-chosen offset."""
    table = _grain_table(seed.device, shape[-1])
    size = shape[-1]
    pick, dy, dx = seed % 64, (seed // 64) % size, (seed // (64 * size)) % size
    ar = torch.arange(size, device=seed.device)
    ys = (ar + dy[:, None]) % size
    xs = (ar + dx[:, None]) % size
    return table[pick[:, None, None, None], torch.arange(3, device=seed.device)[None, :, None, None],
                 ys[:, None, :, None], xs[:, None, None, :]]


def object_pixels(scenes: Scenes, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[B, K] pixels of the size x size image where each object is the nearest thing seen."""
    B, K = scenes.shape.shape
    boxes = screen_boxes(scenes, shadows=False)
    b, y, x = _box_rays(scenes, boxes, size, size)
    counts = torch.zeros(B, K + 1, device=scenes.shape.device)
    if len(b):
        _, _, k = _nearest_hit(scenes, b, scenes.camera[b], _ray_dirs(scenes.camera, b, y, x, size, size),
                               (y, x, _pixel_boxes(boxes, size, size)))
        counts.index_put_((b, k + 1), torch.ones_like(k, dtype=counts.dtype), accumulate=True)
    return counts[:, 1:]
