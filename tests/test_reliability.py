"""Errors a user can cause: each ends with one clear message, the right exit code, no traceback,
and nothing already written damaged. See docs/reliability.md for the list of cases."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clevrgen.cli import app
from clevrgen.config import load_config
from clevrgen.data.iclevr import decode_image, load_iclevr
from clevrgen.errors import ClevrgenError
from clevrgen.train import STATE_FILE, train

from conftest import TINY, write_dataset

SRC = Path(__file__).resolve().parents[1] / "src" / "clevrgen"


def invoke(runner, *args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    # CliRunner hands back the exception of a crash; a handled error is a clean SystemExit.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def expect(runner, args, code, *fragments):
    result = invoke(runner, *args)
    assert result.exit_code == code, result.output
    text = flat(result)
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)
    if code:
        assert "error" in text.lower()
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder after 2 tiny training steps, trained on images of at most 3 objects."""
    root = tmp_path_factory.mktemp("reliability")
    data = load_iclevr(write_dataset(root / "data"), cache_dir=root / "cache", progress=False)
    cfg = load_config(None, [*TINY, "train.steps=2", f"data.path='{root / 'data'}'"])
    train(cfg, root / "run", data, progress=False)
    return root / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


SAMPLE = ["--steps", "1", "--num", "1"]


# --- phrases -------------------------------------------------------------------------------------


@pytest.mark.parametrize("phrases, message", [
    (["pink cube"], 'unknown phrase "pink cube". Did you mean "purple cube"?'),
    (["red spere"], 'Did you mean "red sphere"?'),
    (["red sphere", "Red_Sphere"], 'duplicate phrase "Red_Sphere": each object may be named once'),
    ([""], "empty phrase ''"),
    (["red sphere", "  "], "empty phrase"),
])
def test_bad_phrases_exit_2_before_loading_anything(runner, tmp_path, phrases, message):
    # The checkpoint does not exist: the phrase is checked first.
    expect(runner, ["sample", *phrases, "--checkpoint", tmp_path / "nothing"], 2, message)


def test_denoise_strip_needs_phrases_or_labels(runner, tmp_path):
    expect(runner, ["denoise-strip", "--checkpoint", tmp_path], 2, "give the scene's phrases or --labels FILE")
    labels = tmp_path / "scenes.json"
    labels.write_text('[["red sphere"], ["blue cub"]]')
    expect(runner, ["denoise-strip", "--labels", labels], 2, "label set 1", 'Did you mean "blue cube"?')
    labels.write_text('{"not": "a list"}')
    expect(runner, ["denoise-strip", "--labels", labels], 1, "expected a JSON list of phrase lists")


