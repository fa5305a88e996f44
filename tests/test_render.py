"""The procedural renderer: counts, determinism, visibility, sequences, the layout, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from clevrgen.cli import app
from clevrgen.data import render as R
from clevrgen.data.iclevr import load_iclevr
from clevrgen.data.rendered_folder import render_folder
from clevrgen.errors import DataError
from clevrgen.labels import CLASS_INDEX, multi_hot

SPEC = {
    "CLEVR_train_000001_0.png": ["red cube"],
    "CLEVR_train_000001_1.png": ["red cube", "blue sphere"],
    "CLEVR_train_000001_2.png": ["red cube", "blue sphere", "yellow cylinder"],
    "lone.png": ["gray sphere", "green cylinder", "purple cube", "cyan sphere", "brown cube"],
}


@pytest.fixture(scope="module")
def rendered():
    return R.render_dataset(SPEC, seed=3, progress=False)


def test_counts_and_classes_match_the_spec(rendered):
    assert rendered.names == list(SPEC)
    assert rendered.images.shape == (4, 3, 64, 64) and rendered.images.dtype == torch.uint8
    assert torch.equal(rendered.labels, multi_hot(SPEC.values()))
    plan = {key: classes for key, classes, _ in R.plan_scenes(SPEC)}
    assert plan["CLEVR_train_000001"] == [CLASS_INDEX[p] for p in SPEC["CLEVR_train_000001_2.png"]]
    assert rendered.scenes.tolist() == [0, 0, 0, 1]


def test_same_seed_same_images_other_seed_other_images(rendered):
    again = R.render_dataset(SPEC, seed=3, progress=False)
    assert torch.equal(again.images, rendered.images)
    other = R.render_dataset(SPEC, seed=4, progress=False)
    assert not torch.equal(other.images, rendered.images)


def test_a_scene_does_not_depend_on_its_batch(rendered):
    alone = R.render_dataset({"lone.png": SPEC["lone.png"]}, seed=3, progress=False)
    assert torch.equal(alone.images[0], rendered.images[-1])
    sequence = {k: v for k, v in SPEC.items() if k != "lone.png"}  # 3 object slots, not 5
    assert torch.equal(R.render_dataset(sequence, seed=3, progress=False).images, rendered.images[:3])


def test_objects_rest_apart_and_each_is_visible():
    classes = [[CLASS_INDEX[p] for p in SPEC["lone.png"]]] * 6
    scenes = R.sample_scenes(classes, [f"s{i}" for i in range(6)], seed=0)
    pixels = R.object_pixels(scenes)
    assert bool((pixels >= scenes.style.min_pixels).all())
    gaps = (scenes.xy[:, :, None] - scenes.xy[:, None]).norm(dim=-1)
    radius = R.bound_radius(scenes)
    clearance = gaps - radius[:, :, None] - radius[:, None]
    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    assert bool((clearance[:, off_diagonal] >= scenes.style.gap - 1e-5).all())
    assert bool((gaps[:, off_diagonal] >= scenes.style.spacing - 1e-5).all())
    assert torch.equal(scenes.xy[:, 0], torch.zeros(6, 2))  # i-CLEVR: the first object at the origin
    assert bool((scenes.xy[:, 1:].abs().amax(-1) >= scenes.style.ring - 1e-5).all())


def test_sequences_share_the_earlier_objects(rendered):
    first, second, third = rendered.images[:3].float()
    # adding an object changes only the pixels near it: most of the image stays put
    assert (first - second).abs().amax(0).gt(8).float().mean() < 0.15
    assert (second - third).abs().amax(0).gt(8).float().mean() < 0.15
    assert (first - second).abs().amax(0).gt(8).any() and (second - third).abs().amax(0).gt(8).any()
    scenes = R.sample_scenes([[CLASS_INDEX[p] for p in SPEC["CLEVR_train_000001_2.png"]]], ["CLEVR_train_000001"], 3)
    facts = json.loads(json.dumps(R.scene_facts(scenes, 0)))
    assert [f["phrase"] for f in facts] == SPEC["CLEVR_train_000001_2.png"]


def test_written_folder_reads_back(tmp_path, rendered, monkeypatch):
    monkeypatch.setenv("CLEVRGEN_CACHE", str(tmp_path / "cache"))
    counts = render_folder(tmp_path / "out", SPEC, seed=3, progress=False)
    assert counts == {"rendered": 4, "kept": 0}
    data = load_iclevr(tmp_path / "out", progress=False)
    assert data.names == list(SPEC) and torch.equal(data.images, rendered.images)
    scenes = json.loads((tmp_path / "out" / "scenes.json").read_text())
    assert [f["phrase"] for f in scenes["CLEVR_train_000001_1.png"]] == SPEC["CLEVR_train_000001_1.png"]
    again = render_folder(tmp_path / "out", SPEC, seed=3, progress=False)  # resumes: nothing to do
    assert again == {"rendered": 0, "kept": 4}
    # a run killed midway: its journal holds what was written, one PNG of a sequence is missing
    out = tmp_path / "out"
    (out / "scenes.jsonl").write_text(json.dumps(scenes) + "\n")
    (out / "scenes.json").unlink()
    (out / "iclevr" / "CLEVR_train_000001_2.png").unlink()
    resumed = render_folder(out, SPEC, seed=3, progress=False)
    assert resumed == {"rendered": 3, "kept": 1}  # the whole sequence, so it stays one scene
    assert torch.equal(load_iclevr(out, progress=False).images, rendered.images)
    assert json.loads((out / "scenes.json").read_text()) == scenes and not (out / "scenes.jsonl").exists()
    # resuming with another seed would mix two renders: refused, and nothing is lost
    with pytest.raises(DataError, match="another render"):
        render_folder(out, SPEC, seed=4, progress=False)
    assert json.loads((out / "train.json").read_text()) == SPEC
    assert torch.equal(load_iclevr(out, progress=False).images, rendered.images)


def test_cache_only_folder_reads_back_without_pngs(tmp_path, rendered, monkeypatch):
    monkeypatch.setenv("CLEVRGEN_CACHE", str(tmp_path / "cache"))
    render_folder(tmp_path / "out", SPEC, seed=3, fmt="cache", progress=False)
    assert not (tmp_path / "out" / "iclevr").exists()
    data = load_iclevr(tmp_path / "out", progress=False)
    assert torch.equal(data.images, rendered.images)


def test_cli_render(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEVRGEN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    result = runner.invoke(app, ["data", "render", "--out", str(tmp_path / "a"), "--spec", str(spec), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a" / "iclevr").iterdir()) == sorted(SPEC)
    result = runner.invoke(app, ["data", "render", "--out", str(tmp_path / "b"), "--random", "2", "--objects", "2-3"])
    assert result.exit_code == 0, result.output
    names = json.loads((tmp_path / "b" / "train.json").read_text())
    assert all(2 <= len(v) <= 3 for v in names.values()) and len({n.rsplit("_", 1)[0] for n in names}) == 2


@pytest.mark.parametrize("args, message", [
    (["--random", "2", "--objects", "3-1"], "--objects"),
    (["--random", "2", "--objects", "0-9"], "--objects"),
    (["--spec", "missing.json"], "missing file"),
    (["--spec", "{bad}"], "unknown phrase"),
    (["--spec", "{escape}"], "plain .png file names"),
    (["--spec", "{empty}"], "no phrases"),
])
def test_cli_render_user_errors(tmp_path, args, message):
    if args[-1] in ("{bad}", "{escape}", "{empty}"):
        bad = tmp_path / "bad.json"
        table = {"{bad}": {"x_0.png": ["pink cube"]}, "{escape}": {"../x_0.png": ["red cube"]},
                 "{empty}": {"x_0.png": []}}[args[-1]]
        bad.write_text(json.dumps(table))
        args = ["--spec", str(bad)]
    result = CliRunner().invoke(app, ["data", "render", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output


def test_cli_render_cuda_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    result = CliRunner().invoke(app, ["data", "render", "--out", str(tmp_path / "o"), "--random", "1", "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA" in result.output


def test_generator_options_metal_two_sizes_anywhere():
    style = R.SceneStyle(sizes=(0.7, 0.35), metal_probability=1.0, cube_scale=0.7071, first_at_origin=False,
                         ring=0.0, camera_jitter=0.5)
    scenes = R.sample_scenes([[0, 9, 22]] * 4, [f"m{i}" for i in range(4)], seed=1, style=style)
    images = R.render_scenes(scenes)
    assert images.shape == (4, 3, 64, 64) and images.float().std() > 5
    assert {round(s, 4) for s in scenes.size.flatten().tolist()} <= {0.7, 0.35}
    assert all(f["material"] == "metal" for f in R.scene_facts(scenes, 0))
    assert bool((R.object_pixels(scenes) >= style.min_pixels).all())


def test_bevelled_edges_trim_cubes_and_cylinders_only():
    # a cube, a sphere and a cylinder: rounding edges off takes pixels from the cube and the
    # cylinder (their corners), never from the sphere (it can only show more of it, where an
    # edge in front of it was cut away), and never makes a shape disappear
    scenes = R.sample_scenes([[0, 9, 18]] * 3, [f"b{i}" for i in range(3)], seed=2)
    sharp = R.object_pixels(scenes, size=128)
    round_ = R.object_pixels(R.Scenes(**{**scenes.__dict__, "style": R.SceneStyle(bevel=0.3)}), size=128)
    assert bool((round_[:, 1] >= sharp[:, 1]).all())
    assert bool((round_[:, [0, 2]] < sharp[:, [0, 2]]).all())
    assert bool((round_[:, [0, 2]] > 0.75 * sharp[:, [0, 2]]).all())
    images = R.render_scenes(R.Scenes(**{**scenes.__dict__, "style": R.SceneStyle(bevel=0.3, noise=0)}))
    assert torch.isfinite(images.float()).all() and images.float().std() > 5


def test_shadow_strength_darkens_the_floor_per_light():
    scenes = R.sample_scenes([[0, 9, 18]], ["s"], seed=0)

    def floor_mean(strength):
        style = R.SceneStyle(shadow_strength=strength, noise=0)
        return R.render_scenes(R.Scenes(**{**scenes.__dict__, "style": style})).float().mean()

    none, fill, all_ = floor_mean((0, 0, 0, 0)), floor_mean((0, 1, 0, 0)), floor_mean((1, 1, 1, 1))
    assert all_ < fill < none


def test_embedded_cache_is_keyed_by_the_renderer_settings():
    from clevrgen.data.embedded import embedded_fingerprint

    base = embedded_fingerprint(b"{}", 0)
    assert base == embedded_fingerprint(b"{}", 0, R.SceneStyle())
    assert base != embedded_fingerprint(b"{}", 1)
    assert base != embedded_fingerprint(b'{"a": 1}', 0)
    assert base != embedded_fingerprint(b"{}", 0, R.SceneStyle(cube_scale=0.9))


def test_style_overrides_parse_or_say_why():
    assert R.style_with(["cube_scale=0.9", "shadow_strength=(1, 0, 1, 1)"]) == R.SceneStyle(
        cube_scale=0.9, shadow_strength=(1, 0, 1, 1))
    for bad, message in (["cube_scal=1", "unknown scene setting"], ["penumbra=(0.1", "not a Python literal"],
                         ["noise", "KEY=VALUE"]):
        with pytest.raises(DataError, match=message):
            R.style_with([bad])
