"""The i-CLEVR layout reader, its uint8 cache, and the whole-scene validation split.

A dataset folder holds ``train.json`` (image name -> phrases), ``objects.json`` (phrase ->
index) and ``iclevr/*.png``. Images of any size and mode are squashed to 64x64 RGB and decoded
once: the first use writes a safetensors cache (uint8 images, multi-hot labels, scene ids) that
later runs load in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clevrgen.errors import DataError
from clevrgen.labels import CLASS_INDEX, NUM_CLASSES, normalize_phrase
from clevrgen.runtime import user_cache_dir
from clevrgen import inputs
from clevrgen.inputs import input_file
from clevrgen.output import atomic_path

IMAGE_SIZE = 64
CACHE_VERSION = 1
_SEQUENCE = re.compile(r"^(?P<scene>.+)_(?P<step>\d+)\.png$")


@dataclass
class ImageSet:
    """Images as uint8 [N, 3, H, W], float multi-hot labels [N, 24], int64 scene ids [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    scenes: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        index = index.nonzero().flatten() if index.dtype == torch.bool else index
        return ImageSet(
            self.images[index], self.labels[index], self.scenes[index],
            [self.names[i] for i in index.tolist()],
        )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, size, size]: area averaging down, bilinear up."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch.nn.functional as F

    mode = "area" if size < images.shape[-1] else "bilinear"
    out = F.interpolate(images.float(), size=(size, size), mode=mode,
                        align_corners=False if mode == "bilinear" else None)
    return out.round().clamp(0, 255).to(torch.uint8)


def scene_key(name: str) -> str:
    """``CLEVR_train_000123_2.png`` -> ``CLEVR_train_000123``; any other name is its own scene."""
    match = _SEQUENCE.match(name)
    return match["scene"] if match else name


def scene_ids(names: list[str]) -> torch.Tensor:
    keys: dict[str, int] = {}
    return torch.tensor([keys.setdefault(scene_key(n), len(keys)) for n in names], dtype=torch.int64)


def read_json(path: Path) -> object:
    if not input_file(path).is_file():
        raise DataError(f"missing file: {path}")
    return inputs.read_json(path)


def read_spec(root: Path) -> dict[str, list[str]]:
    """``train.json`` of a dataset folder, checked against the 24-class vocabulary."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise DataError(f"dataset folder {what}: {root} (expected train.json, objects.json, iclevr/*.png)")
    absent = [n for n in ("train.json", "objects.json", "iclevr/") if not (root / n).exists()]
    if absent and absent != ["iclevr/"]:  # images alone may live in the cache (see load_iclevr)
        raise DataError(f"{root} is not an i-CLEVR dataset folder: {', '.join(absent)} missing "
                        "(expected train.json, objects.json, iclevr/*.png)")
    objects = read_json(root / "objects.json")
    if not isinstance(objects, dict) or {normalize_phrase(k): v for k, v in objects.items()} != CLASS_INDEX:
        raise DataError(f"{root / 'objects.json'}: does not hold the 24 i-CLEVR classes in their official order")
    spec = read_json(root / "train.json")
    if not isinstance(spec, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in spec.values()
    ):
        raise DataError(f"{root / 'train.json'}: expected an object mapping image names to phrase lists")
    if not spec:
        raise DataError(f"{root / 'train.json'}: lists no images")
    for name, phrases in spec.items():
        unknown = [p for p in phrases if normalize_phrase(p) not in CLASS_INDEX]
        if unknown or not phrases:
            what = f"unknown label {unknown[0]!r}" if unknown else "no labels"
            raise DataError(f"{root / 'train.json'}: {name}: {what} (not in objects.json)")
    return spec


def decode_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image file -> uint8 [3, size, size] RGB (squashed, alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    input_file(path)
    try:
        with Image.open(path) as image:
            image = _to_rgb(image)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"missing image: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"corrupt or unreadable image: {path} ({exc})") from None
    return array.transpose(2, 0, 1)


def _to_rgb(image):
    """Any PIL mode -> RGB. 16-bit and float grayscale are scaled to 8 bits (PIL's own convert
    clips them to white); palettes are expanded; alpha is dropped."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0.0)
        if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
            scale = 255 / 65535
        elif image.mode == "F" and peak <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def labels_tensor(phrase_lists: list[list[str]]) -> torch.Tensor:
    labels = torch.zeros(len(phrase_lists), NUM_CLASSES)
    for i, phrases in enumerate(phrase_lists):
        labels[i, [CLASS_INDEX[normalize_phrase(p)] for p in phrases]] = 1.0
    return labels


