"""Write the generalization splits shipped in ``src/clevrgen/assets`` (see docs/generalization.md).

    python scripts/make_splits.py [--train src/clevrgen/assets/train.json] [--seed 17] [--out src/clevrgen/assets]

- ``unseen_triples.json``: every 3-object label set (3 distinct classes of the 24) that no image
  of train.json shows, in class order.
- ``four_objects.json`` / ``five_objects.json``: 64 distinct label sets of 4 / 5 distinct
  classes each, drawn uniformly with ``random.Random(f"{name}:{seed}")`` (string seeds hash the
  same on every Python 3), redrawing a set already drawn.

Each label set lists its phrases in class order (objects.json). The output depends only on
train.json and ``--seed``: running the script again gives the same bytes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

from clevrgen.labels import NUM_CLASSES, PHRASES, asset_path, parse_phrases

SEED = 17
DRAWN = {"four_objects": 4, "five_objects": 5}
PER_SPLIT = 64


def seen_label_sets(train: dict[str, list[str]]) -> set[frozenset[int]]:
    return {frozenset(parse_phrases(phrases)) for phrases in train.values()}


def unseen_triples(seen: set[frozenset[int]]) -> list[list[str]]:
    return [[PHRASES[c] for c in combo] for combo in itertools.combinations(range(NUM_CLASSES), 3)
            if frozenset(combo) not in seen]


def drawn_sets(name: str, objects: int, count: int, seed: int) -> list[list[str]]:
    rng = random.Random(f"{name}:{seed}")
    drawn: list[tuple[int, ...]] = []
    while len(drawn) < count:
        combo = tuple(sorted(rng.sample(range(NUM_CLASSES), objects)))
        if combo not in drawn:
            drawn.append(combo)
    return [[PHRASES[c] for c in combo] for combo in drawn]


def make_splits(train: dict[str, list[str]], seed: int = SEED) -> dict[str, list[list[str]]]:
    splits = {"unseen_triples": unseen_triples(seen_label_sets(train))}
    for name, objects in DRAWN.items():
        splits[name] = drawn_sets(name, objects, PER_SPLIT, seed)
    return splits


def dumps(scenes: list[list[str]]) -> str:
    """One label set per line: diffs of a split stay readable."""
    return "[\n" + ",\n".join(json.dumps(s) for s in scenes) + "\n]\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=asset_path("train.json"))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=asset_path(""))
    args = parser.parse_args()
    if not args.train.is_file():
        sys.exit(f"error: no such file: {args.train}")
    train = json.loads(args.train.read_text())
    seen = seen_label_sets(train)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, scenes in make_splits(train, args.seed).items():
        path = args.out / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(dumps(scenes))
        tmp.replace(path)
        triples = [frozenset(t) for s in scenes for t in itertools.combinations(parse_phrases(s), 3)]
        unseen = sum(t not in seen for t in triples)
        print(f"{path}: {len(scenes)} label sets of {len(scenes[0])} objects; "
              f"{unseen} of their {len(triples)} 3-object subsets never occur in {args.train.name}")


if __name__ == "__main__":
    main()
