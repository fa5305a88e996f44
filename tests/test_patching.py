"""Full-size output at low cost: the pixel-unshuffled UNet, and the Min-SNR loss weighting."""

from pathlib import Path

import pytest
import torch

from clevrgen.artifact import load_artifact, save_artifact
from clevrgen.config import load_config
from clevrgen.diffusion import training_scheduler
from clevrgen.errors import ConfigError
from clevrgen.model import build_model
from clevrgen.loss import diffusion_loss, min_snr_weights

from conftest import TINY


def patched(*extra):
    return load_config(None, [*TINY, "model.patch_size=2", *extra])


def test_a_patched_unet_works_at_half_size_but_maps_full_size_images():
    cfg = patched()
    model = build_model(cfg.model).eval()
    assert model.unet.config.sample_size == 32 and model.unet.config.in_channels == 12
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 40]), torch.zeros(2, 24))
    assert out.shape == (2, 3, 64, 64)


def test_the_patch_path_keeps_every_pixel():
    """unshuffle then shuffle is the identity: a patched model loses no resolution on the way."""
    from torch.nn.functional import pixel_shuffle, pixel_unshuffle

    x = torch.rand(2, 3, 64, 64)
    for p in (2, 4):
        assert torch.equal(pixel_shuffle(pixel_unshuffle(x, p), p), x)


def test_the_saved_patched_artifact_is_a_plain_diffusers_unet(tmp_path):
    """The README's few lines: UNet2DModel.from_pretrained plus pixel (un)shuffle reproduce the model."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file
    from torch.nn.functional import pixel_shuffle, pixel_unshuffle

    cfg = patched()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_artifact(model, cfg, tmp_path / "run")
    loaded, saved_cfg = load_artifact(tmp_path / "run")
    assert saved_cfg.model.patch_size == 2 and loaded.patch_size == 2

    unet = UNet2DModel.from_pretrained(tmp_path / "run" / "unet").eval()
    proj = load_file(str(tmp_path / "run" / "label_encoder" / "diffusion_pytorch_model.safetensors"))
    labels = torch.zeros(1, 24)
    labels[0, 5] = 1
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([500])
    with torch.no_grad():
        plain = pixel_shuffle(unet(pixel_unshuffle(x, 2), t, class_labels=labels @ proj["proj.weight"].T + proj["proj.bias"]).sample, 2)
        ours = model(x, t, labels)
    torch.testing.assert_close(plain, ours)


def test_patch_size_must_divide_the_image_through_every_level():
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(None, ["model.patch_size=4", "model.block_out_channels=[32, 32, 32, 32, 32, 32]",
                           "model.attention=[false, false, false, false, false, false]"])
    with pytest.raises(ConfigError, match="model.patch_size"):
        load_config(None, ["model.patch_size=3"])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_cap_the_low_noise_steps(prediction):
    cfg = load_config(None, ["diffusion.beta_schedule='cosine'", f"diffusion.prediction_type='{prediction}'"])
    sched = training_scheduler(cfg.diffusion)
    t = torch.arange(0, 1000, 37)
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    w = min_snr_weights(sched, t, 5.0)
    assert torch.isfinite(w).all()
    # Weighed on the x0 error every step counts min(SNR, 5): the epsilon error is the x0 error
    # times SNR, the v error times SNR + 1 (up to the same factor).
    scale = snr if prediction == "epsilon" else snr + 1
    torch.testing.assert_close(w * scale, snr.clamp(max=5.0), rtol=1e-4, atol=1e-6)


def test_min_snr_off_is_the_plain_mse():
    cfg = load_config(None, ["diffusion.beta_schedule='cosine'", "diffusion.prediction_type='v_prediction'"])
    sched = training_scheduler(cfg.diffusion)
    model = build_model(patched().model)
    x0, labels = torch.rand(4, 3, 64, 64) * 2 - 1, torch.zeros(4, 24)
    with torch.no_grad():
        plain = diffusion_loss(model, sched, x0, labels, torch.Generator().manual_seed(0), None)
        off = diffusion_loss(model, sched, x0, labels, torch.Generator().manual_seed(0), None, cfg.diffusion)
        on = diffusion_loss(model, sched, x0, labels, torch.Generator().manual_seed(0), None,
                            cfg.diffusion.model_copy(update={"min_snr_gamma": 5.0}))
    assert plain == off and on != plain


def test_a_model_below_64_pixels_warns_that_it_is_capped():
    from clevrgen.errors import ClevrgenWarning
    from clevrgen.model import warn_if_upsampled

    with pytest.warns(ClevrgenWarning, match="0.554"):
        warn_if_upsampled(load_config(None, ["model.image_size=32"]).model)


def test_accuracy_against_training_minutes_from_the_metrics(tmp_path):
    from clevrgen.report import accuracy_curve, plot_accuracy_curve

    records = [{"step": 10, "loss": 1.0, "images_per_second": 32.0},
               {"step": 20, "loss": 0.9, "images_per_second": 16.0, "test_topk_accuracy": 0.5,
                "test_exact_accuracy": 0.25}]
    rows = accuracy_curve(records, batch_size=96, splits=["test"])
    # 10 steps of 96 images at 32 img/s (0.5 min), then 10 more at 16 img/s (1 min)
    assert rows == [{"step": 20, "minutes": pytest.approx(1.5), "test_topk": 0.5, "test_exact": 0.25}]
    plot_accuracy_curve(rows, ["test"], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_a_model_trained_in_stages_is_one_curve(tmp_path):
    """runs/a cut at step 20, continued by runs/b (train.init): b's steps and minutes count on."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from training_curve import chained_curve, stage

    def run(name, records):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.toml").write_text('[train]\nbatch_size = 96\neval_splits = ["test"]\n')
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return tmp_path / name

    scored = {"test_topk_accuracy": 0.5, "test_exact_accuracy": 0.25}
    a = run("a", [{"step": 10, "loss": 1.0, "images_per_second": 32.0, **scored},
                  {"step": 20, "loss": 0.9, "images_per_second": 16.0},
                  {"step": 30, "loss": 5.0, "images_per_second": 16.0, **scored}])  # past the cut: dropped
    b = run("b", [{"step": 10, "loss": 0.8, "images_per_second": 32.0, **scored}])
    rows, splits = chained_curve([stage(f"{a}:20"), stage(str(b))])
    assert splits == ["test"]
    assert [(r["step"], r["minutes"]) for r in rows] == [(10, pytest.approx(0.5)), (30, pytest.approx(2.0))]


