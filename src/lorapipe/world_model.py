"""Pretrain the small base model of the procedural world (``lorapipe.world``).

The demo needs a base model that actually draws: a LoRA can only be seen to learn a style, and
a negative prompt to remove a defect, if the model without them makes recognisable images. This
script trains one from scratch on CPU, in diffusers' SD 1.x format (``world``
preset: 64 px images, 8x8x4 latents), so it loads through the normal base-model path:

1. render the world's scenes (objects, backgrounds and defects; never the LoRA's style);
2. train the VAE to reconstruct them (MSE + a small KL term), then set its latent
   ``scaling_factor`` to 1 / std of the latents, as SD does;
3. train the UNet and the text encoder together on the frozen VAE's latents (epsilon
   prediction, 10% empty captions so classifier-free guidance works).

    python -m lorapipe.world_model --out models/world-sd [--scenes 3000] [--seed 0]

The same arguments give the same weights (one thread order aside).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorapipe import world
from lorapipe.models import build_sd

log = logging.getLogger(__name__)

RESOLUTION = 64


@dataclass(frozen=True)
class PretrainConfig:
    """Sizes and steps of the world model's pretraining (defaults: about 20 min on 2 idle
    cores: the VAE 0.4 s a step, the UNet with the text encoder 0.14 s a step)."""

    scenes: int = 3000
    defect_rate: float = 0.3
    vae_steps: int = 1200
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 5000
    unet_lr: float = 4e-4
    batch_size: int = 32
    caption_dropout: float = 0.1
    seed: int = 0


def render_scenes(config: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """The training images in [-1, 1] (N, 3, 64, 64) and their captions."""
    scenes = world.sample_scenes(config.scenes, seed=config.seed, defect_rate=config.defect_rate)
    pixels = np.stack(
        [
            np.asarray(world.render(scene, size=RESOLUTION, seed=config.seed + index))
            for index, scene in enumerate(scenes)
        ]
    )
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, [world.caption(scene) for scene in scenes]


def train_vae(vae: torch.nn.Module, images: torch.Tensor, config: PretrainConfig) -> None:
    """Reconstruction with a KL term small enough to keep detail, large enough to keep the
    latents smooth for diffusion."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(config.vae_steps):
        batch = images[torch.randint(len(images), (config.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == config.vae_steps - 1:
            log.info("vae step %d/%d: loss %.4f", step + 1, config.vae_steps, loss.item())
    vae.eval()


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Latent means of every image, scaled to unit variance (and the VAE told the scale)."""
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return latents * scaling_factor


def train_denoiser(
    pipeline: object, latents: torch.Tensor, captions: list[str], config: PretrainConfig
) -> None:
    """The UNet and the text encoder, together, on epsilon prediction."""
    unet, text_encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    scheduler = pipeline.scheduler
    alphas_cumprod = scheduler.alphas_cumprod
    token_ids = tokenizer(
        captions + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_caption = token_ids[-1]
    generator = torch.Generator().manual_seed(config.seed + 1)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=1e-2)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.unet_steps))
        ),
    )
    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    for step in range(config.unet_steps):
        index = torch.randint(len(latents), (config.batch_size,), generator=generator)
        ids = token_ids[index].clone()
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        ids[dropped] = empty_caption
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(
            scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator
        )
        alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == config.unet_steps - 1:
            log.info(
                "unet step %d/%d: loss %.4f (%.0f s)",
                step + 1,
                config.unet_steps,
                loss.item(),
                time.perf_counter() - started,
            )
    unet.eval()
    text_encoder.eval()


def pretrain(out: str | Path, config: PretrainConfig | None = None) -> Path:
    """Train the world model and save it as a diffusers directory at ``out``."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    config = config or PretrainConfig()
    torch.manual_seed(config.seed)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="lorapipe-world-") as tmp:
        initial = build_sd(Path(tmp) / "initial", seed=config.seed, preset="world")
        pipeline = StableDiffusionPipeline.from_pretrained(initial, safety_checker=None)
        images, captions = render_scenes(config)
        log.info("rendered %d scenes at %d px", len(images), RESOLUTION)
        train_vae(pipeline.vae, images, config)
        latents = encode_latents(pipeline.vae, images)
        train_denoiser(pipeline, latents, captions, config)
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
            pipeline.scheduler.config, use_karras_sigmas=True
        )
        staged = Path(tmp) / "trained"
        pipeline.save_pretrained(staged, safe_serialization=True)
        for vocabulary_file in ("vocab.json", "merges.txt"):
            shutil.copy(initial / "tokenizer" / vocabulary_file, staged / "tokenizer")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/world-sd")
    defaults = PretrainConfig()
    for name in ("scenes", "vae_steps", "unet_steps", "batch_size", "seed"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = PretrainConfig(
        scenes=args.scenes,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    print(pretrain(args.out, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
