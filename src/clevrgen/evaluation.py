"""Generate every label set of a split, score the images with a judge, and write what was made."""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import torch

from clevrgen.artifact import UNET_DIR, WEIGHTS_FILE, describe_model
from clevrgen.labels import PHRASES, asset_path, load_label_sets, multi_hot, normalize_phrase
from clevrgen.loaded import LoadedModel
from clevrgen.claims import PASSES_DIR
from clevrgen.output import atomic_path, atomic_write_bytes, atomic_write_text, strict_json


def write_image_folder(out: Path, images: torch.Tensor, scenes: list[list[str]]) -> None:
    """One PNG per image with ``train.json`` / ``objects.json``: the i-CLEVR layout, so the
    folder can be scored again by ``clevrgen evaluator score``."""
    from torchvision.utils import save_image

    names = [f"image_{i:04d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        with atomic_path(out / "iclevr" / name) as tmp:
            save_image(image.float() / 255, tmp, format="png")
    spec = {name: [normalize_phrase(p) for p in scene] for name, scene in zip(names, scenes)}
    atomic_write_text(out / "train.json", json.dumps(spec, indent=1))
    for stale in set((out / "iclevr").glob("image_*.png")) - {out / "iclevr" / n for n in names}:
        stale.unlink()  # a larger earlier evaluation's: the folder holds what train.json lists
    atomic_write_text(out / "objects.json", asset_path("objects.json").read_text())


def save_grid(images: torch.Tensor, path: Path, per_row: int = 8) -> None:
    """uint8 images [N, 3, H, W] as one PNG grid (torchvision's ``make_grid`` layout, padding 2)."""
    write_grid(path, [images], len(images), per_row)


def write_grid(path: Path, batches, count: int, per_row: int = 8, padding: int = 2) -> None:
    """A PNG grid of ``count`` uint8 images that arrive in ``batches`` (each a multiple of
    ``per_row``, but the last), written band by band as they come: the memory is one batch,
    not the grid (``sample -n 100000`` would need some 20 GB at once). The pixels are those of
    torchvision's ``save_image(make_grid(...))``."""
    import struct
    import zlib

    import numpy as np

    def chunk(f, kind: bytes, data: bytes) -> None:
        f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))

    columns, rows = min(per_row, count), -(-count // per_row)
    padding = 0 if count == 1 else padding  # make_grid returns a lone image unpadded
    done = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        header = None
        packer = zlib.compressobj(6)
        for batch in batches:
            n, _, h, w = batch.shape
            if header is None:
                header = (h + padding, w + padding)
                width = columns * header[1] + padding
                chunk(f, b"IHDR", struct.pack(">IIBBBBB", width, rows * header[0] + padding, 8, 2, 0, 0, 0))
                top = np.zeros((padding, width * 3 + 1), np.uint8)
                chunk(f, b"IDAT", packer.compress(top.tobytes()))
            band_rows = -(-n // per_row)
            band = np.zeros((band_rows * header[0], width, 3), np.uint8)
            cells = batch.permute(0, 2, 3, 1).cpu().numpy()
            for i in range(n):
                y, x = (i // per_row) * header[0], (i % per_row) * header[1] + padding
                band[y:y + h, x:x + w] = cells[i]
            lines = np.concatenate([np.zeros((len(band), 1), np.uint8), band.reshape(len(band), -1)], axis=1)
            chunk(f, b"IDAT", packer.compress(lines.tobytes()))  # filter 0 on every line
            done += n
        if done != count:
            raise ValueError(f"write_grid: {done} images arrived, {count} were announced")
        chunk(f, b"IDAT", packer.flush())
        chunk(f, b"IEND", b"")


def pass_key(model: LoadedModel, scenes: list[list[str]]) -> str:
    """What a pass's images depend on: the weights, the sampling settings and the label sets."""
    import hashlib

    weights = Path(model.run_dir) / UNET_DIR / WEIGHTS_FILE
    stat = weights.stat() if weights.exists() else None
    facts = [str(Path(model.run_dir).resolve()), stat and (stat.st_size, stat.st_mtime_ns),
             model.config.sample.model_dump(exclude={"seed", "num", "batch_size", "device"}), scenes]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:16]


def save_pass(out: Path, base: int, key: str, images: torch.Tensor) -> None:
    """Keep a finished pass's images until the whole evaluation is done, so a stopped run resumes."""
    from safetensors.torch import save

    atomic_write_bytes(out / PASSES_DIR / f"seed-{base}.safetensors",
                       save({"images": images.contiguous()}, metadata={"key": key}))


def load_pass(out: Path, base: int, key: str) -> torch.Tensor | None:
    """The images of a pass an earlier run of the same evaluation finished, if any."""
    from safetensors import safe_open

    path = out / PASSES_DIR / f"seed-{base}.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("images") if (f.metadata() or {}).get("key") == key else None
    except Exception:  # absent, or cut short: draw it again
        return None


def pass_seeds(base: int, passes: int, n: int) -> list[int]:
    """The base seed of each of ``passes`` passes over ``n`` label sets: image i of pass k uses
    seed ``base + k * stride + i``, so no two images share a seed."""
    stride = max(1000, n)
    return [base + k * stride for k in range(passes)]


def score_split(model: LoadedModel, split: str, out: Path, evaluator: Path | None = None,
                   progress: bool = True, seeds: int = 1) -> dict:
    """Draw each label set of ``split`` once per pass (``seeds`` passes; image i of the first uses
    sample.seed + i), score every pass, write the first pass's images and the results. With
    several passes the accuracies are their mean, with the spread beside them."""
    import statistics

    import diffusers

    import clevrgen
    from clevrgen.judge import judge_probs, load_judge, score_predictions

    scenes = load_label_sets(split)
    judge = load_judge(evaluator, model.device)
    s = model.config.sample
    labels = multi_hot(scenes)
    passes, first = [], None  # first: the first pass's (images, scores), which are written out
    key = pass_key(model, scenes)
    start = time.perf_counter()
    for k, base in enumerate(pass_seeds(s.seed, seeds, len(scenes))):
        what = f"sampling {Path(split).stem}" + (f" (seed {k + 1} of {seeds})" if seeds > 1 else "")
        images = load_pass(out, base, key)  # a pass finished by an earlier, stopped run
        if images is None:
            images = model.generate(scenes, [base + i for i in range(len(scenes))], progress, what)
            save_pass(out, base, key, images)
        scores = score_predictions(judge_probs(judge, images), labels)
        passes.append({"seed": base, "topk_accuracy": scores["topk_accuracy"],
                       "exact_accuracy": scores["exact_accuracy"]})
        if first is None:
            first = images, scores
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images, scores = first

    def spread(key: str) -> dict:
        values = [p[key] for p in passes]
        return {key: statistics.fmean(values), f"{key}_std": statistics.pstdev(values),
                f"{key}_min": min(values), f"{key}_max": max(values)}

    out.mkdir(parents=True, exist_ok=True)
    save_grid(images, out / "grid.png")
    write_image_folder(out, images, scenes)
    result = {
        "split": split,
        "n_images": len(scenes),
        **spread("topk_accuracy"),
        **spread("exact_accuracy"),
        "seeds": len(passes),
        "passes": passes,
        "seconds": seconds,
        "sampler": s.sampler,
        "steps": s.steps,
        "guidance": s.guidance,
        "seed": s.seed,
        "checkpoint": str(model.run_dir),
        "evaluator": str(evaluator) if evaluator else "shipped",
        "device": str(model.device),
        "model": describe_model(model.run_dir),
        "per_class_recall": dict(zip(PHRASES, scores["per_class_recall"])),  # of the first pass
        "versions": {"clevrgen": clevrgen.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "python": platform.python_version()},
        "config": model.config.model_dump(mode="json"),
    }
    atomic_write_text(out / "results.json", strict_json(result, indent=2))
    shutil.rmtree(out / PASSES_DIR, ignore_errors=True)  # finished: results.json holds every pass
    return result
