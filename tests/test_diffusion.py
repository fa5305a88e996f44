"""The model/scheduler core and the four commands, end to end, with a tiny UNet on the CPU."""

import json
import shutil
import warnings

import pytest
import torch

from clevrgen.artifact import load_artifact
from clevrgen.cli import app
from clevrgen.config import load_config
from clevrgen.errors import ConfigError
from clevrgen.data.iclevr import load_iclevr
from clevrgen.diffusion import sampling_scheduler
from clevrgen.labels import multi_hot
from clevrgen.model import build_model
from clevrgen.train import Trainer, train

from conftest import TINY, drawn


def tiny_config(*extra):
    return load_config(None, [*TINY, *extra])


@pytest.fixture
def trained_run(tmp_path, dataset):
    """A run folder after 4 training steps."""
    cfg = tiny_config("train.steps=4")
    train(cfg, tmp_path / "run", load_iclevr(dataset, progress=False), progress=False)
    return tmp_path / "run"


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(dataset):
    cfg = tiny_config("train.label_dropout=0", "train.hflip=false")
    trainer = Trainer(cfg, None, load_iclevr(dataset, progress=False), progress=False)
    x0, labels = trainer.data.images[:4].float() / 127.5 - 1, trainer.data.labels[:4]
    from clevrgen.loss import diffusion_loss

    def fixed_loss():
        with torch.no_grad():
            return diffusion_loss(trainer.model, trainer.noise_scheduler, x0, labels,
                                  torch.Generator().manual_seed(0), None).item()

    before = fixed_loss()
    for _ in range(30):
        loss = diffusion_loss(trainer.model, trainer.noise_scheduler, x0, labels, torch.Generator().manual_seed(0), None)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
    assert fixed_loss() < 0.7 * before


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_samples_do_not_depend_on_the_batch(sampler):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    labels = multi_hot([["red sphere"], ["cyan cube", "gray cylinder"], ["blue cube"]])
    sched = sampling_scheduler(cfg.diffusion, sampler)
    together = drawn(model, sched, labels, [7, 8, 9], steps=3, guidance=2.0)
    alone = drawn(model, sampling_scheduler(cfg.diffusion, sampler), labels[1:2], [8], steps=3, guidance=2.0)
    assert together.shape == (3, 3, 64, 64)
    torch.testing.assert_close(together[1:2], alone, atol=1e-4, rtol=0)


def test_the_denoising_strip_sees_the_noise_then_every_step():
    from clevrgen.callbacks import DenoisingStrip
    from clevrgen.data.iclevr import to_uint8
    from clevrgen.pipeline import ClevrgenPipeline

    cfg = tiny_config()
    pipe = ClevrgenPipeline.from_denoiser(build_model(cfg.model).eval(), sampling_scheduler(cfg.diffusion, "ddim"))
    pipe.set_progress_bar_config(disable=True)
    noise = pipe.prepare_latents(2, seed=0)
    strip = DenoisingStrip(4, 5, noise[:1])  # the first image of two
    final = pipe([["red cube"], ["gray sphere"]], seed=0, num_inference_steps=4, guidance_scale=1.0,
                 output_type="uint8", callback_on_step_end=strip, batch_size=1).images
    assert sorted(strip.taken) == [0, 1, 2, 3, 4]
    frames = strip.images()
    assert frames.shape == (1, 5, 3, 64, 64)
    assert torch.equal(frames[0, 0], to_uint8(noise[0].clamp(-1, 1)))  # ddim's init_noise_sigma is 1
    assert torch.equal(frames[0, -1], final[0])


def test_run_folder_and_artifact(trained_run):
    for name in ("config.toml", "metrics.jsonl", "loss.png", "state.pt", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "label_encoder/config.json",
                 "label_encoder/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        assert (trained_run / name).is_file(), name
    assert list((trained_run / "samples").glob("step_*.png"))
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "images_per_second"} <= set(records[0]) and "val_loss" in records[-1]
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(trained_run / "unet")


