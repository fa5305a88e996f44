"""Pack an i-CLEVR folder into one small file that travels to the GPU machine, and unpack it.

    python benchmarks/gpu/pack_images.py [--data ../shared/iclevr] [--out .carry/iclevr.npz] [--codec avif444 --quality 88]

The GPU machine cannot see ../shared, and what travels with the working tree is capped at
64 MiB: the 18,009 images as a lossless xz'd uint8 array are ~41 MiB, too much beside the
tracked files. So each image is stored lossy (AVIF with full 4:4:4 chroma by default, or WebP)
in one ``.npz`` with the names and the dataset's train.json; ``unpack`` decodes it back to an
ImageSet. WebP always halves the chroma resolution (4:2:0), and the judge notices: at quality
95 and 100 alike its held-out top-k fell by ~0.014 (docs/gpu.md).

Packing checks what the loss costs: the shipped judge's top-k accuracy on the scenes it held out
in training (the split in its metadata, as ``clevrgen evaluator score --heldout``) on the
original and on the unpacked images. The difference must stay within ``--tolerance`` (0.002),
else the script exits non-zero: pack again with a higher quality.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from clevrgen.data.iclevr import ImageSet, labels_tensor, load_iclevr, read_spec, scene_ids, split_scenes
from clevrgen.output import atomic_path

FORMAT = "clevrgen-image-pack-1"


CODECS = ("avif444", "webp")


def encode_image(image: np.ndarray, codec: str, quality: int) -> bytes:
    """uint8 [3, H, W] -> AVIF (4:4:4 chroma) or WebP bytes (4:2:0 chroma; quality 101: lossless)."""
    from PIL import Image

    buffer = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    if codec == "avif444":
        pil.save(buffer, format="AVIF", quality=quality, subsampling="4:4:4")
    elif quality > 100:
        pil.save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    else:
        pil.save(buffer, format="WEBP", quality=quality, method=6)
    return buffer.getvalue()


def check_decoder(codec: str) -> None:
    """Fail early, in one line, where this Pillow cannot decode the packed codec."""
    from PIL import features

    feature = {"avif444": "avif", "webp": "webp"}[codec]
    if not features.check(feature):
        import PIL

        raise SystemExit(f"error: Pillow {PIL.__version__} here cannot decode {feature.upper()}: "
                         "pack with --codec webp, or carry a Pillow wheel that can")


def decode_image_bytes(blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def pack(data: ImageSet, spec: dict, out: Path, codec: str = "avif444", quality: int = 88, workers: int = 4) -> int:
    """Write ``data`` (its images compressed) and ``spec`` (train.json) into ``out``; returns its size."""
    images = data.images.numpy()
    with ThreadPoolExecutor(workers) as pool:
        blobs = list(pool.map(lambda i: encode_image(images[i], codec, quality), range(len(images))))
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    meta = {"format": FORMAT, "codec": codec, "quality": quality, "names": data.names, "spec": {n: spec[n] for n in data.names}}
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, blobs=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
                 meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return out.stat().st_size


def unpack(path: Path | str, workers: int = 16) -> ImageSet:
    """The ImageSet of a packed file: uint8 images [N, 3, 64, 64], multi-hot labels, scene ids."""
    with np.load(path, allow_pickle=False) as f:
        packed, offsets, meta = f["blobs"], f["offsets"], json.loads(f["meta"].tobytes())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    check_decoder(meta["codec"])
    names = meta["names"]
    blobs = [packed[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(names))]
    with ThreadPoolExecutor(workers) as pool:
        images = np.stack(list(pool.map(decode_image_bytes, blobs)))
    return ImageSet(torch.from_numpy(images), labels_tensor([meta["spec"][n] for n in names]), scene_ids(names), names)


def load_images(path: Path | str, progress: bool = False) -> ImageSet:
    """A packed ``.npz`` or an i-CLEVR folder, as an ImageSet (what the GPU scripts read)."""
    path = Path(path)
    return unpack(path) if path.is_file() else load_iclevr(path, progress=progress)


def heldout_topk(data: ImageSet, device: str = "cpu") -> tuple[float, int]:
    """The shipped judge's top-k accuracy on the scenes it held out in training, and their count."""
    from clevrgen.judge import judge_probs, load_judge, read_metadata, score_predictions
    from clevrgen.labels import asset_path

    split = json.loads(read_metadata(asset_path("judge.safetensors")).get("split", "null")) or \
        {"val_fraction": 0.05, "split_seed": 0}
    held = split_scenes(data, split["val_fraction"], split["split_seed"])[1]
    judge = load_judge(None, device)
    with torch.no_grad():
        scores = score_predictions(judge_probs(judge, held.images), held.labels)
    return scores["topk_accuracy"], len(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/iclevr"))
    parser.add_argument("--out", type=Path, default=Path(".carry/iclevr.npz"))
    parser.add_argument("--codec", choices=CODECS, default="avif444")
    parser.add_argument("--quality", type=int, default=88, help="1-100 (WebP: 101 for lossless)")
    parser.add_argument("--tolerance", type=float, default=0.002)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    if not (args.data / "train.json").is_file():
        sys.exit(f"error: {args.data} is not an i-CLEVR folder (no train.json)")

    data = load_iclevr(args.data, progress=False)
    start = time.perf_counter()
    check_decoder(args.codec)
    size = pack(data, read_spec(args.data), args.out, args.codec, args.quality, args.workers)
    packed = time.perf_counter() - start
    start = time.perf_counter()
    back = unpack(args.out, args.workers)
    unpacked = time.perf_counter() - start
    assert back.names == data.names and torch.equal(back.labels, data.labels)
    diff = (back.images.float() - data.images.float()).abs()
    original, n = heldout_topk(data)
    restored, _ = heldout_topk(back)
    delta = restored - original
    print(json.dumps({
        "out": str(args.out), "images": len(data), "codec": args.codec, "quality": args.quality, "bytes": size,
        "mib": round(size / 2**20, 2), "pack_seconds": round(packed, 1), "unpack_seconds": round(unpacked, 1),
        "mean_abs_pixel_error": round(diff.mean().item(), 3), "max_abs_pixel_error": int(diff.max().item()),
        "heldout_images": n, "heldout_topk_original": round(original, 4), "heldout_topk_unpacked": round(restored, 4),
        "difference": round(delta, 4), "tolerance": args.tolerance,
    }))
    if abs(delta) > args.tolerance:
        sys.exit(f"error: the judge's held-out top-k moved by {delta:+.4f} (> {args.tolerance}); "
                 f"pack again with a higher --quality")


if __name__ == "__main__":
    main()
