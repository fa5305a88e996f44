"""The editor (issue 47): i-CLEVR's k -> k + 1 pairs, a generator widened into an editor, the
conditioning dropout, the pipeline's ``image=`` and a tiny editor trained a few steps."""

from __future__ import annotations

import pytest
import torch

from conftest import EDITOR


def _config(extra=()):
    from clevrgen.config import load_config

    return load_config(None, [*EDITOR, *extra])


def test_pairs_are_neighbours_of_one_scene_that_add_one_object(dataset):
    from clevrgen.data.iclevr import load_iclevr
    from clevrgen.data.pairs import edit_pairs

    data = load_iclevr(dataset, progress=False)
    pairs = edit_pairs(data)
    assert len(pairs) == 4 * 2  # four scenes of three images: 0 -> 1 and 1 -> 2 each
    for source, target in pairs.tolist():
        assert data.names[target] == data.names[source].replace(data.names[source][-6:],
                                                                f"_{int(data.names[source][-5]) + 1}.png")
        added = data.labels[target] - data.labels[source]
        assert added.min() == 0 and added.sum() == 1


def test_a_pair_that_does_not_add_exactly_one_object_is_left_out():
    from clevrgen.data.iclevr import ImageSet
    from clevrgen.data.pairs import edit_pairs

    labels = torch.zeros(3, 24)
    labels[0, 0] = labels[1, 1] = 1  # _1 swaps the object instead of adding one
    labels[2, [1, 2]] = 1
    data = ImageSet(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), labels, torch.zeros(3, dtype=torch.int64),
                    ["s_0.png", "s_1.png", "s_2.png"])
    assert edit_pairs(data).tolist() == [[1, 2]]


def test_a_widened_generator_predicts_what_the_generator_does_whatever_the_source():
    from clevrgen.config import load_config
    from clevrgen.model import build_model, widen_to_editor

    cfg = _config()
    generator = build_model(load_config(None, [*EDITOR, "model.source_image=false"]).model).eval()
    editor = build_model(cfg.model).eval()
    assert editor.is_editor and not generator.is_editor
    assert editor.unet.config.in_channels == 2 * generator.unet.config.in_channels
    widen_to_editor(editor, generator)
    x, t, labels = torch.randn(2, 3, 64, 64), torch.tensor([10, 40]), torch.eye(24)[:2]
    with torch.no_grad():
        expected = generator(x, t, labels)
        assert torch.equal(editor(x, t, labels), expected)
        assert torch.equal(editor(x, t, labels, source=torch.rand(2, 3, 64, 64)), expected)
        with pytest.raises(ValueError, match="generator"):
            generator(x, t, labels, source=x)


def test_the_conditioning_dropout_drops_label_source_or_both_in_its_shares():
    from clevrgen.data.pairs import draw_edit_batch

    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    labels = torch.ones(2, 24)
    pairs = torch.tensor([[0, 1]])
    x0, drawn, source = draw_edit_batch(images, labels, pairs, 20_000, torch.Generator().manual_seed(0),
                                        label_dropout=0.1, source_dropout=0.2, joint_dropout=0.3)
    no_label, no_source = drawn.sum(1) == 0, source.flatten(1).abs().sum(1) == 0
    shares = [float(s.float().mean()) for s in (no_label & ~no_source, no_source & ~no_label, no_label & no_source)]
    assert shares == pytest.approx([0.1, 0.2, 0.3], abs=0.015)
    assert torch.equal(x0, torch.ones_like(x0))


def test_extra_pairs_take_the_first_rows_of_each_batch():
    from clevrgen.data.pairs import draw_edit_batch

    images = torch.tensor([0, 0, 255, 255], dtype=torch.uint8)[:, None, None, None].expand(4, 3, 4, 4)
    labels = torch.eye(4, 24)
    x0, drawn, _ = draw_edit_batch(images, labels, torch.tensor([[0, 1]]), 32, torch.Generator().manual_seed(0),
                                   0.0, 0.0, 0.0, extra=torch.tensor([[2, 3]]), extra_rows=8)
    assert (x0[:8] == 1).all() and (x0[8:] == -1).all()  # 8 rendered targets, then 24 real ones
    assert torch.equal(drawn[:8], labels[[3] * 8]) and torch.equal(drawn[8:], labels[[1] * 24])


