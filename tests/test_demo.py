"""``clevrgen demo``: the page's checks are the CLI's, its strip is denoise-strip's, and the served
app answers through gradio_client (skipped where Gradio is not installed)."""

import socket
import sys

import pytest
import torch

from clevrgen.artifact import save_artifact
from clevrgen.cli import app
from clevrgen.config import load_config
from clevrgen.demo import add_to_scene, draw, page_scene, page_settings
from clevrgen.errors import ConfigError, PhraseError, UsageError
from clevrgen.loaded import LoadedModel
from clevrgen.model import build_model

from conftest import EDITOR, TINY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny patched model (true 64x64 output, 50 training timesteps) saved as a run folder."""
    cfg = load_config(None, [*TINY, "model.patch_size=2"])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("demo") / "run"
    save_artifact(build_model(cfg.model).eval(), cfg, folder, {"max_objects": 3})
    return LoadedModel.load(folder)


@pytest.fixture(scope="module")
def tiny_editor(tmp_path_factory):
    """A tiny editor (the source as more input channels) saved as a run folder."""
    cfg = load_config(None, EDITOR)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("demo") / "editor"
    save_artifact(build_model(cfg.model).eval(), cfg, folder, {"max_objects": 3})
    return LoadedModel.load(folder)


def test_the_page_checks_a_scene_as_the_cli_does():
    assert page_scene(" Red_Sphere,cyan cube\n") == ["red sphere", "cyan cube"]
    for text, message in [("", "no phrases given"), ("red sphere, red sphere", 'duplicate phrase "red sphere"'),
                          ("pink cube", 'Did you mean "purple cube"?'),
                          ("red cube, blue cube, gray cube, cyan cube, brown cube, green cube", "1 to 5 objects")]:
        with pytest.raises(PhraseError, match=message):
            page_scene(text)


def test_the_page_checks_settings_by_the_cli_ranges(tiny_run):
    s = page_settings(tiny_run, num=None, seed=None, steps=None, guidance=None)
    assert (s.num, s.steps) == (tiny_run.config.sample.num, tiny_run.config.sample.steps)  # the model's own
    s = page_settings(tiny_run, num=3, seed=7, steps=4, guidance=2.5)
    assert (s.num, s.seed, s.steps, s.guidance) == (3, 7, 4, 2.5)
    with pytest.raises(ConfigError, match=r"sample.steps: Input should be greater than or equal to 1 "
                                          r"\(given by the Steps field\)"):
        page_settings(tiny_run, steps=0)
    with pytest.raises(UsageError, match="more than the model's 50 training timesteps"):
        page_settings(tiny_run, steps=51)
    with pytest.raises(ConfigError, match=r"sample.num: Input should be less than or equal to 100000"):
        page_settings(tiny_run, num=100_001)
    with pytest.raises(ConfigError, match="must be a number"):
        page_settings(tiny_run, guidance=float("nan"))


def test_draw_is_sample_and_its_strip_is_denoise_strips(tiny_run):
    s = page_settings(tiny_run, num=3, seed=4, steps=4)
    drawn = draw(tiny_run, ["red sphere", "cyan cube"], s, frames=5)
    assert drawn.images.shape == (3, 3, 64, 64) and drawn.images.dtype == torch.uint8 and not drawn.warnings
    model = LoadedModel(tiny_run.pipe, tiny_run.config.model_copy(update={"sample": s}), tiny_run.run_dir)
    same = model.generate([["red sphere", "cyan cube"]] * 3, [4, 5, 6], progress=False)
    strip = model.trajectory([["red sphere", "cyan cube"]], [4], 5)[0]
    # the same images up to the float rounding of another batch shape (uint8: at most 1 apart)
    assert (drawn.images.int() - same.int()).abs().max() <= 1
    assert drawn.strip.shape == strip.shape == (5, 3, 64, 64)
    assert (drawn.strip.int() - strip.int()).abs().max() <= 1
    assert torch.equal(drawn.strip[-1], drawn.images[0])
    big = draw(tiny_run, ["red sphere", "cyan cube", "gray cube", "blue cube"], page_settings(tiny_run, num=1))
    assert big.warnings and "at most 3" in big.warnings[0]


def test_an_addition_is_the_edit_commands_one_edit(tiny_editor):
    from clevrgen.editing import draw_edits
    from clevrgen.labels import multi_hot

    source = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    s = page_settings(tiny_editor, seed=5, steps=3, guidance=2.0, image_guidance=1.2)
    counted = []
    done = add_to_scene(tiny_editor, source, ["cyan cube"], "red sphere", s, on_step=lambda d, t: counted.append((d, t)))
    assert (done.before, done.objects, done.read_by_judge) == (["cyan cube"], ["cyan cube", "red sphere"], False)
    assert counted == [(1, 3), (2, 3), (3, 3)] and torch.equal(done.source, source)
    same = draw_edits(tiny_editor.pipe, source[None], multi_hot([["cyan cube", "red sphere"]]), [5], 3, 2.0, 1.2, 1,
                      progress=False)[0]
    assert done.image.dtype == torch.uint8 and torch.equal(done.image, same)
    with pytest.raises(UsageError, match="already has a cyan cube"):
        add_to_scene(tiny_editor, source, ["cyan cube"], "cyan cube", s)
    with pytest.raises(ConfigError, match=r"sample.image_guidance: .*\(given by the Image guidance field\)"):
        page_settings(tiny_editor, image_guidance=-1)


def test_the_page_asks_for_bounded_work_and_a_drawing_stops_within_a_step(tiny_run, monkeypatch):
    from clevrgen import demo
    from clevrgen.callbacks import SamplingStopped

    with pytest.raises(UsageError, match=r"^the Images field: the page draws at most 32 images at a time"):
        page_settings(tiny_run, num=33)  # the CLI's range allows 100,000
    monkeypatch.setitem(demo.PAGE_LIMITS, "steps", 10)
    with pytest.raises(UsageError, match=r"^the Steps field: the page draws at most 10 steps"):
        page_settings(tiny_run, steps=11)
    s = page_settings(tiny_run, num=4, steps=10)
    counted = []
    with pytest.raises(SamplingStopped):
        draw(tiny_run, ["red sphere"], s, on_step=lambda d, t: counted.append(d), should_stop=lambda: len(counted) >= 3)
    assert len(counted) == 3  # one batch of 4 images: three steps, then it stopped


def test_a_closed_pages_drawings_stop_and_a_stopping_server_waits_for_them():
    import threading

    from clevrgen.demo_page import Drawings

    drawings = Drawings()
    gone, kept = drawings.should_stop("a"), drawings.should_stop("b")
    drawings.leave("a")
    assert gone() and not kept()
    ended = []

    def drawing():
        with drawings:
            while not kept():
                pass
            ended.append(True)

    worker = threading.Thread(target=drawing)
    with drawings:  # held while the worker starts, so that stop() finds one running
        worker.start()
    drawings.stop(wait_s=10)
    assert ended == [True] and kept() and drawings.running == 0
    worker.join()


def test_without_gradio_the_command_says_how_to_install_it(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: the demo needs Gradio, an optional extra: pip install "
                                                  "'clevrgen[demo]'"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_served_page_draws_and_survives_bad_input(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    client_lib = pytest.importorskip("gradio_client")
    from PIL import Image

    from clevrgen.demo_page import serve

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    port = free_port()
    page = serve(tiny_run, port, block=False)
    try:
        client = client_lib.Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, strip, status, reading = client.predict("red sphere, cyan cube", 2, 0, 4, 2.0, False, api_name="/draw")
        assert [Image.open(item["image"]).size for item in gallery] == [(64, 64), (64, 64)]
        assert [item["caption"] for item in gallery] == ["seed 0", "seed 1"]
        assert Image.open(strip).size[1] == 64 + 2 * 2 and "2 images of red sphere, cyan cube" in status
        assert reading == ""
        for args, message in [(("pink cube", 2, 0, 4, 2.0, False), 'Did you mean "purple cube"?'),
                              (("red sphere, red sphere", 2, 0, 4, 2.0, False), "duplicate phrase"),
                              (("", 2, 0, 4, 2.0, False), "no phrases given"),
                              (("red sphere", 2, 0, 51, 2.0, False), "more than the model's 50 training timesteps")]:
            with pytest.raises(client_lib.exceptions.AppError, match=message):
                client.predict(*args, api_name="/draw")
        # still serving: a scene larger than the training scenes is drawn, with the CLI's warning;
        # the judge's reading is headed as the judge's
        gallery, _, status, reading = client.predict("red sphere, cyan cube, gray cube, blue cube", 1, 3, 2, 2.0, True,
                                                     api_name="/draw")
        assert len(gallery) == 1 and "model was trained on images of at most 3" in status
        assert reading.startswith("**The shipped judge's reading**") and "| 1 | 3 |" in reading
        with pytest.raises(client_lib.exceptions.AppError, match="at most 32 images"):
            client.predict("red sphere", 100_000, 0, 4, 2.0, False, api_name="/draw")
        # only requests addressed to this machine's names (no DNS rebinding)
        import urllib.error
        import urllib.request

        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/").status == 200
        foreign = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": f"rebound.example:{port}"})
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(foreign)
    finally:
        page.close()


def test_the_served_page_adds_an_object_and_survives_bad_input(tiny_run, tiny_editor, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    client_lib = pytest.importorskip("gradio_client")
    from PIL import Image

    from clevrgen.demo_page import serve

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    scene = tmp_path / "scene.png"
    Image.new("RGBA", (80, 60), (120, 130, 140, 255)).save(scene)
    page = serve(tiny_run, free_port(), block=False, editor_path=tiny_editor.run_dir)
    try:
        client = client_lib.Client(f"http://127.0.0.1:{page.server_port}/", verbose=False)
        picture = client_lib.handle_file(str(scene))
        gallery, status = client.predict(picture, "cyan cube", "red", "sphere", 3, 2, 2.0, 1.5, api_name="/add")
        assert [Image.open(item["image"]).size for item in gallery] == [(64, 64), (64, 64)]
        assert [item["caption"] for item in gallery] == ["before: cyan cube", "after: + red sphere"]
        assert "Added red sphere: cyan cube, red sphere" in status and "seed 3" in status
        assert "80x60, resized to 64x64" in status and "RGBA image, converted to RGB" in status
        for args, message in [((picture, "cyan cube", "cyan", "cube", 3, 2, 2.0, 1.5), "already has a cyan cube"),
                              ((None, "cyan cube", "red", "cube", 3, 2, 2.0, 1.5), "no scene to add to"),
                              ((picture, "pink cube", "red", "cube", 3, 2, 2.0, 1.5), 'Did you mean "purple cube"?'),
                              ((picture, "", "red", "cube", 3, 0, 2.0, 1.5), "given by the Steps field")]:
            with pytest.raises(client_lib.exceptions.AppError, match=message):
                client.predict(*args, api_name="/add")
    finally:
        page.close()
    page = serve(tiny_run, free_port(), block=False, editor_path=tiny_run.run_dir)  # a generator: no editor
    try:
        client = client_lib.Client(f"http://127.0.0.1:{page.server_port}/", verbose=False)
        with pytest.raises(client_lib.exceptions.AppError, match="is a generator, not an editor"):
            client.predict(client_lib.handle_file(str(scene)), "cyan cube", "red", "sphere", 3, 2, 2.0, 1.5,
                           api_name="/add")
    finally:
        page.close()


def test_a_busy_port_is_one_line(tiny_run):
    pytest.importorskip("gradio")
    from clevrgen.demo_page import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UsageError, match="choose another port with --port"):
            serve(tiny_run, taken.getsockname()[1], block=False)


def test_sigterm_while_drawing_stops_the_drawing_and_exits_143(tmp_path):
    """A SIGTERM lands while the page draws a long request: the drawing ends within a step and
    the command exits 143 with its message (not 134, "terminate called without an active exception")."""
    pytest.importorskip("gradio")
    client_lib = pytest.importorskip("gradio_client")
    import os
    import signal
    import subprocess
    import time

    cfg = load_config(None, [*TINY, "model.patch_size=2", "diffusion.num_train_timesteps=1000"])
    save_artifact(build_model(cfg.model).eval(), cfg, tmp_path / "run", {"max_objects": 3})
    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    server = subprocess.Popen([sys.executable, "-m", "clevrgen", "demo", "--checkpoint", str(tmp_path / "run"),
                               "--port", str(port), "--set", "sample.batch_size=1"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            try:
                client = client_lib.Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                time.sleep(0.25)
        job = client.submit("red sphere", 32, 0, 250, 2.0, False, api_name="/draw")  # 8,000 steps, one at a time
        while not (job.status().progress_data or job.done()):
            time.sleep(0.1)
        assert not job.done()
        server.send_signal(signal.SIGTERM)
        start = time.monotonic()
        output, _ = server.communicate(timeout=60)
        stopped_s = time.monotonic() - start
    finally:
        server.kill()
    assert server.returncode == 143, output
    assert stopped_s < 8, f"{stopped_s:.1f} s from SIGTERM to exit"  # the drawing: thousands of steps
    assert "stopped the demo" in output and "terminate called" not in output
