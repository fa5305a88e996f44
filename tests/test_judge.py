"""The judge: course metrics, checkpoint I/O, and the evaluator command on tiny folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clevrgen.config import JudgeConfig
from clevrgen.errors import CheckpointError
from clevrgen.judge import (
    build_judge, exact_accuracy, export_course, judge_probs, load_judge, read_metadata, save_judge, score_predictions,
    topk_accuracy,
)
from clevrgen.judge_training import augment
from clevrgen.labels import CLASS_INDEX, PHRASES


def course_topk(out: torch.Tensor, onehot_labels: torch.Tensor) -> float:
    """The course evaluator's compute_acc, loop for loop."""
    acc = total = 0
    for i in range(out.size(0)):
        k = int(onehot_labels[i].sum().item())
        total += k
        _, outi = out[i].topk(k)
        _, li = onehot_labels[i].topk(k)
        for j in outi:
            if j in li:
                acc += 1
    return acc / total


def multi_hot(*rows: list[int]) -> torch.Tensor:
    labels = torch.zeros(len(rows), 24)
    for i, row in enumerate(rows):
        labels[i, row] = 1.0
    return labels


# --- metrics -----------------------------------------------------------------------------------


def test_topk_and_exact_by_hand():
    labels = multi_hot([0], [1, 2], [3, 4, 5])
    probs = torch.full((3, 24), 0.01)
    probs[0, 0] = 0.9                      # 1/1, exact
    probs[1, 1], probs[1, 7] = 0.8, 0.7    # top-2 = {1, 7}: 1/2; only 1 and 7 > 0.5: not exact
    probs[2, [3, 4, 5]] = 0.6              # 3/3 and exact
    probs[2, 9] = 0.55                     # ... but 9 > 0.5 too: not exact (top-3 still 3, 4, 5)
    assert topk_accuracy(probs, labels) == pytest.approx(5 / 6)
    assert exact_accuracy(probs, labels) == pytest.approx(1 / 3)
    scores = score_predictions(probs, labels)
    assert scores["n_images"] == 3
    assert scores["by_objects"]["2"] == {"n_images": 1, "topk_accuracy": 0.5, "exact_accuracy": 0.0}
    assert scores["per_class_recall"][2] == 0.0 and scores["per_class_recall"][1] == 1.0
    assert scores["per_class_recall"][20] is None  # never present
    assert scores["worst_classes"][0] == {"class": PHRASES[2], "recall": 0.0}


def test_topk_matches_the_course_loop():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        k = torch.randint(1, 4, (n,), generator=gen)
        labels = torch.zeros(n, 24)
        for i in range(n):
            labels[i, torch.randperm(24, generator=gen)[: k[i]]] = 1.0
        probs = torch.rand(n, 24, generator=gen)
        probs = torch.where(torch.rand(n, 24, generator=gen) < 0.3, labels * 0.5 + probs * 0.5, probs)
        assert topk_accuracy(probs, labels) == pytest.approx(course_topk(probs, labels))


def test_perfect_and_empty():
    labels = multi_hot([5, 6], [23])
    assert topk_accuracy(labels * 0.9, labels) == 1.0
    assert exact_accuracy(labels * 0.9, labels) == 1.0
    assert score_predictions(torch.zeros(0, 24), torch.zeros(0, 24))["topk_accuracy"] is None


# --- augmentation --------------------------------------------------------------------------------


def test_augment_keeps_range_and_colors_gray():
    gray = torch.full((8, 3, 64, 64), 128, dtype=torch.uint8)
    x = augment(gray, JudgeConfig(translate=3, jitter=0.2), torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 0], x[:, 1]) and torch.allclose(x[:, 1], x[:, 2])  # no hue shift


def test_augment_shift_moves_content_by_few_pixels():
    image = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    image[..., 30:34, 30:34] = 255
    cfg = JudgeConfig(hflip=False, translate=2, jitter=0.0)
    x = augment(image, cfg, torch.Generator().manual_seed(1))
    ys, xs = (x[0, 0] > 0).nonzero(as_tuple=True)
    assert len(ys) == 16 and 28 <= ys.min() <= 32 and 28 <= xs.min() <= 32


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def course_pth(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.manual_seed(0)
    torch.save({"model": build_judge().state_dict()}, path)
    return path


def test_load_course_format(course_pth):
    judge = load_judge(course_pth)
    assert not judge.training
    probs = judge_probs(judge, torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8), batch_size=2)
    assert probs.shape == (3, 24) and probs.min() >= 0 and probs.max() <= 1 and not probs.requires_grad


