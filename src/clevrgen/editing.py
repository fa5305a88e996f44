"""Adding an object to a scene with an editor, and measuring how well it does.

An editor (a model with ``model.source_image``) draws a source scene with one object more; this
module holds what the ``edit`` command and ``evaluate --task edit`` share: reading a scene from a
file, the objects a scene already has, drawing edits, and the edit metrics (the target set's
top-k and exact-set accuracy, GeNeVA's F1 at threshold 0.5, how many of the source's objects are
still recognised, and PSNR / SSIM to the source) on i-CLEVR's held-out pairs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from clevrgen.data.iclevr import IMAGE_SIZE, ImageSet
from clevrgen.errors import DataError, UsageError, warn
from clevrgen.labels import PHRASES

MAX_OBJECTS = 5
"""The most objects a scene may hold after an edit (the renderer's and the vocabulary's limit)."""


def resolve_editor(checkpoint: Path | str | None) -> Path:
    """The editor a command uses: the shipped one when none is given, else the folder given."""
    from clevrgen.artifact import SHIPPED_EDITOR, resolve_checkpoint
    from clevrgen.errors import CheckpointError
    from clevrgen.filenames import CONFIG_FILE

    if checkpoint is None:
        if not (SHIPPED_EDITOR / CONFIG_FILE).is_file():
            raise CheckpointError("this install has no shipped editor: train one (clevrgen train --config edit) "
                                  "and pass --checkpoint RUN")
        return SHIPPED_EDITOR
    return resolve_checkpoint(checkpoint)


# --- a scene from a file ---------------------------------------------------------------------
def read_scene(path: Path) -> torch.Tensor:
    """A scene image file as uint8 [3, 64, 64] (:func:`scene_tensor`'s conversions, each with a
    note); a missing file or one that is not an image is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    from clevrgen.inputs import input_file

    input_file(path)
    if not Path(path).is_file():
        raise DataError(f"scene image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return scene_tensor(image, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image ({exc})") from None


def scene_tensor(image, name: str) -> torch.Tensor:
    """A PIL image as the editor's source, uint8 [3, 64, 64]: RGBA, grey or palette images are
    converted and another size is resized, each with a note naming ``name``."""
    import numpy as np
    from PIL import Image

    if image.mode != "RGB":
        warn(f"{name}: a {image.mode} image, converted to RGB" + (" (alpha dropped)" if "A" in image.mode else ""))
        image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        warn(f"{name}: {image.size[0]}x{image.size[1]}, resized to {IMAGE_SIZE}x{IMAGE_SIZE} (the editor's size; "
             "i-CLEVR's 320x240 renders are squashed as in training)")
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class SceneObjects:
    """The objects a source scene holds, and whether the judge read them (not the user)."""

    phrases: list[str]
    read_by_judge: bool


def scene_objects(image: torch.Tensor, has: Sequence[str] | None, judge=None) -> SceneObjects:
    """The source's objects: ``has`` when the user gives them, else the judge's reading of the
    image (every class it scores above 0.5). The judge only reads the source: it never chooses
    among drawn images."""
    from clevrgen.labels import parse_phrases

    if has:
        return SceneObjects([PHRASES[i] for i in parse_phrases(list(has))], read_by_judge=False)
    from clevrgen.judge import judge_probs, load_judge

    probs = judge_probs(judge or load_judge(None), image[None])[0]
    phrases = [PHRASES[i] for i in (probs > 0.5).nonzero().flatten().tolist()]
    if not phrases:
        raise UsageError("the judge reads no object in the scene: name its objects with --has "
                         "(e.g. --has \"cyan cube\" --has \"gray sphere\")")
    return SceneObjects(phrases, read_by_judge=True)