def test_an_editor_mixes_a_second_datasets_pairs_and_keeps_the_real_held_out_scenes(dataset, tmp_path):
    from conftest import write_dataset

    from clevrgen.data.batches import place_data
    from clevrgen.data.iclevr import load_iclevr

    extra_root = write_dataset(tmp_path / "rendered", scenes=3, seed=5)
    data = load_iclevr(dataset, progress=False)
    plain = place_data(data, _config(["train.batch_size=4"]), torch.device("cpu"))
    mixed = place_data(data, _config(["train.batch_size=4", f"data.extra_pairs='{extra_root}'", "data.extra_share=0.25"]),
                       torch.device("cpu"))
    assert mixed.val_set.names == plain.val_set.names  # the held-out real scenes do not move
    assert torch.equal(mixed.pairs, plain.pairs)
    assert len(mixed.extra_pairs) == 3 * 2 and mixed.record["extra_pairs"] == 6
    assert (mixed.extra_pairs >= len(plain.images)).all()  # rows of the second dataset's images
    assert "25% of each batch from the pairs in" in mixed.record["data"]
    x0, labels, inputs = mixed.draw(_config(["train.batch_size=4", f"data.extra_pairs='{extra_root}'",
                                             "data.extra_share=0.25"]), torch.Generator().manual_seed(0), 0)
    assert x0.shape == inputs["source"].shape == (4, 3, 64, 64)


@pytest.mark.parametrize("settings, message", [
    (["data.extra_share=0.25"], "go together"),
    (["data.extra_pairs='somewhere'"], "go together"),
    (["data.extra_pairs='somewhere'", "data.extra_share=0.25", "model.source_image=false"], "only an editor"),
])
def test_extra_pairs_need_their_share_and_an_editor(settings, message):
    from clevrgen.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _config(settings)


def test_a_folder_with_no_sequences_is_refused_as_extra_pairs(tmp_path):
    import json

    from PIL import Image

    from clevrgen.data.batches import place_data
    from clevrgen.data.iclevr import load_iclevr
    from clevrgen.errors import UsageError
    from conftest import write_dataset

    real = load_iclevr(write_dataset(tmp_path / "real"), progress=False)
    lone = tmp_path / "lone"
    (lone / "iclevr").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(lone / "iclevr" / "one.png")
    (lone / "train.json").write_text(json.dumps({"one.png": ["red sphere"]}))
    (lone / "objects.json").write_text((tmp_path / "real" / "objects.json").read_text())
    cfg = _config(["train.batch_size=4", f"data.extra_pairs='{lone}'", "data.extra_share=0.25",
                   f"data.cache_dir='{tmp_path / 'cache'}'"])
    with pytest.raises(UsageError, match="no image sequences"):
        place_data(real, cfg, torch.device("cpu"))


def test_an_editors_dropout_shares_may_not_add_up_past_one():
    from clevrgen.errors import ConfigError

    with pytest.raises(ConfigError, match="at most 1"):
        _config(["train.label_dropout=0.5", "train.source_dropout=0.3", "train.joint_dropout=0.3"])