def test_uint8_and_float_inputs_agree(course_pth):
    judge = load_judge(course_pth)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    as_float = images.float() / 127.5 - 1
    assert torch.allclose(judge_probs(judge, images), judge_probs(judge, as_float))


def test_refuses_wrong_shape(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "ten.pth"
    model = resnet18(weights=None)
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 10), torch.nn.Sigmoid())
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"judge: fc.0.weight has shape \[10, 512\], a judge needs \[24, 512\]"):
        load_judge(path)
    torch.save({"model": resnet18(weights=None, num_classes=24).state_dict()}, path)  # fc not Sequential
    with pytest.raises(CheckpointError, match="missing .first: fc.0.weight.*unexpected .first: fc.weight"):
        load_judge(path)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_refuses_non_checkpoints(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_judge(path)


def test_refuses_missing_and_truncated(tmp_path, course_pth):
    with pytest.raises(CheckpointError, match="not found"):
        load_judge(tmp_path / "nope.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(course_pth.read_bytes()[:100_000])
    with pytest.raises(CheckpointError):
        load_judge(cut)
    st = tmp_path / "judge.safetensors"
    save_judge(load_judge(course_pth), st)
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(st.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_judge(cut_st)


def test_refuses_a_dict_without_weights(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"epoch": 3}}, path)
    with pytest.raises(CheckpointError, match="expected a dict whose key 'model'"):
        load_judge(path)


def test_safetensors_and_export_round_trip(tmp_path, course_pth):
    judge = load_judge(course_pth)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    path = tmp_path / "judge.safetensors"
    save_judge(judge, path, {"command": "clevrgen evaluator train", "heldout": {"topk_accuracy": 0.5}})
    assert path.stat().st_size < 24e6  # fp16
    meta = read_metadata(path)
    assert meta["command"] == "clevrgen evaluator train" and json.loads(meta["heldout"])["topk_accuracy"] == 0.5
    fp16 = load_judge(path)
    assert torch.allclose(judge_probs(fp16, images), judge_probs(judge, images), atol=2e-2)
    pth = tmp_path / "export.pth"
    export_course(fp16, pth)
    state = torch.load(pth, map_location="cpu", weights_only=True)["model"]
    assert state["fc.0.weight"].shape == (24, 512) and state["fc.0.weight"].dtype == torch.float32
    assert torch.equal(judge_probs(load_judge(pth), images), judge_probs(fp16, images))


# --- the evaluator command -----------------------------------------------------------------------


def write_folder(root: Path, n_scenes: int = 4) -> Path:
    """A tiny i-CLEVR layout folder: n_scenes scenes of 2 images each, random pixels."""
    from PIL import Image

    (root / "iclevr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    spec = {}
    for s in range(n_scenes):
        for k in range(2):
            name = f"CLEVR_train_{s:06d}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "iclevr" / name)
            spec[name] = [PHRASES[(s + j) % 24] for j in range(k + 1)]
    (root / "train.json").write_text(json.dumps(spec))
    (root / "objects.json").write_text(json.dumps(CLASS_INDEX))
    return root


@pytest.fixture()
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEVRGEN_CACHE", str(tmp_path / "cache"))
    from clevrgen.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["evaluator", *(str(a) for a in args)])


def test_evaluator_train_score_export(tmp_path, cli):
    data = write_folder(tmp_path / "data")
    out = tmp_path / "run" / "judge.safetensors"
    result = cli("train", "--data", data, "--out", out, "--set", "judge.epochs=1",
                 "--set", "judge.batch_size=4", "--set", "data.val_fraction=0.25", "--set", "judge.device=cpu")
    assert result.exit_code == 0, result.output
    assert out.is_file() and (out.parent / "config.toml").is_file()
    record = json.loads((out.parent / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and 0 <= record["topk_accuracy"] <= 1
    assert "evaluator train" in read_metadata(out)["command"]

    result = cli("score", data, "--evaluator", out, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["n_images"] == 8 and {"topk_accuracy", "exact_accuracy"} <= set(scores)

    result = cli("score", data, "--evaluator", out)
    assert result.exit_code == 0 and "top-k" in result.stdout

    result = cli("score", data, "--evaluator", out, "--heldout", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_images"] == 2  # the one held-out scene of four

    pth = tmp_path / "course.pth"
    assert cli("export", "--out", pth, "--evaluator", out).exit_code == 0
    assert cli("score", data, "--evaluator", pth, "--json").stdout == result_json(cli, data, out)


def result_json(cli, data: Path, evaluator: Path) -> str:
    return cli("score", data, "--evaluator", evaluator, "--json").stdout


def test_evaluator_train_needs_data(cli):
    result = cli("train", "--set", "judge.epochs=1")
    assert result.exit_code == 2
    assert "error: no training data: pass --data DIR" in result.output


def test_evaluator_score_refuses_bad_checkpoint(tmp_path, cli):
    data = write_folder(tmp_path / "data", n_scenes=1)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    course = tmp_path / "course.pth"
    torch.save({"model": build_judge().state_dict()}, course)
    result = cli("score", data, "--evaluator", course, "--heldout")
    assert result.exit_code == 2 and "records its split" in result.output
    result = cli("score", data, "--evaluator", junk)
    assert result.exit_code == 1
    assert "error: " in result.output and "not a readable torch checkpoint" in result.output
    assert "Traceback" not in result.output


def test_lr_schedule_shape():
    from clevrgen.judge_training import lr_factor

    assert lr_factor(0.0) == pytest.approx(0.04)
    assert lr_factor(0.1) == pytest.approx(1.0)
    assert lr_factor(0.55) == pytest.approx(0.5)
    assert lr_factor(1.0) == pytest.approx(0.0, abs=1e-12)


def test_shipped_judge_config_validates():
    from clevrgen.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "judge.toml")
    assert cfg.judge.precision == "bf16" and cfg.judge.minutes


def test_weight_average_follows_the_model():
    from clevrgen.judge_training import _update_average

    model, average = build_judge(), build_judge()
    before = average.fc[0].weight.clone()
    _update_average(average, model, decay=0.9, step=1000)
    expected = 0.9 * before + 0.1 * model.fc[0].weight
    assert torch.allclose(average.fc[0].weight, expected, atol=1e-6)
    _update_average(average, model, decay=0.9, step=0)  # early on, mostly the model: d = 1/10
    assert torch.allclose(average.fc[0].weight, 0.1 * expected + 0.9 * model.fc[0].weight, atol=1e-6)


def test_batchnorm_statistics_are_measured_afresh():
    from clevrgen.data.iclevr import ImageSet
    from clevrgen.judge_training import _refresh_batchnorm

    model = build_judge()
    model.bn1.running_mean.fill_(5.0)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(8, 24), torch.arange(8), [f"{i}.png" for i in range(8)])
    cfg = JudgeConfig(batch_size=4, precision="fp32")
    _refresh_batchnorm(model, data, cfg, torch.Generator().manual_seed(0), torch.device("cpu"), torch.contiguous_format)
    assert not model.training and model.bn1.momentum == 0.1
    assert model.bn1.running_mean.abs().max() < 5.0 and int(model.bn1.num_batches_tracked) == 2


def test_evaluator_train_with_average_and_renders(tmp_path, cli):
    data = write_folder(tmp_path / "data")
    out = tmp_path / "run" / "judge.safetensors"
    result = cli("train", "--data", data, "--out", out, "--set", "judge.epochs=1", "--set", "judge.batch_size=8",
                 "--set", "data.val_fraction=0.25", "--set", "judge.device=cpu", "--set", "judge.ema=0.5",
                 "--set", "judge.render_extra=3", "--set", "judge.render_objects=[4, 5]")
    assert result.exit_code == 0, result.output
    # 6 real training images plus 3 scenes of 4-5 objects (one image each from 4 objects up)
    assert re.search(r"(9|1[0-2]) training images \(with [3-6] renders\)", result.output), result.output
    assert json.loads(read_metadata(out)["config"])["ema"] == 0.5


def test_render_objects_range_is_checked(cli):
    result = cli("train", "--set", "judge.render_objects=[3, 7]")
    assert result.exit_code == 2 and "judge.render_objects" in result.output


def test_evaluator_train_from_a_judge(tmp_path, cli):
    data = write_folder(tmp_path / "data")
    start = tmp_path / "start.pth"
    torch.save({"model": build_judge().state_dict()}, start)
    out = tmp_path / "run" / "judge.safetensors"
    args = ["train", "--data", data, "--out", out, "--set", "judge.epochs=1", "--set", "judge.batch_size=4",
            "--set", "judge.device=cpu", "--set", "judge.lr=1e-9"]
    result = cli(*args, "--set", f"judge.init='{start}'")
    assert result.exit_code == 0, result.output
    # a vanishing learning rate: the weights are still the starting judge's
    assert torch.allclose(load_judge(out).fc[0].weight, load_judge(start).fc[0].weight, atol=1e-3)
    result = cli(*args, "--set", f"judge.init='{tmp_path / 'missing.pth'}'")
    assert result.exit_code == 1 and "judge checkpoint not found" in result.output
