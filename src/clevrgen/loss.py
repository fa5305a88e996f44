"""The training objective: which noise levels a batch sees, how each is weighted, and which noise
goes with which image. Three small pieces and the loss that combines them.

Every option draws from the generator exactly as the plain objective does (one ``randint`` for the
timesteps, one ``randn`` for the noise), so two runs that differ only here see the same batches
and the same noise: paired trials compare the objective, not the luck of the draw.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clevrgen.config import DiffusionConfig
from clevrgen.runtime import autocast


def sigmas_of(noise_scheduler, device: torch.device | str = "cpu") -> torch.Tensor:
    """EDM's noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of every training timestep."""
    alphas = noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    return ((1 - alphas) / alphas).sqrt()


def draw_timesteps(noise_scheduler, batch: int, gen: torch.Generator, cfg: DiffusionConfig,
                   device: torch.device) -> torch.Tensor:
    """Training timesteps [B]: uniform, or (``timesteps = "lognormal"``) those whose sigma is
    log-normal, ln sigma ~ N(lognormal_mean, lognormal_std^2), as in EDM.

    The log-normal draw maps the same uniform integer the plain draw makes through the normal's
    inverse CDF to the nearest timestep, so it consumes the generator identically."""
    n = noise_scheduler.config.num_train_timesteps
    t = torch.randint(n, (batch,), generator=gen, device=device)
    if cfg.timesteps == "uniform":
        return t
    u = (t.double() + 0.5) / n
    log_sigma = cfg.lognormal_mean + cfg.lognormal_std * math.sqrt(2) * torch.erfinv(2 * u - 1)
    log_sigmas = sigmas_of(noise_scheduler, device).log()
    return (log_sigmas[None, :] - log_sigma[:, None]).abs().argmin(dim=1)


def loss_weights(noise_scheduler, t: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor | None:
    """Per-sample weights of the squared error of the model's target (None: plain MSE).

    ``min_snr_gamma`` (Hang et al. 2023) caps low-noise steps at SNR = gamma; ``edm_sigma_data``
    gives EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on the x0 error."""
    if cfg.weighting == "min_snr" and cfg.min_snr_gamma:
        return min_snr_weights(noise_scheduler, t, cfg.min_snr_gamma)
    if cfg.weighting == "edm":
        sigma2 = sigmas_of(noise_scheduler, t.device)[t].square()
        sd2 = cfg.edm_sigma_data**2
        # A v error is the x0 error times sqrt(1 + sigma^2) / sigma; an epsilon error times 1 / sigma.
        per_x0 = (sigma2 + sd2) / (sigma2 * sd2)
        target_to_x0 = sigma2 / (sigma2 + 1) if noise_scheduler.config.prediction_type == "v_prediction" else sigma2
        return (per_x0 * target_to_x0).float()
    return None


def min_snr_weights(noise_scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma: min(SNR, gamma) / SNR for an epsilon target and
    min(SNR, gamma) / (SNR + 1) for a v target (both equal min(SNR, gamma) on the x0 error)."""
    alphas = noise_scheduler.alphas_cumprod.to(t.device)[t]
    snr = alphas / (1 - alphas)
    if noise_scheduler.config.prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, finite at SNR = 0
    return snr.clamp(max=gamma) / (snr + 1)


def assign_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Immiscible diffusion (Li et al. 2024): reorder the batch's noise samples so that the
    total squared distance between each image and its noise is least (a linear assignment)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()).square()
    _, order = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(order, device=noise.device)]


def diffusion_loss(model, noise_scheduler, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                   amp_dtype: torch.dtype | None, cfg: DiffusionConfig | None = None) -> torch.Tensor:
    """The weighted error of the model's prediction (epsilon or v) on one noised batch."""
    cfg = cfg or DiffusionConfig(prediction_type=noise_scheduler.config.prediction_type)
    b, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=gen, device=device)
    t = draw_timesteps(noise_scheduler, b, gen, cfg, device)
    if cfg.immiscible:
        noise = assign_noise(x0, noise)
    x_t = noise_scheduler.add_noise(x0, noise, t)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
    with autocast(device, amp_dtype):
        pred = model(x_t, t, labels)
    weights = loss_weights(noise_scheduler, t, cfg)
    if weights is None:
        return F.mse_loss(pred.float(), target)
    per_sample = (pred.float() - target).square().mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