def test_a_tiny_editor_trains_from_a_generator_and_edits_through_the_pipeline(dataset, tmp_path):
    from clevrgen.artifact import load_artifact
    from clevrgen.data.iclevr import load_iclevr
    from clevrgen.errors import UsageError
    from clevrgen.pipeline import ClevrgenPipeline
    from clevrgen.train import train

    data = load_iclevr(dataset, progress=False)
    generator_cfg = _config(["model.source_image=false", "train.steps=2"])
    train(generator_cfg, tmp_path / "gen", data, progress=False)
    cfg = _config([f"train.init='{tmp_path / 'gen'}'", "train.steps=2", "train.eval_every=2"])
    result = train(cfg, tmp_path / "edit", data, progress=False)
    assert result.val_loss is not None  # the held-out pairs' loss
    editor, _ = load_artifact(tmp_path / "edit")
    assert editor.is_editor
    pipe = ClevrgenPipeline.from_pretrained(tmp_path / "edit")
    source = torch.rand(1, 3, 64, 64)
    images = pipe([["red sphere", "gray cube"]], image=source, seed=0, output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    again = pipe([["red sphere", "gray cube"]], image=(source * 255).round().to(torch.uint8), seed=0,
                 output_type="pt", image_guidance_scale=1.0).images
    assert again.shape == images.shape
    with pytest.raises(UsageError, match=r"\[N, 3, 64, 64\]"):
        pipe([["red sphere"]], image=torch.rand(1, 3, 32, 32), seed=0)
    with pytest.raises(UsageError, match="2 source images for 3 scenes"):
        pipe([["red sphere"]] * 3, image=torch.rand(2, 3, 64, 64), seed=0)
    generator = ClevrgenPipeline.from_pretrained(tmp_path / "gen")
    with pytest.raises(UsageError, match="generator"):
        generator([["red sphere"]], image=source, seed=0)


# --- the edit command and the edit evaluation -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny generator (2 steps) and a tiny editor trained 2 steps from it, with their dataset."""
    import os

    from conftest import write_dataset

    from clevrgen.data.iclevr import load_iclevr
    from clevrgen.train import train

    root = tmp_path_factory.mktemp("edit")
    old = os.environ.get("CLEVRGEN_CACHE")
    os.environ["CLEVRGEN_CACHE"] = str(root / "cache")
    try:
        dataset = write_dataset(root / "iclevr-mini", scenes=8)
        data = load_iclevr(dataset, progress=False)
        train(_config(["model.source_image=false", "train.steps=2", f"data.path='{dataset}'"]), root / "gen", data,
              progress=False)
        train(_config([f"train.init='{root / 'gen'}'", "train.steps=2", f"data.path='{dataset}'"]), root / "edit",
              data, progress=False)
    finally:
        if old is None:
            os.environ.pop("CLEVRGEN_CACHE", None)
        else:
            os.environ["CLEVRGEN_CACHE"] = old
    return root / "gen", root / "edit", dataset


def _scene_png(path, mode="RGB", size=(64, 64)):
    from PIL import Image

    Image.new(mode, size, (120, 120, 118, 255)[: len(mode)] if mode != "L" else 120).save(path)
    return path


def test_edit_adds_an_object_to_a_scene_the_user_describes(tiny_models, runner, tmp_path):
    from PIL import Image

    from clevrgen.cli import app

    _, editor, _ = tiny_models
    scene = _scene_png(tmp_path / "scene.png")
    result = runner.invoke(app, ["edit", str(scene), "--has", "cyan cube", "--add", "red sphere", "-o",
                                 str(tmp_path / "out.png"), "--checkpoint", str(editor)])
    assert result.exit_code == 0, result.output
    assert "cyan cube, red sphere" in result.output
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"


def test_edit_converts_and_resizes_a_scene_and_says_so(tiny_models, runner, tmp_path):
    from clevrgen.cli import app

    _, editor, _ = tiny_models
    scene = _scene_png(tmp_path / "scene.png", mode="RGBA", size=(320, 240))
    result = runner.invoke(app, ["edit", str(scene), "--has", "cyan cube", "--add", "red sphere", "-o",
                                 str(tmp_path / "out.png"), "--checkpoint", str(editor)])
    assert result.exit_code == 0, result.output
    assert "converted to RGB" in result.output and "resized to 64x64" in result.output


@pytest.mark.parametrize("args, message", [
    (["--has", "cyan cube", "--add", "cyan cube"], "already has a cyan cube"),
    (["--has", "cyan cube", "--has", "red cube", "--has", "blue cube", "--has", "gray cube", "--has", "green cube",
      "--add", "red sphere"], "already has 5 objects"),
    (["--has", "cyan cube", "--add", "pink sphere"], "unknown phrase"),
    (["--has", "cyan cube"], "--add"),
])
def test_edit_refuses_what_cannot_be_added(tiny_models, runner, tmp_path, args, message):
    from clevrgen.cli import app

    _, editor, _ = tiny_models
    scene = _scene_png(tmp_path / "scene.png")
    result = runner.invoke(app, ["edit", str(scene), *args, "-o", str(tmp_path / "out.png"), "--checkpoint", str(editor)])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.png").exists()


def test_edit_names_a_file_that_is_not_an_image_and_overwrites_nothing_it_does_not_own(tiny_models, runner, tmp_path):
    from clevrgen.cli import app

    _, editor, _ = tiny_models
    (tmp_path / "scene.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["edit", str(tmp_path / "scene.png"), "--has", "cyan cube", "--add", "red sphere",
                                 "-o", str(tmp_path / "out.png"), "--checkpoint", str(editor)])
    assert result.exit_code != 0 and "scene.png is not a readable image" in result.output
    config = tmp_path / "config.toml"
    config.write_text("[train]\nsteps = 3\n")
    scene = _scene_png(tmp_path / "ok.png")
    result = runner.invoke(app, ["edit", str(scene), "--has", "cyan cube", "--add", "red sphere", "-o", str(config),
                                 "--checkpoint", str(editor)])
    assert result.exit_code != 0 and config.read_text() == "[train]\nsteps = 3\n"