def test_more_objects_than_trained_is_allowed_with_a_warning(runner, run, tmp_path):
    assert json.loads((run / "training_data.json").read_text())["max_objects"] == 3
    four = ["red sphere", "cyan cube", "gray cylinder", "blue cube"]
    result = expect(runner, ["sample", *four, "--checkpoint", run, "-o", tmp_path / "a.png", *SAMPLE], 0,
                    "warning: the scene has 4 objects, but the model was trained on images of at most 3")
    assert (tmp_path / "a.png").is_file()
    assert "warning" not in invoke(runner, "sample", *four[:3], "--checkpoint", run, "-o", tmp_path / "b.png",
                                   *SAMPLE).output
    expect(runner, ["denoise-strip", *four, "--checkpoint", run, "-o", tmp_path / "s.png", "--frames", "2",
                    "--steps", "1"], 0, "warning: the scene has 4 objects")

    from clevrgen.judge import build_judge

    judge = tmp_path / "judge.pth"
    torch.save({"model": build_judge().state_dict()}, judge)
    split = tmp_path / "split.json"
    split.write_text(json.dumps([four, four[:2], four[1:]]))
    expect(runner, ["evaluate", "--split", split, "--checkpoint", run, "--evaluator", judge, "--steps", "1",
                    "--out", tmp_path / "eval", "--json"], 0, "warning: 1 of 3 label sets have up to 4 objects")


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("toml, message", [
    ("[train\nlr = 1", "not valid TOML"),
    ("[train]\nlrr = 1e-4\n[sampel]\nsteps = 2", "train.lrr: unknown key sampel: unknown key"),
    ('[train]\nlr = "fast"', "train.lr: Input should be a valid number"),
    ("[train]\nlr = -1e-4", "train.lr: Input should be greater than 0"),
    ("[train]\nsteps = 0", "train.steps: Input should be greater than or equal to 1"),
    ("[sample]\nguidance = -1.0", "sample.guidance: Input should be greater than or equal to 0"),
    ("[model]\nblock_out_channels = [8, 16]", "model.attention has 4 entries but block_out_channels has 2"),
    ("train = 3", "train: Input should be a valid dictionary"),
])
def test_bad_config_files_exit_2_with_the_dotted_path(runner, tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    expect(runner, ["train", "--config", path, "--print-config"], 2, "invalid config", message)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("train.steps=0", "train.steps: Input should be greater than or equal to 1"),
    ("train.bogus=1", "train.bogus: unknown key"),
    ("train.batch_size=many", "train.batch_size: Input should be a valid integer"),
    ("lr", "lr: expected section.key=value"),
    ("train.lr.x=1", "train.lr: Input should be a valid number"),
])
def test_bad_overrides_exit_2(runner, override, message):
    expect(runner, ["train", "--set", override, "--print-config"], 2, message)


def test_missing_config_file(runner, tmp_path):
    expect(runner, ["train", "--config", tmp_path / "nope.toml"], 2, "nope.toml: no such config file")


def test_sampling_settings_are_checked(runner, run, tmp_path):
    expect(runner, ["sample", "red sphere", "--checkpoint", run, "--guidance", "-1"], 2,
           "'--guidance': must be from 0 to 100 (got -1)")
    expect(runner, ["sample", "red sphere", "--checkpoint", run, "--sampler", "euler"], 2, "sample.sampler")
    expect(runner, ["sample", "red sphere", "--checkpoint", run, "--steps", "0"], 2, "--steps")
    config = tmp_path / "c.toml"
    config.write_text("[model]\nlayers_per_block = 3\n")
    expect(runner, ["sample", "red sphere", "--checkpoint", run, "--config", config], 2,
           "model: comes from the checkpoint")


def test_batch_larger_than_the_data(runner, dataset, tmp_path):
    args = ["train", "--out", tmp_path / "r", *[x for s in TINY for x in ("--set", s)],
            "--set", f"data.path='{dataset}'", "--set", "train.batch_size=100", "--set", "train.steps=1"]
    expect(runner, args, 2, "train.batch_size: 100 is larger than the 12 training images")
    assert not (tmp_path / "r" / STATE_FILE).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_missing_cuda(runner, run, dataset, tmp_path):
    expect(runner, ["sample", "red sphere", "--checkpoint", run, "--set", "sample.device='cuda'"], 2,
           "device 'cuda' was asked for, but no CUDA GPU is available: use cpu or auto")
    args = ["train", "--out", tmp_path / "r", *[x for s in TINY for x in ("--set", s)],
            "--set", f"data.path='{dataset}'", "--set", "train.device='cuda'"]
    expect(runner, args, 2, "no CUDA GPU is available")
    expect(runner, ["sample", "red sphere", "--checkpoint", run, "--set", "sample.device='tpu'"], 2,
           "sample.device: Input should be 'auto', 'cpu' or 'cuda'")


# --- datasets and images -------------------------------------------------------------------------


def damage_json(root: Path, name: str, text: str) -> None:
    (root / name).write_text(text)


