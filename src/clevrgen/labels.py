"""The 24-class vocabulary: phrase parsing and float multi-hot label tensors [B, 24]."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from clevrgen.errors import DataError, PhraseError
from clevrgen.inputs import input_file, read_json

if TYPE_CHECKING:
    import torch

COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SHAPES = ("cube", "sphere", "cylinder")
NUM_CLASSES = len(COLORS) * len(SHAPES)
# The official order (objects.json): shape-major, colors in the order above.
PHRASES = tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)
CLASS_INDEX = {phrase: i for i, phrase in enumerate(PHRASES)}
OFFICIAL_SPLITS = ("test", "new_test")
# Label sets beyond train.json, made by scripts/make_splits.py (docs/generalization.md).
GENERALIZATION_SPLITS = ("unseen_triples", "four_objects", "five_objects")
SPLITS = OFFICIAL_SPLITS + GENERALIZATION_SPLITS


def asset_path(name: str) -> Path:
    """Path of a file shipped in ``clevrgen/assets``."""
    return Path(str(resources.files("clevrgen") / "assets" / name))


def normalize_phrase(text: str) -> str:
    """'  Red_ SPHERE ' -> 'red sphere'."""
    return " ".join(re.split(r"[\s_]+", str(text).strip().lower()))


# Words people use for our colors and shapes; anything else falls back to the closest spelling.
SYNONYMS = {
    "grey": "gray", "silver": "gray", "black": "gray", "white": "gray",
    "pink": "purple", "violet": "purple", "magenta": "purple", "lilac": "purple",
    "orange": "brown", "tan": "brown", "teal": "cyan", "turquoise": "cyan", "aqua": "cyan",
    "navy": "blue", "lime": "green", "gold": "yellow",
    "ball": "sphere", "spheres": "sphere", "box": "cube", "block": "cube", "cubes": "cube",
    "cylinders": "cylinder", "can": "cylinder", "tube": "cylinder",
}


CLOSE = 0.6
"""How alike (difflib's ratio) a word must be to a valid one to be suggested."""


def _closest(word: str, choices: tuple[str, ...]) -> str | None:
    if word in SYNONYMS and SYNONYMS[word] in choices:
        return SYNONYMS[word]
    best = max(choices, key=lambda c: (difflib.SequenceMatcher(None, word, c).ratio(), c[:1] == word[:1]))
    return best if difflib.SequenceMatcher(None, word, best).ratio() >= CLOSE else None


def suggest(phrase: str) -> str | None:
    """The valid phrase close to ``phrase`` (its color and shape words matched one by one), or
    None when nothing is close: a suggestion that cannot help is worse than none."""
    words = phrase.split()
    if len(words) == 2:
        color, shape = _closest(words[0], COLORS), _closest(words[1], SHAPES)
        return f"{color} {shape}" if color and shape else None
    close = difflib.get_close_matches(phrase, PHRASES, n=1, cutoff=0.75)
    return close[0] if close else None


def parse_phrase(text: str) -> int:
    """The class index of one phrase; an unknown phrase names the closest valid one."""
    phrase = normalize_phrase(text)
    if phrase in CLASS_INDEX:
        return CLASS_INDEX[phrase]
    if not phrase:
        raise PhraseError(f'empty phrase {text!r}: a phrase is "<color> <shape>", e.g. "red sphere".')
    close = suggest(phrase)
    hint = f' Did you mean "{close}"?' if close else ""
    raise PhraseError(
        f'unknown phrase "{text}".{hint} A phrase is "<color> <shape>" with color one of '
        f"{', '.join(COLORS)} and shape one of {', '.join(SHAPES)}."
    )


def parse_phrases(texts: Sequence[str]) -> list[int]:
    """Class indices of one scene's phrases: non-empty, each valid, no duplicates."""
    if len(texts) == 0:
        raise PhraseError("no phrases given: name at least one object, e.g. \"red sphere\".")
    indices = [parse_phrase(t) for t in texts]
    seen: set[int] = set()
    for text, index in zip(texts, indices):
        if index in seen:
            raise PhraseError(f'duplicate phrase "{text}": each object may be named once.')
        seen.add(index)
    return indices


def multi_hot(scenes: Iterable[Sequence[str]]) -> "torch.Tensor":
    """Phrase lists -> float multi-hot tensor [B, 24]."""
    import torch

    rows = [parse_phrases(scene) for scene in scenes]
    labels = torch.zeros(len(rows), NUM_CLASSES)
    for i, indices in enumerate(rows):
        labels[i, indices] = 1.0
    return labels


def phrases_of(labels: "torch.Tensor") -> list[list[str]]:
    """Multi-hot tensor [B, 24] -> phrase lists (in class order)."""
    return [[PHRASES[int(i)] for i in row.nonzero().flatten()] for row in labels]


@lru_cache(maxsize=None)
def shipped_split(name: str) -> tuple[tuple[str, ...], ...]:
    """The phrase lists of a split shipped with clevrgen (one of :data:`SPLITS`)."""
    return tuple(tuple(scene) for scene in read_json(asset_path(f"{name}.json")))


def load_label_sets(split: str) -> list[list[str]]:
    """A shipped split (one of :data:`SPLITS`) or a path to a JSON list of phrase lists; validated."""
    if split in SPLITS:
        scenes = [list(s) for s in shipped_split(split)]
    else:
        path = input_file(split)
        if not path.is_file():
            raise DataError(
                f"no such split or file: {split} (use one of {', '.join(SPLITS)}, or a JSON file "
                "holding a list of phrase lists)"
            )
        scenes = read_json(path)
        if not isinstance(scenes, list) or not all(
            isinstance(s, list) and all(isinstance(p, str) for p in s) for s in scenes
        ):
            raise DataError(f"{path}: expected a JSON list of phrase lists")
        if not scenes:
            raise DataError(f"{path}: the list of label sets is empty")
    for i, scene in enumerate(scenes):
        try:
            parse_phrases(scene)
        except PhraseError as exc:
            raise PhraseError(f"{split}, label set {i}: {exc}") from None
    return scenes
