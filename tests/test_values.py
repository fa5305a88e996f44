"""Numbers, names and messages: every numeric value has a finite range, NaN is "not a number",
JSON stays JSON, an error names the option that was wrong, help says what the command does,
a stop acts within a step, and a suggestion is made only when it is close."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clevrgen.artifact import save_artifact
from clevrgen.cli import app
from clevrgen.config import load_config
from clevrgen.errors import CheckpointError, ConfigError
from clevrgen.model import build_model
from clevrgen.output import strict_json

from conftest import TINY
from test_reliability import expect, flat

SAMPLE = ["--steps", "1", "--num", "1"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    cfg = load_config(None, [*TINY, "model.patch_size=2"])
    save_artifact(build_model(cfg.model).eval(), cfg, tmp_path / "model", {"max_objects": 3})
    return tmp_path / "model"


@pytest.mark.parametrize("value, message", [
    ("inf", "--guidance"), ("1e30", "--guidance"), ("-1", "--guidance"),
    ("nan", "must be a number (got nan)"),
])
def test_absurd_guidance_is_one_line_and_no_image(runner, tmp_path, model_dir, value, message):
    out = tmp_path / "g.png"
    result = expect(runner, ["sample", "red sphere", "--checkpoint", model_dir, "-o", out, "--guidance", value,
                             *SAMPLE], 2, message)
    assert not out.exists() and "invalid config" not in flat(result)


@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", "train.lr: must be finite (got inf) (given by --set train.lr=inf)"),
    ("train.lr=nan", "train.lr: must be a number (got nan) (given by --set train.lr=nan)"),
    ("train.steps=1e999", "(given by --set train.steps=1e999)"),
    ("train.steps=100000000000000000000000000", "train.steps: Input should be less than or equal to 1000000000 (given by"),
    ("sample.seed=1180591620717411303424", "less than or equal to 9007199254740992"),
    ("train.steps=abc", "train.steps: Input should be a valid integer, unable to parse string as an integer (given by --set train.steps=abc)"),
])
def test_config_values_have_finite_ranges_and_errors_name_the_override(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value) and "tiny.toml" not in str(err.value)


def test_a_bad_value_in_the_file_still_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = -1.0\n")
    with pytest.raises(ConfigError, match=f"invalid config {bad}:\n  train.lr: Input should be greater than 0"):
        load_config(bad)


def test_command_ranges_match_the_config_and_are_in_the_help(runner):
    from clevrgen.commands import _options
    from clevrgen.config import MAX_GUIDANCE, MAX_SAMPLE_STEPS, MAX_SEED

    assert (_options.MAX_SEED, _options.MAX_SAMPLE_STEPS, _options.MAX_GUIDANCE) == (MAX_SEED, MAX_SAMPLE_STEPS, MAX_GUIDANCE)
    text = help_text(runner, "sample")
    for shown in ("0<=x<=9007199254740992", "1<=x<=10000", "scale,0to100."):
        assert shown in text.replace(" ", ""), shown


def test_integers_beyond_any_type_are_usage_errors(runner, tmp_path, model_dir):
    for option, value in (("--seed", "99999999999999999999999"), ("--steps", str(10**30)), ("--num", str(2**70))):
        result = runner.invoke(app, ["sample", "red sphere", "--checkpoint", str(model_dir), "-o", str(tmp_path / "x.png"),
                                     option, value])
        assert result.exit_code == 2 and "Traceback" not in result.output, (option, result.output)


def test_more_steps_than_the_training_schedule(runner, tmp_path, model_dir):
    # the tiny model trains with 50 timesteps
    for sampler in ("ddim", "ddpm", "dpm++"):
        expect(runner, ["sample", "red sphere", "--checkpoint", model_dir, "-o", tmp_path / "x.png", "--num", "1",
                        "--steps", "60", "--sampler", sampler], 2, "--steps / sample.steps 60 is more than the model's "
                                                                   "50 training timesteps: give at most 50")


def test_json_output_is_strict_json(runner, tmp_path, model_dir):
    assert strict_json({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'
    result = expect(runner, ["evaluate", "--checkpoint", model_dir, "--split", "test", "--steps", "1", "--json",
                             "--out", tmp_path / "ev"], 0)

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    json.loads(result.stdout.strip().splitlines()[-1], parse_constant=refuse)
    json.loads((tmp_path / "ev" / "results.json").read_text(), parse_constant=refuse)


def test_a_non_finite_loss_before_any_checkpoint_says_none_was_saved(runner, dataset, tmp_path, monkeypatch):
    import clevrgen.train as training

    real = training.diffusion_loss
    monkeypatch.setattr(training, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    args = ["train", "--out", tmp_path / "r", *[x for s in TINY for x in ("--set", s)],
            "--set", f"data.path='{dataset}'", "--set", "train.steps=4"]
    result = expect(runner, args, 1, "the loss became non-finite (nan) by step 1; no checkpoint had been saved yet")
    assert "last good checkpoint" not in flat(result) and not (tmp_path / "r" / "state.pt").exists()
    # the rerun rule: the same command again starts the run over, and says so
    monkeypatch.setattr(training, "diffusion_loss", real)
    expect(runner, args, 0, "a training run stopped before its first checkpoint", "starts it over", "done")
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 1  # the stopped run's records are not kept


def test_an_unknown_device_is_a_usage_error(runner, tmp_path):
    expect(runner, ["data", "render", "--out", tmp_path / "r", "--random", "1", "--device", "tpu"], 2,
           "unknown device 'tpu': use cpu, cuda, cuda:N or auto")
    assert not (tmp_path / "r").exists()


def help_text(runner, *command) -> str:
    """A command's --help with rich's boxes and wrapping undone."""
    import re

    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", runner.invoke(app, [*command, "--help"]).output).split())


def test_sample_help_says_what_its_config_and_phrases_take(runner):
    text = help_text(runner, "sample")
    assert "with only the sample and evaluate tables" in text and "tiny, cpu" not in text
    assert "One to three" not in text and "1 to 3; more are drawn, with a warning" in text


def test_resuming_a_finished_run_or_below_its_step_is_refused_and_rewrites_nothing(runner, dataset, tmp_path):
    run = tmp_path / "r"
    args = ["train", "--out", run, *[x for s in TINY for x in ("--set", s)], "--set", f"data.path='{dataset}'",
            "--set", "train.steps=4"]
    expect(runner, args, 0, "done")
    config = (run / "config.toml").read_bytes()
    expect(runner, ["train", "--resume", run], 2, "has finished its 4 steps", "nothing to train")
    expect(runner, ["train", "--resume", run, "--set", "train.steps=2"], 2, "is past train.steps = 2",
           "--set train.steps=N, N above 4")
    assert (run / "config.toml").read_bytes() == config


def test_a_stop_during_trainings_evaluation_acts_within_a_step(dataset, tmp_path, monkeypatch):
    """Ctrl-C while the end-of-run evaluation samples: it stops after the step in hand, saves, exits 130."""
    from clevrgen.data.iclevr import load_iclevr
    from clevrgen.model import LabelConditionedUNet
    from clevrgen.train import TrainingInterrupted, train

    cfg = load_config(None, [*TINY, "train.steps=2", "train.eval_splits=['test', 'new_test']", "sample.steps=20",
                             "sample.guidance=2.0"])
    calls = []
    real = LabelConditionedUNet.denoise  # every UNet call, training's and each sampling step's

    def counting(self, x, t, conditioning, source=None):
        calls.append(len(x))
        if torch.is_grad_enabled() is False and len(calls) == 3:  # within the evaluation's sampling
            signal.raise_signal(signal.SIGINT)
        return real(self, x, t, conditioning, source)

    monkeypatch.setattr(LabelConditionedUNet, "denoise", counting)
    with pytest.raises(TrainingInterrupted) as err:
        train(cfg, tmp_path / "r", load_iclevr(dataset, progress=False), progress=False)
    assert err.value.exit_code == 130 and (tmp_path / "r" / "state.pt").is_file()
    # the stop came in the last step's evaluation: nothing is left to resume, and no resume is offered
    assert "at step 2, the run's last; checkpoint saved: training is complete" in str(err.value)
    assert "--resume" not in str(err.value)
    sampling_calls = [n for n in calls if n == 64]  # 32 label sets with guidance
    assert len(sampling_calls) <= 2, len(sampling_calls)  # not the 2 x 20 steps of both splits


def test_a_large_strip_is_drawn_in_batches(tmp_path, model_dir):
    from clevrgen.loaded import LoadedModel

    loaded = LoadedModel.load(model_dir)
    loaded.config = loaded.config.model_copy(update={"sample": loaded.config.sample.model_copy(
        update={"steps": 2, "batch_size": 2})})
    scenes = [["red sphere"], ["cyan cube"], ["gray cylinder", "blue cube"]]
    strip = loaded.trajectory(scenes, [0, 1, 2], 3)
    assert strip.shape == (3, 3, 3, 64, 64)


@pytest.mark.parametrize("phrase, hint", [
    ("🔴 ⚽", None), ("xyz abc", None), ("red", None),
    ("purple sphear", "purple sphere"), ("gren cilinder", "green cylinder"), ("pink cube", "purple cube"),
])
def test_suggestions_only_when_close(phrase, hint):
    from clevrgen.labels import suggest

    assert suggest(phrase) == hint


def test_the_shipped_assets_match_their_checksums():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "asset_checksums.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_a_damaged_shipped_asset_is_refused(tmp_path, monkeypatch):
    import clevrgen.integrity as integrity

    assets = Path(shutil.copytree(integrity.ASSETS / "model", tmp_path / "assets" / "model"))
    monkeypatch.setattr(integrity, "ASSETS", tmp_path / "assets")
    monkeypatch.setattr(integrity, "SUMS", tmp_path / "assets" / "SHA256SUMS")
    (tmp_path / "assets" / "SHA256SUMS").write_text("".join(
        f"{integrity.sha256_of(p)}  {p.relative_to(tmp_path / 'assets').as_posix()}\n"
        for p in sorted(assets.rglob("*")) if p.is_file()))
    integrity.verify_shipped(assets)
    weights = assets / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="the shipped model/unet/diffusion_pytorch_model.safetensors does not "
                                              "match its recorded checksum"):
        integrity.verify_shipped(assets)


def test_export_does_not_copy_weights_that_do_not_fit(runner, tmp_path, model_dir):
    from safetensors.torch import load_file, save_file

    file = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(file))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(file))
    expect(runner, ["export", model_dir, "--out", tmp_path / "exp"], 1, "is missing", "do not fit the architecture")
    assert not (tmp_path / "exp").exists()


def test_one_writer_per_model_folder(runner, tmp_path, model_dir):
    """An export (or save_pretrained) into a folder another process is writing fails at once and
    writes nothing; the flock of the folder is what a second `clevrgen export` meets."""
    import fcntl
    import os

    from clevrgen.errors import ClevrgenError
    from clevrgen.pipeline import ClevrgenPipeline

    out = tmp_path / "exp"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # another writer: a second open file description of the folder
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        expect(runner, ["export", model_dir, "--out", out], 1, "is being written by another process",
               "one writer per output folder")
        with pytest.raises(ClevrgenError, match="is being written by another process"):
            ClevrgenPipeline.from_pretrained(model_dir).save_pretrained(out)
        assert list(out.iterdir()) == []
    finally:
        os.close(held)
    expect(runner, ["export", model_dir, "--out", out], 0, "wrote")
    assert (out / "model_index.json").is_file() and not any(p.name.endswith(".tmp") for p in out.rglob("*"))


@pytest.mark.parametrize("edit, message", [
    ({"guidance_scale": "5"}, "guidance_scale: Input should be a valid number"),
    ({"num_inference_steps": 0}, "num_inference_steps: Input should be greater than or equal to 1"),
    ({"max_objects": True}, "max_objects: Input should be a valid integer"),
    ({"unet": ["os", "system"]}, "unet.0: Input should be 'diffusers'"),
    (None, "Input should be an object"),
])
def test_a_pipeline_index_without_a_config_is_validated(tmp_path, model_dir, edit, message):
    """A save_pretrained folder without clevrgen's config.toml is read from model_index.json alone:
    a hand-edited value is refused in one line at load, not met mid-sampling."""
    from clevrgen.pipeline import ClevrgenPipeline

    folder = tmp_path / "pipe"
    ClevrgenPipeline.from_pretrained(model_dir).save_pretrained(folder)
    (folder / "config.toml").unlink()
    assert ClevrgenPipeline.from_pretrained(folder).config.max_objects == 3  # the index alone loads
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **edit}) if edit else "[3]")
    with pytest.raises(CheckpointError, match="model_index.json is not a valid pipeline index: .*" + message):
        ClevrgenPipeline.from_pretrained(folder)


# --- the value rule: a boolean is not a number; a table merges; the run's own files are inputs ---
@pytest.mark.parametrize("override", ["train.lr=true", "train.steps=true", "sample.guidance=false",
                                      "train.ema_sigma_rels=[true]", "model.patch_size=true"])
def test_a_boolean_is_not_a_number(override):
    with pytest.raises(ConfigError, match=r"a boolean is not a number .*\(given by --set "):
        load_config("tiny", [override])
    assert load_config("tiny", ["train.hflip=false", "model.attention=[true, false, true]"]).train.hflip is False


def test_an_override_of_a_table_merges_into_it():
    tiny = load_config("tiny")
    merged = load_config("tiny", ["train={steps=2}"])
    assert merged.train.steps == 2
    assert merged.train.model_copy(update={"steps": tiny.train.steps}) == tiny.train


@pytest.mark.parametrize("content, message", [
    ('{"max_objects": "3"}', "max_objects: Input should be a valid integer"),
    ('{"max_objects": 3', "training_data.json: not valid JSON"),
    ('[3]', "expected a JSON object"),
    ('{"stages": "x"}', "stages: Input should be a valid list"),
    ('{"stages": 3}', "stages: Input should be a valid list"),
    ('{"stages": [1, 2]}', "stages.0: Input should be a valid dictionary"),
    ('{"stages": [{"steps": "5"}]}', "stages.0.steps: Input should be a valid integer"),
    ('{"stages": [{"steps": 5, "curve": [{"step": 1}]}]}', "stages.0.curve.0.minutes: Field required"),
    ('{"stages": ' + "[" * 50_000 + "]" * 50_000 + "}", "training_data.json: not valid JSON (nested too deeply"),
])
def test_a_hand_edited_training_record_is_refused_in_one_line(runner, tmp_path, model_dir, content, message):
    (model_dir / "training_data.json").write_text(content)
    expect(runner, ["sample", "red sphere", "--checkpoint", model_dir, "-o", tmp_path / "s.png", *SAMPLE], 1,
           "training_data.json", message, "the run folder is damaged")
    assert not (tmp_path / "s.png").exists()


def test_a_hand_edited_chain_of_stages_is_refused_wherever_the_record_is_read(runner, tmp_path, model_dir, dataset):
    """export (which would copy it into a new model), train.init and the pipeline read the record
    through one check; a refused train.init leaves no folder and no train.lock behind."""
    from clevrgen import ClevrgenPipeline

    (model_dir / "training_data.json").write_text('{"max_objects": 3, "stages": [{"steps": "12000"}]}')
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    expect(runner, ["export", model_dir, "--out", tmp_path / "exp"], 1, "training_data.json is not a valid training "
           "record: stages.0.steps: Input should be a valid integer")
    assert not (tmp_path / "exp").exists()
    with pytest.raises(CheckpointError, match="stages.0.steps"):
        ClevrgenPipeline.from_pretrained(model_dir)
    run = tmp_path / "run"
    expect(runner, ["train", "--out", run, *[x for s in TINY for x in ("--set", s)], "--set", "model.patch_size=2",
                    "--set", f"data.path='{dataset}'", "--set", "train.steps=2", "--set", f"train.init='{model_dir}'"],
           1, "stages.0.steps")
    assert not run.exists()
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before


def test_a_split_nested_too_deeply_is_one_line(runner, tmp_path, model_dir):
    split = tmp_path / "deep.json"
    split.write_text("[" * 100_000 + "]" * 100_000)
    expect(runner, ["evaluate", "--checkpoint", model_dir, "--split", split, "--out", tmp_path / "ev", *SAMPLE[:2]], 1,
           f"{split}: not valid JSON (nested too deeply to read)")
    assert not (tmp_path / "ev").exists()


def test_a_large_sample_is_drawn_and_written_in_chunks(runner, tmp_path, model_dir, monkeypatch):
    """`sample -n 100000` needed ~20 GB at once; now memory is one chunk, and the grid is the same."""
    import numpy as np
    from PIL import Image

    import clevrgen.commands.sample as sample_command
    from clevrgen.loaded import LoadedModel

    calls = []
    real = LoadedModel.generate
    monkeypatch.setattr(LoadedModel, "generate", lambda self, scenes, seeds, **kw: calls.append(len(seeds)) or
                        real(self, scenes, seeds, **kw))
    args = ["sample", "red sphere", "cyan cube", "blue cube", "gray cube", "--checkpoint", model_dir,
            "--steps", "1", "--num", "19", "--set", "sample.batch_size=4", "-o"]
    expect(runner, [*args, tmp_path / "whole.png"], 0, "wrote")
    monkeypatch.setattr(sample_command, "GRID_CHUNK", 8)
    result = expect(runner, [*args, tmp_path / "chunked.png"], 0, "wrote")
    assert calls == [19, 8, 8, 3] and flat(result).count("warning:") == 1
    grids = [np.asarray(Image.open(tmp_path / name)) for name in ("whole.png", "chunked.png")]
    assert grids[0].shape == (3 * 66 + 2, 8 * 66 + 2, 3) and np.array_equal(*grids)


@pytest.mark.parametrize("count, per_row", [(1, 8), (5, 8), (13, 8), (20, 4)])
def test_the_streamed_grid_has_make_grids_pixels(tmp_path, count, per_row):
    import numpy as np
    from PIL import Image
    from torchvision.utils import save_image

    from clevrgen.evaluation import write_grid

    images = torch.randint(0, 256, (count, 3, 6, 7), dtype=torch.uint8)
    save_image(images.float() / 255, tmp_path / "ref.png", nrow=per_row, padding=2)
    write_grid(tmp_path / "new.png", images.split(2 * per_row), count, per_row)
    assert np.array_equal(*(np.asarray(Image.open(tmp_path / n)) for n in ("ref.png", "new.png")))


@pytest.mark.parametrize("sigma_rel, total", [(0.001, "0.21"), (0.279, "0.37")])
def test_an_ema_length_the_snapshots_cannot_reach_is_refused(tmp_path, monkeypatch, sigma_rel, total):
    """Coefficients summing to 0.21 would scale every exported weight by 0.21: refused, not normalised."""
    import clevrgen.ema as ema
    from clevrgen.errors import UsageError

    snaps = [(2, 0.05, tmp_path / "a"), (2, 0.10, tmp_path / "b")]
    monkeypatch.setattr(ema, "power_snapshots", lambda run: snaps)
    with pytest.raises(UsageError, match=f"--ema-sigma-rel {sigma_rel:g} at step 2 is out of reach .* sum to {total}, "
                                         "not 1"):
        ema.posthoc_model(tmp_path, sigma_rel)
    for reachable in (0.05, 0.08, 0.10):
        ema.check_reachable(ema.posthoc_coefficients([2, 2], [0.05, 0.10], 2, reachable), reachable, 2, [0.05, 0.1])


def test_resuming_a_classic_ema_as_power_emas_says_why():
    from clevrgen.ema import PowerEMA
    from clevrgen.errors import first_line

    ema = PowerEMA([torch.nn.Parameter(torch.zeros(2))], [0.05])
    with pytest.raises(ValueError) as err:
        ema.load_state_dict({"decay": 0.9999, "optimization_step": 3, "shadow_params": [torch.zeros(2)]})
    assert "the checkpoint holds a classic EMA (train.ema_decay) but the config asks for power EMAs" in first_line(
        err.value) and "train.init=RUN" in first_line(err.value)


def test_a_resume_never_changes_the_objective_and_says_when_the_lr_plan_outruns_it(runner, dataset, tmp_path):
    """Another prediction type, number of timesteps or beta schedule (by --set or by an edit of
    config.toml) is refused with the way on; the run is left as it was. A warm-up or cool-down
    longer than the run is said, with its numbers."""
    run = tmp_path / "r"
    args = ["train", "--out", run, *[x for s in TINY for x in ("--set", s)], "--set", f"data.path='{dataset}'",
            "--set", "train.steps=2"]
    result = expect(runner, args, 0, "done")
    assert "warning" not in flat(result)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for change, was, asked in [("diffusion.prediction_type='v_prediction'", "'epsilon'", "'v_prediction'"),
                               ("diffusion.num_train_timesteps=40", "50", "40"),
                               ("diffusion.beta_schedule='cosine'", "'linear'", "'cosine'")]:
        key = change.split("=")[0]
        expect(runner, ["train", "--resume", run, "--set", change, "--set", "train.steps=4"], 1,
               f"cannot resume from {run}/state.pt: the checkpoint was trained with {key} = {was}, but the config "
               f"asks for {asked}", "cannot change on a resume", f"train.init={run}")
    (run / "config.toml").write_text((run / "config.toml").read_text().replace('"epsilon"', '"v_prediction"'))
    expect(runner, ["train", "--resume", run, "--set", "train.steps=4"], 1, "diffusion.prediction_type = 'epsilon'")
    (run / "config.toml").write_bytes(before["config.toml"])
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    expect(runner, ["train", "--resume", run, "--set", "train.steps=3", "--set", "train.lr_decay_steps=50"], 0,
           "warning: train.warmup_steps 0 + train.lr_decay_steps 50 are more than the run's train.steps 3: the lr "
           "never reaches train.lr 0.001 (at most 10.8% of it)", "done")


def test_eval_splits_naming_no_split_are_refused_before_training(runner, dataset, tmp_path):
    run = tmp_path / "r"
    expect(runner, ["train", "--out", run, *[x for s in TINY for x in ("--set", s)], "--set", f"data.path='{dataset}'",
                    "--set", "train.steps=2", "--set", "train.eval_splits=['test', 'nope']"], 1,
           "train.eval_splits: no such split or file: nope")
    assert not run.exists()


def test_a_refused_resume_of_an_exported_model_leaves_it_as_it_was(runner, model_dir):
    before = {str(p): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    expect(runner, ["train", "--resume", model_dir], 1, f"cannot resume: {model_dir}/state.pt not found")
    assert {str(p): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before


def test_resuming_power_emas_as_a_classic_ema_says_why(runner, dataset, tmp_path):
    """Removing train.ema_sigma_rels from a power-EMA run's config is refused with the way on,
    not the classic EMA's own KeyError, and the run is left as it was."""
    run = tmp_path / "r"
    args = ["train", "--out", run, *[x for s in TINY for x in ("--set", s)], "--set", f"data.path='{dataset}'",
            "--set", "train.steps=2", "--set", "train.ema_sigma_rels=[0.05, 0.10]"]
    expect(runner, args, 0, "done")
    state = (run / "state.pt").read_bytes()
    expect(runner, ["train", "--resume", run, "--set", "train.ema_sigma_rels=[]", "--set", "train.steps=4"], 1,
           "the checkpoint holds power EMAs (train.ema_sigma_rels = [0.05, 0.1]) but the config asks for a classic EMA",
           "train.init=RUN")
    assert (run / "state.pt").read_bytes() == state


@pytest.mark.parametrize("folders, message", [
    (["step-000002/ema-0.050", "step-000002/ema-nan"], "step-000002/ema-nan: not a snapshot clevrgen writes"),
    (["step-000002/ema-0.050", "step-000002/ema-0.500"], "step-000002/ema-0.500: not a snapshot clevrgen writes"),
    (["step-000000/ema-0.050"], "step-000000/ema-0.050: not a snapshot clevrgen writes"),
    (["step-000002/ema-0.050", "step-2/ema-0.050"],
     ("step-000002/ema-0.050 and {run}/snapshots/step-2/ema-0.050 are both the snapshot of step 2 at sigma_rel 0.05")),
])
def test_damaged_snapshot_folders_are_named(runner, tmp_path, model_dir, folders, message):
    """An `ema-nan` folder or a duplicated step ended in numpy's ValueError or LinAlgError."""
    for name in folders:
        (model_dir / "snapshots" / name).mkdir(parents=True)
    expect(runner, ["export", model_dir, "--out", tmp_path / "exp", "--ema-sigma-rel", "0.08"], 1,
           message.format(run=model_dir), "the run folder is damaged")
    assert not (tmp_path / "exp").exists()
