"""Micro-batches as the UNet sees them: from samples to noisy latents, timesteps, caption
embeddings, the prediction target and the per-sample loss weights.

For each sample: its draws (``data.draw``) pick mirroring, crop, caption variant, timestep and
noise; its latents come from the cache or the VAE; the latents are noised to the timestep; the
caption is varied (mirror swap, shuffle, dropout) and encoded; for SDXL the pooled caption
embedding and each image's size and crop (``buckets.size_conditioning``) join them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorapipe.train_config import TrainConfig
from lorapipe.training.buckets import size_conditioning
from lorapipe.training.data import Example, Sample, draw, training_caption
from lorapipe.training.encoders import TextConditioning, sample_latents
from lorapipe.training.objective import min_snr_weights, prediction_target

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler


@dataclass(frozen=True)
class Batch:
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    hidden_states: torch.Tensor
    # SDXL: {"text_embeds": pooled caption embeddings, "time_ids": size and crop conditioning}
    added_conditioning: dict[str, torch.Tensor] | None
    target: torch.Tensor  # what the UNet should predict: noise or velocity
    loss_weights: torch.Tensor  # per sample: min-SNR weights or ones; 0 for a stand-in


@dataclass
class TrainingBatches:
    """Turns the samples of a micro-batch into a ``Batch`` on the accelerator's device."""

    config: TrainConfig
    examples: Sequence[Example]
    latent_parameters: Callable[
        [list[tuple[Example, bool, tuple[float, float] | None]]], torch.Tensor
    ]
    encode_captions: Callable[[Sequence[str]], TextConditioning]
    noise_scheduler: DDPMScheduler
    added_conditioning: bool  # the family conditions the UNet on pooled text and image size
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel
    latent_scale: float
    accelerator: Accelerator

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        config, device = self.config, self.accelerator.device
        examples = [self.examples[sample.example_index] for sample in samples]
        width, height = examples[0].bucket  # a micro-batch is one bucket
        latent_shape = (
            self.latent_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        draws = [draw(config, s, e, latent_shape) for s, e in zip(samples, examples, strict=True)]
        crops = [d.crop_position if config.crop == "random" else None for d in draws]
        parameters = self.latent_parameters(
            [(e, d.flip, crop) for e, d, crop in zip(examples, draws, crops, strict=True)]
        )
        latent_noise = torch.stack([d.latent_noise for d in draws]).to(device)
        latents = sample_latents(parameters.to(device), latent_noise, self.latent_scale)
        noise = torch.stack([d.noise for d in draws]).to(device)
        timesteps = torch.tensor([d.timestep for d in draws], device=device)
        captions = [
            training_caption(
                e.caption,
                flip=d.flip,
                shuffle=config.shuffle_caption,
                keep_tokens=config.keep_tokens,
                dropout_rate=config.caption_dropout_rate,
                seed=d.caption_seed,
            )
            for e, d in zip(examples, draws, strict=True)
        ]
        with self.accelerator.autocast():
            conditioning = self.encode_captions(captions)
        added = None
        if self.added_conditioning:
            time_ids = [
                size_conditioning(e.size, e.bucket, crop, flip=d.flip)
                for e, d, crop in zip(examples, draws, crops, strict=True)
            ]
            added = {
                "text_embeds": conditioning.pooled,
                "time_ids": torch.tensor(time_ids, dtype=torch.float32, device=device),
            }
        if config.snr_gamma:
            weights = min_snr_weights(self.noise_scheduler, timesteps, config.snr_gamma)
        else:
            weights = torch.ones(len(samples), device=device)
        counts = torch.tensor([float(s.counts) for s in samples], device=device)
        return Batch(
            noisy_latents=self.noise_scheduler.add_noise(latents, noise, timesteps),
            timesteps=timesteps,
            hidden_states=conditioning.hidden_states,
            added_conditioning=added,
            target=prediction_target(self.noise_scheduler, latents, noise, timesteps),
            loss_weights=weights * counts,
        )
