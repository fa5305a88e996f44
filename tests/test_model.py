"""The denoiser's designs: AdaGN, per-object tokens with cross-attention, and the objective's
options (log-normal noise levels, EDM weighting, immiscible noise), on tiny CPU models."""

import json
import shutil

import pytest
import torch

from clevrgen.artifact import load_artifact, save_artifact
from clevrgen.config import load_config
from clevrgen.diffusion import sampling_scheduler, training_scheduler
from clevrgen.errors import CheckpointError, ConfigError
from clevrgen.labels import multi_hot
from clevrgen.loss import assign_noise, diffusion_loss, draw_timesteps, loss_weights, sigmas_of
from clevrgen.model import LabelEncoder, build_model

from conftest import TINY, TOKENS, drawn


def tiny(*extra):
    return load_config(None, [*TINY, *extra])


def test_tokens_are_one_per_object_plus_an_always_present_null():
    encoder = LabelEncoder(embedding_dim=32, token_dim=8)
    labels = multi_hot([["red sphere", "cyan cube", "gray cylinder"], ["blue cube"]])
    tokens, mask = encoder.tokens(labels, num_objects=3)
    assert tokens.shape == (2, 4, 8)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # the same object is the same token wherever it appears, and order does not matter
    alone, _ = encoder.tokens(multi_hot([["cyan cube"]]), num_objects=1)
    assert any(torch.equal(alone[0, 1], tokens[0, k]) for k in (1, 2, 3))
    empty, empty_mask = encoder.tokens(torch.zeros(3, 24), num_objects=0)
    assert empty.shape == (3, 1, 8) and empty_mask.tolist() == [[1]] * 3
    # Unsized, every label is padded to the largest scene of the vocabulary: a shape that does
    # not depend on the labels' values, the same tokens, the padding masked.
    padded, padded_mask = encoder.tokens(labels)
    assert padded.shape == (2, 25, 8) and padded_mask.sum(1).tolist() == [4, 2]
    present = lambda tok, m: sorted(tok[m.bool()].tolist())  # noqa: E731  (in any order)
    assert all(present(padded[i], padded_mask[i]) == present(tokens[i], mask[i]) for i in range(2))


def test_padded_object_tokens_predict_what_sized_ones_do():
    """With self- and cross-attention at each token level (cpu.toml's design) the mask hides the
    padding. (A cross-attention-only level gets no mask from diffusers: there K matters.)"""
    cfg = tiny(*TOKENS, "model.attention=[false, true, true]")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x, t = torch.randn(3, 3, 64, 64), torch.tensor([3, 20, 40])
    labels = torch.cat([multi_hot([["red sphere", "cyan cube"], ["gray cube"]]), torch.zeros(1, 24)])
    with torch.no_grad():
        sized = model.denoise(x, t, model.label_encoder(labels, num_objects=2))
        padded = model(x, t, labels)
    torch.testing.assert_close(padded, sized, atol=1e-5, rtol=1e-5)


def test_the_token_denoiser_compiles_to_one_graph():
    """A graph break (a device sync such as ``.item()`` on the labels) fails ``fullgraph=True``:
    on a GPU each one would stall every UNet call."""
    cfg = tiny(*TOKENS)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([3, 40])
    labels = multi_hot([["red sphere", "cyan cube"], ["gray cube"]])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, labels), model(x, t, labels))


def test_a_token_model_is_a_unet2dconditionmodel_and_its_labels_matter():
    cfg = tiny(*TOKENS)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    assert type(model.unet).__name__ == "UNet2DConditionModel"
    with torch.no_grad():
        for p in model.label_encoder.class_tokens.parameters():
            p.normal_()
        x, t = torch.randn(1, 3, 64, 64).repeat(3, 1, 1, 1), torch.tensor([20, 20, 20])
        labels = torch.cat([multi_hot([["red sphere"], ["red sphere", "cyan cube"]]), torch.zeros(1, 24)])
        out = model(x, t, labels)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])


@pytest.mark.parametrize("extra", [[], ["model.resnet_time_scale_shift='scale_shift'"], TOKENS])
def test_every_design_saves_and_loads_to_the_same_samples(tmp_path, extra):
    cfg = tiny(*extra)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_artifact(model, cfg, tmp_path / "run")
    loaded, saved = load_artifact(tmp_path / "run")
    assert saved == cfg
    labels = multi_hot([["red sphere", "cyan cube"]])
    a = drawn(model, sampling_scheduler(cfg.diffusion, "dpm++"), labels, [3], steps=2, guidance=2.0)
    b = drawn(loaded, sampling_scheduler(cfg.diffusion, "dpm++"), labels, [3], steps=2, guidance=2.0)
    assert torch.equal(a, b)


