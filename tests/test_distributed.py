"""torchrun: two CPU ranks with gloo train in step and leave one complete run folder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import TINY

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


def overrides(*extra):
    return [x for s in (*TINY, *extra) for x in ("--set", s)]


def test_two_cpu_ranks_stay_in_sync_and_resume_alone(dataset, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clevrgen", "train", "--out", str(run), *overrides(f"data.path='{dataset}'", "train.steps=4")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "effective batch 8" in done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("done:") == 1  # rank 0 alone reports
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 4, "world_size": 2, "ranks_in_sync": True}
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    for name in ("config.toml", "state.pt", "loss.png", "unet/diffusion_pytorch_model.safetensors",
                 "label_encoder/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (run / name).is_file(), name

    # the same run goes on in a single process
    single = subprocess.run([sys.executable, "-m", "clevrgen", "train", "--resume", str(run), "--set", "train.steps=6"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    assert "6 steps" in single.stdout


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(dataset, tmp_path):
    """SIGTERM reaches one worker only: the ranks' stop vote has all of them finish the same step,
    rank 0 checkpoint it, and each end with the same one-line message and exit 143."""
    import signal
    import time

    import torch

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clevrgen", "train", "--out", str(run),
           *overrides(f"data.path='{dataset}'", "train.steps=100000", "train.checkpoint_every=100000")]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 240
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output
    assert "/clevrgen/" not in output, output  # no traceback of ours (torchrun prints its own report)
    step = torch.load(run / "state.pt", weights_only=True)["step"]
    stops = re.findall(r"stopped by SIGTERM at step (\d+); checkpoint saved", " ".join(output.split()))
    # rank 1 always reports; rank 0 too, unless torchrun, seeing rank 1 end, stops it after its save
    assert stops and set(stops) == {str(step)}, output
