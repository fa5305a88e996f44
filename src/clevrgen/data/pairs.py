"""i-CLEVR's sequences as editing pairs: ``CLEVR_train_N_k.png`` -> ``CLEVR_train_N_{k+1}.png``.

Every scene of the dataset is a sequence on one table, camera and light, each image the previous
one with one object more; a pair is (source, target) of two neighbours, and the target's label
set is the source's plus the new object. Pairs never cross the scene split (``split_scenes``
holds out whole scenes), so held-out pairs come from scenes the editor never saw.
"""

from __future__ import annotations

import torch

from clevrgen.data.iclevr import ImageSet, to_float

def edit_pairs(data: ImageSet) -> torch.Tensor:
    """[M, 2] int64 (source index, target index) of every k -> k + 1 pair in ``data`` whose
    target holds exactly the source's objects and one more (a pair that breaks that rule, e.g.
    in a hand-made dataset, is left out). Names that are not ``<scene>_<k>.png`` make no pair."""
    from clevrgen.data.iclevr import scene_key

    where = {name: i for i, name in enumerate(data.names)}
    pairs = []
    for i, name in enumerate(data.names):
        scene = scene_key(name)
        if scene == name:
            continue
        step = int(name[len(scene) + 1:].removesuffix(".png"))
        j = where.get(f"{scene}_{step + 1}.png")
        if j is None:
            continue
        added = data.labels[j] - data.labels[i]
        if bool((added >= 0).all()) and int(added.sum()) == 1:
            pairs.append((i, j))
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)


def draw_edit_batch(images: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor, batch_size: int,
                    gen: torch.Generator, label_dropout: float, source_dropout: float, joint_dropout: float,
                    hflip: bool = False, extra: torch.Tensor | None = None,
                    extra_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random batch of pairs on the device: (targets, their labels, sources), images in
    [-1, 1]. The first ``extra_rows`` rows come from the ``extra`` pairs (another dataset's, e.g.
    rendered 3 -> 4 and 4 -> 5 pairs), the rest from ``pairs``. One draw u per row decides what it
    drops (InstructPix2Pix's conditioning dropout): u < label_dropout the label alone, then
    joint_dropout both, then source_dropout the source alone; a dropped label is the empty one, a
    dropped source the empty (zero) image."""
    device = images.device
    index = torch.randint(len(pairs), (batch_size,), generator=gen, device=device)
    rows = pairs[index]
    if extra is not None and extra_rows:
        pick = torch.randint(len(extra), (extra_rows,), generator=gen, device=device)
        rows = torch.cat([extra[pick], rows[extra_rows:]])
    source_index, target_index = rows.unbind(1)
    x0, source = to_float(images[target_index]), to_float(images[source_index])
    if hflip:  # the same flip for both images of a pair
        flip = (torch.rand(batch_size, generator=gen, device=device) < 0.5)[:, None, None, None]
        x0, source = torch.where(flip, x0.flip(-1), x0), torch.where(flip, source.flip(-1), source)
    u = torch.rand(batch_size, generator=gen, device=device)
    keep_label = u >= label_dropout + joint_dropout
    keep_source = (u < label_dropout) | (u >= label_dropout + joint_dropout + source_dropout)
    return x0, labels[target_index] * keep_label[:, None], source * keep_source[:, None, None, None]
