"""The ray caster behind the renderer: scene model, analytic intersections, shading, images.

Scenes follow CLEVR's generator as i-CLEVR used it (see ``shared/clevr_reference/README.md``):
a fixed camera on a 4:3 frame squashed to 64x64, three jittered area lamps and a sun, a matte
floor that curves up into a backdrop, matte objects. Light powers, backdrop and object colors
are fitted to the real images (``docs/renderer.md``).

Speed comes from doing per-pixel work only where it matters. The floor and its soft shadows are
smooth, so they are shaded at half the output resolution, the shadows only inside each object's
screen box grown to hold them. Objects are ray cast at ``supersample`` x the output resolution,
only inside their own boxes; every pixel list is flattened across the batch into one ragged
list, so there is no loop over pixels and only a loop over the (<= 5) object slots. Hits are
analytic (sphere, upright cylinder, yawed box), each ray tested only against the shape in each
slot; floor shadows are analytic too, with a penumbra that widens with distance to the occluder.

The package: :mod:`.scene` (facts, style, scenes, camera rays), :mod:`.intersect` (ray hits and
floor occlusion), :mod:`.shading` (lights, floor, objects), :mod:`.image` (boxes, rays, images).
"""

from clevrgen.data.raycast.image import object_pixels, render_scenes, screen_boxes
from clevrgen.data.raycast.scene import (
    ALBEDO, CAMERA, COLORS, CUBE, CYLINDER, LAMPS, MAX_OBJECTS, SHAPES, SPHERE, SceneStyle, Scenes,
    bound_radius, object_height,
)

RENDERER_VERSION = 2
"""Bumped whenever the same scene settings would give other pixels (caches of rendered data
sets are keyed by it). 2: shadows from all four lights with per-light strengths, cubes 0.95."""

__all__ = [
    "RENDERER_VERSION", "ALBEDO", "CAMERA", "COLORS", "CUBE", "CYLINDER", "LAMPS", "MAX_OBJECTS", "SHAPES", "SPHERE",
    "SceneStyle", "Scenes", "bound_radius", "object_height", "object_pixels", "render_scenes", "screen_boxes",
]