def test_save_then_load_gives_identical_samples(tmp_path, dataset):
    cfg = tiny_config("train.steps=2")
    trainer = Trainer(cfg, tmp_path / "run", load_iclevr(dataset, progress=False), progress=False)
    trainer.run()
    ema = trainer.ema_model()
    loaded, loaded_cfg = load_artifact(tmp_path / "run")
    assert loaded_cfg == cfg
    labels = multi_hot([["red sphere", "cyan cube"]])
    a = drawn(ema, sampling_scheduler(cfg.diffusion, "dpm++"), labels, [3], steps=3, guidance=1.5)
    b = drawn(loaded, sampling_scheduler(cfg.diffusion, "dpm++"), labels, [3], steps=3, guidance=1.5)
    assert torch.equal(a, b)


def test_resume_continues_from_the_saved_step(tmp_path, dataset):
    data = load_iclevr(dataset, progress=False)
    straight = train(tiny_config("train.steps=4"), tmp_path / "a", data, progress=False)
    train(tiny_config("train.steps=2"), tmp_path / "b", data, progress=False)
    resumed = train(tiny_config("train.steps=4"), tmp_path / "b", data, resume=True, progress=False)
    assert resumed.step == 4
    trace = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert trace(tmp_path / "a") == trace(tmp_path / "b")
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_takes_the_configs_lr(tmp_path, dataset):
    """``--set train.lr=...`` on a resume changes the lr from there on (the saved one is not kept)."""
    data = load_iclevr(dataset, progress=False)
    train(tiny_config("train.steps=2"), tmp_path / "run", data, progress=False)
    train(tiny_config("train.steps=3", "train.lr=2e-4"), tmp_path / "run", data, resume=True, progress=False)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3, 1e-3, 2e-4])


def test_the_optimizer_is_fused_and_a_run_saved_without_it_resumes_fused(tmp_path, dataset):
    """A checkpoint of the loop AdamW (runs from before the fused kernel) resumes with its moments
    and continues on the fused kernel, which load_state_dict alone would turn off."""
    data = load_iclevr(dataset, progress=False)
    train(tiny_config("train.steps=2"), tmp_path / "run", data, progress=False)
    path = tmp_path / "run" / "state.pt"
    state = torch.load(path, weights_only=True)
    assert state["optimizer"]["param_groups"][0]["fused"]
    state["optimizer"]["param_groups"][0]["fused"] = None  # as the loop kernel saved it
    torch.save(state, path)
    resumed = Trainer(tiny_config("train.steps=3"), tmp_path / "run", data, progress=False, resume=True)
    resumed.load_checkpoint()
    assert resumed.optimizer.param_groups[0]["fused"]
    moments = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(moments[i]["exp_avg"], saved["exp_avg"]) for i, saved in state["optimizer"]["state"].items())


