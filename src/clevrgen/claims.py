"""What an output may replace: the one rule every command follows, checked before any work.

A command that writes a folder claims it first (:func:`claim_folder`): a new or empty folder, or
its own earlier output of the same kind (:func:`folder_kind`; an unfinished one, :func:`unfinished_kind`,
is its rerun's), and nothing else. A command that writes a file claims it (:func:`claim_file`): a
new or empty file, or one of its own kind, read from its first bytes (:func:`file_kind`). Both
first check that the path can be written at all (:func:`check_writable`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from clevrgen.errors import ClevrgenError, UsageError, warn
from clevrgen.filenames import (CONFIG_FILE, DATA_FILE, LABEL_ENCODER_DIR, LABEL_PROJ_FILE, LOCK_FILE, METRICS_FILE,
                                MODEL_INDEX, PASSES_DIR, SCHEDULER_DIR, SNAPSHOTS_DIR, STATE_FILE, STUB_MODULE,
                                TENSORBOARD_DIR, UNET_DIR)
from clevrgen.integrity import ASSETS
from clevrgen.output import output_file

NAME_MAX = 255
"""The longest file or folder name (in bytes) that Linux, macOS and Windows file systems take."""


def check_writable(path: Path | str, folder: bool = False) -> None:
    """Fail early, before any work, when ``path`` (a file, or with ``folder`` a folder) cannot be
    written: a folder where a file should go, a file where a folder should go, no permission."""
    path = Path(path)
    if problem := name_too_long(path):
        raise UsageError(f"cannot write {path}: {problem}")
    # a file output's own dangling link is followed (its target is written); nothing passes a broken folder
    if link := broken_link(path if folder else path.parent):
        raise ClevrgenError(f"cannot write {path}: {describe_broken_link(link)}")
    if problem := inside_the_install(path):
        raise UsageError(f"cannot write {path}: {problem}")
    if not folder:
        path = output_file(path)
    if path.is_dir() and not folder:
        raise ClevrgenError(f"cannot write {path}: it is a folder, not a file; give a file name")
    if path.exists() and not path.is_dir() and folder:
        raise ClevrgenError(f"cannot write into {path}: it is a file, not a folder")
    parent = path if folder else path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ClevrgenError(f"cannot write {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or _is_virtual(existing):
        raise ClevrgenError(f"cannot write {path}: {existing} is not writable")


def name_too_long(path: Path | str) -> str | None:
    """Why the OS would refuse ``path`` for a name over :data:`NAME_MAX` bytes, or None: the one
    check of a name's length, for outputs (before any work) and inputs (the CLI's last net)."""
    long = next((part for part in Path(path).parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is None:
        return None
    return f"the name {long[:40]}... is {len(os.fsencode(long))} bytes long; file systems allow {NAME_MAX} per name"


def inside_the_install(path: Path) -> str | None:
    """Why ``path`` may not be written because it is (or lies in) the install's shipped assets, or
    None: the shipped model, editor and judge are checked against SHA256SUMS, so an output there
    would leave every later command saying the install is damaged."""
    try:
        inside = path.resolve().is_relative_to(ASSETS)
    except (OSError, RuntimeError):  # a link loop: check_writable's broken_link names it
        return None
    if not inside:
        return None
    return (f"it lies inside this clevrgen install's shipped assets ({ASSETS}), which no command replaces: "
            "write somewhere else")


def read_part(folder: Path, source: Path | None) -> Path | None:
    """What of the model folder ``source`` a command reads that ``folder`` is or lies in: the
    folder itself, or its snapshots (``export --ema-sigma-rel`` reads them again later); None
    for anything else (``RUN/posthoc/``, where the post-hoc sweep writes, is free)."""
    if source is None:
        return None
    source, target = Path(source).resolve(), folder.resolve()
    if target == source:
        return source
    return next((part for part in (source / SNAPSHOTS_DIR,) if target.is_relative_to(part)), None)


def broken_link(path: Path) -> Path | None:
    """``path`` or the first of its parents that is a symbolic link leading nowhere (to a missing
    target, or round a loop): nothing can be written through it."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            return p
    return None


