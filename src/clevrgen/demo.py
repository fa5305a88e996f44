"""What the page of ``clevrgen demo`` does, without Gradio: pick objects, press Draw, look at the
images; or add an object to a scene (uploaded, or the last one drawn) with the editor.

:func:`page_scene` and :func:`page_settings` check what the page asks for as the CLI checks it;
:func:`draw` is ``ClevrgenPipeline``'s one call with :mod:`clevrgen.callbacks`' step callbacks (the
first image's denoising strip, ``denoise-strip``'s, and the progress); :func:`add_to_scene` is
``clevrgen edit``'s one edit; :func:`judge_readings` what the judge sees. The page itself (Gradio)
is :mod:`clevrgen.demo_page`.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clevrgen.errors import ClevrgenWarning, PhraseError, UsageError
from clevrgen.labels import PHRASES, parse_phrases

if TYPE_CHECKING:
    import torch

    from clevrgen.config import SampleConfig
    from clevrgen.loaded import LoadedModel

MAX_OBJECTS = 5
"""The page draws scenes of 1 to 5 objects: the model was trained on at most 3, and the
generalization splits (docs/generalization.md) measure it up to 5."""
STRIP_FRAMES = 10
"""Frames of the first image's denoising strip, noise first (as ``denoise-strip``'s default)."""
HOST = "127.0.0.1"
PAGE_LIMITS = {"num": 32, "steps": 250}
"""The most images and steps one press may ask for: the CLI's ranges allow far more (100,000
images), which a page left drawing after its browser has gone would spend hours on."""
# How the page names the values the CLI's messages blame on an option.
PAGE_FIELDS = {"num": "the Images field", "seed": "the Seed field", "steps": "the Steps field",
               "guidance": "the Guidance field", "image_guidance": "the Image guidance field"}


# --- what the page asks for, checked as the CLI checks it ---------------------------------------
def typed_phrases(text: str | None) -> list[str]:
    """The phrases typed in the page: separated by commas (or semicolons or new lines)."""
    return [p.strip() for p in re.split(r"[,;\n]", text or "") if p.strip()]


def page_scene(text: str | None) -> list[str]:
    """The scene typed in the page as normalized phrases; a bad, missing or repeated phrase
    raises the CLI's :class:`PhraseError`."""
    scene = [PHRASES[i] for i in parse_phrases(typed_phrases(text))]
    if len(scene) > MAX_OBJECTS:
        raise PhraseError(f"{len(scene)} objects: the demo draws scenes of 1 to {MAX_OBJECTS} objects")
    return scene


def page_settings(model: "LoadedModel", **given: float | int | None) -> "SampleConfig":
    """The run's sample settings with the page's values (None: the model's own) validated by the
    same rules and ranges as ``clevrgen sample``'s options: one message per bad value."""
    from clevrgen.config import validate_config
    from clevrgen.pipeline_inputs import check_sample_steps

    raw = model.config.model_dump(mode="json", exclude_none=True)
    given = {k: v for k, v in given.items() if v is not None}
    raw["sample"].update(given)
    config = validate_config(raw, source=str(model.run_dir), origins={f"sample.{k}": PAGE_FIELDS[k] for k in given})
    check_sample_steps(config)
    for name, most in PAGE_LIMITS.items():
        if getattr(config.sample, name) > most:
            raise UsageError(f"{PAGE_FIELDS[name]}: the page draws at most {most} {'images' if name == 'num' else 'steps'} "
                             f"at a time (clevrgen {'sample' if name == 'num' else 'sample --steps'} takes more)")
    return config.sample


@contextmanager
def said_warnings():
    """Collects the messages of clevrgen's warnings raised inside (the page shows them) into the
    list it yields."""
    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ClevrgenWarning)
        yield said
    said.extend(str(w.message) for w in caught if issubclass(w.category, ClevrgenWarning))


# --- drawing: the pipeline's one call --------------------------------------------------------------
@dataclass
class Drawing:
    """What one press of Draw made."""

    scene: list[str]
    sample: "SampleConfig"
    images: "torch.Tensor"  # uint8 [N, 3, 64, 64], image i from seed + i, as `clevrgen sample` draws it
    strip: "torch.Tensor"  # uint8 [frames, 3, 64, 64], the first image from noise to the end
    seconds: float
    warnings: list[str] = field(default_factory=list)


