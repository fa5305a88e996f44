"""The editor (issue 47): i-CLEVR's k -> k + 1 pairs, a generator widened into an editor, the
conditioning dropout, the pipeline's ``image=`` and a tiny editor trained a few steps."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, TOKENS

EDITOR = [*TINY, *TOKENS, "model.patch_size=2", "model.source_image=true", "model.block_out_channels=[8, 16]",
          "model.attention=[false, true]", "model.cross_attention=[false, true]"]


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
