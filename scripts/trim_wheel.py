"""Write a smaller diffusers wheel that holds only what clevrgen uses on the GPU machine.

What travels to the GPU machine is capped at 64 MiB (docs/gpu.md); diffusers is 6.4 MB of the
9.2 MB of wheels, and over half of it is pipelines clevrgen never imports. The trimmed wheel keeps
every file of ``import diffusers``, UNet2DModel, the schedulers, ``training_utils.EMAModel`` and
ModelMixin / ConfigMixin loading and saving, byte for byte (no source is edited), and drops whole
subpackages that none of these import: the pipelines (but the three files ``diffusers.pipelines``
itself needs), modular pipelines, controlnets, guiders, the CLI and so on (see ``DROP``).

A file is dropped only at subpackage level: diffusers imports every model family eagerly
(``models/unets/unet_2d_blocks.py`` imports ``models.transformers``, whose ``__init__`` imports all
transformers), so the transformer and autoencoder families stay; dropping them would mean
editing diffusers' source.

    python scripts/trim_wheel.py .whl/diffusers-0.42.1-py3-none-any.whl          # in place
    python scripts/trim_wheel.py WHEEL --out DIR --check                          # + verify

``--check`` installs the trimmed wheel with pip into a temporary ``--target`` folder and runs, in
a fresh process with that folder first on the path, what clevrgen does with diffusers (tiny
model, save and load, 2 steps of each sampler, EMAModel), asserting that the trimmed copy is the
one imported and that a dropped subpackage cannot be.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Folders (ending in "/") and files dropped from the wheel, relative to the package's parent.
DROP = (
    "diffusers/pipelines/",
    "diffusers/modular_pipelines/",
    "diffusers/commands/",
    "diffusers/experimental/",
    "diffusers/guiders/",
    "diffusers/callbacks.py",
    "diffusers/models/controlnets/",
    "diffusers/models/condition_embedders/",
    "diffusers/models/latent_upscaler/",
    "diffusers/schedulers/deprecated/",
)
# Exceptions inside dropped folders: ``import diffusers`` and ModelMixin import these.
KEEP = (
    "diffusers/pipelines/__init__.py",
    "diffusers/pipelines/pipeline_utils.py",
    "diffusers/pipelines/pipeline_loading_utils.py",
)
MARKER = "TRIMMED"  # a file in the dist-info saying what was dropped


class TrimError(Exception):
    """A wheel this script cannot trim: said in one line."""


@dataclass
class Trimmed:
    path: Path
    kept: list[str]
    dropped: list[str]
    size_before: int
    size_after: int


def is_kept(name: str, drop: tuple[str, ...] = DROP, keep: tuple[str, ...] = KEEP) -> bool:
    """Whether the wheel member ``name`` stays."""
    if name in keep:
        return True
    return not any(name.startswith(d) if d.endswith("/") else name == d for d in drop)


def record_hash(data: bytes) -> str:
    """The ``sha256=...`` digest of a RECORD row (urlsafe base64, no padding)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _dist_info(names: list[str]) -> str:
    infos = sorted({n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")})
    if len(infos) != 1 or f"{infos[0]}/RECORD" not in names:
        raise TrimError("not a wheel: it needs exactly one *.dist-info folder with a RECORD")
    return infos[0]


def _entry_points(text: str, kept: set[str]) -> str:
    """entry_points.txt without the entries whose module was dropped (``diffusers-cli``), nor
    the sections left empty; "" when nothing is left."""
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.strip().startswith("["):
            sections.append((line.strip(), []))
        elif "=" in line and sections:
            module = line.split("=", 1)[1].split(":")[0].strip().replace(".", "/")
            if f"{module}.py" in kept or f"{module}/__init__.py" in kept:
                sections[-1][1].append(line)
    return "".join(f"{head}\n" + "".join(f"{e}\n" for e in entries) + "\n" for head, entries in sections if entries)


def trim_wheel(src: Path, out_dir: Path, drop: tuple[str, ...] = DROP, keep: tuple[str, ...] = KEEP) -> Trimmed:
    """Write ``out_dir / src.name`` without the dropped members; RECORD is rewritten from the
    kept bytes. ``out_dir`` may be ``src``'s own folder: the file is replaced atomically."""
    src, out_dir = Path(src), Path(out_dir)
    size_before = src.stat().st_size if src.is_file() else 0
    try:
        zin = zipfile.ZipFile(src)
    except (OSError, zipfile.BadZipFile) as exc:
        raise TrimError(f"cannot read {src}: {exc}") from None
    with zin:
        infos = [i for i in zin.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        info_dir = _dist_info(names)
        record, marker = f"{info_dir}/RECORD", f"{info_dir}/{MARKER}"
        kept_infos = [i for i in infos if i.filename not in (record, marker) and is_kept(i.filename, drop, keep)]
        dropped = sorted(n for n in names if n not in (record, marker) and not is_kept(n, drop, keep))
        kept_names = {i.filename for i in kept_infos}
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / src.name
        tmp = out_dir / f".{src.name}.tmp"
        rows = []
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
                for info in kept_infos:
                    data = zin.read(info)
                    if info.filename == f"{info_dir}/entry_points.txt":
                        text = _entry_points(data.decode(), kept_names)
                        if not text:
                            continue
                        data = text.encode()
                    zout.writestr(_copy_info(info), data)
                    rows.append((info.filename, record_hash(data), str(len(data))))
                # Only the rules, so that trimming a trimmed wheel again gives the same wheel.
                note = (f"Trimmed by clevrgen's scripts/trim_wheel.py for the GPU machine.\n"
                        f"Dropped: {', '.join(drop)}\nKept anyway: {', '.join(keep)}\n")
                zout.writestr(_copy_info(zin.getinfo(record), marker), note.encode())
                rows.append((marker, record_hash(note.encode()), str(len(note.encode()))))
                rows.append((record, "", ""))
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(rows)
                zout.writestr(_copy_info(zin.getinfo(record)), buf.getvalue().encode())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return Trimmed(dest, [r[0] for r in rows], dropped, size_before, dest.stat().st_size)


def _copy_info(info: zipfile.ZipInfo, name: str | None = None) -> zipfile.ZipInfo:
    new = zipfile.ZipInfo(name or info.filename, date_time=info.date_time)
    new.external_attr = info.external_attr
    new.compress_type = zipfile.ZIP_DEFLATED
    return new


def workload() -> None:
    """What clevrgen does with diffusers, at toy size on the CPU (run by ``--check`` in a process
    whose path starts with the trimmed install, named by $TRIM_TARGET)."""
    import importlib.util

    import torch

    torch.set_num_threads(1)
    import diffusers

    target = Path(os.environ["TRIM_TARGET"]).resolve()
    where = Path(diffusers.__file__).resolve()
    assert target in where.parents, f"diffusers came from {where}, not the trimmed install in {target}"
    assert importlib.util.find_spec("diffusers.pipelines.stable_diffusion") is None, "a dropped subpackage imports"
    from diffusers.training_utils import EMAModel

    from clevrgen.artifact import load_artifact, save_artifact
    from clevrgen.config import load_config
    from clevrgen.diffusion import SCHEDULER_CLASSES, sampling_scheduler
    from clevrgen.model import build_model
    from clevrgen.pipeline import ClevrgenPipeline

    cfg = load_config(None, ["model.block_out_channels=[8, 16, 16]", "model.layers_per_block=1",
                             "model.attention=[false, false, true]", "model.norm_num_groups=4",
                             "model.attention_head_dim=4", "model.image_size=16", "diffusion.num_train_timesteps=50"])
    model = build_model(cfg.model)
    ema = EMAModel(model.parameters(), decay=0.99)
    ema.step(model.parameters())
    ema.copy_to(model.parameters())
    labels = torch.zeros(2, 24)
    labels[0, 3] = labels[1, 7] = 1
    with tempfile.TemporaryDirectory() as tmp:
        save_artifact(model, cfg, Path(tmp) / "run")
        back, back_cfg = load_artifact(Path(tmp) / "run")
    for sampler in SCHEDULER_CLASSES:
        pipe = ClevrgenPipeline.from_denoiser(back, sampling_scheduler(back_cfg.diffusion, sampler))
        pipe.set_progress_bar_config(disable=True)
        x = pipe(labels=labels, seed=[0, 1], num_inference_steps=2, guidance_scale=2.0, output_type="latent").images
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all(), sampler
    loaded = sorted(m for m in sys.modules if m.startswith("diffusers"))
    print(f"ok: diffusers {diffusers.__version__} from {where.parent}; build, save/load, "
          f"{'/'.join(SCHEDULER_CLASSES)} 2 steps each, EMAModel; {len(loaded)} diffusers modules loaded")


def install(wheel: Path, target: Path) -> None:
    """``pip install --no-index --no-deps --target``, as the GPU machine's command does."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--target", str(target), str(wheel)], capture_output=True, text=True)
    if done.returncode != 0:
        raise TrimError(f"pip could not install {wheel.name}: {(done.stderr or done.stdout).strip()}")


def check(wheel: Path) -> str:
    """Install ``wheel`` into a temporary folder and run :func:`workload` from it; its last line."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "site"
        install(wheel, target)
        env = dict(os.environ, TRIM_TARGET=str(target), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join([str(target), str(ROOT / "src")]))
        done = subprocess.run([sys.executable, __file__, "--workload"], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise TrimError(f"the trimmed wheel fails clevrgen's workload:\n{done.stdout}{done.stderr}")
        return done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, nargs="?", help="a diffusers wheel, e.g. .whl/diffusers-0.42.1-py3-none-any.whl")
    parser.add_argument("--out", type=Path, help="folder for the trimmed wheel (same file name); default: in place")
    parser.add_argument("--check", action="store_true", help="install the result and run clevrgen's workload on it")
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workload:
        workload()
        return 0
    if args.wheel is None:
        parser.error("the wheel to trim is required")
    try:
        if not args.wheel.is_file():
            raise TrimError(f"no such wheel: {args.wheel}")
        result = trim_wheel(args.wheel, args.out or args.wheel.parent)
        print(f"{result.path}: {result.size_before:,} -> {result.size_after:,} bytes; kept {len(result.kept)} files, "
              f"dropped {len(result.dropped)}")
        if args.check:
            print(check(result.path))
    except TrimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
