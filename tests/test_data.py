import json

import pytest
import torch

from clevrgen.cli import app
from clevrgen.data.iclevr import cache_path, load_iclevr, scene_key, split_scenes, to_float, to_uint8
from clevrgen.errors import DataError

from conftest import SHARED_ICLEVR


def test_reader_squashes_to_64_rgb_and_labels(dataset):
    data = load_iclevr(dataset, progress=False)
    assert data.images.shape == (12, 3, 64, 64) and data.images.dtype == torch.uint8
    assert data.labels.shape == (12, 24)
    assert data.labels.sum(1).tolist() == [1, 2, 3] * 4
    assert data.scenes.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    x = to_float(data.images)
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(to_uint8(x), data.images)


def test_cache_is_written_once_and_reused(dataset, monkeypatch):
    first = load_iclevr(dataset, progress=False)
    assert cache_path(dataset).is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr("clevrgen.data.iclevr.decode_folder", no_decoding)
    second = load_iclevr(dataset, progress=False)
    assert torch.equal(first.images, second.images) and first.names == second.names


def test_cache_follows_the_label_file(dataset):
    load_iclevr(dataset, progress=False)
    spec = json.loads((dataset / "train.json").read_text())
    spec.pop(next(iter(spec)))
    (dataset / "train.json").write_text(json.dumps(spec))
    assert len(load_iclevr(dataset, progress=False)) == 11


def test_split_holds_out_whole_scenes(dataset):
    data = load_iclevr(dataset, progress=False)
    train, val = split_scenes(data, 0.25, seed=0)
    assert len(val) == 3 and len(train) == 9
    assert not set(train.scenes.tolist()) & set(val.scenes.tolist())
    again_train, _ = split_scenes(data, 0.25, seed=0)
    assert again_train.names == train.names


def test_scene_key():
    assert scene_key("CLEVR_train_000123_2.png") == "CLEVR_train_000123"
    assert scene_key("anything.png") == "anything.png"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "iclevr" / "CLEVR_train_000001_1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"),
     "corrupt or unreadable image: .*CLEVR_train_000001_1.png"),
    (lambda d: (d / "iclevr" / "CLEVR_train_000002_0.png").unlink(), "missing image: .*CLEVR_train_000002_0.png"),
    (lambda d: (d / "train.json").write_text('{"a_0.png": ["pink cube"]}'), "a_0.png: unknown label 'pink cube'"),
    (lambda d: (d / "train.json").write_text("{}"), "lists no images"),
    (lambda d: (d / "train.json").write_text("[1, 2"), "not valid JSON"),
    (lambda d: (d / "objects.json").unlink(), "not an i-CLEVR dataset folder: objects.json missing"),
])
def test_damaged_datasets_are_named(dataset, damage, message):
    damage(dataset)
    with pytest.raises(DataError, match=message):
        load_iclevr(dataset, progress=False)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        load_iclevr(tmp_path / "nowhere")


def test_data_info_command(runner, dataset, tmp_path):
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["data", "info", str(dataset), "--grid", str(grid), "--count", "6"])
    assert result.exit_code == 0, result.output
    assert "images with 3 objects" in result.output and grid.is_file()
    result = runner.invoke(app, ["data", "info", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "dataset folder not found" in result.output


@pytest.mark.skipif(not (SHARED_ICLEVR / "train.json").exists(), reason="../shared/iclevr is absent")
def test_real_iclevr_through_the_cache(monkeypatch):
    data = load_iclevr(SHARED_ICLEVR, progress=False)
    assert data.images.shape == (18009, 3, 64, 64)
    assert len(torch.unique(data.scenes)) == 6003
    counts = data.labels.sum(0)
    assert counts.min() >= 1422 and counts.max() <= 1577
    monkeypatch.setattr("clevrgen.data.iclevr.decode_folder", None)  # the second load must hit the cache
    again = load_iclevr(SHARED_ICLEVR, progress=False)
    assert torch.equal(again.labels, data.labels)
