from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_python(after: str, page: str = "README.md") -> str:
    """The first Python block after the text ``after`` in ``page`` (the README or a docs page), as written."""
    section = (ROOT / page).read_text().split(after, 1)[1]
    start = section.index("```python") + len("```python")
    return section[start:section.index("```\n", start)]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command.strip() in (ROOT / "README.md").read_text()


def test_the_readme_python_section_runs(tmp_path, monkeypatch):
    """The README's Python lines, as written, with a tiny patched model standing in for the shipped one."""
    import torch

    from clevrgen import ClevrgenPipeline
    from clevrgen.artifact import save_artifact
    from clevrgen.config import load_config
    from clevrgen.model import build_model

    from conftest import TINY

    code = readme_python("### From Python")
    cfg = load_config(None, [*TINY, "model.patch_size=2"])
    save_artifact(build_model(cfg.model).eval(), cfg, tmp_path / "tiny")
    real = ClevrgenPipeline.from_pretrained.__func__
    monkeypatch.setattr(ClevrgenPipeline, "from_pretrained",
                        classmethod(lambda cls, path=None, **kw: real(cls, path or tmp_path / "tiny", **kw)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "scene.png").is_file() and (tmp_path / "my-pipeline" / "model_index.json").is_file()
    assert len(namespace["grid"]) == 4 and namespace["grid"][0].size == (64, 64)
    assert len(namespace["same"]) == 4
    assert isinstance(namespace["pipe"], ClevrgenPipeline) and namespace["pipe"].unet.dtype == torch.float32


def test_the_readme_diffusers_alone_lines_reproduce_the_model(tmp_path, monkeypatch):
    """The denoiser call with diffusers alone (docs/architecture.md, linked from the README), on a
    tiny run of cpu.toml's design (2x2 patches, tokens), gives what clevrgen's own model gives."""
    import torch

    from clevrgen.artifact import save_artifact
    from clevrgen.config import load_config
    from clevrgen.labels import multi_hot
    from clevrgen.model import build_model

    from conftest import TINY, TOKENS

    code = readme_python("One denoiser call with diffusers", "docs/architecture.md")
    cfg = load_config(None, [*TINY, *TOKENS, "model.patch_size=2", "model.resnet_time_scale_shift='scale_shift'"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_artifact(model, cfg, tmp_path / "runs" / "cpu")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    namespace: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), namespace)
    with torch.no_grad():
        ours = model(namespace["x"], namespace["t"], multi_hot([["red sphere", "cyan cube"]]))
    torch.testing.assert_close(namespace["v"], ours, atol=1e-5, rtol=0)