def test_the_label_encoder_is_a_diffusers_model(tmp_path):
    encoder = LabelEncoder(embedding_dim=32, token_dim=8)
    encoder.save_pretrained(tmp_path / "enc")
    again = LabelEncoder.from_pretrained(tmp_path / "enc", local_files_only=True)
    labels = multi_hot([["red sphere", "cyan cube"]])
    assert all(torch.equal(a, b) for a, b in zip(encoder(labels).values(), again(labels).values()))


def test_a_run_of_the_older_layout_still_loads(tmp_path):
    """Runs written before the label encoder keep the projection in label_proj.safetensors."""
    from safetensors.torch import save_file

    cfg = tiny()
    model = build_model(cfg.model).eval()
    save_artifact(model, cfg, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "label_encoder")
    save_file({k: v.contiguous() for k, v in model.label_encoder.proj.state_dict().items()},
              str(tmp_path / "run" / "label_proj.safetensors"))
    loaded, _ = load_artifact(tmp_path / "run")
    assert torch.equal(loaded.label_encoder.proj.weight, model.label_encoder.proj.weight)


def rewrite_weights(file, change):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(file))
    change(weights)
    save_file(weights, str(file))


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop(next(iter(sorted(w)))), "is missing"),
    (lambda w: w.update({"extra.weight": torch.zeros(2)}), "tensor extra.weight is not part of this architecture"),
    (lambda w: w.update({k: torch.zeros(3, 3) for k in [next(iter(sorted(w)))]}), "has shape [3, 3]"),
])
def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path, change, message):
    cfg = tiny()
    save_artifact(build_model(cfg.model), cfg, tmp_path / "run")
    rewrite_weights(tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors", change)
    with pytest.raises(CheckpointError, match="the weights do not fit") as err:
        load_artifact(tmp_path / "run")
    assert message in str(err.value)


def test_a_token_encoder_beside_a_pooled_model_is_refused(tmp_path):
    cfg = tiny()
    save_artifact(build_model(cfg.model), cfg, tmp_path / "run")
    LabelEncoder(embedding_dim=32, token_dim=16).save_pretrained(tmp_path / "run" / "label_encoder")
    with pytest.raises(CheckpointError, match="token_dim 16"):
        load_artifact(tmp_path / "run")


def test_cross_attention_needs_one_flag_per_level():
    with pytest.raises(ConfigError, match="model.cross_attention has 2 entries"):
        tiny("model.cross_attention=[true, false]")


def test_lognormal_timesteps_consume_the_generator_like_uniform_ones():
    cfg = tiny("diffusion.num_train_timesteps=1000", "diffusion.beta_schedule='cosine'")
    sched = training_scheduler(cfg.diffusion)
    lognormal = cfg.diffusion.model_copy(update={"timesteps": "lognormal"})
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    t = draw_timesteps(sched, 20000, g1, lognormal, "cpu")
    draw_timesteps(sched, 20000, g2, cfg.diffusion, "cpu")
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))  # paired runs stay paired
    log_sigma = sigmas_of(sched)[t].log()
    assert abs(log_sigma.median().item() - (-1.2)) < 0.1  # EDM's P_mean
    assert 0.9 < log_sigma.std().item() < 1.4


def test_edm_weights_on_the_v_error_go_from_1_to_1_over_sigma_data_squared():
    cfg = tiny("diffusion.num_train_timesteps=1000", "diffusion.beta_schedule='cosine'",
               "diffusion.prediction_type='v_prediction'", "diffusion.weighting='edm'")
    sched = training_scheduler(cfg.diffusion)
    w = loss_weights(sched, torch.tensor([0, 500, 999]), cfg.diffusion)
    assert w[0].item() == pytest.approx(1.0, abs=0.01) and w[2].item() == pytest.approx(4.0, rel=0.01)
    assert torch.all(w[1:] >= w[:-1])


def test_immiscible_assignment_pairs_each_image_with_nearer_noise():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    assigned = assign_noise(x0, noise)
    assert sorted(assigned.flatten(1).sum(1).tolist()) == sorted(noise.flatten(1).sum(1).tolist())  # a permutation
    assert (x0 - assigned).square().sum() < (x0 - noise).square().sum()


def test_every_objective_trains_a_token_model(tmp_path):
    cfg = tiny(*TOKENS, "diffusion.immiscible=true", "diffusion.timesteps='lognormal'", "diffusion.weighting='edm'")
    model = build_model(cfg.model)
    labels = multi_hot([["red sphere"], ["cyan cube", "gray cube"], ["blue cube"], ["red cube"]])
    labels[2] = 0  # a dropped (unconditional) label
    x0 = torch.rand(4, 3, 64, 64) * 2 - 1
    loss = diffusion_loss(model, training_scheduler(cfg.diffusion), x0, labels, torch.Generator().manual_seed(0),
                          None, cfg.diffusion)
    loss.backward()
    assert torch.isfinite(loss) and model.label_encoder.class_tokens.weight.grad.abs().sum() > 0
    json.dumps(cfg.model.model_dump())  # the new settings are plain data for config.toml


