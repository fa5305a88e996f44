"""ClevrgenPipeline: diffusers' conventions, and the same images as the loop it replaced."""

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from clevrgen import ClevrgenPipeline
from clevrgen.artifact import save_artifact
from clevrgen.config import load_config
from clevrgen.diffusion import sampling_scheduler
from clevrgen.errors import PhraseError
from clevrgen.labels import multi_hot
from clevrgen.model import build_model
from clevrgen.runtime import autocast

from conftest import TINY

SCENES = [["red sphere", "cyan cube"], ["gray cube"], ["blue cylinder", "green sphere", "brown cube"]]


@torch.no_grad()
def reference_sample(model, scheduler, labels, seeds: Sequence[int], steps, guidance, amp=None):
    """The sampling loop as clevrgen had it before the pipeline (kept here as the reference)."""
    device = labels.device
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn((3, 64, 64), generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    empty = torch.zeros_like(labels)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        with autocast(device, amp):
            if guidance == 1.0:
                out = model(model_input, t, labels)
            elif guidance == 0.0:
                out = model(model_input, t, empty)
            else:
                cond, uncond = model(torch.cat([model_input] * 2), t, torch.cat([labels, empty])).chunk(2)
                out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out.float(), t, x, generator=generators).prev_sample
    return x.clamp(-1.0, 1.0)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config(None, [*TINY, "model.patch_size=2"])
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg


