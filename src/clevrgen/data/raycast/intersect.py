"""Analytic ray hits (sphere, upright cylinder, yawed cube), the nearest hit of each ray, and
the soft occlusion of floor points toward a light."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clevrgen.data.raycast.scene import CUBE, CYLINDER, INF, SPHERE, Scenes, half_width, object_height

def _hit_sphere(ox, oy, oz, dx, dy, dz, half, height, yaw):
    sz = oz - half  # centre at height `half`
    bq = ox * dx + oy * dy + sz * dz
    disc = bq * bq - (ox * ox + oy * oy + sz * sz - half * half)
    t = -bq - disc.clamp_min(0).sqrt()
    t = torch.where((disc > 0) & (t > 1e-4), t, INF)
    tt = t.nan_to_num(0, 0, 0)
    n = torch.stack([ox + tt * dx, oy + tt * dy, sz + tt * dz], -1) / half[:, None]
    return t, n


def _hit_cylinder(ox, oy, oz, dx, dy, dz, half, height, yaw):
    a = (dx * dx + dy * dy).clamp_min(1e-12)
    bq = ox * dx + oy * dy
    disc = bq * bq - a * (ox * ox + oy * oy - half * half)
    t_side = (-bq - disc.clamp_min(0).sqrt()) / a
    z_side = oz + t_side * dz
    t_side = torch.where((disc > 0) & (t_side > 1e-4) & (z_side >= 0) & (z_side <= height), t_side, INF)
    t_cap = (height - oz) / torch.where(dz.abs() > 1e-9, dz, torch.full_like(dz, -1e-9))
    px, py = ox + t_cap * dx, oy + t_cap * dy
    t_cap = torch.where((t_cap > 1e-4) & (px * px + py * py <= half * half), t_cap, INF)
    on_cap = t_cap <= t_side
    t = torch.where(on_cap, t_cap, t_side)
    tt = t.nan_to_num(0, 0, 0)
    side = torch.stack([(ox + tt * dx) / half, (oy + tt * dy) / half, torch.zeros_like(t)], -1)
    n = torch.where(on_cap[:, None], torch.tensor([0.0, 0.0, 1.0], device=t.device), side)
    return t, n


def _yawed(x, y, z, c, s):
    """[P, 3] vectors (x, y, z) turned by -yaw about z (into a yawed shape's frame), given c, s =
    cos(yaw), sin(yaw); pass -s to turn back."""
    return torch.stack([c * x + s * y, -s * x + c * y, z], -1)


def _hit_box(ox, oy, oz, dx, dy, dz, half, height, yaw):
    """A cube of half-edge ``half`` yawed about z: the slab test in its own frame."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    q = _yawed(ox, oy, oz - half, c, s)
    e = _yawed(dx, dy, dz, c, s)
    e = torch.where(e.abs() > 1e-9, e, torch.full_like(e, 1e-9))
    t1, t2 = (-half[:, None] - q) / e, (half[:, None] - q) / e
    t_near, axis = torch.minimum(t1, t2).max(-1)
    t_far = torch.maximum(t1, t2).min(-1).values
    t = torch.where((t_near < t_far) & (t_near > 1e-4), t_near, INF)
    local = -torch.sign(e) * F.one_hot(axis, 3).to(e.dtype)
    return t, _yawed(*local.unbind(-1), c, -s)


_HITS = {CUBE: _hit_box, SPHERE: _hit_sphere, CYLINDER: _hit_cylinder}

BEVEL_STEPS, BEVEL_EPS = 8, 1e-3


def _rounded(kind, q, half, height, radius):
    """(signed distance [P], outward normal [P, 3]) of local points q [P, 3] (centred on the
    shape, in its yawed frame) to a cube or cylinder whose edges are rounded off with ``radius``."""
    if kind == CUBE:
        v = q.abs() - (half - radius)[:, None]
        out = v.clamp_min(0)
        n = out * torch.sign(q)
    else:
        rho = (q[:, 0] ** 2 + q[:, 1] ** 2).sqrt()
        v = torch.stack([rho - (half - radius), q[:, 2].abs() - (height / 2 - radius)], -1)
        out = v.clamp_min(0)
        radial = q[:, :2] / rho.clamp_min(1e-9)[:, None]
        n = torch.cat([out[:, :1] * radial, (out[:, 1] * torch.sign(q[:, 2]))[:, None]], -1)
    dist = out.norm(dim=-1) + v.max(-1).values.clamp_max(0) - radius
    return dist, F.normalize(n, dim=-1)


def _bevel(kind, t, n, ox, oy, oz, dx, dy, dz, half, height, yaw, bevel):
    """Round off the edges of a sharp cube or cylinder hit (t, n): the sharp shape bounds the
    rounded one, so rays march on from its surface (sphere tracing) to the rounded surface, and
    rays that only clip an edge miss. Only rays that hit the sharp shape march."""
    sel = torch.isfinite(t).nonzero().flatten()
    ox, oy, oz, dx, dy, dz, half, height, yaw = (v[sel] for v in (ox, oy, oz, dx, dy, dz, half, height, yaw))
    radius = bevel * half
    # cylinders are round: their own frame needs no turn
    c, s = (torch.cos(yaw), torch.sin(yaw)) if kind == CUBE else (torch.ones_like(yaw), torch.zeros_like(yaw))
    o, e = _yawed(ox, oy, oz - height / 2, c, s), _yawed(dx, dy, dz, c, s)
    tt = t[sel]
    for _ in range(BEVEL_STEPS):
        dist, _ = _rounded(kind, o + tt[:, None] * e, half, height, radius)
        tt = tt + dist.clamp_min(0)
    dist, local = _rounded(kind, o + tt[:, None] * e, half, height, radius)
    hit = dist < BEVEL_EPS * half
    t, n = t.clone(), n.clone()
    t[sel] = torch.where(hit, tt, INF)
    n[sel] = torch.where(hit[:, None], _yawed(*local.unbind(-1), c, -s), n[sel])
    return t, n


def nearest_hit(scenes: Scenes, b: torch.Tensor, o: torch.Tensor, d: torch.Tensor,
                 pixels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """(t [P], unit normal [P, 3], slot [P], -1 for none) of the nearest object along each ray.

    Each ray is tested only against the shape that sits in each slot of its scene, and with
    ``pixels`` = (y, x, pixel boxes [B, K, 4]) only against the objects whose box holds it.
    """
    t_best = torch.full_like(d[:, 0], INF)
    n_best = torch.zeros_like(d)
    k_best = torch.full_like(b, -1)
    half, height = half_width(scenes), object_height(scenes)
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
            args = (oi[:, 0] - scenes.xy[bi, k, 0], oi[:, 1] - scenes.xy[bi, k, 1], oi[:, 2],
                    di[:, 0], di[:, 1], di[:, 2], half[bi, k], height[bi, k], scenes.yaw[bi, k])
            t, n = hit(*args)
            if kind != SPHERE and scenes.style.bevel > 0:
                t, n = _bevel(kind, t, n, *args, scenes.style.bevel)
            closer = t < t_best[idx]
            idx, t, n = idx[closer], t[closer], n[closer]
            t_best[idx] = t
            n_best[idx] = n
            k_best[idx] = k
    return t_best, n_best, k_best


def occlusion(p, to_light, dist, shape, cx, cy, half, height, yaw, penumbra):
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