def test_sigma_rel_and_gamma_as_edm2_gives_them():
    from clevrgen.ema import sigma_rel_to_gamma

    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


def test_posthoc_ema_rebuilds_a_tracked_average_from_snapshots():
    """Weights that follow a known path: the synthesized average of a length that was not tracked
    is close to the one computed directly, and a tracked one is reproduced."""
    import numpy as np

    from clevrgen.ema import PowerEMA, posthoc_coefficients

    torch.manual_seed(0)
    path = torch.randn(1200, 4).cumsum(0)
    param = torch.nn.Parameter(path[0].clone())
    tracked = PowerEMA([param], [0.05, 0.10])
    direct = PowerEMA([param], [0.07])
    snaps = []
    for t in range(1, 1201):
        param.data.copy_(path[t - 1])
        tracked.step([param])
        direct.step([param])
        if t % 200 == 0:
            snaps += [(t, s, tracked.averages[i][0].clone()) for i, s in enumerate(tracked.sigma_rels)]
    x = posthoc_coefficients([s for s, _, _ in snaps], [r for _, r, _ in snaps], 1200, 0.07)
    rebuilt = sum(float(w) * a for w, (_, _, a) in zip(x, snaps))
    target = direct.averages[0][0]
    assert torch.allclose(rebuilt, target, atol=0.05 * target.abs().max().item())
    x = posthoc_coefficients([s for s, _, _ in snaps], [r for _, r, _ in snaps], 1200, 0.10)
    assert np.argmax(np.abs(x)) == len(snaps) - 1 and x[-1] == pytest.approx(1.0, abs=1e-6)


def test_a_power_ema_run_keeps_snapshots_and_exports_any_length(runner, dataset, tmp_path):
    from clevrgen.cli import app

    args = ["train", "--out", str(tmp_path / "r"), *[x for s in TINY for x in ("--set", s)],
            "--set", f"data.path='{dataset}'", "--set", "train.steps=6", "--set", "train.snapshot_every=2",
            "--set", "train.ema_sigma_rels=[0.05, 0.10]"]
    assert runner.invoke(app, args).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "r" / "snapshots" / "step-000006").iterdir()) == ["ema-0.050", "ema-0.100"]
    result = runner.invoke(app, ["export", str(tmp_path / "r"), "--out", str(tmp_path / "e"), "--ema-sigma-rel", "0.08"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "e" / "training_data.json").read_text())
    assert record["ema_sigma_rel"] == 0.08 and record["steps"] == 6 and len(record["posthoc_ema"]) == 6
    load_artifact(tmp_path / "e")
    # the post-hoc sweep script scores synthesized lengths
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "posthoc_ema.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "r"), "--sigma-rels", "0.12",
                           "--passes", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| 0.120 | 7 |" in done.stdout and (tmp_path / "r" / "posthoc" / "ema-0.120-step-last").is_dir()
    # resuming a power-EMA run continues its averages
    assert runner.invoke(app, ["train", "--resume", str(tmp_path / "r"), "--set", "train.steps=8"]).exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "r"), "--out", str(tmp_path / "f"), "--ema-sigma-rel",
                                 "0.08", "--step", "5"])
    assert result.exit_code == 2 and "snapshots are at steps 2, 4, 6, 8" in result.output


@pytest.mark.parametrize("extra", [[], TOKENS])
def test_the_math_attention_kernel_is_the_same_math(extra):
    from clevrgen.model import set_attention_kernel

    cfg = tiny(*extra)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([3, 40])
    labels = multi_hot([["red sphere", "cyan cube"], ["gray cube"]])
    with torch.no_grad():
        fused = model(x, t, labels)
        set_attention_kernel(model, "math")
        explicit = model(x, t, labels)
    torch.testing.assert_close(fused, explicit, atol=1e-4, rtol=1e-4)


def test_the_attention_kernel_is_chosen_for_the_device_unless_forced():
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from clevrgen.model import attention_kernel_for, set_attention_kernel

    assert attention_kernel_for("auto", "cpu") == "math"
    assert attention_kernel_for("auto", torch.device("cuda", 0)) == "sdpa"
    assert attention_kernel_for("math", "cuda") == "math" and attention_kernel_for("sdpa", "cpu") == "sdpa"
    assert load_config(None, []).train.attention_kernel == "auto"
    assert load_config("cpu", []).train.attention_kernel == "auto"  # cpu.toml no longer forces math onto a GPU
    model = build_model(tiny(*TOKENS).model)
    processors = lambda: {type(m.processor) for m in model.modules() if isinstance(m, Attention)}  # noqa: E731
    set_attention_kernel(model, "auto")  # its weights are on the CPU
    assert processors() == {AttnProcessor}
    set_attention_kernel(model, "sdpa")
    assert processors() == {AttnProcessor2_0}
