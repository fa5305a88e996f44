"""Lights and shading: the area lamps and the sun, the floor curving into the backdrop with
its soft shadows, and the matte (or metal) objects."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clevrgen.data.raycast.intersect import occlusion
from clevrgen.data.raycast.scene import (
    ALBEDO, LAMP_TINT, SUN, INF, Scenes, half_width, object_height,
)

def scene_lights(scenes: Scenes, b: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
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


def irradiance(p, n, lights):
    """Per-light (unit direction [P, 3], distance [P], rgb irradiance [P, 3]) at points p with normals n."""
    out = []
    for pos, sun, power in lights:
        if pos is None:
            l = sun.expand_as(p)
            dist = torch.full_like(p[:, 0], INF)
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


def backdrop(o: torch.Tensor, d: torch.Tensor, backdrop: tuple[float, float]):
    """Hit points and normals of the floor, which curves up into a wall far behind the origin."""
    start, radius = backdrop
    g = F.normalize(-o[:, :2], dim=-1)  # away from the camera, in the floor plane
    w_o, w_d = (o[:, :2] * g).sum(-1), (d[:, :2] * g).sum(-1)
    t_floor = -o[:, 2] / d[:, 2].clamp_max(-1e-6)
    t_floor = torch.where(d[:, 2] < 0, t_floor, INF)
    # the curve: a circle in the (w, z) plane centred at (start, radius)
    a = w_d * w_d + d[:, 2] * d[:, 2]
    bq = (w_o - start) * w_d + (o[:, 2] - radius) * d[:, 2]
    cq = (w_o - start) ** 2 + (o[:, 2] - radius) ** 2 - radius * radius
    disc = bq * bq - a * cq
    t_curve = (-bq + disc.clamp_min(0).sqrt()) / a
    t_wall = (start + radius - w_o) / w_d.clamp_min(1e-6)
    on_floor = (w_o + t_floor * w_d) <= start
    z_curve = torch.where(disc > 0, o[:, 2] + t_curve * d[:, 2], INF)
    t = torch.where(on_floor, t_floor, torch.where(z_curve <= radius, t_curve, t_wall))
    p = o + t[:, None] * d
    w = (p[:, :2] * g).sum(-1)
    nw = torch.where(on_floor, 0.0, torch.where(z_curve <= radius, -(w - start) / radius, -1.0))
    nz = torch.where(on_floor, 1.0, torch.where(z_curve <= radius, (radius - p[:, 2]) / radius, 0.0))
    n = torch.cat([nw[:, None] * g, nz[:, None]], -1)
    return p, n


def floor_color(scenes: Scenes, b: torch.Tensor, d: torch.Tensor, shadows: bool) -> torch.Tensor:
    """Linear rgb [P, 3] of the floor and backdrop seen along d from the camera of scene b."""
    st = scenes.style
    p, n = backdrop(scenes.camera[b], d, st.backdrop)
    if shadows:
        present = scenes.present[b]
        prim = dict(shape=scenes.shape[b], cx=scenes.xy[b, :, 0], cy=scenes.xy[b, :, 1], half=half_width(scenes)[b],
                    height=object_height(scenes)[b], yaw=scenes.yaw[b])
    floor = torch.zeros_like(p)
    for i, (l, dist, e) in enumerate(irradiance(p, n, scene_lights(scenes, b))):
        if shadows and st.shadow_strength[i] > 0:
            lit = torch.ones_like(dist)
            for k in range(scenes.shape.shape[1]):
                occ = occlusion(p, l, dist, penumbra=st.penumbra, **{key: v[:, k] for key, v in prim.items()})
                lit = lit * (1 - occ * present[:, k] * st.shadow_strength[i])
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


def object_color(scenes: Scenes, b: torch.Tensor, d: torch.Tensor, t: torch.Tensor, n: torch.Tensor,
                  k: torch.Tensor) -> torch.Tensor:
    """Linear rgb [P, 3] of object k of scene b hit at distance t along d, with normal n."""
    st = scenes.style
    lights = scene_lights(scenes, b)
    p = scenes.camera[b] + t[:, None] * d
    view = -d
    albedo = ALBEDO.to(d.device)[scenes.color[b, k]]
    metal = scenes.metal[b, k][:, None]
    diffuse = torch.zeros_like(p)
    spec = torch.zeros_like(p)
    for l, dist, e in irradiance(p, n, lights):
        h = F.normalize(l + view, dim=-1)
        diffuse = diffuse + e
        spec = spec + e * (n * h).sum(-1).clamp_min(0).pow(30)[:, None]
    # light bounced off the floor (as lit at the object's foot) reaches the sides and undersides
    B, K = scenes.shape.shape
    foot = torch.cat([scenes.xy, torch.zeros_like(scenes.xy[..., :1])], -1).view(B * K, 3)
    up = torch.zeros_like(foot)
    up[:, 2] = 1.0
    rows = torch.arange(B, device=d.device).repeat_interleave(K)
    floor_light = sum(e for _, _, e in irradiance(foot, up, scene_lights(scenes, rows))).view(B, K, 3)[b, k]
    ambient = (st.bounce * (1 - n[:, 2:3]) * 0.5 + st.ambient) * (floor_light * st.floor_albedo + st.floor_ambient)
    rubber = albedo * (diffuse + ambient) + st.gloss * spec
    # metal: a tinted mirror of a mid-gray world, with sharp tinted highlights
    env = torch.where(n[:, 2:3] > 0, 0.12, 0.06) * (1 + (n * view).sum(-1, keepdim=True))
    shiny = albedo * (env + 0.15 * ambient + 6.0 * spec) + 0.03 * diffuse
    return torch.where(metal, shiny, rubber) * st.object_gain
