"""Schedulers from the config: the training noise schedule, and the samplers built from it.

The one sampling loop is ``ClevrgenPipeline.__call__`` (``clevrgen.pipeline``).
"""

from __future__ import annotations

from clevrgen.config import DiffusionConfig

SCHEDULER_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}


def training_scheduler(cfg: DiffusionConfig):
    """The DDPM noise schedule the model is trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else "linear",
        prediction_type=cfg.prediction_type,
        clip_sample=True,
    )


def sampling_scheduler(cfg: DiffusionConfig, sampler: str):
    """A DDPM, DDIM or DPM-Solver++ scheduler built from the training schedule's config."""
    import diffusers

    base = training_scheduler(cfg)
    cls = getattr(diffusers, SCHEDULER_CLASSES[sampler])
    extra = {
        "ddim": {"timestep_spacing": "trailing", "set_alpha_to_one": False},
        "dpm++": {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"},
    }.get(sampler, {})
    return cls.from_config(base.config, **extra)
