"""The diffusion objective: what the UNet predicts (noise or velocity) and min-SNR weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lorapipe.errors import ModelError
from lorapipe.training.objective import min_snr_weights, per_sample_mse, prediction_target

SD15_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **SD15_SCHEDULE)


def test_epsilon_models_predict_the_noise() -> None:
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    target = prediction_target(scheduler("epsilon"), latents, noise, torch.tensor([10, 900]))
    assert torch.equal(target, noise)


def test_v_prediction_models_predict_the_velocity() -> None:
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    v_scheduler = scheduler("v_prediction")
    timesteps = torch.tensor([10, 900])
    alpha_bar = v_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(prediction_target(v_scheduler, latents, noise, timesteps), expected)


def test_an_unsupported_prediction_type_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="predicts 'sample'"):
        prediction_target(scheduler("sample"), torch.zeros(1), torch.zeros(1), torch.tensor([1]))


def test_min_snr_caps_the_weight_of_low_noise_timesteps() -> None:
    timesteps = torch.tensor([1, 200, 999])
    epsilon = min_snr_weights(scheduler("epsilon"), timesteps, gamma=5.0)
    velocity = min_snr_weights(scheduler("v_prediction"), timesteps, gamma=5.0)
    assert epsilon[0] < 0.01 and epsilon[2] == 1.0  # SNR ~ 1000 at t=1; below 5 at t=999
    assert torch.all(velocity < 1.0) and torch.all(velocity > 0)


def test_the_loss_is_a_mean_per_sample() -> None:
    prediction = torch.zeros(2, 3)
    target = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    assert per_sample_mse(prediction, target).tolist() == [1.0, 3.0]
