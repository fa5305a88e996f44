"""A rendered dataset on disk: :func:`render_folder` writes a spec's renders (:mod:`clevrgen.data.render`)
in the i-CLEVR layout, resumably, and adds to a folder only what the same settings drew.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import torch

from clevrgen.data.iclevr import ImageSet, labels_tensor, scene_ids
from clevrgen.data.render import SceneStyle, iter_render, plan_scenes, render_settings, track_render
from clevrgen.errors import DataError, Interrupted
from clevrgen.inputs import read_json
from clevrgen.output import WriteError


def render_folder(out, spec: dict[str, list[str]], seed: int = 0, device: torch.device | str = "cpu",
                  fmt: str = "png", progress: bool = True, style: SceneStyle | None = None) -> dict[str, int]:
    """Write ``spec`` rendered in the i-CLEVR layout under ``out``: train.json, objects.json,
    scenes.json (each image's objects) and ``iclevr/<name>`` PNGs (``fmt`` png or both) and/or
    the reader's uint8 cache (cache or both), so ``load_iclevr(out)`` reads it back.

    An interrupted run resumes: PNGs already written (each written atomically) are kept, their
    objects read back from ``scenes.jsonl``; a scene missing any image is rendered again whole.
    ``render.json`` records the seed, settings and renderer version; resuming a folder rendered
    with others is refused, as its kept images would not match the new ones.
    Returns the counts of images rendered and kept.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    from clevrgen.data.iclevr import cache_path, decode_image, fingerprint_of, save_cache
    from clevrgen.labels import CLASS_INDEX
    from clevrgen.output import append_jsonl, atomic_path, atomic_write_text
    from clevrgen.runtime import SIGNAL_NAMES, deferred_stop

    out = Path(out)
    plan_scenes(spec)  # validates every phrase before anything is written
    bad = [n for n in spec if Path(n).name != n or not n.lower().endswith(".png") or n.startswith(".")]
    if bad:
        raise DataError(f"image names must be plain .png file names, got {bad[0]!r}")
    out.mkdir(parents=True, exist_ok=True)
    pngs = fmt in ("png", "both")
    journal = out / "scenes.jsonl"
    facts: dict[str, list[dict]] = {}
    if pngs and (out / "scenes.json").is_file():
        with contextlib.suppress(DataError):
            facts.update(read_json(out / "scenes.json"))
    if pngs and journal.is_file():
        for line in journal.read_text().splitlines():
            try:
                facts.update(json.loads(line))
            except (ValueError, RecursionError):  # a line cut short by a kill
                continue
    # a render may add to a dataset only if it drew it with the very same settings, and keeps
    # every image that dataset lists
    manifest = render_settings(seed, style)
    spec = _added_to(out, spec, manifest, pngs)
    kept = {n for n in spec if n in facts and (out / "iclevr" / n).is_file()} if pngs else set()
    atomic_write_text(out / "render.json", manifest)
    atomic_write_text(out / "train.json", json.dumps(spec))
    atomic_write_text(out / "objects.json", json.dumps(CLASS_INDEX))
    rendered = 0
    images: dict[str, torch.Tensor] = {}

    def write_png(name: str, image: torch.Tensor) -> None:
        with atomic_path(out / "iclevr" / name) as tmp:
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")

    # Ctrl-C or SIGTERM: the batch in hand is finished and journalled, then the render stops
    with _kept_on_failure(out if pngs else None), deferred_stop() as stop, ThreadPoolExecutor(4) as pool:
        batches = iter_render(spec, seed, device, style=style, skip=kept)
        for names, batch, batch_facts in track_render(batches, len(spec), progress, done=len(kept)):
            if fmt != "png":
                images.update(zip(names, batch))
            if pngs:
                list(pool.map(write_png, names, batch))
                append_jsonl(journal, dict(zip(names, batch_facts)))
            facts.update(zip(names, batch_facts))
            rendered += len(names)
            if stop.requested and len(kept) + rendered < len(spec):
                how = "interrupted" if stop.signum == signal.SIGINT else f"stopped by {SIGNAL_NAMES[stop.signum]}"
                kept_note = ("the finished images are kept: run the same command again to go on" if pngs else
                             "--format cache keeps nothing of an unfinished render")
                raise Interrupted(f"render {how} after {len(kept) + rendered:,} of {len(spec):,} images; {kept_note}",
                                  exit_code=128 + stop.signum)
    atomic_write_text(out / "scenes.json", json.dumps({n: facts[n] for n in spec}))
    if fmt != "png":
        for name in kept:
            images[name] = torch.from_numpy(np.ascontiguousarray(decode_image(out / "iclevr" / name)))
        names = list(spec)
        data = ImageSet(torch.stack([images[n] for n in names]), labels_tensor([spec[n] for n in names]),
                        scene_ids(names), names)
        save_cache(cache_path(out), data, fingerprint_of(out))
    if pngs:
        journal.unlink(missing_ok=True)
    if fmt == "png":  # a cache of an earlier render of this folder would be stale now
        cache_path(out).unlink(missing_ok=True)
    return {"rendered": rendered, "kept": len(spec) - rendered}


def _added_to(out: Path, spec: dict[str, list[str]], manifest: str, pngs: bool) -> dict[str, list[str]]:
    """The spec to write into ``out``: ``spec`` alone for a new folder; for a dataset this
    renderer drew with the same settings, its listed images and ``spec`` together. A dataset of
    other settings, or not rendered by clevrgen, is refused, and so is an image listed twice
    with other objects."""
    listed = out / "train.json"
    before = (out / "render.json").read_text() if (out / "render.json").is_file() else None
    if not listed.is_file():
        if before is not None and before != manifest and any((out / "iclevr").glob("*.png")):
            raise DataError(f"{out} holds images of another render (another seed, scene settings or renderer "
                            f"version): render into a new folder, or delete {out / 'iclevr'} to start over")
        return spec
    if before is None:
        raise DataError(f"--out {out} holds a dataset clevrgen did not render (train.json without render.json): "
                        "render into a new folder; clevrgen adds only to its own renders")
    if before != manifest:
        raise DataError(f"--out {out} holds images of another render (another seed, scene settings or renderer "
                        "version): render into a new folder, or give the same --seed to add to it")
    old = read_json(listed, hint=": render into a new folder")
    clash = next((n for n in spec if n in old and old[n] != spec[n]), None)
    if clash is not None:
        raise DataError(f"--out {out} lists {clash} with other objects ({', '.join(old[clash])}): give the new "
                        "images other names, or render into a new folder")
    if not pngs and set(old) - set(spec):
        raise DataError(f"--out {out} already lists {len(set(old) - set(spec)):,} images this render does not: "
                        "--format cache cannot add to a dataset (its images are not kept as files); use --format both")
    return {**old, **spec}


@contextlib.contextmanager
def _kept_on_failure(out: Path | None):
    """A write the disk refused ends in one line that says what is kept (the PNGs of ``out``)."""
    try:
        yield
    except WriteError as exc:
        if out is None:
            raise
        raise WriteError(f"{exc}; the images written so far are kept: make room, then run the same command again "
                         "to go on", exc.path, exc.errno, exc.needed) from None
