"""Interrupted training loses nothing: Ctrl-C saves a checkpoint, and a run killed (SIGKILL) at
random moments resumes from its last checkpoint to exactly the weights and loss trace of a
straight run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clevrgen.config import load_config
from clevrgen.data.iclevr import load_iclevr
from clevrgen.train import METRICS_FILE, STATE_FILE, train

from conftest import TINY

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def settings(dataset: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.path='{dataset}'", "train.checkpoint_every=1", *extra]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "clevrgen", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def set_args(values: list[str]) -> list[str]:
    return [x for s in values for x in ("--set", s)]


def wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll until ``condition()``; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting for the training subprocess"
        time.sleep(0.02)
    return True


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def trace(run: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in records]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(dataset, tmp_path):
    run = tmp_path / "run"
    process = start(["train", "--out", str(run), *set_args(settings(
        dataset, "train.steps=100000", "train.checkpoint_every=100000"))])
    assert wait_for(lambda: len((run / METRICS_FILE).read_text().splitlines()) >= 2
                    if (run / METRICS_FILE).exists() else False, process), process.communicate()
    assert not (run / STATE_FILE).exists()  # no periodic checkpoint yet: the one we find is Ctrl-C's
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted at step" in err and f"clevrgen train --resume {run}" in " ".join(err.split())
    state = torch.load(run / STATE_FILE, weights_only=True)
    assert state["step"] >= 2 and f"interrupted at step {state['step']};" in err
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_sigkill_at_random_moments_then_resume_is_exact(dataset, tmp_path):
    steps = 16
    values = settings(dataset, f"train.steps={steps}", "train.log_every=2")  # a window spans checkpoints
    straight = tmp_path / "straight"
    data = load_iclevr(dataset, progress=False)
    began = time.perf_counter()
    train(load_config(None, values), straight, data, progress=False)
    # Kill within about two steps of a new checkpoint, however fast this machine is.
    longest_delay = min(0.5, 2 * (time.perf_counter() - began) / steps)

    run = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("CLEVRGEN_KILL_SEED", time.time_ns())))
    kills, args = 0, ["train", "--out", str(run), *set_args(values)]
    while kills < 6:
        before = mtime(run / STATE_FILE)
        process = start(args)
        # Kill only once this process has trained (a new checkpoint): killing during start-up tests nothing.
        if wait_for(lambda: mtime(run / STATE_FILE) != before, process):
            time.sleep(rng.uniform(0.0, longest_delay))
            process.kill()
        process.communicate(timeout=60)
        if process.returncode == 0:  # it finished before the kill
            break
        assert process.returncode == -signal.SIGKILL, process.returncode
        kills += 1
        args = ["train", "--resume", str(run)]
    assert kills >= 3, "the run finished too fast to be killed: raise steps"
    if process.returncode != 0:
        process = start(args)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err

    assert trace(run) == trace(straight)
    assert [s for s, _, _ in trace(run)] == list(range(2, steps + 1, 2))
    a, b = (torch.load(r / STATE_FILE, weights_only=True) for r in (straight, run))
    assert a["step"] == b["step"] == steps
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    weights = "unet/diffusion_pytorch_model.safetensors"
    ema_a, ema_b = load_file(straight / weights), load_file(run / weights)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_ctrl_c_mid_step_and_mid_log_window_resumes_exactly(dataset, tmp_path, monkeypatch):
    """Ctrl-C lands inside a training step (here: between backward and the optimizer step) and
    inside a log window (log_every=2): the step is finished, the partial window is checkpointed,
    and the resumed run logs and ends exactly as a straight one."""
    from clevrgen.train import TrainingInterrupted

    data = load_iclevr(dataset, progress=False)
    cfg = load_config(None, [*TINY, "train.steps=6", "train.log_every=2", "train.checkpoint_every=4"])
    train(cfg, tmp_path / "straight", data, progress=False)

    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_and_press_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_press_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3; checkpoint saved"):
        train(cfg, tmp_path / "run", data, progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    assert torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["step"] == 3
    train(cfg, tmp_path / "run", data, resume=True, progress=False)
    assert trace(tmp_path / "run") == trace(tmp_path / "straight")
    a, b = (torch.load(r / STATE_FILE, weights_only=True)["model"] for r in (tmp_path / "straight", tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch):
    from clevrgen.train import TrainingInterrupted

    cfg = load_config(None, [*TINY, "train.steps=6", "train.checkpoint_every=2"])
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_and_press_ctrl_c_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_press_ctrl_c_twice)
    with pytest.raises(TrainingInterrupted, match="interrupted twice at step 2: stopped without saving"):
        train(cfg, tmp_path / "run", load_iclevr(dataset, progress=False), progress=False)
    assert torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["step"] == 2


def test_sigterm_stops_like_ctrl_c_and_a_second_writer_is_refused(dataset, tmp_path):
    """SIGTERM (kill, timeout, a SLURM preemption) finishes the step, checkpoints and exits 143.
    While the run trains, a second writer of its folder (a resume, or a new run with the same
    --out) is refused at once with the holder's PID, and writes nothing."""
    from typer.testing import CliRunner

    from clevrgen.cli import app
    from clevrgen.locks import run_lock

    run = tmp_path / "run"
    values = settings(dataset, "train.steps=100000", "train.checkpoint_every=100000")
    process = start(["train", "--out", str(run), *set_args(values)])
    assert wait_for(lambda: len((run / METRICS_FILE).read_text().splitlines()) >= 2
                    if (run / METRICS_FILE).exists() else False, process), process.communicate()
    before = sorted(p.name for p in run.iterdir())
    for args in (["train", "--resume", str(run)], ["train", "--out", str(run), *set_args(values)]):
        second = CliRunner().invoke(app, args)
        assert second.exit_code == 1, second.output
        assert f"is being trained by another process (PID {process.pid})" in " ".join(second.output.split())
        assert "Traceback" not in second.output
    assert sorted(p.name for p in run.iterdir()) == before and not (run / STATE_FILE).exists()

    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    step = torch.load(run / STATE_FILE, weights_only=True)["step"]
    assert f"stopped by SIGTERM at step {step}; checkpoint saved. Resume with: clevrgen train --resume {run}" \
        in " ".join(err.split())
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with run_lock(run):  # the OS released the lock with the process
        pass


