"""The generator shipped in the package: the default of sample / evaluate / denoise-strip."""

import json
import os
from pathlib import Path

import pytest
import torch

from clevrgen.artifact import SHIPPED_MODEL, export_artifact, load_artifact
from clevrgen.cli import app

from test_diffusion import trained_run  # noqa: F401  (fixture)


def test_export_writes_a_loadable_fp16_artifact(trained_run, tmp_path):  # noqa: F811
    export_artifact(trained_run, tmp_path / "shipped")
    weights = tmp_path / "shipped" / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert not (tmp_path / "shipped" / "state.pt").exists()
    model, _ = load_artifact(tmp_path / "shipped")
    reference, _ = load_artifact(trained_run)
    assert next(model.parameters()).dtype == torch.float32  # runs in fp32 / autocast, like any run
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3, msg=name)


def test_export_command(runner, trained_run, tmp_path):  # noqa: F811
    result = runner.invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "fp16 weights" in result.output and (tmp_path / "m" / "unet").is_dir()
    result = runner.invoke(app, ["export", str(trained_run), "--out", str(trained_run)])
    assert result.exit_code == 2 and "is the run itself" in result.output


def test_commands_use_the_shipped_model_by_default_and_latest_on_request(runner, trained_run, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    import clevrgen.artifact

    export_artifact(trained_run, tmp_path / "shipped")
    monkeypatch.setattr(clevrgen.artifact, "SHIPPED_MODEL", tmp_path / "shipped")
    result = runner.invoke(app, ["sample", "red sphere", "-o", "a.png", "--num", "2", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "model: the shipped model" in result.output
    result = runner.invoke(app, ["evaluate", "--split", "test", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert Path("eval-test/grid.png").is_file() and not (tmp_path / "shipped" / "eval-test").exists()
    Path("runs").mkdir()
    os.symlink(trained_run, "runs/mine")
    result = runner.invoke(app, ["sample", "red sphere", "-o", "b.png", "--num", "2", "--steps", "2",
                                 "--checkpoint", "latest"])
    assert result.exit_code == 0, result.output
    assert "model: runs/mine" in result.output


def test_evaluate_with_several_seeds_reports_mean_and_spread(runner, trained_run, tmp_path):  # noqa: F811
    result = runner.invoke(app, ["evaluate", "--split", "test", "--checkpoint", str(trained_run), "--steps", "1",
                                 "--seeds", "3", "--seed", "5", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["seeds"] == 3 and [p["seed"] for p in record["passes"]] == [5, 1005, 2005]
    values = [p["topk_accuracy"] for p in record["passes"]]
    assert record["topk_accuracy"] == pytest.approx(sum(values) / 3)
    assert record["topk_accuracy_min"] == min(values) and record["topk_accuracy_max"] == max(values)


needs_shipped = pytest.mark.skipif(not (SHIPPED_MODEL / "config.toml").is_file(), reason="no shipped model")


@needs_shipped
def test_the_shipped_model_is_small_fp16_and_on_full_resolution():
    files = [p for p in SHIPPED_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20  # issue 22's cap for the generator in fp16
    _, config = load_artifact(SHIPPED_MODEL)
    assert config.model.image_size == 64
    record = json.loads((SHIPPED_MODEL / "training_data.json").read_text())
    assert "i-CLEVR" in record["data"]


@needs_shipped
def test_sample_from_an_empty_folder_uses_the_shipped_model(runner, tmp_path):
    torch.set_num_threads(1)
    result = runner.invoke(app, ["sample", "red sphere", "cyan cube", "-o", "out.png", "--num", "2"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open("out.png").size == (2 * 66 + 2, 66 + 2)


def test_a_stopped_evaluation_resumes_from_its_last_whole_pass(trained_run, tmp_path):  # noqa: F811
    from clevrgen.evaluation import score_split
    from clevrgen.loaded import LoadedModel
    from clevrgen.runtime import StopSignal

    model = LoadedModel.load(trained_run)
    model.config = model.config.model_copy(
        update={"sample": model.config.sample.model_copy(update={"steps": 1})})
    straight = score_split(model, "test", tmp_path / "straight", progress=False, seeds=3)

    drawn, generate = [], model.generate

    def stop_in_the_second_pass(scenes, seeds, *args, **kwargs):
        drawn.append(seeds[0])
        if len(drawn) == 2:
            raise StopSignal(15)  # as SIGTERM does mid-pass
        return generate(scenes, seeds, *args, **kwargs)

    model.generate = stop_in_the_second_pass
    with pytest.raises(StopSignal):
        score_split(model, "test", tmp_path / "stopped", progress=False, seeds=3)
    drawn.clear()
    model.generate = lambda scenes, seeds, *a, **k: (drawn.append(seeds[0]), generate(scenes, seeds, *a, **k))[1]
    resumed = score_split(model, "test", tmp_path / "stopped", progress=False, seeds=3)
    assert drawn == [1000, 2000]  # the first pass was kept, the torn second one drawn again
    assert resumed["passes"] == straight["passes"]
    assert not (tmp_path / "stopped" / ".passes").exists()
