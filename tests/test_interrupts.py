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
