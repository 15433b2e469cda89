"""A1111 sampler names as diffusers schedulers."""

from __future__ import annotations

import pytest

from lorapipe.generation.samplers import make_scheduler


@pytest.mark.parametrize(
    ("sampler", "scheduler", "karras"),
    [
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", True),
        ("DPM++ 2M", "DPMSolverMultistepScheduler", False),
        ("Euler a", "EulerAncestralDiscreteScheduler", None),
        ("Euler", "EulerDiscreteScheduler", False),
        ("DDIM", "DDIMScheduler", None),
        ("UniPC", "UniPCMultistepScheduler", None),
    ],
)
def test_a1111_sampler_names_map_to_diffusers_schedulers(
    pipe, sampler: str, scheduler: str, karras: bool | None
) -> None:
    made = make_scheduler(sampler, pipe.scheduler.config)
    assert type(made).__name__ == scheduler
    assert made.config.num_train_timesteps == 1000  # the model's own schedule is kept
    if karras is not None:
        assert made.config.use_karras_sigmas is karras


def test_ddim_never_clips_the_latents_even_when_the_model_ships_a_dpm_solver_config() -> None:
    """diffusers' DDIM clips to [-1, 1] unless told not to; a config without the key (any
    DPM-Solver one) would turn every DDIM image into noise."""
    from diffusers import DPMSolverMultistepScheduler

    dpm_config = DPMSolverMultistepScheduler(beta_schedule="scaled_linear").config
    assert "clip_sample" not in dpm_config
    assert make_scheduler("DDIM", dpm_config).config.clip_sample is False
