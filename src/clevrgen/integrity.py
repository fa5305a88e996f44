"""The shipped assets against their recorded checksums: a damaged or partial install says so
in one line instead of sampling with broken weights.

``assets/SHA256SUMS`` lists every shipped weight, config and split file with its SHA-256
(``sha256sum`` format); ``python scripts/asset_checksums.py`` writes it after an asset changes.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from clevrgen.errors import CheckpointError

ASSETS = Path(__file__).resolve().parent / "assets"
SUMS = ASSETS / "SHA256SUMS"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded() -> dict[str, str]:
    """Relative path -> SHA-256, as ``SHA256SUMS`` records them."""
    if not SUMS.is_file():
        raise CheckpointError(f"{SUMS} is missing: this clevrgen install is incomplete; reinstall it")
    sums = {}
    for line in SUMS.read_text().splitlines():
        if line.strip():
            digest, _, name = line.partition("  ")
            sums[name.strip()] = digest.strip()
    return sums


@lru_cache(maxsize=None)
def _verified(relative: str, stamp: tuple) -> None:
    """Every recorded file at or under ``relative`` (a path inside assets/) matches its checksum;
    cached per (path, sizes and mtimes), so a process hashes an unchanged asset once."""
    for name, digest in recorded().items():
        if relative not in (".", name) and not name.startswith(relative + "/"):
            continue
        path = ASSETS / name
        if not path.is_file():
            raise CheckpointError(f"the shipped {name} is missing: this clevrgen install is damaged; reinstall it")
        if sha256_of(path) != digest:
            raise CheckpointError(f"the shipped {name} does not match its recorded checksum: this clevrgen install "
                                  "is damaged; reinstall it")


def verify_shipped(path: Path) -> None:
    """Check a shipped file, or every shipped file under a shipped folder, against SHA256SUMS."""
    path = Path(path).resolve()
    root = ASSETS.resolve()
    if not path.is_relative_to(root):  # not an installed asset (e.g. a test's stand-in)
        return
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    stamp = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.exists()))
    _verified(path.relative_to(root).as_posix(), stamp)