def describe_broken_link(link: Path) -> str:
    try:
        os.stat(link)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{link} is a symbolic link that loops back on itself: remove it or point it at a folder"
    return f"{link} is a symbolic link to {os.readlink(link)}, which does not exist: create it or remove the link"


def _is_virtual(folder: Path) -> bool:
    """/proc and /sys accept no new folders, even from root (whom os.access always allows)."""
    resolved = folder.resolve()
    return resolved.parts[:2] in (("/", "proc"), ("/", "sys"))


# --- what an output folder may overwrite -------------------------------------------------------
FOLDER_KINDS = {
    "run": "a training run",
    "model": "a clevrgen model (an export, a snapshot or a pipeline)",
    "evaluation": "an evaluation",
    "dataset": "a dataset",
    "judge": "a judge's training folder",
}
OWN_OUTPUT = {"run": "a run it started without a checkpoint", "model": "an earlier export",
              "evaluation": "an earlier evaluation", "dataset": "an earlier render of the same settings",
              "judge": "an earlier judge's folder"}
# Files clevrgen leaves in any folder it writes, which say nothing about what the folder is.
_INCIDENTAL = {LOCK_FILE, ".DS_Store"}


def _names(folder: Path) -> set[str]:
    """The names in ``folder`` that say what it is: not the lock, not a writer's temporaries."""
    names = {p.name for p in folder.iterdir()} - _INCIDENTAL
    return {n for n in names if not (n.startswith(".") and n.endswith(".tmp"))}


def folder_kind(folder: Path) -> str | None:
    """What clevrgen output ``folder`` holds, by the files that make it one: ``run``, ``model``,
    ``evaluation``, ``dataset`` or ``judge``; None for an empty folder; ``other`` for anything else."""
    names = _names(folder)
    if not names:
        return None
    weights = any(n.endswith(".safetensors") for n in names)
    if STATE_FILE in names:
        return "run"
    if unfinished := unfinished_kind(folder, names):
        return unfinished
    if {METRICS_FILE, CONFIG_FILE} <= names and not weights:
        return "run"
    if "results.json" in names or PASSES_DIR in names:  # done, or stopped part way
        return "evaluation"
    if CONFIG_FILE in names and ({UNET_DIR, MODEL_INDEX} & names):
        return "model"
    if "train.json" in names or "iclevr" in names:
        return "dataset"
    if CONFIG_FILE in names and weights:
        return "judge"
    return "other"


# --- the rerun rule: a command's own unfinished output is its own ------------------------------
# What each writer leaves before its output is whole, so that its rerun (and nothing else) may
# take the folder over: an export or save_pretrained stopped before config.toml and
# model_index.json (written last); a training run or a judge's training stopped before its first
# checkpoint (a disk full, a non-finite loss, a signal), which leaves only its bookkeeping.
_MODEL_PARTS = {UNET_DIR, LABEL_ENCODER_DIR, SCHEDULER_DIR, CONFIG_FILE, DATA_FILE, MODEL_INDEX, f"{STUB_MODULE}.py",
                LABEL_PROJ_FILE}
_BOOKKEEPING = {CONFIG_FILE, METRICS_FILE, DATA_FILE, "loss.png", "samples", TENSORBOARD_DIR}
UNFINISHED = {"model": "an unfinished export (stopped before its config.toml and model_index.json)",
              "run": "a training run stopped before its first checkpoint",
              "judge": "a judge's training stopped before it saved a judge"}


def unfinished_kind(folder: Path, names: set[str] | None = None) -> str | None:
    """The kind of a command's own output in ``folder`` that stopped before it was whole, or None:
    ``model``, ``run`` (its folder holds training's lock file) or ``judge``."""
    if names is None:
        names = _names(folder)
    parts = {n[1:].removesuffix(".old") if n.startswith(".") and n.endswith(".old") else n for n in names}
    if parts & {UNET_DIR, LABEL_ENCODER_DIR, SCHEDULER_DIR} and parts <= _MODEL_PARTS and CONFIG_FILE not in parts:
        return "model"
    if CONFIG_FILE in names and names <= _BOOKKEEPING and _written_by_clevrgen(folder / CONFIG_FILE):
        return "run" if (folder / LOCK_FILE).exists() else "judge"
    return None