def decode_folder(root: Path, spec: dict[str, list[str]], progress: bool = True) -> ImageSet:
    names = list(spec)
    images = np.empty((len(names), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)

    def work(i: int) -> None:
        images[i] = decode_image(root / "iclevr" / names[i])

    from clevrgen.progress import track

    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in track(pool.map(work, range(len(names))), total=len(names),
                       description="decoding images", enabled=progress):
            pass
    return ImageSet(torch.from_numpy(images), labels_tensor([spec[n] for n in names]), scene_ids(names), names)


def save_cache(path: Path, data: ImageSet, fingerprint: str) -> None:
    from safetensors.torch import save_file

    meta = {"version": str(CACHE_VERSION), "fingerprint": fingerprint, "names": json.dumps(data.names)}
    tensors = {"images": data.images.contiguous(), "labels": data.labels.contiguous(),
               "scenes": data.scenes.contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_cache(path: Path, fingerprint: str | None = None) -> ImageSet | None:
    """The cached set, or None when the file is absent, stale or unreadable (it is rebuilt)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != str(CACHE_VERSION):
                return None
            if fingerprint is not None and meta.get("fingerprint") != fingerprint:
                return None
            tensors = {k: f.get_tensor(k) for k in ("images", "labels", "scenes")}
            names = json.loads(meta["names"])
    except Exception:  # a truncated or foreign file is just a stale cache
        return None
    return ImageSet(tensors["images"], tensors["labels"], tensors["scenes"], names)


def fingerprint_of(root: Path) -> str:
    digest = hashlib.sha256()
    for name in ("train.json", "objects.json"):
        digest.update((root / name).read_bytes())
    digest.update(f"{IMAGE_SIZE}".encode())
    return digest.hexdigest()[:16]


def cache_path(root: Path, cache_dir: Path | None = None) -> Path:
    """``cache_dir`` (default: the user cache folder) / a name keyed by the folder and its files.

    The cache never goes inside the dataset folder, which may be shared or read-only.
    """
    resolved = root.resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return (cache_dir or user_cache_dir()) / f"{resolved.name}-{key}-{fingerprint_of(root)}.safetensors"


def load_iclevr(root: Path | str, cache_dir: Path | None = None, progress: bool = True) -> ImageSet:
    """The whole dataset folder as an :class:`ImageSet`, through the cache."""
    root = Path(root)
    spec = read_spec(root)
    fingerprint = fingerprint_of(root)
    path = cache_path(root, cache_dir)
    data = load_cache(path, fingerprint)
    if data is None:
        # a folder written as a cache only (`clevrgen data render --format cache`) has no iclevr/
        if not (root / "iclevr").is_dir():
            raise DataError(f"{root} is not an i-CLEVR dataset folder: iclevr/ missing "
                            "(expected train.json, objects.json, iclevr/*.png)")
        data = decode_folder(root, spec, progress=progress)
        try:
            save_cache(path, data, fingerprint)
        except Exception:  # a cache we cannot write costs time, not correctness
            pass
    return data


def split_scenes(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, validation): whole scenes held out, chosen by ``seed``."""
    unique = torch.unique(data.scenes)
    n_val = int(round(len(unique) * fraction))
    if fraction > 0 and n_val == 0 and len(unique) > 1:
        n_val = 1
    order = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))]
    held = torch.isin(data.scenes, order[:n_val])
    return data.subset(~held), data.subset(held)
