from pathlib import Path

import pytest

from clevrgen.cli import app
from clevrgen.config import Config, load_config
from clevrgen.config_file import to_toml
from clevrgen.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_defaults_are_the_reference_model():
    cfg = Config()
    assert cfg.model.block_out_channels == [128, 128, 256, 256]
    assert cfg.model.attention == [False, False, False, True]
    assert cfg.diffusion.num_train_timesteps == 1000 and cfg.train.batch_size == 32 and cfg.train.lr == 1e-4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # and survives a round trip through --print-config's TOML
    path2 = Path("roundtrip.toml")
    path2.write_text(to_toml(cfg))
    assert load_config(path2) == cfg


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"base.toml", "small.toml", "tiny.toml"}


def test_overrides_are_toml_literals():
    cfg = load_config(None, ["train.lr=2e-4", "model.block_out_channels=[64,128,128,256]", "sample.sampler=ddim",
                             "train.compile=true"])
    assert cfg.train.lr == 2e-4 and cfg.model.block_out_channels == [64, 128, 128, 256]
    assert cfg.sample.sampler == "ddim" and cfg.train.compile is True


@pytest.mark.parametrize("override, where", [
    ("train.lr=-1", "train.lr"),
    ("train.steps=0", "train.steps"),
    ("sample.guidance=-0.5", "sample.guidance"),
    ("sample.sampler=euler", "sample.sampler"),
    ("train.bogus=1", "train.bogus: unknown key"),
    ("nosection.x=1", "nosection: unknown key"),
    ("model.attention=[true]", "model"),
    ("train.batch_size='many'", "train.batch_size"),
])
def test_invalid_values_name_their_path(override, where):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert any(p.startswith(where.split(":")[0]) for p in err.value.problems), err.value.problems
    if "unknown key" in where:
        assert any(p.startswith(where) for p in err.value.problems)
    assert all(f"(given by --set {override})" in p for p in err.value.problems)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_cli_reports_each_problem_and_exits_2(runner, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlr = -1\nsteps = 0\nwhat = 3\n")
    result = runner.invoke(app, ["train", "--config", str(cfg)])
    assert result.exit_code == 2
    for line in ("train.lr: Input should be greater than 0", "train.steps:", "train.what: unknown key"):
        assert line in result.output
    assert "Traceback" not in result.output


def test_print_config(runner):
    tiny = next(p for p in CONFIGS if p.name == "tiny.toml")
    result = runner.invoke(app, ["train", "--config", str(tiny), "--print-config", "--set", "train.lr=0.5"])
    assert result.exit_code == 0
    assert "lr = 0.5" in result.output and "block_out_channels = [32, 64, 64]" in result.output


@pytest.mark.parametrize("name", ["base", "base.toml", "configs/base.toml"])
def test_shipped_configs_are_found_by_name_from_any_folder(name, tmp_path, monkeypatch):
    from clevrgen.config_file import find_config

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert find_config(name).resolve() == (CONFIGS[0].parent / "base.toml").resolve()
    assert load_config(Path(name)).model.block_out_channels == [128, 128, 256, 256]


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("base.toml").write_text("[train]\nlr = 0.123\n")
    assert load_config(Path("base.toml")).train.lr == 0.123


def test_an_unknown_config_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the shipped configs are .*base.*tiny"):
        load_config(Path("bsae"))
