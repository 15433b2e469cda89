"""Pretrain the small base model of the procedural world (``lorapipe.demo.world``).

The demo needs a base model that actually draws: a LoRA can only be seen to learn a style, and
a negative prompt to remove a defect, if the model without them makes recognisable images. This
script trains one from scratch on CPU, in diffusers' SD 1.x format (``world``
preset: 64 px images, 8x8x4 latents), so it loads through the normal base-model path:

1. render the world's scenes (objects, backgrounds and defects; never the LoRA's style), a
   ``watermark_rate`` share of them watermarked as stock photos are. Like web captions, a
   caption names each of its image's defects only at times (``defect_caption_rate``), so
   "a red circle" alone still draws blurry or watermarked images at times, and a negative
   prompt naming the defects has work to do;
2. train the VAE to reconstruct them under random colour casts and lighting (MSE + L1,
   weighted towards the objects, + a small KL term): a general-purpose autoencoder, as SD's
   is, that can draw colour grades the UNet never saw; then set its latent
   ``scaling_factor`` to 1 / std of the latents, as SD does;
3. train the UNet and the text encoder together on the frozen VAE's latents (epsilon
   prediction, 10% empty captions so classifier-free guidance works).

    python -m lorapipe.demo.world_model --out models/world-sd [--scenes 3000] [--seed 0]

The same arguments give the same weights (one thread order aside).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorapipe.demo import world
from lorapipe.demo.tiny_model import build_sd

log = logging.getLogger(__name__)

RESOLUTION = 64


@dataclass(frozen=True)
class PretrainConfig:
    """Sizes and steps of the world model's pretraining (defaults: about 30 min on 2 cores:
    the VAE 0.57 s a step, the UNet with the text encoder 0.18 s a step)."""

    scenes: int = 3000
    defect_rate: float = 0.4
    # like stock photos on the web: this share of scenes also carries a watermark
    watermark_rate: float = 0.3
    defect_caption_rate: float = 0.5
    vae_steps: int = 2000
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4000
    unet_lr: float = 4e-4
    batch_size: int = 32
    caption_dropout: float = 0.1
    seed: int = 0


def render_scenes(config: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """The training images in [-1, 1] (N, 3, 64, 64) and their captions, each defect named
    in a ``defect_caption_rate`` share of the captions of the images it spoils."""
    scenes = world.sample_scenes(config.scenes, seed=config.seed, defect_rate=config.defect_rate)
    stock = np.random.default_rng([config.seed, 1]).random(len(scenes)) < config.watermark_rate
    scenes = [
        dataclasses.replace(scene, defects=(*scene.defects, "watermark"))
        if marked and "watermark" not in scene.defects
        else scene
        for scene, marked in zip(scenes, stock, strict=True)
    ]
    pixels = np.stack(
        [
            np.asarray(world.render(scene, size=RESOLUTION, seed=config.seed + index))
            for index, scene in enumerate(scenes)
        ]
    )
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    naming = np.random.default_rng(config.seed)
    captions = [
        world.caption(dataclasses.replace(scene, defects=_named(scene.defects, naming, config)))
        for scene in scenes
    ]
    return images, captions


def _named(
    defects: tuple[str, ...], rng: np.random.Generator, config: PretrainConfig
) -> tuple[str, ...]:
    """The defects a caption names, each on its own chance: were they named all or none
    together, a negative "blurry" would also mean "no watermark" and push towards one."""
    return tuple(defect for defect in defects if rng.random() < config.defect_caption_rate)


def random_colour_and_light(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``batch`` (in [-1, 1]) under a random per-image colour cast (channel gains and offsets)
    and smooth lighting (a linear and a radial brightness gradient), for a VAE that can draw
    any grade, not only the world's neutral palette."""
    count, _, height, width = batch.shape
    gains = 1.0 + 0.25 * (2 * torch.rand(count, 3, 1, 1, generator=generator) - 1)
    offsets = 0.2 * (2 * torch.rand(count, 3, 1, 1, generator=generator) - 1)
    y = torch.linspace(-1, 1, height).view(1, 1, height, 1)
    x = torch.linspace(-1, 1, width).view(1, 1, 1, width)
    slopes = 0.3 * (2 * torch.rand(count, 2, 1, 1, generator=generator) - 1)
    radial = 0.6 * torch.rand(count, 1, 1, 1, generator=generator)
    light = 1.0 + slopes[:, :1] * y + slopes[:, 1:] * x - radial * (x**2 + y**2) / 2
    pixels = (batch + 1) / 2 * gains * light + offsets
    return (pixels * 2 - 1).clamp(-1, 1)


def cosine_with_warmup(steps: int, warmup: int = 100) -> Callable[[int], float]:
    """The learning-rate factor at each step: a linear warm-up, then a cosine decay to zero,
    so each stage ends on small steps instead of a noise floor set by the peak rate."""
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def detail_weights(batch: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    """Per-pixel loss weights: ``weight`` where a pixel stands out from its 15 px
    neighbourhood (objects, edges, the watermark), 1 on the plain background. Objects
    cover a few percent of a scene, so an unweighted loss is met by drawing the background
    alone, and the VAE learns shapes and colours several times slower."""
    neighbourhood = F.avg_pool2d(F.pad(batch, (7, 7, 7, 7), mode="replicate"), 15, stride=1)
    stands_out = (batch - neighbourhood).abs().sum(dim=1, keepdim=True) > 0.2
    return 1.0 + (weight - 1.0) * stands_out.float()


def train_vae(vae: torch.nn.Module, images: torch.Tensor, config: PretrainConfig) -> None:
    """Reconstruction (MSE + L1, weighted towards objects by ``detail_weights``) of the
    scenes, half of each batch under a random colour cast and lighting, with a KL term small
    enough to keep detail, large enough to keep the latents smooth for diffusion."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config.vae_steps))
    vae.train()
    for step in range(config.vae_steps):
        batch = images[torch.randint(len(images), (config.batch_size,), generator=generator)]
        half = config.batch_size // 2
        batch = torch.cat([batch[:half], random_colour_and_light(batch[half:], generator)])
        posterior = vae.encode(batch).latent_dist
        error = vae.decode(posterior.sample(generator=generator)).sample - batch
        loss = (detail_weights(batch) * (error**2 + error.abs())).mean()
        loss = loss + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
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
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config.unet_steps))
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