def _written_by_clevrgen(config: Path) -> bool:
    """A config.toml clevrgen resolved and wrote (every section), not one a user wrote by hand."""
    try:
        lines = set(config.read_text().splitlines())
    except (OSError, UnicodeDecodeError):
        return False
    return {"[data]", "[model]", "[diffusion]", "[train]", "[sample]", "[evaluate]", "[judge]"} <= lines


def describe_folder(folder: Path) -> str:
    """What is in ``folder``, in words, for a refusal."""
    kind = folder_kind(folder)
    if (unfinished := unfinished_kind(folder)) is not None and unfinished == kind:
        return UNFINISHED[kind]
    if kind in FOLDER_KINDS:
        detail = {"run": STATE_FILE, "model": f"{CONFIG_FILE}, {UNET_DIR}/", "evaluation": "results.json",
                  "dataset": "train.json, iclevr/", "judge": f"{CONFIG_FILE}, *.safetensors"}[kind]
        return f"{FOLDER_KINDS[kind]} ({detail})"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in _INCIDENTAL)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"other files ({shown})"


def claim_folder(folder: Path | str, kind: str, option: str = "--out", source: Path | None = None) -> None:
    """The one rule for an output folder: a new or empty folder, or this command's own earlier
    output of the same ``kind``, may be written; anything else (a dataset, a training run, an
    export, an evaluation, a folder of other files) is refused in one line saying what is there,
    before any work. Nor may it be the ``source`` folder the command reads, or lie in the part of
    it read again later (:func:`read_part`)."""
    folder = Path(folder)
    check_writable(folder, folder=True)
    if (part := read_part(folder, source)) is not None:
        where = "is the run itself" if part == Path(source).resolve() else f"lies inside {part}"
        raise UsageError(f"{option} {folder} {where}, which this command reads: choose another {option}")
    if not folder.is_dir():
        return
    found = folder_kind(folder)
    if found is not None and found == kind and unfinished_kind(folder) == kind:
        warn(f"{folder} holds {UNFINISHED[kind]}: this is its rerun, which starts it over")
    if found is None or found == kind:
        return
    raise UsageError(f"{option} {folder} already holds {describe_folder(folder)}; this command writes only into a "
                     f"new or empty folder or {OWN_OUTPUT[kind]}: choose another {option}")


# --- what an output file may overwrite ---------------------------------------------------------
# A file output replaces only a file of its own kind, read from the file's first bytes (its name
# may lie: `-o RUN/state.pt`): an image over an image, never a checkpoint, weights or a config.
FILE_KINDS = {
    "image": "an image",
    "weights": "safetensors weights",
    "course_judge": "a course-format judge (.pth)",
    "torch": "a torch checkpoint",
    "text": "a text file (a config, JSON or notes)",
    "other": "a file of another kind",
}
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def file_kind(path: Path) -> str | None:
    """What the existing file ``path`` holds, by its first bytes: ``image``, ``weights``
    (safetensors), ``course_judge`` (a torch file holding only ``model``), ``torch``, ``text`` or
    ``other``; None for an empty file (nothing to lose)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return None
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 << 20:
        return "weights"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        import torch

        try:
            keys = set(torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK")))
        except Exception:
            return "torch"
        return "course_judge" if keys == {"model"} else "torch"
    try:
        head.decode()
    except UnicodeDecodeError:
        return "other"
    return "text"


def claim_file(path: Path | str, kind: str, option: str = "--out") -> None:
    """The one rule for an output file, beside :func:`claim_folder`'s for folders: a new or empty
    file, or a file of this command's own ``kind`` (an image over an image), may be replaced;
    a checkpoint, weights, a config or a dataset's JSON never is. Checked before any work."""
    check_writable(path)
    target = output_file(path)
    if not target.is_file():
        return
    found = file_kind(target)
    if found is None or found == kind:
        return
    raise UsageError(f"{option} {path} already holds {FILE_KINDS[found]}; this command replaces only "
                     f"{FILE_KINDS[kind]}: choose another {option}")