def test_edit_without_has_reads_the_scene_with_the_judge_and_says_what_it_read(tiny_models, runner, tmp_path,
                                                                               monkeypatch):
    import clevrgen.editing as editing
    from clevrgen.cli import app

    _, editor, _ = tiny_models
    scene = _scene_png(tmp_path / "scene.png")
    reading = torch.zeros(1, 24)
    monkeypatch.setattr("clevrgen.judge.load_judge", lambda *a, **k: None)
    monkeypatch.setattr("clevrgen.judge.judge_probs", lambda judge, images: reading)
    result = runner.invoke(app, ["edit", str(scene), "--add", "red sphere", "-o", str(tmp_path / "out.png"),
                                 "--checkpoint", str(editor)])
    assert result.exit_code != 0 and "--has" in result.output and "reads no object" in result.output
    reading[0, 6] = 0.9  # cyan cube
    result = runner.invoke(app, ["edit", str(scene), "--add", "red sphere", "-o", str(tmp_path / "out.png"),
                                 "--checkpoint", str(editor)])
    assert result.exit_code == 0, result.output
    assert "the judge reads" in result.output and "cyan cube" in result.output
    assert editing.PHRASES[6] == "cyan cube"


def test_edit_sequence_writes_the_steps_as_a_strip(tiny_models, runner, tmp_path):
    from PIL import Image

    from clevrgen.cli import app

    generator, editor, _ = tiny_models
    result = runner.invoke(app, ["edit", "--sequence", "gray cube", "red sphere", "cyan cylinder", "-o",
                                 str(tmp_path / "steps.png"), "--checkpoint", str(editor), "--generator", str(generator)])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "steps.png") as image:
        assert image.size == (3 * 66 + 2, 68)  # three frames in a row (make_grid's padding 2)
    result = runner.invoke(app, ["edit", "--sequence", "gray cube", "gray cube", "-o", str(tmp_path / "x.png"),
                                 "--checkpoint", str(editor)])
    assert result.exit_code != 0 and "duplicate" in result.output


def test_evaluate_task_edit_scores_the_held_out_pairs(tiny_models, runner, tmp_path):
    import json

    from clevrgen.cli import app

    _, editor, dataset = tiny_models
    result = runner.invoke(app, ["evaluate", "--task", "edit", "--checkpoint", str(editor), "--data", str(dataset),
                                 "--out", str(tmp_path / "ev"), "--seeds", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert record["task"] == "edit" and record["pairs"] >= 2 and len(record["passes"]) == 2
    for key in ("topk_accuracy", "exact_accuracy", "f1", "source_kept", "psnr", "ssim"):
        assert key in record and key in record["real_pairs"]
    assert len(record["iterative"]["f1_by_step"]) == 3 and "beyond" not in record
    assert (tmp_path / "ev" / "grid.png").is_file()
    result = runner.invoke(app, ["evaluate", "--task", "edit", "--checkpoint", str(editor), "--data", str(dataset),
                                 "--out", str(tmp_path / "ev3"), "--no-iterative", "--beyond"])
    assert result.exit_code == 0, result.output
    beyond = json.loads((tmp_path / "ev3" / "results.json").read_text())["beyond"]
    assert beyond["scenes"] >= 1 and "a fifth object added to" in result.output
    for name in ("fourth", "fifth"):
        assert set(beyond[name]) == {"topk_accuracy", "exact_accuracy", "f1", "source_kept", "psnr", "ssim"}
    result = runner.invoke(app, ["evaluate", "--task", "edit", "--checkpoint", str(tiny_models[0]), "--data",
                                 str(dataset), "--out", str(tmp_path / "ev2")])
    assert result.exit_code != 0 and "is a generator" in result.output


def test_the_edit_metrics():
    from clevrgen.editing import f1_scores, psnr, ssim

    a = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.isinf(psnr(a, a)).all() and torch.allclose(ssim(a, a), torch.ones(2))
    b = (a.int() + 10).clamp(max=255).to(torch.uint8)
    assert (psnr(a, b) > 20).all() and (ssim(a, b) < 1).all()
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    probs = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.1, 0.1]])
    assert f1_scores(probs, labels).tolist() == pytest.approx([0.5, 0.0])

