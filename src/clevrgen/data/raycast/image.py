"""Images: each object's screen box, the rays inside the boxes, the supersampled render with
its grain, and the visible pixels of each object."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch
import torch.nn.functional as F

from clevrgen.data.iclevr import IMAGE_SIZE
from clevrgen.data.raycast.intersect import nearest_hit
from clevrgen.data.raycast.scene import (
    ASPECT, MAX_OBJECTS, SHADOW_REACH, SUN, TAN_HALF_FOV, Scenes, bound_radius, camera_frame, object_height,
    ray_dirs,
)
from clevrgen.data.raycast.shading import floor_color, object_color

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
    forward, right, up = camera_frame(scenes.camera)
    rel = pts - scenes.camera[:, None, None, :]
    depth = (rel * forward[:, None, None]).sum(-1).clamp_min(1e-3)
    u = (rel * right[:, None, None]).sum(-1) / depth / TAN_HALF_FOV * 0.5 + 0.5
    v = 0.5 - (rel * up[:, None, None]).sum(-1) / depth / (TAN_HALF_FOV * ASPECT) * 0.5
    return torch.stack([u.amin(-1), v.amin(-1), u.amax(-1), v.amax(-1)], -1)


def pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Frame-unit boxes [B, K, 4] -> grid pixel bounds (x0, y0, x1, y1), end exclusive."""
    scale = torch.tensor([width, height, width, height], device=boxes.device)
    lo = (boxes[..., :2] * scale[:2]).floor()
    hi = (boxes[..., 2:] * scale[2:]).ceil()
    return torch.minimum(torch.cat([lo, hi], -1).clamp_min(0), scale)


def box_rays(scenes: Scenes, boxes: torch.Tensor, height: int, width: int):
    """(b, y, x) of every grid pixel inside some present object's box, each pixel once."""
    B, K = scenes.shape.shape
    x0, y0, x1, y1 = pixel_boxes(boxes, height, width).unbind(-1)
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    mask = torch.zeros(B, height, width, dtype=torch.bool, device=boxes.device)
    for k in range(K):
        my = (ys >= y0[:, k, None]) & (ys < y1[:, k, None]) & scenes.present[:, k, None]
        mx = (xs >= x0[:, k, None]) & (xs < x1[:, k, None])
        mask |= my[:, :, None] & mx[:, None, :]
    return mask.nonzero(as_tuple=True)


def dense_rays(B: int, height: int, width: int, device):
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
    b, y, x = dense_rays(B, low, low, device)
    floor = floor_color(scenes, b, ray_dirs(scenes.camera, b, y, x, low, low), shadows=False).view(B, low, low, 3)
    b, y, x = box_rays(scenes, screen_boxes(scenes, shadows=True), low, low)
    if len(b):
        floor[b, y, x] = floor_color(scenes, b, ray_dirs(scenes.camera, b, y, x, low, low), shadows=True)
    grid = size * supersample
    image = F.interpolate(floor.permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", align_corners=False)
    # the objects, supersampled, only inside their own boxes and only where a ray hits one
    boxes = screen_boxes(scenes, shadows=False)
    b, y, x = box_rays(scenes, boxes, grid, grid)
    d = ray_dirs(scenes.camera, b, y, x, grid, grid)
    t, n, k = nearest_hit(scenes, b, scenes.camera[b], d, (y, x, pixel_boxes(boxes, grid, grid)))
    hit = (k >= 0).nonzero().flatten()
    if len(hit):
        b, y, x = b[hit], y[hit], x[hit]
        image[b, :, y, x] = object_color(scenes, b, d[hit], t[hit], n[hit], k[hit])
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
    b, y, x = box_rays(scenes, boxes, size, size)
    counts = torch.zeros(B, K + 1, device=scenes.shape.device)
    if len(b):
        _, _, k = nearest_hit(scenes, b, scenes.camera[b], ray_dirs(scenes.camera, b, y, x, size, size),
                               (y, x, pixel_boxes(boxes, size, size)))
        counts.index_put_((b, k + 1), torch.ones_like(k, dtype=counts.dtype), accumulate=True)
    return counts[:, 1:]
