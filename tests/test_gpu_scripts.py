"""The one-call GPU scripts (benchmarks/gpu/gpu_train.py, gpu_headline.py) run end to end on the CPU at
toy size, from a packed dataset, and write their reports; the packed format round-trips."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import write_dataset

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))


@pytest.fixture
def packed(tmp_path) -> Path:
    from pack_images import check_decoder, pack

    from clevrgen.data.iclevr import load_iclevr, read_spec

    check_decoder("avif444")
    root = write_dataset(tmp_path / "ds", scenes=4)
    out = tmp_path / "ds.npz"
    pack(load_iclevr(root, progress=False), read_spec(root), out, "avif444", 88, workers=1)
    return out


def test_pack_round_trip_keeps_names_labels_and_pixels(packed, tmp_path):
    from pack_images import unpack

    from clevrgen.data.iclevr import load_iclevr

    original = load_iclevr(tmp_path / "ds", progress=False)
    back = unpack(packed, workers=1)
    assert back.names == original.names
    assert torch.equal(back.labels, original.labels) and torch.equal(back.scenes, original.scenes)
    assert back.images.shape == original.images.shape and back.images.dtype == torch.uint8
    assert (back.images.float() - original.images.float()).abs().mean() < 3.0


def run(script: str, packed: Path, out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(GPU / script), "--data", str(packed), "--toy", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_gpu_train_toy_writes_report_and_a_loadable_fp16_run(packed, tmp_path):
    out = tmp_path / "out"
    run("gpu_train.py", packed, out)
    report = json.loads((out / "gpu_train.json").read_text())
    assert report["toy"] and report["machine"]["gpu"] is None
    assert report["curve"] and report["curve"][-1]["step"] == report["steps"] > 0
    assert "test_topk_accuracy" in report["curve"][-1] and "new_test_exact_accuracy" in report["curve"][-1]
    assert {(f["split"], f["guidance"]) for f in report["final"]} == {
        (s, g) for s in ("test", "new_test") for g in (1.0, 2.0, 3.0)}
    assert all(0 <= f["topk_mean"] <= 1 and len(f["topk_per_seed"]) == 1 for f in report["final"])
    md = (out / "gpu_train.md").read_text()
    assert "not GPU measurements" in md and "0.901" in md and "exact set" in md
    assert (out / "gpu_train_test_grid.png").is_file()

    parts = sorted(out.glob("run.tar.*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    (tmp_path / "run.tar").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "run.tar") as tar:
        tar.extractall(tmp_path / "back")
    from safetensors import safe_open

    from clevrgen.loaded import LoadedModel

    weights = tmp_path / "back" / "gpu-run" / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = LoadedModel.load(tmp_path / "back" / "gpu-run")
    assert model.device.type in ("cpu", "cuda") and model.config.model.block_out_channels == [8, 16, 16]


def test_gpu_headline_toy_reports_every_figure_and_a_synced_torchrun(packed, tmp_path):
    out = tmp_path / "out"
    run("gpu_headline.py", packed, out)
    report = json.loads((out / "gpu_headline.json").read_text())
    assert report["toy"]
    t, e = report["training"], report["evaluation"]
    assert t["clevrgen"]["images_per_second"] > 0 and t["reference"]["images_per_second"] > 0
    assert 0 < t["clevrgen"]["mfu"] and t["clevrgen"]["flops_per_step"] > 0
    assert e["clevrgen"]["images"] == 64 and e["reference"]["scaled_seconds"] > e["reference"]["timed_seconds"]
    assert report["render"]["rendering_scenes_per_second"] > 0
    assert report["torchrun"]["returncode"] == 0, report["torchrun"]["output_tail"]
    assert report["torchrun"]["last_record"] == {"step": 3, "world_size": 1, "ranks_in_sync": True}
    md = (out / "gpu_headline.md").read_text()
    assert "not GPU measurements" in md and ">= 10x" in md and "ranks_in_sync = True" in md
