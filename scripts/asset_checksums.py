"""Write src/clevrgen/assets/SHA256SUMS: the SHA-256 of every shipped asset (weights, configs,
splits), which clevrgen checks before it uses the shipped model or judge.

    python scripts/asset_checksums.py           # after changing a shipped asset
    python scripts/asset_checksums.py --check   # exit 1 if a file differs from the list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clevrgen.integrity import ASSETS, SUMS, recorded, sha256_of  # noqa: E402


def shipped_files() -> list[Path]:
    return sorted(p for p in ASSETS.rglob("*") if p.is_file() and p != SUMS and "__pycache__" not in p.parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    sums = {p.relative_to(ASSETS).as_posix(): sha256_of(p) for p in shipped_files()}
    if args.check:
        differ = sorted(set(sums.items()) ^ set(recorded().items()))
        for name in sorted({n for n, _ in differ}):
            print(f"differs: {name}")
        sys.exit(1 if differ else 0)
    SUMS.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    print(f"wrote {SUMS} ({len(sums)} files)")


if __name__ == "__main__":
    main()