def check_addition(present: Sequence[str], added: str) -> list[str]:
    """The scene after adding ``added`` to ``present`` (phrases), or a UsageError: i-CLEVR scenes
    hold each object once, and at most five."""
    from clevrgen.labels import parse_phrase

    present = [PHRASES[parse_phrase(p)] for p in present]
    added = PHRASES[parse_phrase(added)]
    if added in present:
        raise UsageError(f"the scene already has a {added}: i-CLEVR scenes hold each object once; add another")
    if len(present) >= MAX_OBJECTS:
        raise UsageError(f"the scene already has {len(present)} objects ({', '.join(present)}): "
                         f"an edit adds up to {MAX_OBJECTS} in all")
    return [*present, added]


# --- drawing edits -------------------------------------------------------------------------
def draw_edits(pipe, sources: torch.Tensor, labels: torch.Tensor, seeds: Sequence[int], steps: int,
               guidance: float, image_guidance: float, batch_size: int, progress: bool = True,
               description: str = "editing", on_step: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """uint8 [N, 3, 64, 64]: source i (uint8 [N, 3, 64, 64]) drawn with the objects of
    ``labels[i]`` from seed ``seeds[i]``, with a rich progress bar (and :class:`StepProgress`'
    ``on_step`` and ``should_stop``)."""
    from clevrgen.callbacks import StepProgress

    with StepProgress(len(seeds) * steps, description, enabled=progress, on_step=on_step,
                      should_stop=should_stop) as bar:
        return pipe(labels=labels, image=sources, seed=list(seeds), num_inference_steps=steps, guidance_scale=guidance,
                    image_guidance_scale=image_guidance, output_type="uint8", callback_on_step_end=bar,
                    batch_size=batch_size).images


# --- metrics ---------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images [N, 3, H, W] (identical images: infinity)."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of uint8 images [N, 3, H, W]: Wang et al. 2004 with an 11-pixel Gaussian
    window (sigma 1.5) per channel, averaged over channels and the valid positions."""
    import torch.nn.functional as F

    x, y = a.double(), b.double()
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(z):
        return F.conv2d(z, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return value.flatten(1).mean(1).float()


def f1_scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image F1 of the classes scored above ``threshold`` against the true set (GeNeVA's
    samples-averaged F1 takes their mean); an image with no prediction scores 0."""
    predicted, true = probs > threshold, labels.bool()
    hits = (predicted & true).sum(1).float()
    precision = hits / predicted.sum(1).clamp(min=1)
    recall = hits / true.sum(1).clamp(min=1)
    return torch.where(hits > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(hits))


def score_edits(probs: torch.Tensor, labels: torch.Tensor, source_labels: torch.Tensor) -> dict:
    """The judge's reading of edited images against their target sets: top-k and exact-set
    accuracy, mean F1 at 0.5, and the share of the sources' objects still recognised (above 0.5)."""
    from clevrgen.judge import exact_accuracy, topk_accuracy

    kept = ((probs > 0.5) & source_labels.bool()).sum().item() / max(1, int(source_labels.sum().item()))
    return {"topk_accuracy": topk_accuracy(probs, labels), "exact_accuracy": exact_accuracy(probs, labels),
            "f1": f1_scores(probs, labels).mean().item(), "source_kept": kept}


# --- the held-out pairs -------------------------------------------------------------------------
def held_out_pairs(data: ImageSet, val_fraction: float, split_seed: int) -> tuple[ImageSet, torch.Tensor]:
    """The editor's test set: the held-out scenes of the generator's split (``split_scenes`` with
    the model's data settings) and their k -> k + 1 pairs [M, 2] (indices into that set)."""
    from clevrgen.data.iclevr import split_scenes
    from clevrgen.data.pairs import edit_pairs

    _, held = split_scenes(data, val_fraction, split_seed)
    pairs = edit_pairs(held)
    if not len(pairs):
        raise UsageError("the dataset's held-out scenes hold no k -> k+1 pairs: give a dataset of i-CLEVR sequences")
    return held, pairs


def scene_sequences(held: ImageSet) -> list[list[int]]:
    """Each held-out scene's images in order (``_0``, ``_1``, ...), for the iterative form; a
    scene whose sequence has a gap is left out."""
    from clevrgen.data.iclevr import scene_key

    order: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(held.names):
        key = scene_key(name)
        if key != name:
            order.setdefault(key, []).append((int(name[len(key) + 1:].removesuffix(".png")), i))
    return [[i for _, i in sorted(steps)] for steps in order.values()
            if [k for k, _ in sorted(steps)] == list(range(len(steps)))]


def evaluate_edits(pipe, sample, data: ImageSet, val_fraction: float, split_seed: int, passes: int = 1,
                   limit: int | None = None, iterative: bool = True, judge=None, progress: bool = True,
                   beyond: bool = False) -> dict:
    """Edit every held-out pair's source into its target set (``passes`` passes, image i of pass
    k from seed ``sample.seed + k * stride + i``) and score the edits; with ``iterative``, also
    build each held-out scene from its real first image by editing, scoring F1 at every step;
    with ``beyond``, add a fourth and a fifth object to the held-out 3-object scenes (:func:`beyond_three`).
    Returns the figures (means over passes, with their spread) and the first pass's images."""
    from clevrgen.evaluation import pass_seeds
    from clevrgen.judge import judge_probs, load_judge

    judge = judge or load_judge(None)
    held, pairs = held_out_pairs(data, val_fraction, split_seed)
    pairs = pairs[:limit] if limit else pairs
    sources, targets = held.images[pairs[:, 0]], held.images[pairs[:, 1]]
    source_labels, labels = held.labels[pairs[:, 0]], held.labels[pairs[:, 1]]
    s = sample
    start = time.perf_counter()
    runs, first = [], None
    for k, base in enumerate(pass_seeds(s.seed, passes, len(pairs))):
        what = "editing held-out pairs" + (f" (pass {k + 1} of {passes})" if passes > 1 else "")
        edited = draw_edits(pipe, sources, labels, [base + i for i in range(len(pairs))], s.steps, s.guidance,
                            s.image_guidance, s.batch_size, progress, what)
        scores = score_edits(judge_probs(judge, edited), labels, source_labels)
        scores.update(psnr=psnr(edited, sources).mean().item(), ssim=ssim(edited, sources).mean().item(), seed=base)
        runs.append(scores)
        first = first if first is not None else edited
    result = {"pairs": len(pairs), "passes": runs, "seconds": time.perf_counter() - start}
    for key in ("topk_accuracy", "exact_accuracy", "f1", "source_kept", "psnr", "ssim"):
        values = [r[key] for r in runs]
        result[key] = statistics.fmean(values)
        result[f"{key}_std"] = statistics.pstdev(values)
    real = score_edits(judge_probs(judge, targets), labels, source_labels)
    result["real_pairs"] = {**real, "psnr": psnr(targets, sources).mean().item(),
                            "ssim": ssim(targets, sources).mean().item()}
    if iterative:
        result["iterative"] = iterative_f1(pipe, s, held, judge, limit, progress)
    if beyond:
        result["beyond"] = beyond_three(pipe, s, held, judge, limit, progress)
    return {**result, "images": (sources[:32], first[:32], targets[:32])}


def iterative_f1(pipe, sample, held: ImageSet, judge, limit: int | None = None, progress: bool = True) -> dict:
    """From each held-out scene's real first image, add the scene's next objects one edit at a
    time (each edit from the previous edit), and score F1 at every step (step 0: the real image)."""
    from clevrgen.judge import judge_probs

    scenes = [steps for steps in scene_sequences(held) if len(steps) >= 3]
    scenes = scenes[:limit] if limit else scenes
    if not scenes:
        return {}
    current = held.images[[steps[0] for steps in scenes]]
    f1 = [f1_scores(judge_probs(judge, current), held.labels[[steps[0] for steps in scenes]]).mean().item()]
    for k in range(1, 3):
        labels = held.labels[[steps[k] for steps in scenes]]
        seeds = [sample.seed + 100_000 * k + i for i in range(len(scenes))]
        current = draw_edits(pipe, current, labels, seeds, sample.steps, sample.guidance, sample.image_guidance,
                             sample.batch_size, progress, f"building scenes, object {k + 1}")
        f1.append(f1_scores(judge_probs(judge, current), labels).mean().item())
    return {"scenes": len(scenes), "f1_by_step": f1}


def beyond_three(pipe, sample, held: ImageSet, judge, limit: int | None = None, progress: bool = True) -> dict:
    """From each held-out real 3-object image, add a fourth object and then a fifth (each edit from
    the one before), scored as the pairs are. The real data stops at three objects, so there is no
    real image to compare with. The objects added are drawn at random among those not yet in the
    scene, from a fixed seed, so every model and every pass adds the same ones."""
    from clevrgen.judge import judge_probs

    three = (held.labels.sum(dim=1) == 3).nonzero().flatten()
    three = three[:limit] if limit else three
    if not len(three):
        return {}
    chooser = torch.Generator().manual_seed(0)
    current, labels = held.images[three], held.labels[three]
    result = {"scenes": len(three)}
    for k, name in ((4, "fourth"), (5, "fifth")):
        source, source_labels, labels = current, labels, labels.clone()
        labels[torch.arange(len(labels)), torch.multinomial(1 - labels, 1, generator=chooser).flatten()] = 1
        seeds = [sample.seed + 100_000 * k + i for i in range(len(three))]
        current = draw_edits(pipe, source, labels, seeds, sample.steps, sample.guidance, sample.image_guidance,
                             sample.batch_size, progress, f"adding a {name} object")
        result[name] = {**score_edits(judge_probs(judge, current), labels, source_labels),
                        "psnr": psnr(current, source).mean().item(), "ssim": ssim(current, source).mean().item()}
    return result


def pair_grid(sources: torch.Tensor, edited: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """uint8 images in rows of three (source, edit, real next image), for ``save_grid(.., per_row=6)``."""
    return torch.stack([sources, edited, targets], dim=1).flatten(0, 1)


def evaluate_edit_task(loaded, data_path: Path | None, out: Path, passes: int = 1, limit: int | None = None,
                       iterative: bool = True, progress: bool = True, beyond: bool = False) -> dict:
    """``clevrgen evaluate --task edit``: score the editor of ``loaded`` (a model with its config)
    on the held-out pairs of ``data_path`` (default: the dataset it was trained on), and write
    ``grid.png`` (rows of source, edit, real next image) and ``results.json`` into ``out``."""
    from clevrgen.data import load_dataset
    from clevrgen.evaluation import save_grid
    from clevrgen.artifact import describe_model
    from clevrgen.output import atomic_write_text, strict_json

    cfg = loaded.config
    if not loaded.pipe.is_editor:
        raise UsageError(f"{loaded.run_dir} is a generator: --task edit scores an editor (a model trained with "
                         "model.source_image = true, e.g. --config edit)")
    data_cfg = cfg.data.model_copy(update={"path": data_path} if data_path is not None else {})
    data = load_dataset(data_cfg, progress=progress)
    result = evaluate_edits(loaded.pipe, cfg.sample, data, data_cfg.val_fraction, data_cfg.split_seed, passes, limit,
                            iterative, progress=progress, beyond=beyond)
    sources, edited, targets = result.pop("images")
    out.mkdir(parents=True, exist_ok=True)
    save_grid(pair_grid(sources, edited, targets), out / "grid.png", per_row=6)
    s = cfg.sample
    result.update(task="edit", data=str(data_cfg.path or "the embedded renderer's scenes"), steps=s.steps, guidance=s.guidance,
                  image_guidance=s.image_guidance, sampler=s.sampler, seed=s.seed, checkpoint=str(loaded.run_dir),
                  model=describe_model(loaded.run_dir))
    atomic_write_text(out / "results.json", strict_json(result, indent=2))
    return result