@pytest.mark.parametrize("damage, message", [
    (lambda r: shutil.rmtree(r), "dataset folder not found"),
    (lambda r: [shutil.rmtree(r), r.mkdir()], "is not an i-CLEVR dataset folder: train.json, objects.json, iclevr/ missing"),
    (lambda r: shutil.rmtree(r / "iclevr"), "iclevr/ missing"),
    (lambda r: damage_json(r, "train.json", "{}"), "train.json: lists no images"),
    (lambda r: damage_json(r, "train.json", "[1, 2"), "train.json: not valid JSON"),
    (lambda r: damage_json(r, "train.json", "[" * 100_000), "train.json: not valid JSON (nested too deeply to read)"),
    (lambda r: damage_json(r, "train.json", '{"CLEVR_train_000000_0.png": ["red sphre"]}'),
     "CLEVR_train_000000_0.png: unknown label 'red sphre'"),
    (lambda r: damage_json(r, "train.json", '{"CLEVR_train_000000_0.png": []}'), "CLEVR_train_000000_0.png: no labels"),
    (lambda r: damage_json(r, "objects.json", '{"red sphere": 0}'), "does not hold the 24 i-CLEVR classes"),
    (lambda r: (r / "iclevr" / "CLEVR_train_000001_2.png").unlink(), "missing image:"),
    (lambda r: cut_in_half(r / "iclevr" / "CLEVR_train_000001_2.png"),
     "corrupt or unreadable image: {root}/iclevr/CLEVR_train_000001_2.png"),
    (lambda r: (r / "iclevr" / "CLEVR_train_000001_2.png").write_text("not an image"),
     "corrupt or unreadable image: {root}/iclevr/CLEVR_train_000001_2.png"),
])
def test_damaged_datasets_name_the_file_and_exit_1(runner, dataset, tmp_path, damage, message):
    damage(dataset)
    expect(runner, ["data", "info", dataset, "--grid", tmp_path / "g.png"], 1, message.format(root=dataset))
    assert not (tmp_path / "g.png").exists()


def test_dataset_path_that_is_a_file(runner, dataset, tmp_path):
    expect(runner, ["data", "info", dataset / "train.json"], 1, "dataset folder is a file, not a folder")