def test_the_lr_cools_down_over_the_last_steps():
    from clevrgen.optim import lr_lambda

    f = lr_lambda(warmup=10, steps=100, decay_steps=40, final=0.1)
    assert f(0) == pytest.approx(0.1) and f(30) == 1.0 and f(60) == 1.0
    assert f(80) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert [f(s) for s in range(60, 101)] == sorted([f(s) for s in range(60, 101)], reverse=True)
    assert lr_lambda(warmup=0)(10**6) == 1.0


def test_the_runs_calendar_says_what_falls_due_after_each_step():
    from clevrgen.config import TrainConfig
    from clevrgen.train import due_after

    t = TrainConfig(steps=12, log_every=4, eval_every=6, sample_every=12, checkpoint_every=5, snapshot_every=3)
    due = {step: due_after(step, t) for step in range(1, 13)}
    assert [s for s, d in due.items() if d.log] == [4, 6, 8, 12]  # an evaluation is logged
    assert [s for s, d in due.items() if d.measure] == [6, 12]
    assert [s for s, d in due.items() if d.sample] == [12]
    assert [s for s, d in due.items() if d.snapshot] == [3, 6, 9, 12]
    assert [s for s, d in due.items() if d.checkpoint] == [5, 10, 12]  # the last step always saves
    assert not any(due_after(s, t.model_copy(update={"snapshot_every": 0})).snapshot for s in range(1, 13))
    # the last step snapshots too: relay stage 2 (8,500 steps, snapshots every 1,000) lost its end without it
    t = t.model_copy(update={"snapshot_every": 5})
    assert [s for s in range(1, 13) if due_after(s, t).snapshot] == [5, 10, 12]
