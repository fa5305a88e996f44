"""Where predictions go wrong: each image's errors by kind, and totals by number of objects.

Inputs are judge probabilities ``[N, 24]`` and true multi-hot labels ``[N, 24]``. Each image's
errors are read off a *predicted set* P against its true set T, under one of two rules:

- ``topk``: the k highest outputs, k = the number of true objects (the course's top-k metric;
  ties as in :func:`clevrgen.judge.topk_predictions`). P has as many objects as T.
- ``threshold``: the outputs above ``threshold`` (0.5: the set exact-set accuracy compares). P may
  have more or fewer objects than T.

With missed = T - P and spurious = P - T, a spurious object *substitutes* for a missed one when it
has the same shape (a **wrong colour**) or the same colour (a **wrong shape**). Substitutes are
paired one to one by a maximum matching (augmenting paths, missed objects and candidates taken in
class order), so that as many errors as possible are explained as substitutions. What is left:

- **missing**: a true object not predicted, with no same-colour or same-shape substitute;
- **extra**: a predicted object that is not true and substitutes for nothing.

Under ``topk`` every unpaired missed object leaves its slot to an unpaired spurious one, so
missing == extra there; an image is correct under ``topk`` when it has no error (all its true
objects in its top k), and under ``threshold`` exactly when it counts for exact-set accuracy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from clevrgen.labels import COLORS, PHRASES

Rule = Literal["topk", "threshold"]
RULES: tuple[Rule, ...] = ("topk", "threshold")
KINDS = ("missing", "extra", "wrong_colour", "wrong_shape")
THRESHOLD = 0.5


def colour_of(c: int) -> int:
    return c % len(COLORS)  # PHRASES is shape-major


def shape_of(c: int) -> int:
    return c // len(COLORS)


@dataclass
class ImageErrors:
    """One image's errors, as phrases; substitutions are (true, predicted) pairs."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    wrong_colour: list[tuple[str, str]] = field(default_factory=list)
    wrong_shape: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.wrong_colour or self.wrong_shape)

    def counts(self) -> dict[str, int]:
        return {kind: len(getattr(self, kind)) for kind in KINDS}


def _substitutes(missed: list[int], spurious: list[int]) -> dict[int, int]:
    """A maximum one-to-one pairing missed -> spurious of objects sharing a colour or a shape."""
    owner: dict[int, int] = {}  # spurious -> missed

    def related(t: int, p: int) -> bool:
        return colour_of(t) == colour_of(p) or shape_of(t) == shape_of(p)

    def augment(t: int, visited: set[int]) -> bool:
        for p in spurious:
            if p in visited or not related(t, p):
                continue
            visited.add(p)
            if p not in owner or augment(owner[p], visited):
                owner[p] = t
                return True
        return False

    for t in missed:
        augment(t, set())
    return {t: p for p, t in owner.items()}


def image_errors(predicted: set[int], true: set[int]) -> ImageErrors:
    """The errors of one image whose predicted classes are ``predicted`` and true ones ``true``."""
    missed, spurious = sorted(true - predicted), sorted(predicted - true)
    pairs = _substitutes(missed, spurious)
    errors = ImageErrors()
    for t in missed:
        if t not in pairs:
            errors.missing.append(PHRASES[t])
            continue
        p = pairs[t]
        kind = errors.wrong_colour if shape_of(t) == shape_of(p) else errors.wrong_shape
        kind.append((PHRASES[t], PHRASES[p]))
    paired = set(pairs.values())
    errors.extra = [PHRASES[p] for p in spurious if p not in paired]
    return errors


def predicted_sets(probs: torch.Tensor, labels: torch.Tensor, rule: Rule = "topk",
                   threshold: float = THRESHOLD) -> torch.Tensor:
    """Bool [N, 24]: each image's predicted set under ``rule``."""
    from clevrgen.judge import topk_predictions

    if rule == "topk":
        return topk_predictions(probs, labels)
    if rule == "threshold":
        return probs.float() > threshold
    raise ValueError(f"unknown rule {rule!r}: use one of {RULES}")


def classify_errors(probs: torch.Tensor, labels: torch.Tensor, rule: Rule = "topk",
                    threshold: float = THRESHOLD) -> list[ImageErrors]:
    """Each image's errors under ``rule``."""
    predicted = predicted_sets(probs.cpu(), labels.cpu(), rule, threshold)
    truth = labels.cpu().bool()
    return [image_errors(set(p.nonzero().flatten().tolist()), set(t.nonzero().flatten().tolist()))
            for p, t in zip(predicted, truth)]


def _summary(errors: list[ImageErrors]) -> dict[str, int]:
    totals = Counter({kind: 0 for kind in KINDS})
    for e in errors:
        totals.update(e.counts())
    return {"images_wrong": sum(not e.ok for e in errors), **{kind: totals[kind] for kind in KINDS}}


def _confusions(errors: list[ImageErrors], top: int) -> dict[str, Any]:
    pairs: Counter[tuple[str, str, str]] = Counter()
    for e in errors:
        pairs.update((t, p, "wrong_colour") for t, p in e.wrong_colour)
        pairs.update((t, p, "wrong_shape") for t, p in e.wrong_shape)
    return {
        "substitutions": [{"true": t, "predicted": p, "kind": k, "count": n}
                          for (t, p, k), n in sorted(pairs.items(), key=lambda x: (-x[1], x[0]))[:top]],
        "shape_swaps": dict(Counter(f"{t.split()[1]} -> {p.split()[1]}" for e in errors for t, p in e.wrong_shape)
                            .most_common()),
        "missing": dict(Counter(m for e in errors for m in e.missing).most_common(top)),
        "extra": dict(Counter(x for e in errors for x in e.extra).most_common(top)),
    }


def failure_breakdown(probs: torch.Tensor, labels: torch.Tensor, threshold: float = THRESHOLD,
                      top: int = 10) -> dict[str, Any]:
    """Top-k and exact-set accuracy with error counts under both rules, over all images and by
    number of true objects, and the ``top`` most common confusions of each rule."""
    from clevrgen.judge import exact_accuracy, topk_accuracy

    probs, labels = probs.float().cpu(), labels.float().cpu()
    errors = {rule: classify_errors(probs, labels, rule, threshold) for rule in RULES}

    def group(mask: torch.Tensor) -> dict[str, Any]:
        index = mask.nonzero().flatten().tolist()
        return {
            "n_images": len(index),
            "n_objects": int(labels[mask].sum()),
            "topk_accuracy": topk_accuracy(probs[mask], labels[mask]),
            "exact_accuracy": exact_accuracy(probs[mask], labels[mask]),
            **{rule: _summary([errors[rule][i] for i in index]) for rule in RULES},
        }

    k = labels.sum(1).long()
    return {
        "threshold": threshold,
        **group(torch.ones(len(labels), dtype=torch.bool)),
        "by_objects": {str(int(n)): group(k == n) for n in torch.unique(k)},
        "confusions": {rule: _confusions(errors[rule], top) for rule in RULES},
    }
