import subprocess
import sys

from clevrgen import __version__
from clevrgen.cli import app


def test_help_lists_every_command(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "sample", "evaluate", "denoise-strip", "demo", "data", "evaluator"):
        assert command in result.output


def test_every_command_has_help_with_examples(runner):
    for command in (["train"], ["sample"], ["evaluate"], ["denoise-strip"], ["demo"], ["data", "info"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, command
        assert "Examples" in result.output, command


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_cli_import_does_not_load_torch_or_diffusers():
    code = "import sys, clevrgen.cli; print(sorted(m for m in ('torch', 'diffusers', 'gradio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m(tmp_path):
    out = subprocess.run([sys.executable, "-m", "clevrgen", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


def test_bad_phrase_is_one_line_and_exit_2(runner):
    result = runner.invoke(app, ["sample", "pink cube"])
    assert result.exit_code == 2
    assert 'unknown phrase "pink cube". Did you mean "purple cube"?' in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_missing_checkpoint_is_exit_1(runner, tmp_path):
    result = runner.invoke(app, ["sample", "red sphere", "--checkpoint", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "checkpoint not found" in result.output
    result = runner.invoke(app, ["sample", "red sphere", "--checkpoint", "latest"])  # no runs/ folder at all
    assert result.exit_code == 1 and "no trained model found" in result.output
