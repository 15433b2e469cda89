"""A1111 sampler names and the diffusers schedulers that run them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# A1111 sampler name -> (diffusers scheduler class, options over the model's scheduler config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2M": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
    ),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False},
    ),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    # latents are not in [-1, 1]: diffusers' DDIM clips to it unless the config says not to,
    # and a model that ships a DPM-Solver config (no clip_sample key) would get noise
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(sampler: str, scheduler_config: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler for an A1111 sampler name, over the model's config."""
    import diffusers

    class_name, options = SAMPLERS[sampler]
    return getattr(diffusers, class_name).from_config(scheduler_config, **options)
