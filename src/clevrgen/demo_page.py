"""The Gradio page of ``clevrgen demo`` on :mod:`clevrgen.demo`'s drawing half, served on
127.0.0.1 only (no share link, no analytics: nothing leaves the machine), answering requests
addressed to this machine's own names only, with bounded requests whose drawings end when their
page is closed or the server stops.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from clevrgen.demo import (HOST, MAX_OBJECTS, PAGE_LIMITS, add_to_scene, draw, judge_readings, page_scene,
                           page_settings, reading_table, said_warnings, typed_phrases)
from clevrgen.errors import ClevrgenError, UsageError

if TYPE_CHECKING:
    import torch

    from clevrgen.loaded import LoadedModel

STOP_WAIT_S = 30
"""How long a stopping server waits for the drawings in hand to end (each ends within a step)."""


class Drawings:
    """The drawings in hand, so that each ends within a step when its page is closed (its
    session gone) or the server stops, and a stopping server waits for them before it exits."""

    def __init__(self):
        import threading

        self.stopping, self.gone, self.running = threading.Event(), set(), 0
        self.changed = threading.Condition()

    def should_stop(self, session: str | None) -> Callable[[], bool]:
        return lambda: self.stopping.is_set() or session in self.gone

    def leave(self, session: str | None) -> None:
        self.gone.add(session)

    def __enter__(self) -> "Drawings":
        with self.changed:
            self.running += 1
        return self

    def __exit__(self, *exc) -> None:
        with self.changed:
            self.running -= 1
            self.changed.notify_all()

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop every drawing and wait (at most ``wait_s``) until none runs."""
        self.stopping.set()
        with self.changed:
            self.changed.wait_for(lambda: self.running == 0, timeout=wait_s)


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

    from clevrgen.callbacks import SamplingStopped

    drawings = Drawings()

    def page_error(exc: Exception):
        """The CLI's message in the page (which reads it as HTML: "<color>")."""
        message = str(exc) if isinstance(exc, ClevrgenError) else "stopped: the page was closed or the server is stopping"
        return gr.Error(html.escape(message, quote=False), duration=None, print_exception=False)

    def on_draw(text, num, seed, steps, guidance, show_judge, request=None, progress=gr.Progress()):
        try:
            scene = page_scene(text)
            sample = page_settings(model, num=num, seed=seed, steps=steps, guidance=guidance)
            progress((0, sample.num * sample.steps), desc="drawing", unit="image-steps")
            with drawings:
                result = draw(model, scene, sample, on_step=lambda d, t: progress((d, t), desc="drawing", unit="image-steps"),
                              should_stop=drawings.should_stop(request and request.session_hash))
            readings = judge_readings(the_judge(), result.images, scene) if show_judge else None
        except (ClevrgenError, SamplingStopped) as exc:
            raise page_error(exc) from None
        for message in result.warnings:
            gr.Warning(message)
        captions = [f"seed {sample.seed + i}" for i in range(sample.num)]
        seeds = f"seed {sample.seed}" + (f" to {sample.seed + sample.num - 1}" if sample.num > 1 else "")
        status = (f"{sample.num} image{'s' * (sample.num > 1)} of {', '.join(scene)}: {sample.sampler} "
                  f"{sample.steps} steps, guidance {sample.guidance:g}, {seeds}, {result.seconds:.1f} s")
        status += "".join(f"\n\n**warning:** {m}" for m in result.warnings)
        return (list(zip(_pil(result.images), captions)), _row(result.strip), status,
                reading_table(readings, sample.seed) if readings else "")

    def on_add(picture, has, color, shape, seed, steps, guidance, image_guidance, request=None, progress=gr.Progress()):
        import torch

        from clevrgen.editing import scene_tensor

        try:
            if editor is None:
                raise UsageError(f"no editor to add with: {no_editor}")
            if picture is None:
                raise UsageError("no scene to add to: upload an image, or take the last drawn one")
            with said_warnings() as said:
                source = scene_tensor(picture, "the scene")
            sample = page_settings(editor, seed=seed, steps=steps, guidance=guidance, image_guidance=image_guidance)
            present = page_scene(has) if typed_phrases(has) else []
            with drawings:
                done = add_to_scene(editor, source, present, f"{color} {shape}", sample,
                                    judge=None if present else the_judge(),
                                    on_step=lambda d, t: progress((d, t), desc="adding", unit="steps"),
                                    should_stop=drawings.should_stop(request and request.session_hash))
        except (ClevrgenError, SamplingStopped) as exc:
            raise page_error(exc) from None
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

    def on_leave(request=None):
        drawings.leave(request and request.session_hash)

    # Gradio hands a function its request where that parameter's annotation is gr.Request (a class
    # here: this module's string annotations could not name the lazily imported gr)
    for fn in (on_draw, on_add, on_leave):
        fn.__annotations__ = {"request": gr.Request}

    def take_last(gallery):
        if not gallery:
            raise gr.Error("nothing drawn yet: draw a scene first, or upload one", print_exception=False)
        return gallery[0][0]

    # delete_cache: the images Gradio keeps for the browser go after 10 minutes, and when it stops
    with gr.Blocks(title="clevrgen demo", analytics_enabled=False, delete_cache=(600, 600)) as page:
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
                        num = gr.Number(s.num, label="Images", precision=0, info=_range("num", PAGE_LIMITS["num"]),
                                         elem_id="num")
                        seed = gr.Number(s.seed, label="Seed", precision=0, info="image i: seed + i", elem_id="seed")
                    with gr.Row():
                        steps = gr.Number(s.steps, label="Steps", precision=0, elem_id="steps",
                                          info=_range("steps", min(most_steps, PAGE_LIMITS["steps"])))
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
                        edit_steps = gr.Number(e.steps, label="Steps", precision=0,
                                               info=_range("steps", min(most_steps, PAGE_LIMITS["steps"])))
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
        page.unload(on_leave)
    page.drawings = drawings  # serve() stops them before it closes the page
    return page


def serve(model: "LoadedModel", port: int, judge_path: Path | None = None, block: bool = True,
          editor_path: Path | None = None):
    """Serve the demo page on 127.0.0.1:``port``; with ``block``, until Ctrl-C or SIGTERM (which
    propagate, the server closed). Returns the page (``.close()`` stops it)."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    page = build_demo(model, judge_path, editor_path)
    # Only requests addressed to this machine's own names: a page elsewhere that renames itself to
    # 127.0.0.1 (DNS rebinding) gets 400, not the demo.
    only_here = Middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"])
    try:
        page.queue().launch(server_name=HOST, server_port=port, share=False, inbrowser=False, css=CSS,
                            prevent_thread_lock=True, quiet=True, footer_links=["api"],
                            app_kwargs={"middleware": [only_here]})
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
            close(page)
    return page


def close(page) -> None:
    """Stop the page's drawings (each ends within a step), then the server."""
    page.drawings.stop()
    page.close()
