"""What the one-call GPU scripts (gpu_train.py, gpu_headline.py) share: the machine's description,
the toy-size overrides that let them run end to end on a CPU, and the report writers.

The device machine returns at most 8 files of at most 16 MiB from $OUT (docs/gpu.md), so a run
folder travels back as one tar cut into parts of 15 MiB: ``cat run.tar.* | tar x``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import sys
import tarfile
import time
from pathlib import Path

import torch

from clevrgen.output import atomic_write_text

PART_BYTES = 15 * 2**20

# A UNet small enough to train and sample in seconds on one CPU core (tests/conftest.py's TINY).
TOY = [
    "model.block_out_channels=[8, 16, 16]",
    "model.layers_per_block=1",
    "model.attention=[false, false, true]",
    "model.norm_num_groups=4",
    "model.attention_head_dim=4",
    "train.batch_size=4",
    "train.warmup_steps=0",
    "train.precision='fp32'",
    "train.compile=false",
    "train.channels_last=false",
    "train.device='cpu'",
    "sample.device='cpu'",
    "sample.steps=2",
    "sample.batch_size=64",
    "data.val_fraction=0.25",
]


def script_parser(doc: str, out_name: str) -> argparse.ArgumentParser:
    """The arguments every one-call GPU script takes: the data, the config and its overrides, the
    report folder; each script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(".carry/iclevr.npz"), help="a packed .npz or an i-CLEVR folder")
    p.add_argument("--config", type=Path, default=Path("configs/gpu.toml"))
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help=f"report folder (default: $OUT, else out/{out_name})")
    return p


def default_out() -> Path:
    """$OUT on the device machine (what comes back), else out/<script>."""
    return Path(os.environ.get("OUT") or Path("out") / Path(sys.argv[0]).stem)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict:
    import diffusers

    import clevrgen

    info = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "clevrgen": clevrgen.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    return info


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def bundle(folder: Path, out: Path, name: str = "run.tar") -> list[str]:
    """``folder`` as an uncompressed tar in ``out``, cut into parts of at most 15 MiB
    (``name.00``, ``name.01``, ...); returns the part names."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    data = buffer.getvalue()
    parts = []
    for k, start in enumerate(range(0, len(data), PART_BYTES)):
        part = out / f"{name}.{k:02d}"
        part.write_bytes(data[start:start + PART_BYTES])
        parts.append(part.name)
    return parts


def write_reports(out: Path, stem: str, report: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown)


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine_md(info: dict, command: str, toy: bool) -> str:
    where = (f"{info['gpu']} ({info.get('gpu_memory_gib')} GiB, CUDA {info.get('cuda')})" if info["gpu"]
             else "CPU only (no GPU)")
    text = (f"- machine: {where}, {info['cpu_count']} CPUs, {info['platform']}\n"
            f"- versions: python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}, "
            f"clevrgen {info['clevrgen']}\n- date: {info['date']}\n- command: `{command}`\n")
    if toy or not info["gpu"]:
        text += ("\n**Toy/CPU run: these figures check that the script runs end to end; they are not GPU "
                 "measurements and say nothing about the targets.**\n")
    return text
