from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command.strip() in (ROOT / "README.md").read_text()


def test_the_readme_diffusers_snippet_draws_with_a_saved_run(tmp_path, monkeypatch):
    """The README's lines that sample with diffusers alone run, on a tiny patched model."""
    import torch

    from clevrgen.config import load_config
    from clevrgen.model import build_model, save_artifact

    from conftest import TINY

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Sampling with diffusers alone"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    cfg = load_config(None, [*TINY, "model.patch_size=2"])
    save_artifact(build_model(cfg.model).eval(), cfg, tmp_path / "run")
    monkeypatch.chdir(ROOT)
    code = code.replace('run = "src/clevrgen/assets/model"', f'run = "{tmp_path / "run"}"')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["image"].shape == (1, 3, 64, 64) and namespace["image"].dtype == torch.uint8
