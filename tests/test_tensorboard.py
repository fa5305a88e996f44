"""train.tensorboard: the logged numbers and the sample grids in RUN/tensorboard/, as the course had them."""

import pytest

from clevrgen.cli import app

from conftest import TINY

pytest.importorskip("tensorboard")


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def train_args(out, dataset, *extra):
    return ["train", "--out", str(out), *[x for s in TINY for x in ("--set", s)], "--set", f"data.path='{dataset}'",
            *extra]


def test_tensorboard_gets_the_loss_lr_speed_held_out_loss_and_grids(runner, dataset, tmp_path):
    result = runner.invoke(app, train_args(tmp_path / "t", dataset, "--tensorboard", "--set", "train.steps=4",
                                           "--set", "train.eval_every=2", "--set", "train.sample_every=2"))
    assert result.exit_code == 0, result.output
    acc = events(tmp_path / "t")
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/images_per_second", "eval/held_out_loss"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Images("samples/new_test")] == [2, 4]
    assert (tmp_path / "t" / "metrics.jsonl").is_file()  # still the record


def test_a_resume_forgets_the_events_after_its_checkpoint(runner, dataset, tmp_path):
    args = train_args(tmp_path / "t", dataset, "--tensorboard", "--set", "train.steps=3",
                      "--set", "train.checkpoint_every=2")
    assert runner.invoke(app, args).exit_code == 0
    # events a killed run wrote after its last checkpoint (step 3)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "t" / "tensorboard")) as writer:
        writer.add_scalar("train/loss", 99.0, 4)
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "t"), "--set", "train.steps=5"])
    assert result.exit_code == 0, result.output
    losses = events(tmp_path / "t").Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5] and 99.0 not in [e.value for e in losses]


def test_without_tensorboard_the_option_fails_at_once_saying_what_to_install(runner, dataset, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result = runner.invoke(app, train_args(tmp_path / "t", dataset, "--tensorboard"))
    assert result.exit_code == 2
    assert "pip install 'clevrgen[tensorboard]'" in result.output
    assert not (tmp_path / "t" / "state.pt").exists()