@pytest.mark.parametrize("has_kernels", [True, False])
def test_bf16_computes_in_fp32_on_a_cpu_without_bf16_kernels(monkeypatch, dataset, has_kernels):
    """On an AVX2-only CPU, bf16 autocast falls back to reference loops (a cpu.toml step 24x slower
    than fp32): there "bf16" trains and samples in fp32, and training says so once."""
    from clevrgen import runtime
    from clevrgen.errors import ClevrgenWarning

    assert isinstance(runtime.cpu_has_kernels(torch.bfloat16), bool)  # the real check answers here
    monkeypatch.setattr(runtime, "cpu_has_kernels", lambda dtype: has_kernels)
    cpu = torch.device("cpu")
    assert runtime.autocast_dtype("bf16", cpu) == (torch.bfloat16 if has_kernels else None)
    assert runtime.autocast_dtype("fp32", cpu) is None and runtime.autocast_dtype("auto", cpu) is None
    data = load_iclevr(dataset, progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = Trainer(tiny_config("train.precision='bf16'"), None, data, progress=False)
    said = [str(w.message) for w in seen if issubclass(w.category, ClevrgenWarning) and "kernels" in str(w.message)]
    assert trainer.amp_dtype == (torch.bfloat16 if has_kernels else None)
    assert len(said) == (0 if has_kernels else 1) and all("computing in fp32" in m for m in said)


def test_init_starts_from_a_trained_model_and_checks_its_architecture(tmp_path, dataset):
    data = load_iclevr(dataset, progress=False)
    source = tmp_path / "source"
    train(tiny_config("train.steps=2"), source, data, progress=False)
    cfg = tiny_config("train.steps=1", f"train.init='{source}'", "train.lr=1e-12")
    tuned = train(cfg, tmp_path / "tuned", data, progress=False)
    assert tuned.step == 1
    a, _ = load_artifact(source)
    b, _ = load_artifact(tmp_path / "tuned")
    # One step at a vanishing lr: the new run holds the source's weights.
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert str(source) in json.loads((tmp_path / "tuned" / "training_data.json").read_text())["init"]
    with pytest.raises(ConfigError, match="another architecture"):
        train(tiny_config("train.steps=1", f"train.init='{source}'", "model.layers_per_block=2"),
              tmp_path / "other", data, progress=False)
    shutil.rmtree(source)  # a resume needs its own checkpoint only, and keeps the record
    train(tiny_config("train.steps=2", f"train.init='{source}'"), tmp_path / "tuned", data, resume=True, progress=False)
    assert str(source) in json.loads((tmp_path / "tuned" / "training_data.json").read_text())["init"]


def test_snapshots_keep_the_ema_weights_of_past_steps(tmp_path, dataset):
    data = load_iclevr(dataset, progress=False)
    train(tiny_config("train.steps=4", "train.snapshot_every=2"), tmp_path / "run", data, progress=False)
    snaps = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert snaps == ["step-000002", "step-000004"]
    early, _ = load_artifact(tmp_path / "run" / "snapshots" / "step-000002")
    final, _ = load_artifact(tmp_path / "run")
    last, _ = load_artifact(tmp_path / "run" / "snapshots" / "step-000004")
    weights = lambda m: torch.cat([v.flatten() for v in m.state_dict().values()])
    assert torch.allclose(weights(last), weights(final), atol=1e-2)  # the same step, stored as fp16
    assert not torch.allclose(weights(early), weights(final), atol=1e-4)
    record = json.loads((tmp_path / "run" / "snapshots" / "step-000002" / "training_data.json").read_text())
    assert record["steps"] == 2


def test_train_command_and_refusing_to_overwrite(runner, dataset, tmp_path):
    args = ["train", "--out", str(tmp_path / "run"), "--set", f"data.path='{dataset}'", "--set", "train.steps=2"]
    args += [x for s in TINY for x in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "done" in result.output and (tmp_path / "run" / "unet").is_dir()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=3"])
    assert resumed.exit_code == 0, resumed.output
    assert "3 steps" in resumed.output


def test_sample_command(runner, trained_run, tmp_path):
    out = tmp_path / "out.png"
    result = runner.invoke(app, ["sample", "red sphere", "Cyan Cube", "-o", str(out), "--checkpoint", str(trained_run),
                                 "--num", "3", "--steps", "2", "--sampler", "ddim", "--guidance", "2"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size == (3 * 66 + 2, 66 + 2)


def test_sample_rejects_a_bad_sampler(runner, trained_run):
    result = runner.invoke(app, ["sample", "red sphere", "--checkpoint", str(trained_run), "--sampler", "euler"])
    assert result.exit_code == 2 and "sample.sampler" in result.output


def test_denoise_strip_command(runner, trained_run, tmp_path):
    out = tmp_path / "strip.png"
    labels = tmp_path / "scenes.json"
    labels.write_text('[["red sphere", "cyan cylinder", "cyan cube"], ["gray cube"]]')
    result = runner.invoke(app, ["denoise-strip", "--labels", str(labels), "-o", str(out), "--frames", "4",
                                 "--steps", "6", "--checkpoint", str(trained_run)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size == (4 * 66 + 2, 2 * 66 + 2)


def test_evaluate_command_with_a_course_format_judge(runner, trained_run, tmp_path):
    from clevrgen.judge import build_judge

    course = tmp_path / "classifier_weight.pth"
    torch.save({"model": build_judge().state_dict()}, course)
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--split", "test", "--checkpoint", str(trained_run), "--evaluator",
                                 str(course), "--steps", "2", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["split"] == "test" and summary["n_images"] == 32
    assert 0 <= summary["topk_accuracy"] <= 1 and 0 <= summary["exact_accuracy"] <= 1 and summary["seconds"] > 0
    assert (out / "grid.png").is_file() and (out / "results.json").is_file()
    assert len(list((out / "iclevr").glob("*.png"))) == 32
    assert len(json.loads((out / "train.json").read_text())) == 32


def test_fresh_scenes_fill_part_of_each_batch_and_resume_exactly(tmp_path, dataset):
    data = load_iclevr(dataset, progress=False)
    cfg = tiny_config("train.steps=3", "data.fresh=0.5", "data.fresh_objects=[2, 3]", "model.patch_size=2")
    trainer = Trainer(cfg, None, data, progress=False)
    images, labels = trainer.data.fresh.draw(step=5)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert set(labels.sum(1).tolist()) <= {2.0, 3.0}
    again, _ = trainer.data.fresh.draw(step=5)
    assert torch.equal(images, again) and not torch.equal(images, trainer.data.fresh.draw(step=6)[0])

    straight = train(cfg, tmp_path / "a", data, progress=False)
    train(tiny_config("train.steps=2", "data.fresh=0.5", "data.fresh_objects=[2, 3]", "model.patch_size=2"),
          tmp_path / "b", data, progress=False)
    resumed = train(cfg, tmp_path / "b", data, resume=True, progress=False)
    assert straight.step == resumed.step == 3
    trace = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert trace(tmp_path / "a") == trace(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "training_data.json").read_text())["max_objects"] == 3


def test_draw_batch_puts_fresh_scenes_first():
    from clevrgen.data.batches import draw_batch

    cfg = tiny_config("train.label_dropout=0", "train.hflip=false")
    stored = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    fresh = (torch.full((1, 3, 8, 8), 255, dtype=torch.uint8), torch.ones(1, 24))
    x0, labels = draw_batch(stored, torch.zeros(6, 24), cfg, torch.Generator().manual_seed(0), fresh)
    assert x0.shape[0] == cfg.train.batch_size
    assert (x0[0] == 1).all() and (x0[1:] == -1).all()
    assert labels[0].sum() == 24 and labels[1:].sum() == 0


def test_fp16_trains_with_a_loss_scaler_and_a_non_finite_step_touches_no_weight(monkeypatch, dataset, tmp_path):
    """fp16's range underflows small gradients and overflows large ones to inf: training scales
    the loss (GradScaler), skips a step whose gradients are not finite, and keeps the scale in
    its checkpoint. On this CPU fp16 is made to run as on a GPU (kernels or not)."""
    from clevrgen import runtime

    monkeypatch.setattr(runtime, "cpu_has_kernels", lambda dtype: True)
    data = load_iclevr(dataset, progress=False)
    trainer = Trainer(tiny_config("train.precision='fp16'"), tmp_path / "run", data, progress=False)
    assert trainer.amp_dtype == torch.float16 and trainer.scaler is not None
    assert torch.isfinite(trainer.train_step())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.scaler.update(new_scale=3e38)  # the next backward overflows to inf
    trainer.train_step()
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))  # skipped, not applied
    assert trainer.scaler.get_scale() < 3e38  # and the scale came down
    assert "scaler" in trainer.state_dict()
    assert Trainer(tiny_config("train.precision='bf16'"), None, data, progress=False).scaler is None


def test_bf16_on_a_gpu_without_it_is_fp16_with_a_scaler(monkeypatch):
    from clevrgen import runtime
    from clevrgen.errors import ClevrgenWarning

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cuda = torch.device("cuda")
    with pytest.warns(ClevrgenWarning, match="no bf16"):
        assert runtime.autocast_dtype("bf16", cuda, warn_fallback=True) == torch.float16
    assert runtime.autocast_dtype("auto", cuda) == torch.float16
    assert isinstance(runtime.grad_scaler(torch.device("cpu"), torch.float16), torch.amp.GradScaler)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.autocast_dtype("auto", cuda) == torch.bfloat16 and runtime.grad_scaler(cuda, torch.bfloat16) is None


def test_a_run_resumes_on_another_device(trained_run, dataset, capsys):
    """A CPU generator's state is 5,056 bytes, a CUDA one's 16: a run saved on one device and
    resumed on the other draws its batches afresh from the step, and says so."""
    from clevrgen.runfolder import read_state, write_state

    state = read_state(trained_run)
    assert state["gen"].numel() == torch.Generator().get_state().numel()
    state["gen"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA generator's
    write_state(trained_run, state)
    data = load_iclevr(dataset, progress=False)
    result = train(tiny_config("train.steps=6"), trained_run, data, resume=True, progress=False)
    assert result.step == 6
    said = " ".join(capsys.readouterr().err.split())
    assert "batch generator was another device's, so batches are drawn afresh from step 4" in said


def test_the_classic_ema_updates_all_weights_at_once():
    from clevrgen.ema import make_ema

    cfg = tiny_config()
    ema = make_ema(build_model(cfg.model), cfg)
    assert ema.foreach


def test_the_gpu_config_checkpoints_on_a_clock_a_user_would_pick():
    cfg = load_config("gpu", [])
    assert cfg.train.steps <= 100_000 and cfg.train.checkpoint_every <= 5_000 and cfg.train.sample_every <= cfg.train.steps


def test_an_export_adds_its_run_to_the_models_chain_of_stages(tmp_path, dataset, runner):
    """A relay stage starts from a model and its export carries the whole chain (training_data.json's
    ``stages``): what each stage started from, its steps, images, lr plan, machine and minutes."""
    from clevrgen.record import chain_curve

    data = load_iclevr(dataset, progress=False)
    train(tiny_config("train.steps=2"), tmp_path / "first", data, progress=False)
    assert runner.invoke(app, ["export", str(tmp_path / "first"), "--out", str(tmp_path / "m1")]).exit_code == 0
    train(tiny_config("train.steps=3", f"train.init='{tmp_path / 'm1'}'", "train.lr_decay_steps=1"),
          tmp_path / "second", data, progress=False)
    assert runner.invoke(app, ["export", str(tmp_path / "second"), "--out", str(tmp_path / "m2")]).exit_code == 0
    first, second = json.loads((tmp_path / "m2" / "training_data.json").read_text())["stages"]
    assert first["from"] == "random weights" and first["steps"] == 2 and first["images"] == 8
    assert str(tmp_path / "m1") in second["from"] and second["steps"] == 3 and second["images"] == 12
    assert "cool-down" in second["lr_plan"] and "cool-down" not in first["lr_plan"]
    assert second["machine"] and second["minutes"] >= 0  # minutes of the logged windows (a tiny run: ~0)
    assert json.loads((tmp_path / "m1" / "training_data.json").read_text())["stages"] == [first]
    rows, boundaries = chain_curve([{**first, "curve": [{"step": 2, "minutes": 1.0}]},
                                    {**second, "minutes": 2.0, "curve": [{"step": 3, "minutes": 2.0}]}])
    assert [(r["stage"], r["step"], r["minutes"]) for r in rows] == [(0, 2, 1.0), (1, 5, first["minutes"] + 2.0)]
    assert boundaries == [first["minutes"]]


def test_a_chain_of_stages_names_its_batch_sizes_where_they_differ():
    from clevrgen.record import describe_chain

    same = [{"steps": 12_000, "images": 384_000}, {"steps": 7_000, "images": 224_000}]
    assert describe_chain(same) == "12,000 + 7,000 steps"
    mixed = [*same, {"steps": 4_250, "images": 272_000}]
    assert describe_chain(mixed) == "12,000 + 7,000 steps of 32 + 4,250 steps of 64"
