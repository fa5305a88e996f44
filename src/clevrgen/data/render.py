"""The procedural CLEVR renderer: scenes laid out as i-CLEVR did, datasets in its layout.

Scenes follow CLEVR's generator as i-CLEVR used it (see ``shared/clevr_reference/README.md``):
the first object at the origin, later ones on a square ring around it, none overlapping, each
visible. ``X_0.png, X_1.png, ...`` of one scene show its first 1, 2, ... objects. Each scene's
layout, lights and grain depend only on (seed, its key), never on the batch it is drawn in.
The ray casting itself lives in :mod:`clevrgen.data.raycast`; writing a rendered dataset to a
folder (resumable) in :mod:`clevrgen.data.rendered_folder`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence

import torch

from clevrgen.data.iclevr import ImageSet, labels_tensor, scene_ids, scene_key
from clevrgen.data.raycast import (  # noqa: F401  (the renderer's public names)
    RENDERER_VERSION, CAMERA, COLORS, LAMPS, MAX_OBJECTS, SHAPES, SceneStyle, Scenes, bound_radius, object_height,
    screen_boxes, object_pixels, render_scenes,
)
from clevrgen.errors import DataError, PhraseError
from clevrgen.labels import parse_phrase


def render_settings(seed: int, style: SceneStyle | None = None) -> str:
    """What a render's pixels depend on besides its spec (seed, scene settings, renderer
    version), as text: a folder's ``render.json`` and the embedded cache's key are made of it."""
    return json.dumps({"seed": seed, "renderer": RENDERER_VERSION, "style": repr(style or SceneStyle())})


def style_with(overrides: Sequence[str]) -> SceneStyle:
    """The default :class:`SceneStyle` with ``KEY=VALUE`` overrides (values are Python literals)."""
    settings = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"a style override is KEY=VALUE, got {item!r}")
        try:
            settings[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise DataError(f"{key.strip()}: {value.strip()!r} is not a Python literal") from None
    unknown = sorted(set(settings) - set(SceneStyle.__dataclass_fields__))
    if unknown:
        raise DataError(f"unknown scene setting {unknown[0]!r}")
    return SceneStyle(**settings)


# ---------------------------------------------------------------- scene sampling


def _scene_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


ATTEMPTS, CANDIDATES = 8, 24


def sample_scenes(classes: Sequence[Sequence[int]], keys: Sequence[str], seed: int = 0,
                  style: SceneStyle | None = None, device: torch.device | str = "cpu") -> Scenes:
    """Lay out one scene per class list (objects in order); each scene's layout depends only on
    (seed, its key), so it is the same in any batch. Scenes whose objects overlap, leave the
    frame or hide one another below ``style.min_pixels`` are re-drawn."""
    style = style or SceneStyle()
    B, K = len(classes), max(len(c) for c in classes)
    if K > MAX_OBJECTS:
        raise PhraseError(f"at most {MAX_OBJECTS} objects per scene (got {K})")
    # every scene draws the same amount of noise, for MAX_OBJECTS slots, whatever the batch
    M = MAX_OBJECTS
    per_scene = 3 * M + 3 + 9 + ATTEMPTS * M * CANDIDATES * 2
    noise = torch.empty(B, per_scene)
    for i, key in enumerate(keys):
        torch.rand(per_scene, generator=torch.Generator().manual_seed(_scene_seed(seed, key)), out=noise[i])
    u_yaw, u_size, u_metal, u_cam, u_lamp, u_xy = torch.split(noise, [M, M, M, 3, 9, ATTEMPTS * M * CANDIDATES * 2], 1)
    u_yaw, u_size, u_metal = u_yaw[:, :K], u_size[:, :K], u_metal[:, :K]
    shape = torch.zeros(B, K, dtype=torch.long)
    color = torch.zeros(B, K, dtype=torch.long)
    present = torch.zeros(B, K, dtype=torch.bool)
    for i, cls in enumerate(classes):
        n = len(cls)
        shape[i, :n] = torch.tensor([c // len(COLORS) for c in cls])
        color[i, :n] = torch.tensor([c % len(COLORS) for c in cls])
        present[i, :n] = True
    sizes = torch.tensor(style.sizes)
    scenes = Scenes(
        shape=shape, color=color, xy=torch.zeros(B, K, 2),
        size=sizes[(u_size * len(sizes)).long().clamp_max(len(sizes) - 1)],
        yaw=u_yaw * 2 * math.pi, metal=u_metal < style.metal_probability, present=present,
        camera=torch.tensor(CAMERA) + (u_cam * 2 - 1) * style.camera_jitter,
        lamps=torch.tensor(LAMPS) + (u_lamp.view(B, 3, 3) * 2 - 1) * style.light_jitter,
        seed=torch.tensor([_scene_seed(seed, key) & 0xFFFFFF for key in keys]), style=style,
    ).to(device)
    u_xy = u_xy.reshape(B, ATTEMPTS, M, CANDIDATES, 2)[:, :, :K].to(device)
    todo = torch.arange(B, device=device)
    radius = bound_radius(scenes)
    for attempt in range(ATTEMPTS):
        sub = scenes.index(todo)
        cand = (u_xy[todo, attempt] * 2 - 1) * style.extent  # [b, K, C, 2]
        ok = torch.ones(len(todo), dtype=torch.bool, device=device)
        xy = torch.zeros(len(todo), K, 2, device=device)
        for k in range(K):
            c = cand[:, k]
            if k == 0 and style.first_at_origin:
                c = torch.zeros_like(c)
            valid = torch.ones(c.shape[:2], dtype=torch.bool, device=device)
            for j in range(k):
                dist = (c - xy[:, j, None]).norm(dim=-1)
                valid &= dist - radius[todo, k, None] - radius[todo, j, None] >= style.gap
                valid &= dist >= style.spacing
                if j == 0 and style.first_at_origin:  # a square ring around the first object
                    valid &= (c - xy[:, j, None]).abs().amax(-1) >= style.ring
            first = valid.float().argmax(1)
            xy[:, k] = c[torch.arange(len(todo), device=device), first]
            ok &= valid.any(1) | ~sub.present[:, k]
        sub.xy = xy
        pixels = object_pixels(sub)
        frame = (screen_boxes(sub, shadows=False).clamp(0, 1) == screen_boxes(sub, shadows=False)).all(-1)
        ok &= ((pixels >= style.min_pixels) & frame | ~sub.present).all(1)
        last = attempt == ATTEMPTS - 1
        take = torch.ones_like(ok) if last else ok  # the last attempt is kept as it is
        scenes.xy[todo[take]] = xy[take]
        todo = todo[~take]
        if len(todo) == 0:
            break
    return scenes


def scene_facts(scenes: Scenes, row: int, count: int | None = None) -> list[dict]:
    """The objects of one scene for scenes.json: class, position, size, material, yaw."""
    facts = []
    height = object_height(scenes)
    for k in range(scenes.shape.shape[1] if count is None else count):
        if not bool(scenes.present[row, k]):
            continue
        facts.append({
            "phrase": f"{COLORS[int(scenes.color[row, k])]} {SHAPES[int(scenes.shape[row, k])]}",
            "position": [round(float(v), 4) for v in scenes.xy[row, k].tolist()] + [round(float(height[row, k]) / 2, 4)],
            "size": round(float(scenes.size[row, k]), 4),
            "material": "metal" if bool(scenes.metal[row, k]) else "rubber",
            "yaw_degrees": round(math.degrees(float(scenes.yaw[row, k])), 2),
        })
    return facts


# ---------------------------------------------------------------- datasets in the i-CLEVR layout

_STEP = re.compile(r"^(?P<scene>.+)_(?P<step>\d+)\.png$")


def plan_scenes(spec: dict[str, list[str]]) -> list[tuple[str, list[int], list[tuple[str, int]]]]:
    """Group image names into scenes: (key, the scene's classes in order, [(name, objects shown)]).

    ``X_0.png, X_1.png, ...`` share one scene and show its first 1, 2, ... objects (the union of
    their phrase lists in step order); any other name is a scene of its own.
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in spec:
        m = _STEP.match(name)
        key, step = (m["scene"], int(m["step"])) if m else (name, 0)
        groups.setdefault(key, []).append((step, name))
    plan = []
    for key, members in groups.items():
        members.sort()
        classes: list[int] = []
        images = []
        for _, name in members:
            if not spec[name]:
                raise PhraseError(f"{name}: no phrases: an image shows at least one object")
            wanted = []
            for phrase in spec[name]:
                try:
                    wanted.append(parse_phrase(phrase))
                except PhraseError as exc:
                    raise PhraseError(f"{name}: {exc}") from None
            for c in wanted:
                if c not in classes:
                    classes.append(c)
            images.append((name, wanted))
        images = [(name, [classes.index(c) for c in wanted]) for name, wanted in images]
        if len(classes) > MAX_OBJECTS:
            raise PhraseError(f"{key}: {len(classes)} objects, at most {MAX_OBJECTS} are supported")
        plan.append((key, classes, images))
    return plan


def iter_render(spec: dict[str, list[str]], seed: int = 0, device: torch.device | str = "cpu",
                batch_size: int = 256, style: SceneStyle | None = None, skip: set[str] | frozenset = frozenset(),
                ) -> Iterator[tuple[list[str], torch.Tensor, list[list[dict]]]]:
    """Render ``spec`` batch by batch: (names, uint8 images [N, 3, 64, 64] on the CPU, facts).

    A scene whose images are all in ``skip`` is not rendered (resuming); an image depends only
    on (seed, its scene key), never on the batch it was drawn in.
    """
    plan = [p for p in plan_scenes(spec) if not all(name in skip for name, _ in p[2])]
    for start in range(0, len(plan), batch_size):
        chunk = plan[start:start + batch_size]
        scenes = sample_scenes([c for _, c, _ in chunk], [k for k, _, _ in chunk], seed, style, device)
        K = scenes.shape.shape[1]
        rows, shown, names, facts = [], [], [], []
        on_cpu = scenes.to("cpu")  # facts read element by element: no device syncs
        for i, (_, _, images) in enumerate(chunk):
            for name, objects in images:
                mask = torch.zeros(K, dtype=torch.bool)
                mask[objects] = True
                rows.append(i)
                shown.append(mask)
                names.append(name)
                facts.append([f for j, f in enumerate(scene_facts(on_cpu, i, K)) if j in objects])
        index = torch.tensor(rows, device=scenes.shape.device)
        images = render_scenes(scenes.index(index), torch.stack(shown).to(index.device))
        yield names, images.cpu(), facts


def render_dataset(spec: dict[str, list[str]], seed: int = 0, device: torch.device | str = "cpu",
                   progress: bool = True, style: SceneStyle | None = None) -> ImageSet:
    """Render every image of ``spec`` (name -> phrases) as an :class:`ImageSet` in spec order."""
    if not spec:
        raise DataError("nothing to render: the spec lists no images")
    images: dict[str, torch.Tensor] = {}
    for names, batch, _ in track_render(iter_render(spec, seed, device, style=style), len(spec), progress):
        images.update(zip(names, batch))
    names = list(spec)
    return ImageSet(torch.stack([images[n] for n in names]), labels_tensor([spec[n] for n in names]),
                    scene_ids(names), names)


def track_render(batches, total: int, enabled: bool, done: int = 0):
    """Pass batches through while a rich bar shows images and scenes per second."""
    import time

    from rich.progress import TextColumn

    from clevrgen.progress import make_progress

    start, scenes, count = time.perf_counter(), 0, 0
    with make_progress(TextColumn("{task.fields[rate]}"), enabled=enabled) as bar:
        task = bar.add_task("rendering", total=total, completed=done, rate="")
        for batch in batches:
            yield batch
            names = batch[0]
            count += len(names)
            scenes += len({scene_key(n) for n in names})
            elapsed = time.perf_counter() - start
            bar.update(task, advance=len(names), rate=f"{scenes / elapsed:,.0f} scenes/s")


def random_label_sets(count: int, objects: tuple[int, int], generator: torch.Generator) -> list[list[str]]:
    """``count`` lists of distinct phrases, each as long as a count drawn from ``objects`` = (MIN, MAX)."""
    from clevrgen.labels import PHRASES

    lo, hi = objects
    sets = []
    for _ in range(count):
        n = int(torch.randint(lo, hi + 1, (), generator=generator))
        sets.append([PHRASES[j] for j in torch.randperm(len(PHRASES), generator=generator)[:n].tolist()])
    return sets


def random_spec(count: int, objects: tuple[int, int] = (1, 3), seed: int = 0) -> dict[str, list[str]]:
    """``count`` random scenes named as in i-CLEVR: ``CLEVR_random_000000_k.png`` shows the scene's
    first k + 1 objects. Each scene draws its object count from ``objects`` = (MIN, MAX) and
    writes its images with at least MIN objects (with 1-3: the i-CLEVR sequences)."""
    g = torch.Generator().manual_seed(_scene_seed(seed, "random-spec"))
    spec: dict[str, list[str]] = {}
    for i, phrases in enumerate(random_label_sets(count, objects, g)):
        for k in range(objects[0] - 1, len(phrases)):
            spec[f"CLEVR_random_{i:06d}_{k}.png"] = phrases[:k + 1]
    return spec
