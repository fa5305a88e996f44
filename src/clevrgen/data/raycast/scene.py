"""Scenes as the ray caster sees them: CLEVR's fixed facts, the style settings fitted to
i-CLEVR, a batch of scenes as tensors, the camera's rays and the objects' sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

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
INF = float("inf")


@dataclass(frozen=True)
class SceneStyle:
    """How scenes are drawn. The defaults are what i-CLEVR used, measured on its images."""

    sizes: tuple[float, ...] = (0.61,)
    """Object sizes (sphere radius) to choose from; CLEVR's generator used (0.7, 0.35)."""
    metal_probability: float = 0.0
    cube_scale: float = 0.95
    """Cube half-edge / size: 0.95 measured in i-CLEVR, 1/sqrt(2) in the generator."""
    cylinder_height: float = 0.97
    """Cylinder half-height / radius."""
    bevel: float = 0.0
    """Cube and cylinder edges rounded off with this radius, a fraction of the half-width
    (CLEVR's SmoothCube and SmoothCylinder are bevelled)."""
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
    penumbra: tuple[float, float] = (0.05, 0.15)
    """Shadow softness: a constant blur plus a widening per unit distance to the occluder."""
    floor_albedo: float = 0.8
    wall_light: float = 0.0067
    """Extra light on the upright part of the backdrop (matched to the real images' top rows)."""
    floor_scale: int = 2
    """The floor and its shadows are shaded at 1/floor_scale of the output resolution."""
    shadow_strength: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.3)
    """How much of each light (key, fill, back lamps, sun) an object's shadow takes away: 1 a
    full shadow, 0 none. The real shadows are fainter than a lone lamp would make them: these
    were matched to the darkening an added object brings to the real floor (docs/renderer.md)."""
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


def camera_frame(camera: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, right and up unit vectors [B, 3] of cameras aimed at the origin."""
    forward = F.normalize(-camera, dim=-1)
    z = torch.zeros_like(forward)
    z[:, 2] = 1.0
    right = F.normalize(torch.linalg.cross(forward, z), dim=-1)
    up = torch.linalg.cross(right, forward)
    return forward, right, up


def ray_dirs(camera: torch.Tensor, b: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
              height: int, width: int) -> torch.Tensor:
    """Unit directions [P, 3] through pixel centres (y, x) of an height x width grid on the 4:3 frame."""
    forward, right, up = (v[b] for v in camera_frame(camera))
    u = ((x.float() + 0.5) / width * 2 - 1) * TAN_HALF_FOV
    v = (1 - (y.float() + 0.5) / height * 2) * TAN_HALF_FOV * ASPECT
    return F.normalize(forward + u[:, None] * right + v[:, None] * up, dim=-1)


def object_height(scenes: Scenes) -> torch.Tensor:
    st = scenes.style
    scale = torch.where(scenes.shape == CUBE, torch.full_like(scenes.size, st.cube_scale),
                        torch.where(scenes.shape == CYLINDER, torch.full_like(scenes.size, st.cylinder_height),
                                    torch.ones_like(scenes.size)))
    return 2 * scenes.size * scale


def half_width(scenes: Scenes) -> torch.Tensor:
    """Half-extent in the floor plane: radius, or cube half-edge."""
    return scenes.size * torch.where(scenes.shape == CUBE, scenes.style.cube_scale, 1.0)


def bound_radius(scenes: Scenes) -> torch.Tensor:
    return half_width(scenes) * torch.where(scenes.shape == CUBE, math.sqrt(2.0), 1.0)
