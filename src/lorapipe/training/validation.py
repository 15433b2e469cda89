"""Deterministic validation loss: the same checkpoint always gets the same number.

Held-out images (never trained on) are measured at fixed timesteps (``validation_timesteps``):
the VAE's mean latent of the centre crop, noised with noise seeded by the image's id, captioned
with its plain caption. Nothing random is left: the models are in eval mode, and there is no
caption shuffle or dropout and no mirroring. The processes split the images and every image is
evaluated alone (one batch of its timesteps), so the result does not depend on how many
processes computed it. The loss is reported per timestep and as the mean over timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate.utils import gather_object

from lorapipe.training.buckets import size_conditioning
from lorapipe.training.data import Example, validation_noise
from lorapipe.training.encoders import TextConditioning, latent_mean
from lorapipe.training.objective import per_sample_mse, prediction_target

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode (no dropout) for the block, then back as they were."""
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)


@dataclass(frozen=True)
class ValidationLoss:
    mean: float
    by_timestep: dict[str, float]  # {"100": loss, ...}


@dataclass
class Validator:
    """Everything validation needs besides the UNet being trained."""

    examples: Sequence[Example]
    timesteps: Sequence[int]
    latent_parameters: Callable[[list[tuple[Example, bool, None]]], torch.Tensor]
    encode_captions: Callable[[Sequence[str]], TextConditioning]
    noise_scheduler: DDPMScheduler
    latent_scale: float
    added_conditioning: bool  # SDXL: pooled text and the centre crop's size conditioning

    def __call__(self, unet: torch.nn.Module, accelerator: Accelerator) -> ValidationLoss | None:
        """The validation loss of ``unet``, computed by all processes together (call it in
        ``eval_mode``)."""
        if not self.examples:
            return None
        rows = []
        with torch.no_grad(), accelerator.autocast():
            for index in range(
                accelerator.process_index, len(self.examples), accelerator.num_processes
            ):
                rows.append((index, self._losses(unet, self.examples[index])))
        all_rows = sorted(gather_object(rows))
        by_timestep = {
            str(t): math.fsum(losses[i] for _, losses in all_rows) / len(all_rows)
            for i, t in enumerate(self.timesteps)
        }
        return ValidationLoss(math.fsum(by_timestep.values()) / len(by_timestep), by_timestep)

    def _losses(self, unet: torch.nn.Module, example: Example) -> list[float]:
        """The loss of one image at each validation timestep."""
        count = len(self.timesteps)
        parameters = self.latent_parameters([(example, False, None)])
        latents = (
            latent_mean(parameters, self.latent_scale).to(unet.device).expand(count, -1, -1, -1)
        )
        noise = (
            validation_noise(example, tuple(latents.shape[1:]))
            .to(unet.device)
            .expand(count, -1, -1, -1)
        )
        timesteps = torch.tensor(list(self.timesteps), device=unet.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        conditioning = self.encode_captions([example.caption]).expand(count)
        added = None
        if self.added_conditioning:
            time_ids = size_conditioning(example.size, example.bucket, None, flip=False)
            added = {
                "text_embeds": conditioning.pooled,
                "time_ids": torch.tensor(
                    [time_ids] * count, dtype=torch.float32, device=unet.device
                ),
            }
        prediction = unet(
            noisy, timesteps, conditioning.hidden_states, added_cond_kwargs=added
        ).sample
        target = prediction_target(self.noise_scheduler, latents, noise, timesteps)
        return per_sample_mse(prediction, target).tolist()
