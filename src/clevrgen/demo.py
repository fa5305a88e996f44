"""The local web page of ``clevrgen demo``: pick objects, press Draw, look at the images; or add
an object to a scene (uploaded, or the last one drawn) with the editor.

The drawing half (:func:`page_scene`, :func:`page_settings`, :func:`draw`, :func:`judge_readings`,
:func:`add_to_scene`) needs no Gradio: it is ``ClevrgenPipeline``'s one call with
:mod:`clevrgen.callbacks`' step callbacks, the first image's denoising strip (``denoise-strip``'s)
and the progress; an addition is ``clevrgen edit``'s. :func:`build_demo` puts a Gradio page on it
and :func:`serve` serves that page on 127.0.0.1 only (no share link, no analytics: nothing leaves
the machine).
"""

from __future__ import annotations

import html
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clevrgen.errors import ClevrgenError, ClevrgenWarning, PhraseError, UsageError
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
    return config.sample


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
         on_step: Callable[[int, int], None] | None = None) -> Drawing:
    """``sample.num`` images of ``scene`` and the first one's denoising strip, in one pipeline
    call. ``on_step(done, total)`` counts image-steps; a scene larger than any the model was
    trained on is drawn, and its warning returned in ``Drawing.warnings``."""
    from diffusers.callbacks import MultiPipelineCallbacks

    from clevrgen.callbacks import DenoisingStrip, StepProgress

    pipe, s = model.pipe, sample
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ClevrgenWarning)
        labels = pipe.encode_scenes([list(scene)])
    said = [str(w.message) for w in caught if issubclass(w.category, ClevrgenWarning)]
    start = time.perf_counter()
    strip = DenoisingStrip(s.steps, min(frames, s.steps + 1), pipe.prepare_latents(1, seed=s.seed))
    progress = StepProgress(s.num * s.steps, enabled=False, on_step=on_step)
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
                 judge=None, on_step: Callable[[int, int], None] | None = None) -> Addition:
    """``clevrgen edit``'s one edit: ``added`` put into ``source`` (uint8 [3, 64, 64]) whose objects
    are ``has`` (empty: the judge reads them from the image, and says so in ``read_by_judge``),
    drawn from ``sample.seed``; ``on_step(done, total)`` counts the steps."""
    from clevrgen.editing import check_addition, draw_edits, scene_objects
    from clevrgen.labels import multi_hot

    present = scene_objects(source, list(has) or None, judge)
    objects = check_addition(present.phrases, added)
    start = time.perf_counter()
    image = draw_edits(editor.pipe, source[None], multi_hot([objects]), [sample.seed], sample.steps, sample.guidance,
                       sample.image_guidance, 1, progress=False, on_step=on_step)[0]
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


# --- the page ---------------------------------------------------------------------------------------
CSS = """
.pixels img { image-rendering: pixelated; }
"""


def _range(name: str, most: float | None = None) -> str:
    """'1 to 100000': the range of a sample setting as config.py has it (``most``: another upper limit)."""
    from clevrgen.config import SampleConfig

    bounds = {type(m).__name__: m for m in SampleConfig.model_fields[name].metadata}
    top = bounds["Le"].le if most is None else min(most, bounds["Le"].le)
    return f"{bounds['Ge'].ge:g} to {top:g}"


def _pil(images: "torch.Tensor"):
    from PIL import Image

    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]


def _row(frames: "torch.Tensor"):
    from torchvision.utils import make_grid

    return _pil(make_grid(frames, nrow=len(frames), padding=2, pad_value=255)[None])[0]