def draw(model: "LoadedModel", scene: Sequence[str], sample: "SampleConfig", frames: int = STRIP_FRAMES,
         on_step: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None) -> Drawing:
    """``sample.num`` images of ``scene`` and the first one's denoising strip, in one pipeline
    call. ``on_step(done, total)`` counts image-steps; when ``should_stop()`` turns true the call
    ends after the step in hand (``SamplingStopped``); a scene larger than any the model was
    trained on is drawn, and its warning returned in ``Drawing.warnings``."""
    from diffusers.callbacks import MultiPipelineCallbacks

    from clevrgen.callbacks import DenoisingStrip, StepProgress

    pipe, s = model.pipe, sample
    with said_warnings() as said:
        labels = pipe.encode_scenes([list(scene)])
    start = time.perf_counter()
    strip = DenoisingStrip(s.steps, min(frames, s.steps + 1), pipe.prepare_latents(1, seed=s.seed))
    progress = StepProgress(s.num * s.steps, enabled=False, on_step=on_step, should_stop=should_stop)
    images = pipe(labels=labels.expand(s.num, -1), seed=s.seed, num_inference_steps=s.steps,
                  guidance_scale=s.guidance, output_type="uint8", batch_size=s.batch_size,
                  callback_on_step_end=MultiPipelineCallbacks([strip, progress])).images
    return Drawing(list(scene), s, images, strip.images()[0], time.perf_counter() - start, said)


@dataclass
class Addition:
    """What one press of Add made: ``before`` (the source's objects, the user's or the judge's
    reading) and ``objects`` (after), the source and the edited image (uint8 [3, 64, 64])."""

    before: list[str]
    read_by_judge: bool
    objects: list[str]
    sample: "SampleConfig"
    source: "torch.Tensor"
    image: "torch.Tensor"
    seconds: float


def add_to_scene(editor: "LoadedModel", source: "torch.Tensor", has: Sequence[str], added: str, sample: "SampleConfig",
                 judge=None, on_step: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Addition:
    """``clevrgen edit``'s one edit: ``added`` put into ``source`` (uint8 [3, 64, 64]) whose objects
    are ``has`` (empty: the judge reads them from the image, and says so in ``read_by_judge``),
    drawn from ``sample.seed``; ``on_step(done, total)`` counts the steps."""
    from clevrgen.editing import check_addition, draw_edits, scene_objects
    from clevrgen.labels import multi_hot

    present = scene_objects(source, list(has) or None, judge)
    objects = check_addition(present.phrases, added)
    start = time.perf_counter()
    image = draw_edits(editor.pipe, source[None], multi_hot([objects]), [sample.seed], sample.steps, sample.guidance,
                       sample.image_guidance, 1, progress=False, on_step=on_step, should_stop=should_stop)[0]
    return Addition(present.phrases, present.read_by_judge, objects, sample, source, image,
                    time.perf_counter() - start)


def judge_readings(judge, images: "torch.Tensor", scene: Sequence[str]) -> list[dict]:
    """The shipped judge's reading of each image: the objects it sees (probability above 0.5,
    most certain first) and the asked-for objects it does not see, with its probabilities. For
    looking only: the demo never chooses or filters images by it."""
    from clevrgen.judge import judge_probs

    readings = []
    for row in judge_probs(judge, images):
        seen = sorted(((PHRASES[j], float(p)) for j, p in enumerate(row) if p > 0.5), key=lambda sp: -sp[1])
        missed = [(phrase, float(row[PHRASES.index(phrase)])) for phrase in scene if row[PHRASES.index(phrase)] <= 0.5]
        readings.append({"sees": seen, "misses": missed})
    return readings


def _listed(pairs: list[tuple[str, float]]) -> str:
    return ", ".join(f"{phrase} {p:.2f}" for phrase, p in pairs) or "nothing"


def reading_table(readings: list[dict], seed: int) -> str:
    """The judge's readings as a Markdown table, headed as the judge's."""
    lines = ["**The shipped judge's reading** (a ResNet-18 classifier's probabilities; shown for "
             "looking only, it did not choose these images)", "",
             "| image | seed | the judge sees | asked for, not seen |", "| --- | --- | --- | --- |"]
    lines += [f"| {i + 1} | {seed + i} | {_listed(r['sees'])} | {_listed(r['misses']) if r['misses'] else '-'} |"
              for i, r in enumerate(readings)]
    return "\n".join(lines)
