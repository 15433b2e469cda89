"""The diffusion training objective, shared by the training loss and the validation loss.

The UNet sees latents noised to timestep t and predicts what the scheduler's
``prediction_type`` says: the noise itself (``epsilon``, SD 1.x) or the velocity
(``v_prediction``, SD 2.x 768). Min-SNR weighting (Hang et al. 2023, ``snr_gamma``) caps the
weight of low-noise timesteps, whose easy targets otherwise dominate the gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.training_utils import compute_snr

from lorapipe.errors import ModelError

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_target(
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet should predict for ``latents`` noised with ``noise`` at ``timesteps``."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(
        f"the base model's scheduler predicts '{prediction_type}'; lorapipe trains "
        f"{' and '.join(PREDICTION_TYPES)} models"
    )


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def min_snr_weights(
    noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR for epsilon targets, and
    min(SNR, gamma) / (SNR + 1) for velocity targets, whose loss already carries SNR + 1."""
    snr = compute_snr(noise_scheduler, timesteps)
    capped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return capped / (snr + 1)
    return capped / snr