def test_sigterm_mid_step_resumes_exactly(dataset, tmp_path, monkeypatch):
    """SIGTERM inside a step and a log window, sent twice (a scheduler, or torchrun forwarding it):
    the step is finished, the checkpoint saved, the exit code is 143, and the resumed run logs and
    ends bit for bit as a straight one."""
    from clevrgen.train import TrainingInterrupted

    data = load_iclevr(dataset, progress=False)
    cfg = load_config(None, [*TINY, "train.steps=6", "train.log_every=2", "train.checkpoint_every=4"])
    train(cfg, tmp_path / "straight", data, progress=False)

    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_and_terminate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM does not cut the save short
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_terminate)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM at step 3; checkpoint saved") as stopped:
        train(cfg, tmp_path / "run", data, progress=False)
    assert stopped.value.exit_code == 143
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    assert torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["step"] == 3
    train(cfg, tmp_path / "run", data, resume=True, progress=False)
    assert trace(tmp_path / "run") == trace(tmp_path / "straight")
    for key in ("model", "optimizer"):
        a, b = (torch.load(r / STATE_FILE, weights_only=True)[key] for r in (tmp_path / "straight", tmp_path / "run"))
        flat_a, flat_b = (torch.nn.utils.parameters_to_vector([v for v in _tensors(x)]) for x in (a, b))
        assert torch.equal(flat_a, flat_b), key
    weights = "unet/diffusion_pytorch_model.safetensors"
    ema_a, ema_b = (load_file(r / weights) for r in (tmp_path / "straight", tmp_path / "run"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def _tensors(tree):
    """Every floating tensor of a nested state dict, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree.float().flatten()] if tree.is_floating_point() else []
    items = sorted(tree.items(), key=lambda kv: str(kv[0])) if isinstance(tree, dict) else enumerate(tree)
    return [t for _, v in items if isinstance(v, (torch.Tensor, dict, list, tuple)) for t in _tensors(v)]


def test_a_render_stops_cleanly_on_sigterm_and_resumes(tmp_path, monkeypatch):
    """SIGTERM during `data render`: the batch in hand is written and journalled, the render
    stops with exit 143, and the next run renders only the rest, to the same images."""
    from clevrgen.data import rendered_folder as F
    from clevrgen.data.iclevr import load_iclevr as read
    from clevrgen.data.render import random_spec
    from clevrgen.errors import Interrupted

    spec = random_spec(6, (1, 2), seed=0)
    F.render_folder(tmp_path / "straight", spec, seed=1, progress=False)
    real = F.iter_render

    def small_batches_then_sigterm(*args, **kwargs):
        for i, batch in enumerate(real(*args, **{**kwargs, "batch_size": 2})):
            if i == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(F, "iter_render", small_batches_then_sigterm)
    with pytest.raises(Interrupted, match=rf"render stopped by SIGTERM after \d+ of {len(spec)} images; the finished "
                                          "images are kept: run the same command again") as stopped:
        F.render_folder(tmp_path / "run", spec, seed=1, progress=False)
    assert stopped.value.exit_code == 143
    done = int(str(stopped.value).split(" after ")[1].split()[0])
    assert 0 < done < len(spec) and len(list((tmp_path / "run" / "iclevr").glob("*.png"))) == done
    monkeypatch.setattr(F, "iter_render", real)
    assert F.render_folder(tmp_path / "run", spec, seed=1, progress=False) == {"rendered": len(spec) - done,
                                                                                 "kept": done}
    a, b = (read(tmp_path / name, progress=False) for name in ("straight", "run"))
    assert a.names == b.names and torch.equal(a.images, b.images)
    assert not [p.name for p in (tmp_path / "run").rglob(".*")]
