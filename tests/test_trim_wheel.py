"""scripts/trim_wheel.py drops the right members of a (fake) diffusers wheel, writes a RECORD
that matches the kept bytes, and pip installs the result."""

import csv
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

INFO = "diffusers-0.42.1.dist-info"
FILES = {
    "diffusers/__init__.py": "from .models.unet import UNet\n__version__ = '0.42.1'\n",
    "diffusers/callbacks.py": "",
    "diffusers/models/__init__.py": "",
    "diffusers/models/unet.py": "class UNet:\n    pass\n",
    "diffusers/models/controlnets/__init__.py": "",
    "diffusers/models/controlnets/controlnet.py": "",
    "diffusers/pipelines/__init__.py": "",
    "diffusers/pipelines/pipeline_utils.py": "class DiffusionPipeline:\n    pass\n",
    "diffusers/pipelines/stable_diffusion/__init__.py": "",
    "diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py": "x = 1\n",
    "diffusers/commands/diffusers_cli.py": "def main():\n    pass\n",
    "diffusers/schedulers/scheduling_ddpm.py": "",
    "diffusers/schedulers/deprecated/old.py": "",
    f"{INFO}/METADATA": "Metadata-Version: 2.1\nName: diffusers\nVersion: 0.42.1\n",
    f"{INFO}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    f"{INFO}/top_level.txt": "diffusers\n",
    f"{INFO}/entry_points.txt": "[console_scripts]\ndiffusers-cli = diffusers.commands.diffusers_cli:main\n",
}
KEPT = {"diffusers/__init__.py", "diffusers/models/__init__.py", "diffusers/models/unet.py",
        "diffusers/pipelines/__init__.py", "diffusers/pipelines/pipeline_utils.py",
        "diffusers/schedulers/scheduling_ddpm.py",
        f"{INFO}/METADATA", f"{INFO}/WHEEL", f"{INFO}/top_level.txt", f"{INFO}/TRIMMED", f"{INFO}/RECORD"}


def fake_wheel(folder: Path) -> Path:
    from trim_wheel import record_hash

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "diffusers-0.42.1-py3-none-any.whl"
    rows = [(n, record_hash(t.encode()), len(t.encode())) for n, t in FILES.items()] + [(f"{INFO}/RECORD", "", "")]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in FILES.items():
            z.writestr(name, text)
        z.writestr(f"{INFO}/RECORD", buf.getvalue())
    return path


def read_record(wheel: Path) -> tuple[set[str], list[list[str]]]:
    from trim_wheel import record_hash

    with zipfile.ZipFile(wheel) as z:
        names = {i.filename for i in z.infolist()}
        rows = list(csv.reader(io.StringIO(z.read(f"{INFO}/RECORD").decode())))
        for name, digest, size in rows:
            if name != f"{INFO}/RECORD":
                data = z.read(name)
                assert (digest, int(size)) == (record_hash(data), len(data)), name
    return names, rows


def test_trim_keeps_what_is_used_and_rewrites_a_consistent_record(tmp_path):
    from trim_wheel import trim_wheel

    src = fake_wheel(tmp_path / "in")
    result = trim_wheel(src, tmp_path / "out")
    assert result.path == tmp_path / "out" / src.name
    names, rows = read_record(result.path)
    assert names == KEPT
    assert {r[0] for r in rows} == names and [r for r in rows if r[0].endswith("RECORD")] == [[f"{INFO}/RECORD", "", ""]]
    # The only entry point's module went, so entry_points.txt is left out too (not in KEPT): pip
    # would otherwise write a diffusers-cli script that cannot run.
    assert set(result.dropped) == set(FILES) - KEPT - {f"{INFO}/entry_points.txt"}
    with zipfile.ZipFile(result.path) as z:
        assert "diffusers/pipelines/" in z.read(f"{INFO}/TRIMMED").decode()


def test_trim_in_place_twice_is_stable_and_pip_installs_it(tmp_path):
    from trim_wheel import trim_wheel

    src = fake_wheel(tmp_path / "whl")
    trim_wheel(src, src.parent)
    once = read_record(src)
    trim_wheel(src, src.parent)
    assert read_record(src) == once and [p.name for p in src.parent.iterdir()] == [src.name]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    assert (target / "diffusers" / "pipelines" / "pipeline_utils.py").is_file()
    assert not (target / "diffusers" / "pipelines" / "stable_diffusion").exists()
    assert not (target / "bin").exists()
    done = subprocess.run([sys.executable, "-c", "import diffusers, diffusers.pipelines.pipeline_utils; "
                           "print(diffusers.__file__)"], env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(str(target)), done.stderr


def test_entry_points_keep_entries_whose_module_stays():
    from trim_wheel import _entry_points

    text = "[console_scripts]\na = pkg.cli:main\nb = pkg.gone:main\n\n[other]\nc = pkg.gone:run\n"
    assert _entry_points(text, {"pkg/cli.py"}) == "[console_scripts]\na = pkg.cli:main\n\n"
    assert _entry_points(text, set()) == ""


@pytest.mark.parametrize("content", [b"not a zip", None])
def test_a_bad_wheel_is_one_error_line(tmp_path, content):
    from trim_wheel import main

    path = tmp_path / "diffusers-0.42.1-py3-none-any.whl"
    if content is not None:
        path.write_bytes(content)
    done = subprocess.run([sys.executable, str(SCRIPTS / "trim_wheel.py"), str(path)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert main([str(path)]) == 1