@pytest.fixture
def pipe(tiny_model):
    model, cfg = tiny_model
    p = ClevrgenPipeline.from_denoiser(model, sampling_scheduler(cfg.diffusion, "dpm++"), num_inference_steps=3,
                                       guidance_scale=2.0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("sampler, guidance", [("dpm++", 2.0), ("ddim", 1.0), ("ddpm", 0.0), ("ddpm", 3.5)])
def test_the_pipeline_draws_bit_for_bit_what_the_old_loop_drew(tiny_model, sampler, guidance):
    model, cfg = tiny_model
    labels = multi_hot(SCENES)
    old = reference_sample(model, sampling_scheduler(cfg.diffusion, sampler), labels, [5, 6, 7], 3, guidance)
    pipe = ClevrgenPipeline.from_denoiser(model, sampling_scheduler(cfg.diffusion, sampler))
    pipe.set_progress_bar_config(disable=True)
    new = pipe(SCENES, num_inference_steps=3, guidance_scale=guidance, seed=5, output_type="latent").images
    assert torch.equal(old, new)
    # prepare_latents draws the noise seed= starts from
    assert torch.equal(new, pipe(labels=labels, seed=[5, 6, 7], latents=pipe.prepare_latents(3, seed=5),
                                 num_inference_steps=3, guidance_scale=guidance, output_type="latent").images)
    # in batches of another size: the same images up to the float rounding of another batch shape
    torch.testing.assert_close(new, pipe(labels=labels, seed=[5, 6, 7], num_inference_steps=3, guidance_scale=guidance,
                                         output_type="latent", batch_size=2).images, atol=1e-4, rtol=0)


def test_seed_is_one_generator_per_image(pipe):
    by_seed = pipe(SCENES, seed=10, output_type="pt").images
    by_list = pipe(SCENES, generator=[torch.Generator().manual_seed(10 + i) for i in range(3)], output_type="pt").images
    assert torch.equal(by_seed, by_list)
    alone = pipe(SCENES[1:2], seed=11, output_type="pt").images
    torch.testing.assert_close(alone[0], by_seed[1], atol=1e-4, rtol=0)  # nor on the other images of the call


def test_one_generator_draws_the_images_one_after_the_other(pipe):
    a = pipe([SCENES[0]] * 2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe([SCENES[0]] * 2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    with pytest.raises(Exception, match="2 generators for 3 images"):
        pipe(SCENES, generator=[torch.Generator(), torch.Generator()])


def test_the_starting_noise_is_drawn_on_the_generators_device(pipe, monkeypatch):
    """diffusers' convention: ``pipe(..., generator=torch.Generator("cuda"))`` draws the noise on
    the GPU. (No CUDA here, and a meta generator cannot be made: a stand-in reports its device,
    and the noise it asks for is recorded.)"""
    from clevrgen import pipeline

    asked = []

    def randn_tensor(shape, generator=None, device=None, dtype=None):
        asked.append(device)
        return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)

    class CudaGenerator(torch.Generator):  # a generator (the pipeline takes no other) reporting a GPU
        device = torch.device("cuda", 0)

    monkeypatch.setattr(pipeline, "randn_tensor", randn_tensor)
    pipe(SCENES[:1], generator=CudaGenerator(), output_type="latent")
    pipe(SCENES[:2], generator=[CudaGenerator(), CudaGenerator()], output_type="latent")
    pipe(SCENES[:1], seed=0, output_type="latent")
    pipe(SCENES[:1], generator=torch.Generator().manual_seed(0), output_type="latent")
    assert asked == [torch.device("cuda", 0)] * 2 + [torch.device("cpu")] * 2


def test_output_types(pipe):
    pil = pipe(SCENES[0], seed=0).images
    assert len(pil) == 1 and pil[0].size == (64, 64) and pil[0].mode == "RGB"  # a flat list is one scene
    arr = pipe(SCENES, seed=0, output_type="np").images
    pt = pipe(SCENES, seed=0, output_type="pt").images
    assert arr.shape == (3, 64, 64, 3) and pt.shape == (3, 3, 64, 64)
    assert 0 <= pt.min() and pt.max() <= 1 and np.allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    images, = pipe(SCENES[0], seed=0, return_dict=False)
    assert len(images) == 1
    with pytest.raises(Exception, match="output_type 'jpeg'"):
        pipe(SCENES[0], output_type="jpeg")


def test_a_bad_phrase_raises_clevrgens_error_with_a_suggestion(pipe):
    with pytest.raises(PhraseError, match="red sphere"):
        pipe(["red spere"])


def test_the_step_callback_sees_every_step_and_may_change_the_state(pipe):
    seen = []

    def record(p, i, t, kwargs):
        seen.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else kwargs

    out = pipe(SCENES[0], seed=0, num_inference_steps=3, output_type="latent", callback_on_step_end=record).images
    assert seen == [0, 1, 2] and torch.equal(out, torch.zeros_like(out))


def test_save_and_load_give_the_same_images_and_diffusers_finds_the_class(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    before = pipe(SCENES, seed=3, output_type="pt").images
    pipe.save_pretrained(tmp_path / "p")
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors",
                 "label_encoder/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (tmp_path / "p" / name).is_file(), name
    again = ClevrgenPipeline.from_pretrained(tmp_path / "p")
    by_diffusers = DiffusionPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True)
    assert type(by_diffusers) is ClevrgenPipeline and by_diffusers.config.num_inference_steps == 3
    for loaded in (again, by_diffusers):
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(before, loaded(SCENES, seed=3, output_type="pt").images)


def test_a_run_folder_is_a_pipeline_folder(tiny_model, tmp_path):
    from diffusers import DiffusionPipeline

    model, cfg = tiny_model
    save_artifact(model, cfg, tmp_path / "run")
    a = ClevrgenPipeline.from_pretrained(tmp_path / "run")
    b = DiffusionPipeline.from_pretrained(tmp_path / "run", trust_remote_code=True)
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    # The same weights and loop, to rounding: diffusers' loader leaves the weights in the
    # memory-mapped file, not 64-byte aligned, and on an AVX2 AMD EPYC the kernels' unaligned path
    # moved the images by 3.6e-7 (bit-equal once the weights were copied to aligned memory).
    torch.testing.assert_close(a(SCENES[0], seed=1, output_type="pt").images,
                               b(SCENES[0], seed=1, output_type="pt").images, rtol=0, atol=1e-5)
    assert a.config.num_inference_steps == cfg.sample.steps


def test_torch_dtype_and_to(tiny_model, tmp_path):
    model, cfg = tiny_model
    save_artifact(model, cfg, tmp_path / "run")
    half = ClevrgenPipeline.from_pretrained(tmp_path / "run", torch_dtype=torch.bfloat16).to("cpu")
    half.set_progress_bar_config(disable=True)
    assert half.unet.dtype == torch.bfloat16
    assert half(SCENES[0], seed=0, output_type="pt").images.isfinite().all()


@pytest.mark.parametrize("dtype", ["float16", "fp16", torch.int8, 16])
def test_torch_dtype_that_is_no_floating_dtype_is_refused(tiny_model, tmp_path, dtype):
    from clevrgen.errors import UsageError

    model, cfg = tiny_model
    save_artifact(model, cfg, tmp_path / "run")
    with pytest.raises(UsageError, match=f"torch_dtype {dtype!r}: give a floating torch dtype"):
        ClevrgenPipeline.from_pretrained(tmp_path / "run", torch_dtype=dtype)


def test_the_shipped_model_loads_with_no_argument():
    pipe = ClevrgenPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.num_inference_steps == 25 and pipe.config.max_objects == 3
    images = pipe(["red sphere", "cyan cube"], num_inference_steps=2, seed=0).images
    assert images[0].size == (64, 64)


@pytest.mark.parametrize("kwargs, message", [
    ({"scenes": []}, "nothing to draw"),
    ({"num_inference_steps": 0}, "num_inference_steps 0: must be from 1 to 50"),
    ({"num_inference_steps": True}, "num_inference_steps True: give an integer"),
    ({"guidance_scale": float("nan")}, "guidance_scale nan: must be from 0.0 to 100.0"),
    ({"guidance_scale": float("inf")}, "guidance_scale inf"),
    ({"batch_size": 0}, "batch_size 0: must be from 1"),
    ({"seed": 2**70}, "seed 1180591620717411303424: must be from 0 to 9007199254740992"),
    ({"seed": -1}, "seed -1"),
    ({"callback_on_step_end": lambda p, i, t, kw: 3}, "callback_on_step_end returned int"),
    ({"scenes": None, "labels": torch.ones(2, 5)}, "labels [2, 5]: give multi-hot labels [N, 24]"),
    ({"scenes": None, "labels": torch.full((1, 24), float("nan"))}, "every entry 0 or 1"),
    ({"latents": torch.full((1, 3, 64, 64), float("nan"))}, "latents hold NaN"),
    ({"latents": torch.zeros(1, 3, 32, 32)}, "latents [1, 3, 32, 32]: this model draws from noise [1, 3, 64, 64]"),
    ({"scenes": None, "labels": torch.full((1, 24), 2)}, "every entry 0 or 1"),
    ({"scenes": None, "labels": -torch.ones(1, 24, dtype=torch.int64)}, "every entry 0 or 1"),
    ({"seed": None, "generator": [object()]}, "generator object: give a torch.Generator"),
    ({"seed": None, "generator": "0"}, "generator str: give a torch.Generator"),
    ({"callback_on_step_end": lambda p, i, t, kw: {**kw, "latents": kw["latents"][..., :8]}},
     "callback_on_step_end returned latents [1, 3, 64, 8] at step 0: they must keep the shape they were given, [1, 3, 64, 64]"),
    ({"callback_on_step_end": lambda p, i, t, kw: {**kw, "latents": kw["latents"] * float("nan")}},
     "callback_on_step_end returned latents holding NaN or infinite values at step 0"),
])
def test_the_pipeline_refuses_bad_arguments_with_clevrgens_error(pipe, kwargs, message):
    from clevrgen.errors import UsageError

    args = {"scenes": ["red sphere"], "seed": 0, "output_type": "pt", **kwargs}
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pipe(**args)


def test_a_call_too_large_for_memory_is_refused_before_any_work(pipe, monkeypatch):
    """The images of a call are returned together: a call that cannot hold them is one line, before
    any noise is drawn or any step taken (the CLI's `sample -n` streams to disk instead)."""
    import clevrgen.runtime
    from clevrgen.errors import UsageError

    monkeypatch.setattr(clevrgen.runtime, "available_memory", lambda: 2**30)
    monkeypatch.setattr(pipe, "_denoise", lambda *args: pytest.fail("sampled before the memory check"))
    with pytest.raises(UsageError, match=r"10000 images need about 1\.4 GiB at once, and this machine has 1\.0 GiB "
                                         r"free: draw them in parts"):
        pipe(labels=torch.zeros(10_000, 24), seed=0, output_type="pil")
