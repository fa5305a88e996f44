"""What an output may overwrite: every command that writes a folder writes only a new or empty one,
or its own earlier output of the same kind; a file output never replaces a special file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from clevrgen.artifact import save_artifact
from clevrgen.config import load_config
from clevrgen.errors import UsageError
from clevrgen.model import build_model
from clevrgen.claims import claim_folder, folder_kind
from clevrgen.output import output_file

from conftest import TINY, write_dataset
from test_reliability import expect

SAMPLE = ["--steps", "1", "--num", "1"]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    cfg = load_config(None, [*TINY, "model.patch_size=2"])
    save_artifact(build_model(cfg.model).eval(), cfg, tmp_path / "model", {"max_objects": 3})
    return tmp_path / "model"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_kinds(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    assert folder_kind(tmp_path / "empty") is None
    assert folder_kind(tmp_path / "notes") == "other"
    assert folder_kind(model_dir) == "model"
    assert folder_kind(write_dataset(tmp_path / "data")) == "dataset"


@pytest.mark.parametrize("target, what", [
    ("data", "a dataset (train.json, iclevr/)"),
    ("model", "a clevrgen model"),
    ("notes", "other files (todo.txt)"),
])
def test_evaluate_never_writes_into_a_folder_of_another_kind(runner, tmp_path, model_dir, target, what):
    folders = {"data": write_dataset(tmp_path / "data"), "model": model_dir, "notes": tmp_path / "notes"}
    (tmp_path / "notes").mkdir(exist_ok=True)
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    before = snapshot(folders[target])
    expect(runner, ["evaluate", "--checkpoint", model_dir, "--split", "test", "--out", folders[target], *SAMPLE[:2]],
           2, f"--out {folders[target]} already holds {what}", "choose another --out")
    assert snapshot(folders[target]) == before


def test_evaluate_may_write_over_its_own_earlier_evaluation(runner, tmp_path, model_dir):
    args = ["evaluate", "--checkpoint", model_dir, "--split", "test", "--out", tmp_path / "ev", *SAMPLE[:2]]
    expect(runner, args, 0, "wrote")
    expect(runner, args, 0, "wrote")


def test_export_and_train_refuse_a_training_run_or_a_model(runner, tmp_path, model_dir, dataset):
    args = ["train", "--out", tmp_path / "run", *[x for s in TINY for x in ("--set", s)],
            "--set", f"data.path='{dataset}'", "--set", "train.steps=2"]
    expect(runner, args, 0, "done")
    before = snapshot(tmp_path / "run")
    expect(runner, ["export", model_dir, "--out", tmp_path / "run"], 2, "already holds a training run (state.pt)")
    assert snapshot(tmp_path / "run") == before
    # onto an export: refused too, the export stays as it was
    exported = snapshot(model_dir)
    expect(runner, [*args[:2], model_dir, *args[3:]], 2, f"--out {model_dir} already holds a clevrgen model")
    assert snapshot(model_dir) == exported
    # an export may replace an earlier export
    expect(runner, ["export", tmp_path / "run", "--out", tmp_path / "exp"], 0, "wrote")
    expect(runner, ["export", tmp_path / "run", "--out", tmp_path / "exp"], 0, "wrote")


def test_a_judge_is_not_trained_into_a_run_folder(runner, tmp_path, model_dir, dataset):
    before = snapshot(model_dir)
    expect(runner, ["evaluator", "train", "--data", dataset, "--out", model_dir / "judge.safetensors"], 2,
           "already holds a clevrgen model")
    assert snapshot(model_dir) == before


def test_render_adds_to_its_own_render_only_with_the_same_settings(runner, tmp_path):
    out = tmp_path / "r"
    expect(runner, ["data", "render", "--out", out, "--random", "2", "--objects", "1-1"], 0, "2 images rendered")
    first = json.loads((out / "train.json").read_text())
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"CLEVR_extra_000000_0.png": ["red sphere"]}))
    expect(runner, ["data", "render", "--out", out, "--spec", extra], 0, "1 images rendered, 2 already there")
    listed = json.loads((out / "train.json").read_text())
    assert set(first) < set(listed) and len(listed) == 3  # nothing listed before dropped out
    expect(runner, ["data", "render", "--out", out, "--spec", extra, "--seed", "1"], 1, "another render")
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"CLEVR_extra_000000_0.png": ["cyan cube"]}))
    expect(runner, ["data", "render", "--out", out, "--spec", clash], 1, "lists CLEVR_extra_000000_0.png with other objects")
    assert json.loads((out / "train.json").read_text()) == listed


def test_render_never_writes_into_a_dataset_it_did_not_render(runner, tmp_path):
    real = write_dataset(tmp_path / "real")
    before = snapshot(real)
    expect(runner, ["data", "render", "--out", real, "--random", "1"], 1, "holds a dataset clevrgen did not render")
    assert snapshot(real) == before


def test_a_fifo_is_refused_never_replaced(runner, tmp_path, model_dir):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    expect(runner, ["sample", "red sphere", "--checkpoint", model_dir, "-o", fifo, *SAMPLE], 2,
           "it is a FIFO, not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_special_files_are_named(monkeypatch, tmp_path):
    """A character device (as /dev/null) is refused by its kind, without touching a real one."""
    real_stat = os.stat
    fake = tmp_path / "null"
    fake.write_text("")
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: os.stat_result((stat.S_IFCHR | 0o666,) + real_stat(fake)[1:])
                        if Path(p) == fake else real_stat(p, *a, **k))
    with pytest.raises(Exception, match="it is a character device"):
        output_file(fake)


def test_a_symlink_output_writes_its_target_and_stays_a_link(runner, tmp_path, model_dir):
    target, link = tmp_path / "real.png", tmp_path / "link.png"
    from PIL import Image

    Image.new("RGB", (2, 2)).save(target)  # an image: a file output replaces only its own kind
    old = target.read_bytes()
    link.symlink_to(target)
    expect(runner, ["sample", "red sphere", "--checkpoint", model_dir, "-o", link, *SAMPLE], 0, "wrote")
    assert link.is_symlink() and target.read_bytes()[:4] == b"\x89PNG" and target.read_bytes() != old


def test_a_name_longer_than_the_file_system_allows(runner, tmp_path, model_dir):
    long = tmp_path / ("x" * 300 + ".png")
    expect(runner, ["sample", "red sphere", "--checkpoint", model_dir, "-o", long, *SAMPLE], 2,
           "is 304 bytes long; file systems allow 255 per name")


def test_claim_allows_new_empty_and_same_kind(tmp_path, model_dir):
    claim_folder(tmp_path / "new", "evaluation")
    (tmp_path / "empty").mkdir()
    claim_folder(tmp_path / "empty", "dataset")
    claim_folder(model_dir, "model")


def test_a_stopped_evaluations_folder_is_its_own_to_resume(tmp_path):
    """An evaluation stopped part way leaves only its finished passes: running it again resumes
    there, and no other command takes the folder for its own."""
    (tmp_path / "ev" / ".passes").mkdir(parents=True)
    (tmp_path / "ev" / ".passes" / "seed-0.safetensors").write_bytes(b"x")
    assert folder_kind(tmp_path / "ev") == "evaluation"
    claim_folder(tmp_path / "ev", "evaluation")
    with pytest.raises(UsageError, match="an evaluation"):
        claim_folder(tmp_path / "ev", "dataset")


def test_export_sets_only_the_models_sampling_defaults(runner, tmp_path, model_dir):
    from clevrgen.pipeline import ClevrgenPipeline

    args = ["export", model_dir, "--out", tmp_path / "exp", "--set", "sample.guidance=5.5", "--set", "sample.steps=9"]
    expect(runner, args, 0, "wrote")
    pipe = ClevrgenPipeline.from_pretrained(tmp_path / "exp")
    assert (pipe.config.guidance_scale, pipe.config.num_inference_steps) == (5.5, 9)
    assert load_config(tmp_path / "exp" / "config.toml").sample.guidance == 5.5
    # the architecture and training are the run's: refused before anything is written
    expect(runner, ["export", model_dir, "--out", tmp_path / "x", "--set", "model.patch_size=1"], 2,
           "only its sampling defaults")
    expect(runner, ["export", model_dir, "--out", tmp_path / "x", "--set", "sample.guidance=500"], 2, "--set")
    expect(runner, ["export", model_dir, "--out", tmp_path / "x", "--set", "sample.steps=5000"], 2,
           "training timesteps")
    assert not (tmp_path / "x").exists()


# --- what a file output may replace: only a file of its own kind --------------------------------
def test_a_file_output_replaces_only_a_file_of_its_own_kind(runner, tmp_path, model_dir, dataset):
    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    import torch

    torch.save({"model": {}, "step": 3}, run / "state.pt")
    (run / "config.toml").write_text("[train]\n")
    before = snapshot(run) | {"train.json": (dataset / "train.json").read_bytes()}
    sample = ["sample", "red sphere", "--checkpoint", model_dir, *SAMPLE, "-o"]
    expect(runner, [*sample, run / "state.pt"], 2, f"--out {run / 'state.pt'} already holds a torch checkpoint; "
           "this command replaces only an image: choose another --out")
    expect(runner, [*sample, run / "config.toml"], 2, "already holds a text file")
    expect(runner, [*sample, model_dir / "unet" / "diffusion_pytorch_model.safetensors"], 2,
           "already holds safetensors weights")
    expect(runner, ["data", "info", dataset, "--grid", dataset / "train.json"], 2,
           f"--grid {dataset / 'train.json'} already holds a text file")
    expect(runner, ["denoise-strip", "red sphere", "--checkpoint", model_dir, "--steps", "1", "-o", run / "state.pt"],
           2, "already holds a torch checkpoint")
    expect(runner, ["evaluator", "export", "--out", run / "state.pt"], 2, "replaces only a course-format judge")
    assert snapshot(run) | {"train.json": (dataset / "train.json").read_bytes()} == before
    # an image over an image, and an empty file, are replaced
    expect(runner, [*sample, tmp_path / "a.png"], 0, "wrote")
    expect(runner, [*sample, tmp_path / "a.png"], 0, "wrote")
    (tmp_path / "empty.png").touch()
    expect(runner, [*sample, tmp_path / "empty.png"], 0, "wrote")


def test_save_pretrained_follows_exports_overwrite_rule(tmp_path, model_dir):
    import torch

    from clevrgen import ClevrgenPipeline

    pipe = ClevrgenPipeline.from_pretrained(model_dir)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"step": 3}, run / "state.pt")
    (run / "config.toml").write_text("[train]\nsteps = 3\n")
    before = snapshot(run)
    with pytest.raises(UsageError, match=f"save_directory {run} already holds a training run .*choose another"):
        pipe.save_pretrained(run)
    assert snapshot(run) == before
    # an earlier model folder is replaced whole: no config.toml of the old model survives a pipeline without one
    pipe.save_pretrained(tmp_path / "copy")
    assert folder_kind(tmp_path / "copy") == "model"
    bare = ClevrgenPipeline(pipe.unet, pipe.label_encoder, pipe.scheduler)
    bare.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy" / "config.toml").exists()


# --- the rerun rule: a command's own unfinished output is its own ------------------------------
def test_a_commands_own_unfinished_output_is_its_own_to_start_over(tmp_path):
    """What an export, a training run and a judge's training leave when they stop before their
    output is whole is theirs to rerun (with a warning that says it starts over), and no one else's."""
    import warnings

    from clevrgen.locks import LOCK_FILE

    full = "".join(f"[{s}]\n" for s in ("data", "model", "diffusion", "train", "sample", "evaluate", "judge"))

    def make(name: str, files: dict[str, str], dirs=()) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for n, text in files.items():
            (folder / n).write_text(text)
        for d in dirs:
            (folder / d).mkdir()
        return folder

    export = make("export", {"training_data.json": "{}"}, ["unet", ".label_encoder.tmp"])  # stopped by SIGTERM
    run = make("run", {"config.toml": full, "metrics.jsonl": "{}\n", LOCK_FILE: ""})  # non-finite loss, full disk
    judge = make("judge", {"config.toml": full, "metrics.jsonl": "{}\n"})  # full disk, SIGTERM
    user = make("user", {"config.toml": "[train]\nlr = 1\n"})  # a config a user wrote is no one's output
    assert [folder_kind(f) for f in (export, run, judge, user)] == ["model", "run", "judge", "other"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for folder, kind in ((export, "model"), (run, "run"), (judge, "judge")):
            claim_folder(folder, kind)
    assert len(caught) == 3 and all("this is its rerun, which starts it over" in str(w.message) for w in caught)
    with pytest.raises(UsageError, match="already holds a training run stopped before its first checkpoint"):
        claim_folder(run, "judge")
    with pytest.raises(UsageError, match="already holds a judge's training stopped before it saved a judge"):
        claim_folder(judge, "run")
    for kind in ("run", "judge", "model"):
        with pytest.raises(UsageError, match=r"already holds other files \(config.toml\)"):
            claim_folder(user, kind)


def test_a_stopped_export_is_finished_by_the_same_command(runner, tmp_path, model_dir):
    import shutil

    out = tmp_path / "exp"
    out.mkdir()
    shutil.copytree(model_dir / "unet", out / "unet")  # SIGTERM after the UNet, before the rest
    (out / "training_data.json").write_text("{}")
    expect(runner, ["export", model_dir, "--out", out], 0, "unfinished export", "starts it over", "wrote")
    assert folder_kind(out) == "model" and json.loads((out / "training_data.json").read_text())["max_objects"] == 3


def test_a_file_outputs_own_dangling_link_is_still_followed(tmp_path):
    """Only folders through a broken link are refused: a file output that is a link to a file not
    yet written writes that file, as any symlink output does."""
    from clevrgen.claims import check_writable
    from clevrgen.output import atomic_write_text

    link = tmp_path / "f.png"
    link.symlink_to(tmp_path / "target.png")
    check_writable(link)
    atomic_write_text(link, "x")
    assert link.is_symlink() and (tmp_path / "target.png").read_text() == "x"


# --- outputs that land on what must not change ------------------------------------------------
def test_no_output_lands_in_the_install_or_inside_the_model_it_reads(runner, tmp_path, model_dir):
    """The shipped model's own folder (checked against SHA256SUMS), a snapshot inside the source
    run (read again by a later `export --ema-sigma-rel`): refused before anything is written."""
    import torch

    from clevrgen import ClevrgenPipeline
    from clevrgen.artifact import SHIPPED_EDITOR, SHIPPED_MODEL

    shipped = snapshot(SHIPPED_MODEL.parent)
    for target in (SHIPPED_MODEL, SHIPPED_EDITOR / "sub", SHIPPED_MODEL.parent / "new"):
        expect(runner, ["export", model_dir, "--out", target], 2, f"cannot write {target}: it lies inside this "
               "clevrgen install's shipped assets")
    pipe = ClevrgenPipeline.from_pretrained(model_dir)
    with pytest.raises(UsageError, match="shipped assets"):
        pipe.save_pretrained(SHIPPED_MODEL)
    expect(runner, ["sample", "red sphere", "--checkpoint", model_dir, *SAMPLE, "-o", SHIPPED_MODEL / "x.png"], 2,
           "shipped assets")
    assert snapshot(SHIPPED_MODEL.parent) == shipped and not (SHIPPED_MODEL.parent / "new").exists()
    # a snapshot inside the source run is neither exported nor saved over
    cfg = load_config(None, [*TINY, "model.patch_size=2"])
    inner = model_dir / "snapshots" / "step-2"
    save_artifact(build_model(cfg.model).eval(), cfg, inner, {"max_objects": 3})
    before = snapshot(model_dir)
    expect(runner, ["export", model_dir, "--out", inner], 2, f"--out {inner} lies inside {model_dir.resolve()}/"
           "snapshots, which this command reads")
    with pytest.raises(UsageError, match="lies inside"):
        pipe.save_pretrained(inner)
    assert snapshot(model_dir) == before
    # a pipeline loaded from a training run is not saved back over the run's fp32 weights
    torch.save({"step": 2}, model_dir / "state.pt")
    before = snapshot(model_dir)
    pipe = ClevrgenPipeline.from_pretrained(model_dir, torch_dtype=torch.float16)
    with pytest.raises(UsageError, match=f"save_directory {model_dir} already holds a training run"):
        pipe.save_pretrained(model_dir)
    assert snapshot(model_dir) == before


def test_an_export_is_readable_by_others_under_the_umask(runner, tmp_path, model_dir):
    from clevrgen import ClevrgenPipeline
    from clevrgen.output import UMASK

    expect(runner, ["export", model_dir, "--out", tmp_path / "exp"], 0, "wrote")
    ClevrgenPipeline.from_pretrained(model_dir).save_pretrained(tmp_path / "saved")
    for folder in (tmp_path / "exp", tmp_path / "saved"):
        modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
        assert modes["unet/diffusion_pytorch_model.safetensors"] == 0o666 & ~UMASK
        assert set(modes.values()) == {0o666 & ~UMASK}, modes


def test_a_smaller_evaluation_over_a_larger_one_leaves_only_its_own_images(runner, tmp_path, model_dir):
    scenes = [["red sphere"], ["blue cube"], ["green cylinder"]]
    for n in (3, 1):
        split = tmp_path / f"split{n}.json"
        split.write_text(json.dumps(scenes[:n]))
        expect(runner, ["evaluate", "--checkpoint", model_dir, "--split", split, "--out", tmp_path / "ev",
                        *SAMPLE[:2]], 0, "wrote")
    listed = json.loads((tmp_path / "ev" / "train.json").read_text())
    assert sorted(p.name for p in (tmp_path / "ev" / "iclevr").iterdir()) == sorted(listed) == ["image_0000.png"]


def test_an_export_stopped_at_its_first_file_is_rerun_as_its_message_says(runner, tmp_path, model_dir, monkeypatch):
    """The record is written after the weights: a stop before the UNet leaves no lone
    training_data.json, which no command could claim."""
    from clevrgen import artifact

    def stopped(write, target):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(artifact, "_replace_dir", stopped)
        with pytest.raises(KeyboardInterrupt):
            artifact.export_artifact(model_dir, tmp_path / "exp")
    assert folder_kind(tmp_path / "exp") is None
    expect(runner, ["export", model_dir, "--out", tmp_path / "exp"], 0, "wrote")
    assert json.loads((tmp_path / "exp" / "training_data.json").read_text())["max_objects"] == 3