@torch.no_grad()
def test_an_edit_draws_bit_for_bit_what_the_editors_own_loop_drew():
    """The pipeline's one loop draws an edit as issue 47's editor loop did: three predictions a
    step (labels and source, source alone, neither) in one batch, combined as InstructPix2Pix."""
    from clevrgen.diffusion import sampling_scheduler
    from clevrgen.labels import multi_hot
    from clevrgen.model import build_model
    from clevrgen.pipeline import ClevrgenPipeline

    cfg = _config()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    scenes, source = [["red sphere", "gray cube"], ["cyan cylinder"]], torch.rand(2, 3, 64, 64)
    guidance, image_guidance = 2.0, 1.5
    labels = multi_hot(scenes)
    scheduler = sampling_scheduler(cfg.diffusion, "dpm++")
    scheduler.set_timesteps(3)
    x = torch.stack([torch.randn((3, 64, 64), generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    x = x * scheduler.init_noise_sigma
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    empty = torch.zeros_like(labels)
    conditioning = model.label_encoder(torch.cat([labels, empty, empty]), int(labels.sum(dim=1).max()))
    sources = torch.cat([source * 2 - 1, source * 2 - 1, torch.zeros_like(source)])
    for t in scheduler.timesteps:
        full, kept, uncond = model.denoise(torch.cat([scheduler.scale_model_input(x, t)] * 3), t, conditioning,
                                           sources).chunk(3)
        out = uncond + image_guidance * (kept - uncond) + guidance * (full - kept)
        x = scheduler.step(out.float(), t, x, generator=generators).prev_sample
    pipe = ClevrgenPipeline.from_denoiser(model, sampling_scheduler(cfg.diffusion, "dpm++"))
    pipe.set_progress_bar_config(disable=True)
    edited = pipe(scenes, image=source, image_guidance_scale=image_guidance, guidance_scale=guidance,
                  num_inference_steps=3, seed=3, output_type="latent").images
    assert torch.equal(x.clamp(-1.0, 1.0), edited)


def test_the_shipped_editor_is_the_shipped_generator_with_a_source_and_small():
    from clevrgen.artifact import SHIPPED_EDITOR, SHIPPED_MODEL, load_artifact

    if not (SHIPPED_EDITOR / "config.toml").is_file():
        pytest.skip("no shipped editor")
    size = sum(p.stat().st_size for p in SHIPPED_EDITOR.rglob("*") if p.is_file())
    assert size <= 30 * 2**20
    editor, config = load_artifact(SHIPPED_EDITOR)  # checked against SHA256SUMS
    _, generator_config = load_artifact(SHIPPED_MODEL)
    assert editor.is_editor and config.model.source_image
    assert config.model.model_copy(update={"source_image": False}) == generator_config.model
    from safetensors import safe_open

    with safe_open(str(SHIPPED_EDITOR / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())


def test_beyond_three_adds_a_fourth_then_a_fifth_object_not_yet_in_the_scene():
    from types import SimpleNamespace

    from clevrgen.config import load_config
    from clevrgen.data.iclevr import ImageSet
    from clevrgen.editing import beyond_three
    from clevrgen.judge import load_judge

    labels = torch.zeros(3, 24)
    labels[0, [0, 1, 2]] = labels[1, [5, 9, 23]] = labels[2, [4]] = 1  # two 3-object scenes and one of 1
    held = ImageSet(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8), labels, torch.zeros(3, dtype=torch.int64),
                    ["a_2.png", "b_2.png", "c_0.png"])
    asked = []

    def pipe(labels, image, **kwargs):  # an "editor" that keeps its source and notes what it was asked for
        asked.append((labels.clone(), kwargs["seed"]))
        return SimpleNamespace(images=image)

    sample, judge = load_config(None, EDITOR).sample, load_judge(None)
    result = beyond_three(pipe, sample, held, judge, progress=False)
    assert result["scenes"] == 2 and set(result) == {"scenes", "fourth", "fifth"}
    (fourth, seeds4), (fifth, seeds5) = asked
    assert fourth.sum(1).tolist() == [4, 4] and fifth.sum(1).tolist() == [5, 5]
    assert (fourth >= labels[:2]).all() and (fifth >= fourth).all() and seeds4 != seeds5
    again = []
    beyond_three(lambda labels, image, **kw: again.append(labels) or SimpleNamespace(images=image), sample, held, judge,
                 progress=False)
    assert torch.equal(again[0], fourth) and torch.equal(again[1], fifth)  # every model adds the same objects
