"""What the UNet trains on: latents of the images and embeddings of the captions, cached.

Latents. The VAE turns an image into a distribution (a mean and a log-variance per latent
pixel), and training samples it. ``LatentCache`` stores those parameters, one safetensors file
per (image content, VAE identity, bucket, crop, mirrored), so each image and its mirror
are VAE-encoded once and reused across epochs and runs; each step then samples them with the
sample's own latent noise. Without the cache (``cache_latents: false``, or random crops, whose
pixels differ every time) ``EncodeEveryStep`` runs the VAE on every batch, as diffusers'
train_text_to_image_lora.py does. Both give the same latents for the same draws.

Text. ``CaptionEncoder`` runs the text encoders on a batch of captions (one for SD 1.x/2.x, two
for SDXL, whose second also gives a pooled embedding); when the encoders are frozen and captions
never change, each distinct caption is encoded once.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lorapipe.training.data import Example, load_pixels

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

LATENT_KEY = "latent_parameters"
ENCODE_BATCH = 8


def vae_identity(vae_dir: Path, dtype: torch.dtype) -> str:
    """A hash of the VAE's config and weight files and the dtype it encodes in."""
    digest = hashlib.sha256(str(dtype).encode())
    for path in sorted(p for p in vae_dir.rglob("*") if p.is_file()):
        digest.update(path.name.encode())
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def sample_latents(
    parameters: torch.Tensor, latent_noise: torch.Tensor, scale: float
) -> torch.Tensor:
    """Latents drawn from the VAE's distribution (mean, log-variance) with the given noise,
    times the VAE's scaling factor."""
    mean, log_variance = parameters.float().chunk(2, dim=1)
    std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
    return (mean + std * latent_noise) * scale


def latent_mean(parameters: torch.Tensor, scale: float) -> torch.Tensor:
    """The distribution's mean, times the scaling factor: what validation measures on."""
    return parameters.float().chunk(2, dim=1)[0] * scale


def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution parameters for a batch of pixel tensors."""
    with torch.no_grad():
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        return vae.encode(pixels).latent_dist.parameters.float()


class LatentCache:
    """Latent distribution parameters on disk, one file per (image, VAE, bucket, mirrored).

    Only centre crops are cached: a random crop is different every time it is drawn. Each
    chunk the VAE encodes holds images of one bucket (one tensor shape).
    """

    def __init__(self, directory: Path, vae: AutoencoderKL, vae_id: str) -> None:
        self.directory = directory
        self.vae = vae
        self.vae_id = vae_id

    def path(self, example: Example, flip: bool) -> Path:
        width, height = example.bucket
        key = f"{example.sha256}|{self.vae_id}|{width}x{height}|center|flip={flip}"
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.directory / name[:2] / f"{name}.safetensors"

    def fill(self, wanted: Sequence[tuple[Example, bool]], rank: int, num_processes: int) -> int:
        """Encode the wanted (example, flip) pairs not yet on disk, this process's share of
        them (every ``num_processes``-th, from ``rank``); returns how many it encoded."""
        missing = [item for item in wanted[rank::num_processes] if not self.path(*item).exists()]
        if not missing:
            return 0
        missing.sort(key=lambda item: item[0].bucket)
        chunks = [
            same_bucket[start : start + ENCODE_BATCH]
            for _, group in itertools.groupby(missing, key=lambda item: item[0].bucket)
            for same_bucket in [list(group)]
            for start in range(0, len(same_bucket), ENCODE_BATCH)
        ]
        progress = tqdm(total=len(missing), desc="caching latents", unit="image", disable=rank != 0)
        for chunk in chunks:
            pixels = torch.stack(
                [load_pixels(e.image_path, e.bucket, flip=f, crop_position=None) for e, f in chunk]
            )
            for (example, flip), parameters in zip(
                chunk, encode_pixels(self.vae, pixels), strict=True
            ):
                self._write(self.path(example, flip), parameters)
            progress.update(len(chunk))
        progress.close()
        return len(missing)

    def _write(self, path: Path, parameters: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({LATENT_KEY: parameters.contiguous().cpu()}, temporary)
        temporary.replace(path)

    def latent_parameters(
        self, items: Sequence[tuple[Example, bool, tuple[float, float] | None]]
    ) -> torch.Tensor:
        return torch.stack(
            [load_file(self.path(example, flip))[LATENT_KEY] for example, flip, _ in items]
        )


class EncodeEveryStep:
    """The uncached path: load, crop and VAE-encode the images of every batch."""

    def __init__(self, vae: AutoencoderKL) -> None:
        self.vae = vae

    def latent_parameters(
        self, items: Sequence[tuple[Example, bool, tuple[float, float] | None]]
    ) -> torch.Tensor:
        pixels = torch.stack(
            [
                load_pixels(example.image_path, example.bucket, flip=flip, crop_position=crop)
                for example, flip, crop in items
            ]
        )
        return encode_pixels(self.vae, pixels)


@dataclass(frozen=True)
class TextConditioning:
    """What the captions of a batch condition the UNet with."""

    hidden_states: torch.Tensor  # (batch, 77, width): the text encoders' outputs, concatenated
    pooled: torch.Tensor | None  # (batch, width): the last encoder's pooled projection (SDXL)

    def expand(self, count: int) -> TextConditioning:
        """One caption's conditioning repeated ``count`` times (validation's timesteps)."""
        return TextConditioning(
            self.hidden_states.expand(count, -1, -1),
            None if self.pooled is None else self.pooled.expand(count, -1),
        )


class CaptionEncoder:
    """Captions to the text encoders' conditioning, remembered per caption when ``cache`` is on.

    Each encoder reads the caption through its own tokenizer; their hidden states (the last
    layer's, or the penultimate layer's for SDXL) are concatenated along the feature axis, and
    with ``pooled`` the last encoder's projected pooled output is kept as well (SDXL's second
    CLIP), as diffusers' SDXL pipeline and kohya's trainer encode them.
    """

    def __init__(
        self,
        tokenizers: Sequence[CLIPTokenizer],
        text_encoders: Sequence[torch.nn.Module],
        *,
        penultimate: bool,
        pooled: bool,
        cache: bool,
    ) -> None:
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.penultimate = penultimate
        self.pooled = pooled
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = (
            {} if cache else None
        )

    def __call__(self, captions: Sequence[str]) -> TextConditioning:
        if self.cache is None:
            return self._encode(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing)
            for index, caption in enumerate(missing):
                pooled = None if encoded.pooled is None else encoded.pooled[index]
                self.cache[caption] = (encoded.hidden_states[index], pooled)
        hidden_states = torch.stack([self.cache[c][0] for c in captions])
        pooled = None if not self.pooled else torch.stack([self.cache[c][1] for c in captions])
        return TextConditioning(hidden_states, pooled)

    def _encode(self, captions: Sequence[str]) -> TextConditioning:
        hidden_states = []
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            input_ids = tokenizer(
                list(captions),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            device = next(text_encoder.parameters()).device
            output = text_encoder(
                input_ids.to(device), output_hidden_states=self.penultimate, return_dict=True
            )
            hidden_states.append(
                output.hidden_states[-2] if self.penultimate else output.last_hidden_state
            )
        pooled = output.text_embeds if self.pooled else None  # the last encoder's
        return TextConditioning(torch.cat(hidden_states, dim=-1), pooled)