def test_training_on_a_damaged_dataset_writes_no_checkpoint(runner, dataset, tmp_path):
    (dataset / "iclevr" / "CLEVR_train_000002_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    args = ["train", "--out", tmp_path / "r", *[x for s in TINY for x in ("--set", s)], "--set", f"data.path='{dataset}'"]
    expect(runner, args, 1, "corrupt or unreadable image", "CLEVR_train_000002_1.png")
    assert not (tmp_path / "r" / STATE_FILE).exists()


def test_wrong_image_modes_are_converted(runner, dataset, tmp_path):
    from PIL import Image

    files = sorted((dataset / "iclevr").glob("*.png"))
    reference = [decode_image(f).astype(int) for f in files]
    gray = [np.asarray(Image.open(f).convert("L")) for f in files]
    gray_64 = [np.asarray(Image.fromarray(g).resize((64, 64), Image.Resampling.BILINEAR, reducing_gap=None))
               .astype(int)[None].repeat(3, 0) for g in gray]
    Image.fromarray(gray[0].astype(np.uint16) * 257).save(files[0])            # 16-bit grayscale
    Image.open(files[1]).convert("P").save(files[1])                           # palette
    Image.open(files[2]).convert("RGBA").save(files[2])                        # alpha
    Image.open(files[3]).convert("LA").save(files[3])                          # gray + alpha
    Image.open(files[4]).convert("CMYK").save(files[4], format="JPEG")         # CMYK JPEG named .png
    Image.fromarray(gray[5].astype(np.float32) / 255).save(files[5], format="TIFF")  # float in [0, 1]
    Image.fromarray(gray[6].astype(np.int32) * 257).save(files[6], format="TIFF")    # 32-bit int, 16-bit range
    assert Image.open(files[0]).mode.startswith("I")
    got = [decode_image(f).astype(int) for f in files]
    for i in (0, 3, 5, 6):  # grayscale of any depth: the gray levels of an 8-bit conversion
        assert np.abs(got[i] - gray_64[i]).max() <= 1, i
    assert np.array_equal(got[2], reference[2])
    assert np.abs(got[1] - reference[1]).mean() < 3  # a palette quantizes
    assert np.abs(got[4] - reference[4]).mean() < 8  # JPEG is lossy
    expect(runner, ["data", "info", dataset, "--grid", tmp_path / "g.png"], 0, "wrote")


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_that_is_not_a_run_folder(runner, run, tmp_path):
    expect(runner, ["sample", "red sphere", "--checkpoint", tmp_path / "nothing"], 1, "checkpoint not found")
    (tmp_path / "empty").mkdir()
    expect(runner, ["sample", "red sphere", "--checkpoint", tmp_path / "empty"], 1,
           "is not a clevrgen run folder (no config.toml)")
    expect(runner, ["sample", "red sphere", "--checkpoint", run / "config.toml"], 1, "not a clevrgen run folder")
    (tmp_path / "weights.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    expect(runner, ["sample", "red sphere", "--checkpoint", tmp_path / "weights.pth"], 1, "not a clevrgen run folder")


@pytest.mark.parametrize("damage, message", [
    (lambda r: cut_in_half(r / "unet" / "diffusion_pytorch_model.safetensors"),
     "diffusion_pytorch_model.safetensors is truncated or not a safetensors file"),
    (lambda r: (r / "unet" / "diffusion_pytorch_model.safetensors").write_text("garbage"),
     "diffusion_pytorch_model.safetensors is truncated or not a safetensors file"),
    (lambda r: (r / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
     "diffusion_pytorch_model.safetensors is missing"),
    (lambda r: cut_in_half(r / "label_encoder" / "diffusion_pytorch_model.safetensors"),
     "cannot load the label encoder in {run}/label_encoder: diffusion_pytorch_model.safetensors is truncated"),
    (lambda r: shutil.rmtree(r / "unet"), "is not a clevrgen run folder (missing unet)"),
    (lambda r: (r / "config.toml").write_text("[[["), "config.toml is not a valid run config: "),
    (lambda r: (r / "config.toml").write_text("[model]\nwidth = 3\n"), "model.width: unknown key"),
    (lambda r: (r / "config.toml").write_text((r / "config.toml").read_text().replace(
        "block_out_channels = [8, 16, 16]", "block_out_channels = [16, 16, 32]")),
     "config.toml does not match the weights in unet/ (block_out_channels"),
    (lambda r: (r / "config.toml").write_text((r / "config.toml").read_text().replace(
        "image_size = 64", "image_size = 32")), "(sample_size: config gives 32, the weights have 64)"),
])
def test_damaged_or_foreign_checkpoints_exit_1(runner, run, tmp_path, damage, message):
    copy = copy_run(run, tmp_path)
    damage(copy)
    expect(runner, ["sample", "red sphere", "--checkpoint", copy, "-o", tmp_path / "out.png", *SAMPLE], 1,
           message.format(run=copy))
    assert not (tmp_path / "out.png").exists()


def test_a_kill_mid_swap_of_the_unet_folder_still_loads(runner, run, tmp_path):
    copy = copy_run(run, tmp_path)
    (copy / "unet").rename(copy / ".unet.old")  # the moment between the two renames
    expect(runner, ["sample", "red sphere", "--checkpoint", copy, "-o", tmp_path / "out.png", *SAMPLE], 0, "wrote")


def test_resume_from_a_truncated_or_foreign_state(runner, run, tmp_path):
    copy = copy_run(run, tmp_path)
    cut_in_half(copy / STATE_FILE)
    expect(runner, ["train", "--resume", copy, "--set", "train.steps=3"], 1,
           f"cannot resume from {copy / STATE_FILE}: ")
    torch.save({"step": 1, "model": {"nonsense": torch.zeros(1)}}, copy / STATE_FILE)
    expect(runner, ["train", "--resume", copy, "--set", "train.steps=3"], 1, "cannot resume from")
    (copy / STATE_FILE).unlink()
    expect(runner, ["train", "--resume", copy, "--set", "train.steps=3"], 1, "state.pt not found")
    expect(runner, ["train", "--resume", tmp_path / "nothing"], 1, "checkpoint not found")


def test_a_pickle_with_code_is_refused(runner, run, tmp_path):
    """weights_only loading: a state.pt that would run code when unpickled is an error, not a shell."""
    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "pwned", "x"))

    copy = copy_run(run, tmp_path)
    torch.save(Exploit(), copy / STATE_FILE)
    expect(runner, ["train", "--resume", copy, "--set", "train.steps=3"], 1, "cannot resume from")
    judge = tmp_path / "judge.pth"
    torch.save(Exploit(), judge)
    expect(runner, ["evaluator", "score", copy, "--evaluator", judge], 1, "not a readable torch checkpoint")
    expect(runner, ["evaluator", "score", copy, "--evaluator", copy], 1, "is a folder, not a judge")
    assert not (tmp_path / "pwned").exists()


# --- outputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("where, message", [
    ("/proc/nope/out.png", "cannot write /proc/nope/out.png: /proc is not writable"),
    ("{tmp}/afile/out.png", "cannot write {tmp}/afile/out.png: {tmp}/afile is a file, not a folder"),
    ("{tmp}/afile/deeper/out.png", "{tmp}/afile is a file, not a folder"),
    ("{tmp}/adir", "cannot write {tmp}/adir: it is a folder"),
])
def test_unwritable_outputs_fail_before_sampling(runner, run, tmp_path, where, message):
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "adir").mkdir()
    out = where.format(tmp=tmp_path)
    result = expect(runner, ["sample", "red sphere", "--checkpoint", run, "-o", out, *SAMPLE], 1,
                    message.format(tmp=tmp_path))
    assert "sampling" not in result.output  # checked before any work
    assert (tmp_path / "afile").read_text() == "keep me"
    expect(runner, ["denoise-strip", "red sphere", "--checkpoint", run, "-o", out], 1, "cannot write")