def build_demo(model: "LoadedModel", judge_path: Path | None = None, editor_path: Path | None = None):
    """The demo page (a ``gr.Blocks``) drawing with ``model``'s pipeline and adding objects with
    the editor of ``editor_path`` (None: the shipped editor; a page without one says so in its
    tab); ``judge_path``: the judge whose reading the page may show (None: the shipped judge),
    loaded on first use."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from clevrgen.artifact import describe_model
    from clevrgen.labels import COLORS, SHAPES

    s = model.config.sample
    most_steps = model.config.diffusion.num_train_timesteps  # check_sample_steps' limit
    trained_on = model.pipe.config.max_objects
    judges: list = []

    def the_judge():
        if not judges:
            from clevrgen.judge import load_judge

            judges.append(load_judge(judge_path, model.device))
        return judges[0]

    try:
        from clevrgen.editing import resolve_editor
        from clevrgen.loaded import LoadedModel

        editor, no_editor = LoadedModel.load(resolve_editor(editor_path)), None
        if not editor.config.model.source_image:
            editor, no_editor = None, f"{editor.run_dir} is a generator, not an editor (model.source_image)"
    except ClevrgenError as exc:
        editor, no_editor = None, str(exc)

    def add_object(text: str, color: str, shape: str) -> str:
        return ", ".join([*typed_phrases(text), f"{color} {shape}"])

    def on_draw(text, num, seed, steps, guidance, show_judge, progress=gr.Progress()):
        try:
            scene = page_scene(text)
            sample = page_settings(model, num=num, seed=seed, steps=steps, guidance=guidance)
            progress((0, sample.num * sample.steps), desc="drawing", unit="image-steps")
            result = draw(model, scene, sample, on_step=lambda d, t: progress((d, t), desc="drawing", unit="image-steps"))
            readings = judge_readings(the_judge(), result.images, scene) if show_judge else None
        except ClevrgenError as exc:  # the CLI's message, in the page (which reads it as HTML: "<color>")
            raise gr.Error(html.escape(str(exc), quote=False), duration=None, print_exception=False) from None
        for message in result.warnings:
            gr.Warning(message)
        captions = [f"seed {sample.seed + i}" for i in range(sample.num)]
        seeds = f"seed {sample.seed}" + (f" to {sample.seed + sample.num - 1}" if sample.num > 1 else "")
        status = (f"{sample.num} image{'s' * (sample.num > 1)} of {', '.join(scene)}: {sample.sampler} "
                  f"{sample.steps} steps, guidance {sample.guidance:g}, {seeds}, {result.seconds:.1f} s")
        status += "".join(f"\n\n**warning:** {m}" for m in result.warnings)
        return (list(zip(_pil(result.images), captions)), _row(result.strip), status,
                reading_table(readings, sample.seed) if readings else "")

    def on_add(picture, has, color, shape, seed, steps, guidance, image_guidance, progress=gr.Progress()):
        import torch

        from clevrgen.editing import scene_tensor

        try:
            if editor is None:
                raise UsageError(f"no editor to add with: {no_editor}")
            if picture is None:
                raise UsageError("no scene to add to: upload an image, or take the last drawn one")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ClevrgenWarning)
                source = scene_tensor(picture, "the scene")
            sample = page_settings(editor, seed=seed, steps=steps, guidance=guidance, image_guidance=image_guidance)
            present = page_scene(has) if typed_phrases(has) else []
            done = add_to_scene(editor, source, present, f"{color} {shape}", sample,
                                judge=None if present else the_judge(),
                                on_step=lambda d, t: progress((d, t), desc="adding", unit="steps"))
        except ClevrgenError as exc:
            raise gr.Error(html.escape(str(exc), quote=False), duration=None, print_exception=False) from None
        said = [str(w.message) for w in caught if issubclass(w.category, ClevrgenWarning)]
        for message in said:
            gr.Warning(message)
        read = (f"The shipped judge read in the scene: {', '.join(done.before)} (not right? type the scene's "
                "objects above). " if done.read_by_judge else "")
        status = (f"{read}Added {done.objects[-1]}: {', '.join(done.objects)}; {sample.sampler} {sample.steps} steps, "
                  f"guidance {sample.guidance:g}, image guidance {sample.image_guidance:g}, seed {sample.seed}, "
                  f"{done.seconds:.1f} s")
        status += "".join(f"\n\n**note:** {m}" for m in said)
        images = _pil(torch.stack([done.source, done.image]))
        return [(images[0], "before: " + ", ".join(done.before)), (images[1], "after: + " + done.objects[-1])], status

    def take_last(gallery):
        if not gallery:
            raise gr.Error("nothing drawn yet: draw a scene first, or upload one", print_exception=False)
        return gallery[0][0]

    with gr.Blocks(title="clevrgen demo", analytics_enabled=False) as page:
        gr.Markdown(f"## clevrgen: phrases in, 64×64 scenes out\nModel: {describe_model(model.run_dir)}; "
                    f"{s.sampler} sampler on {model.device.type}."
                    + (f" It was trained on scenes of at most {trained_on} objects." if trained_on else ""))
        with gr.Tab("Draw a scene"):
            with gr.Row():
                with gr.Column(scale=2):
                    objects = gr.Textbox(label=f"Objects (1 to {MAX_OBJECTS}, separated by commas)", elem_id="objects",
                                         value="red sphere, cyan cube", placeholder="red sphere, cyan cube",
                                         info=f"<color> <shape>: colors {', '.join(COLORS)}; shapes {', '.join(SHAPES)}")
                    with gr.Row():
                        color = gr.Dropdown(list(COLORS), value=COLORS[1], label="Color", min_width=80)
                        shape = gr.Dropdown(list(SHAPES), value=SHAPES[1], label="Shape", min_width=80)
                    with gr.Row():
                        add = gr.Button("Add this object", size="sm")
                        clear = gr.Button("Clear", size="sm")
                    # No minimum / maximum on the fields: the CLI's checks (page_settings) give the messages.
                    with gr.Row():
                        num = gr.Number(s.num, label="Images", precision=0, info=_range("num"), elem_id="num")
                        seed = gr.Number(s.seed, label="Seed", precision=0, info="image i: seed + i", elem_id="seed")
                    with gr.Row():
                        steps = gr.Number(s.steps, label="Steps", precision=0, info=_range("steps", most_steps),
                                          elem_id="steps")
                        guidance = gr.Number(s.guidance, label="Guidance", info=_range("guidance"), elem_id="guidance")
                    show_judge = gr.Checkbox(False, label="Show the shipped judge's reading of each image",
                                             elem_id="judge")
                    go = gr.Button("Draw", variant="primary", elem_id="draw")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png", object_fit="contain",
                                         elem_classes="pixels")
                    gr.Markdown("The first image from noise to the end (its denoising strip):")
                    strip = gr.Image(type="pil", format="png", interactive=False, show_label=False, elem_id="strip",
                                     elem_classes="pixels")
                    status = gr.Markdown(label="what was drawn", elem_id="status")
                    readings = gr.Markdown(label="the judge's reading", elem_id="readings")
        with gr.Tab("Add an object"):
            gr.Markdown("The editor puts one more object into a scene and keeps the rest: "
                        + (f"{describe_model(editor.run_dir)}." if editor else f"**not available here**: {no_editor}."))
            with gr.Row():
                with gr.Column(scale=2):
                    scene = gr.Image(type="pil", image_mode=None, sources=["upload", "clipboard"], elem_id="scene",
                                     label="The scene (a PNG, resized to 64x64)", elem_classes="pixels", height=192)
                    take = gr.Button("Take the first image drawn last", size="sm")
                    has = gr.Textbox(label="Objects already in the scene (empty: the shipped judge reads them)",
                                     placeholder="cyan cube, gray sphere", elem_id="has")
                    with gr.Row():
                        add_color = gr.Dropdown(list(COLORS), value=COLORS[1], label="Add: color", min_width=80)
                        add_shape = gr.Dropdown(list(SHAPES), value=SHAPES[1], label="Add: shape", min_width=80)
                    e = editor.config.sample if editor else s
                    with gr.Row():
                        edit_seed = gr.Number(e.seed, label="Seed", precision=0)
                        edit_steps = gr.Number(e.steps, label="Steps", precision=0)
                    with gr.Row():
                        edit_guidance = gr.Number(e.guidance, label="Guidance", info=_range("guidance"))
                        image_guidance = gr.Number(e.image_guidance, label="Image guidance", info=_range("image_guidance"))
                    go_add = gr.Button("Add", variant="primary", elem_id="add", interactive=editor is not None)
                with gr.Column(scale=3):
                    edited = gr.Gallery(label="Before and after", columns=2, height="auto", format="png",
                                        object_fit="contain", elem_classes="pixels")
                    edit_status = gr.Markdown(elem_id="edit_status")
        add.click(add_object, [objects, color, shape], objects, queue=False, api_name=False)
        clear.click(lambda: "", None, objects, queue=False, api_name=False)
        # One drawing at a time (the default): the pipeline's scheduler holds the state of a call.
        go.click(on_draw, [objects, num, seed, steps, guidance, show_judge], [gallery, strip, status, readings],
                 api_name="draw")
        take.click(take_last, gallery, scene, queue=False, api_name=False)
        go_add.click(on_add, [scene, has, add_color, add_shape, edit_seed, edit_steps, edit_guidance, image_guidance],
                     [edited, edit_status], api_name="add")
    return page


def serve(model: "LoadedModel", port: int, judge_path: Path | None = None, block: bool = True,
          editor_path: Path | None = None):
    """Serve the demo page on 127.0.0.1:``port``; with ``block``, until Ctrl-C or SIGTERM (which
    propagate, the server closed). Returns the page (``.close()`` stops it)."""
    page = build_demo(model, judge_path, editor_path)
    try:
        page.queue().launch(server_name=HOST, server_port=port, share=False, inbrowser=False, css=CSS,
                            prevent_thread_lock=True, quiet=True, footer_links=["api"])
    except OSError as exc:
        if "port" not in str(exc).lower():
            raise
        raise UsageError(f"cannot serve on {HOST}:{port} (in use, or not allowed): "
                         "choose another port with --port") from None
    if block:
        try:
            while page.is_running:
                time.sleep(0.2)
        finally:
            page.close()
    return page