def test_unwritable_run_and_eval_folders(runner, run, dataset, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    args = ["train", *[x for s in TINY for x in ("--set", s)], "--set", f"data.path='{dataset}'"]
    expect(runner, [*args, "--out", tmp_path / "afile"], 1, "cannot write into", "it is a file, not a folder")
    expect(runner, [*args, "--out", "/proc/nope/run"], 1, "/proc is not writable")
    expect(runner, ["evaluate", "--checkpoint", run, "--out", tmp_path / "afile" / "eval"], 1,
           "afile is a file, not a folder")
    expect(runner, ["data", "info", dataset, "--grid", "/proc/nope.png"], 1, "cannot write /proc/nope.png")
    expect(runner, ["data", "render", "--out", "/proc/nope", "--random", "2"], 1, "/proc is not writable")
    expect(runner, ["data", "render", "--out", tmp_path / "afile", "--random", "2"], 1, "it is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    from clevrgen.output import atomic_path, atomic_write_text

    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(ClevrgenError, match="cannot write"):
        with atomic_path(target) as tmp:
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_debug_shows_the_traceback(runner, tmp_path):
    result = runner.invoke(app, ["--debug", "sample", "red sphere", "--checkpoint", str(tmp_path / "nothing")])
    assert isinstance(result.exception, ClevrgenError)


# --- training that goes wrong --------------------------------------------------------------------


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(runner, dataset, tmp_path, monkeypatch):
    import clevrgen.train as training

    real, calls = training.diffusion_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(training, "diffusion_loss", poisoned)
    args = ["train", "--out", tmp_path / "r", *[x for s in TINY for x in ("--set", s)],
            "--set", f"data.path='{dataset}'", "--set", "train.steps=8"]
    expect(runner, args, 1, "the loss became non-finite (nan)", "step 5", "last good checkpoint", "train.lr")
    state = torch.load(tmp_path / "r" / STATE_FILE, weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    from clevrgen.artifact import load_artifact

    model, _ = load_artifact(tmp_path / "r")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# --- untrusted files -----------------------------------------------------------------------------


def calls_of(name: str) -> list[tuple[str, int, ast.Call]]:
    """Every call of ``<something>.name(...)`` in clevrgen's source."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                found.append((str(path.relative_to(SRC)), node.lineno, node))
    return found


def keyword_is_true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def test_every_torch_load_is_weights_only():
    loads = [c for c in calls_of("load") if ast.unparse(c[2].func) == "torch.load"]
    assert loads, "no torch.load found: the scan is broken"
    unsafe = [(path, line) for path, line, call in loads if not keyword_is_true(call, "weights_only")]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    pickles = [(p, n) for p, n, c in calls_of("load") + calls_of("loads")
               if ast.unparse(c.func) in ("pickle.load", "pickle.loads", "joblib.load", "dill.load")]
    assert not pickles, pickles


def test_every_from_pretrained_is_local_only():
    probe = ast.parse("unet = UNet2DModel.from_pretrained(path)")
    assert any(isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "from_pretrained"
               for n in ast.walk(probe)), "the scan is broken"
    calls = calls_of("from_pretrained")
    remote = [(path, line) for path, line, call in calls if not keyword_is_true(call, "local_files_only")]
    assert not remote, f"from_pretrained without local_files_only=True: {remote}"


def test_sampling_works_offline(runner, run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("clevrgen tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    expect(runner, ["sample", "red sphere", "--checkpoint", run, "-o", tmp_path / "o.png", *SAMPLE], 0, "wrote")


# --- one writer, full disks, stop signals -------------------------------------------------------


def test_readers_need_no_lock_and_writers_get_the_holders_pid(runner, run, tmp_path):
    """While another process holds the run folder (here a bare flock, as a training run holds it),
    sampling and evaluation read it; training into it is refused in one line, with the PID."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
        "time.sleep(60)"), str(run / "train.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        expect(runner, ["sample", "red sphere", "--checkpoint", run, "-o", tmp_path / "s.png", *SAMPLE], 0)
        expect(runner, ["train", "--resume", run], 1,
               f"{run} is being trained by another process (PID {holder.pid}): one writer per run folder")
    finally:
        holder.kill()
        holder.wait()


def _fail_state_writes(monkeypatch, after: int):
    """os.replace of state.pt fails with ENOSPC from its ``after + 1``-th call on."""
    import errno
    import os

    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == STATE_FILE:
            calls.append(dst)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return real


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resumes_exactly(dataset, tmp_path, monkeypatch):
    """The disk fills at the second checkpoint (the OSError injected into the atomic writer):
    one line names the file, its size and the intact checkpoint; no temporary is left; the old
    checkpoint and artifact load, and the resumed run ends as a straight one."""
    import os

    from clevrgen.artifact import load_artifact
    from clevrgen.output import WriteError

    data = load_iclevr(dataset, progress=False)
    cfg = load_config(None, [*TINY, "train.steps=6", "train.checkpoint_every=2"])
    train(cfg, tmp_path / "straight", data, progress=False)
    run = tmp_path / "run"
    real = _fail_state_writes(monkeypatch, after=1)
    with pytest.raises(WriteError) as failed:
        train(cfg, run, data, progress=False)
    monkeypatch.setattr(os, "replace", real)
    size = (tmp_path / "straight" / STATE_FILE).stat().st_size
    assert str(failed.value).startswith(f"cannot write {run / STATE_FILE} ({size / 1e6:.1f} MB): No space left on "
                                        "device (")
    assert str(failed.value).endswith(f"; the last checkpoint, at step 2, is intact. Make room, then resume with: "
                                      f"clevrgen train --resume {run}")
    assert failed.value.exit_code == 1 and "\n" not in str(failed.value)
    assert not [p.name for p in run.rglob(".*")]
    assert torch.load(run / STATE_FILE, weights_only=True)["step"] == 2
    load_artifact(run)
    train(cfg, run, data, resume=True, progress=False)
    a, b = (torch.load(r / STATE_FILE, weights_only=True)["model"] for r in (tmp_path / "straight", run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_while_writing_the_unet_folder(run, tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error (``... (os error 28)``): the half-written
    folder is removed, the old one kept, and the message is one line."""
    import safetensors.torch

    from clevrgen.artifact import load_artifact, save_artifact
    from clevrgen.output import WriteError

    copy = copy_run(run, tmp_path)
    model, cfg = load_artifact(copy)
    before = (copy / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(WriteError, match=rf"^cannot write {copy / 'unet'}: No space left on device \(.* free\)$"):
        save_artifact(model, cfg, copy)
    assert not [p.name for p in copy.rglob(".*")]
    assert (copy / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    load_artifact(copy)


def test_a_failed_append_leaves_no_half_record(tmp_path, monkeypatch):
    import errno
    import os

    from clevrgen.output import WriteError, append_jsonl

    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:5]))  # the disk fills mid-line
    with pytest.raises(WriteError, match="cannot write .*metrics.jsonl"):
        append_jsonl(path, {"step": 2})
    monkeypatch.setattr(os, "write", real)
    assert path.read_text() == '{"step": 1}\n'


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 600 kB (mounting needs root; skipped elsewhere). Yields (folder, resize)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_small_real_disk_costs_nothing(runner, dataset, small_disk):
    """On a real full file system: the first checkpoint does not fit (the issue's 600 kB tmpfs);
    then one does and the next does not. Each ends in one line, exit 1, no temporaries; the run
    resumes once there is room."""
    from clevrgen.artifact import load_artifact

    disk, resize = small_disk
    args = ["train", "--out", disk / "run", *[x for s in TINY for x in ("--set", s)], "--set",
            f"data.path='{dataset}'", "--set", "train.steps=6", "--set", "train.checkpoint_every=2"]
    expect(runner, args, 1, f"cannot write {disk / 'run' / STATE_FILE} (1.4 MB): No space left on device",
           "no checkpoint had been saved yet")
    assert not [p.name for p in disk.rglob(".*")]

    shutil.rmtree(disk / "run")
    resize("2600k")  # one checkpoint (state.pt 1.4 MB, unet 0.3 MB) fits, not a second state.pt beside it
    result = expect(runner, args, 1, f"cannot write {disk / 'run' / STATE_FILE} (1.4 MB): No space left on device (",
                    "free); the last checkpoint, at step 2, is intact. Make room, then resume with: "
                    f"clevrgen train --resume {disk / 'run'}")
    assert result.output[result.output.index("error: cannot write"):].count("\n") == 1  # one line, the last
    assert not [p.name for p in disk.rglob(".*")]
    assert torch.load(disk / "run" / STATE_FILE, weights_only=True)["step"] == 2
    load_artifact(disk / "run")
    resize("8m")
    expect(runner, ["train", "--resume", disk / "run"], 0, "6 steps")


def test_a_render_onto_a_full_disk_ends_in_one_line_and_resumes(runner, small_disk):
    disk, resize = small_disk
    resize("3000k")  # the first batch of 256 PNGs (~5 kB, 8 kB of tmpfs each) fits, the second does not
    args = ["data", "render", "--out", disk / "r", "--random", "600", "--objects", "1-1"]
    result = expect(runner, args, 1, f"cannot write {disk / 'r'}", "No space left on device",
                    "the images written so far are kept: make room, then run the same command again to go on")
    assert result.output[result.output.index("error: cannot write"):].count("\n") == 1  # one line, the last
    assert not [p.name for p in disk.rglob(".*.tmp")]
    resize("8m")
    assert "344 images rendered, 256 already there" in flat(expect(runner, args, 0, "already there"))


def test_sigterm_during_an_evaluation_stops_in_one_line(runner, run, tmp_path, monkeypatch):
    """Outside training and rendering, SIGTERM ends a command at once with one line and exit 143;
    every file is written whole, so nothing is left half-written."""
    import os
    import signal

    from clevrgen.loaded import LoadedModel

    real = LoadedModel.generate

    def generate_and_terminate(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "generate", generate_and_terminate)
    out = tmp_path / "eval"
    expect(runner, ["evaluate", "--checkpoint", run, "--split", "test", "--out", out, "--steps", "1"], 143,
           "stopped by SIGTERM; no file was left half-written: run the same command again")
    assert not (out / "results.json").exists() and not [p.name for p in tmp_path.rglob(".*.tmp")]


# --- paths the OS refuses, and files that are not files ----------------------------------------
def test_an_input_name_longer_than_the_file_system_allows(runner, run, dataset, tmp_path):
    long = tmp_path / ("x" * 300)
    message = "is 300 bytes long; file systems allow 255 per name"
    out = ["-o", tmp_path / "o.png", "--steps", "1", "--num", "1"]
    expect(runner, ["sample", "red sphere", "--checkpoint", long, *out], 2, f"cannot read {long}", message)
    expect(runner, ["sample", "red sphere", "--checkpoint", run, "--config", long, *out], 2, message)
    expect(runner, ["evaluate", "--checkpoint", run, "--split", long, "--out", tmp_path / "ev"], 2, message)
    expect(runner, ["data", "info", long, "--grid", tmp_path / "g.png"], 2, message)
    expect(runner, ["export", long, "--out", tmp_path / "exp"], 2, message)
    expect(runner, ["train", "--config", "tiny", "--set", f"data.path='{long}'", "--out", tmp_path / "r"], 2, message)


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_an_output_folder_through_a_broken_symlink_is_refused_before_any_work(runner, run, dataset, tmp_path, kind):
    link = tmp_path / "link"
    link.symlink_to(link if kind == "loop" else tmp_path / "nowhere")
    said = "loops back on itself" if kind == "loop" else "which does not exist"
    args = ["train", *[x for s in TINY for x in ("--set", s)], "--set", f"data.path='{dataset}'", "--set", "train.steps=1"]
    expect(runner, [*args, "--out", link], 1, f"cannot write {link}: {link} is a symbolic link", said)
    expect(runner, [*args, "--out", link / "run"], 1, said)
    expect(runner, ["export", run, "--out", link], 1, said)
    expect(runner, ["data", "render", "--out", link, "--random", "1"], 1, said)
    expect(runner, ["evaluate", "--checkpoint", run, "--split", "test", "--out", link], 1, said)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_special_file_is_never_opened_for_reading(tmp_path):
    """A dataset image that is a FIFO would block `open` forever: refused by its kind instead
    (in a subprocess with a timeout, so that a regression fails rather than hangs)."""
    import os
    import subprocess
    import sys

    data = write_dataset(tmp_path / "data", scenes=1)
    image = next((data / "iclevr").iterdir())
    image.unlink()
    os.mkfifo(image)
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    result = subprocess.run([sys.executable, "-m", "clevrgen", "data", "info", str(data), "--grid", str(tmp_path / "g.png")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr
    assert f"cannot read {image}: it is a FIFO, not a regular file" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    from clevrgen.errors import ClevrgenError
    from clevrgen.inputs import input_file

    for reader in (lambda: load_config(image), lambda: __import__("clevrgen.labels").labels.load_label_sets(str(image))):
        with pytest.raises(ClevrgenError, match="it is a FIFO"):
            reader()
