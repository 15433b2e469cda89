"""The SDXL training baseline: the per-step loop of diffusers'
``examples/text_to_image/train_text_to_image_lora_sdxl.py``, written again here (independent of
lorapipe) so that ``train_throughput.py --model bench-sdxl`` measures lorapipe against what
users run today on SDXL.

What it keeps from the script, step for step:

- data: a folder of images with a lora-scripts ``metadata.csv``, as ``baseline_diffusers_lora``
  reads it; every time a sample is drawn its file is opened and decoded again, its size is
  recorded as the original size (height, width), and it goes through the script's transforms
  (``Resize(resolution)`` on the shorter side with the script's default
  ``--image_interpolation_mode lanczos``, ``CenterCrop(resolution)`` (``--center_crop``) with
  the crop's top-left recorded as (top, left) in the resized image, no flip (``--random_flip``
  off), ``ToTensor``, ``Normalize([0.5], [0.5])``), written with PIL and numpy; the caption is
  tokenized by both tokenizers (padding to ``model_max_length``) on every draw;
  ``DataLoader(shuffle=True, num_workers=0)``.
- models: the frozen UNet and both text encoders in ``weight_dtype``, the VAE in float32 (the
  script's guard against SDXL's VAE overflowing in fp16, when no other VAE is given); the UNet
  gets a peft LoRA adapter (``init_lora_weights="gaussian"``, ``to_k``, ``to_q``, ``to_v``,
  ``to_out.0``), cast back to fp32 under fp16 (``cast_training_params``).
- each step: ``vae.encode(pixels).latent_dist.sample() * scaling_factor`` in float32, then cast
  to ``weight_dtype``; ``randn_like`` noise, uniform timesteps, ``noise_scheduler.add_noise``;
  the add time ids (original size + crop top-left + target size) built on the host for each
  sample; both text encoders with ``output_hidden_states``, their penultimate hidden states
  concatenated and the second's projected pooled output as ``text_embeds``; the UNet with
  ``added_cond_kwargs``; MSE against the noise (epsilon) or the velocity,
  ``accelerator.backward``, gradient clipping at ``max_grad_norm`` (the script's parameter
  list is a list, so it does clip), AdamW, the constant learning-rate schedule, the gathered
  loss's ``item()`` for the log every step.

Left out: validation images, checkpoints, trackers, text-encoder LoRA (``--train_text_encoder``
is off by default), SNR weighting, noise offset and ``--debug_loss`` (all off by default in the
script, or outside the per-step loop).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from baseline_diffusers_lora import TARGET_MODULES, ImageCaptionFolder


def script_transforms_sdxl(
    image: Any, resolution: int
) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """The SDXL script's resize (Lanczos, shorter side), centre crop, ``ToTensor`` and
    ``Normalize`` on a PIL image: (a (3, resolution, resolution) tensor in [-1, 1], original
    (height, width), crop (top, left) in the resized image)."""
    import torch
    from PIL import Image

    image = image.convert("RGB")
    original_size = (image.height, image.width)
    width, height = image.size
    # torchvision's Resize(int): the shorter side becomes ``resolution``, the longer is truncated
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    image = image.resize(size, Image.Resampling.LANCZOS)
    top = max(0, int(round((image.height - resolution) / 2.0)))
    left = max(0, int(round((image.width - resolution) / 2.0)))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = (np.asarray(image, dtype=np.float32) / 255.0 - 0.5) / 0.5
    pixel_values = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixel_values, original_size, (top, left)


class ImageCaptionFolderSDXL(ImageCaptionFolder):
    """The same folder, drawn as the SDXL script's ``preprocess_train`` draws it: pixels, their
    original size and crop, and the caption's ids for both tokenizers, on every draw."""

    def __init__(self, folder: str | Path, tokenizers: tuple[Any, Any], resolution: int) -> None:
        super().__init__(folder, tokenizers[0], resolution)
        self.tokenizers = tokenizers

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        name, caption = self.rows[index]
        with Image.open(self.folder / name) as image:
            pixel_values, original_size, crop_top_left = script_transforms_sdxl(
                image, self.resolution
            )
        input_ids = [
            tokenizer(
                caption,
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
            for tokenizer in self.tokenizers
        ]
        return {
            "pixel_values": pixel_values,
            "input_ids_one": input_ids[0],
            "input_ids_two": input_ids[1],
            "original_sizes": original_size,
            "crop_top_lefts": crop_top_left,
        }


def collate_sdxl(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacked pixels and ids; sizes and crops stay lists of tuples, as in the script."""
    import torch

    pixel_values = torch.stack([e["pixel_values"] for e in examples])
    return {
        "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
        "input_ids_one": torch.stack([e["input_ids_one"] for e in examples]),
        "input_ids_two": torch.stack([e["input_ids_two"] for e in examples]),
        "original_sizes": [e["original_sizes"] for e in examples],
        "crop_top_lefts": [e["crop_top_lefts"] for e in examples],
    }


def encode_captions(text_encoders: tuple[Any, Any], input_ids: tuple[Any, Any]) -> tuple[Any, Any]:
    """(both encoders' penultimate hidden states concatenated on the feature axis, the second
    encoder's projected pooled output)."""
    import torch

    hidden_states = []
    for text_encoder, ids in zip(text_encoders, input_ids, strict=True):
        output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), output.text_embeds


def train_diffusers_lora_sdxl(
    model_dir: str | Path,
    train_data_dir: str | Path,
    *,
    resolution: int,
    batch_size: int,
    max_train_steps: int,
    rank: int,
    lora_alpha: float,
    learning_rate: float = 1e-4,
    weight_decay: float = 1e-2,
    max_grad_norm: float = 1.0,
    mixed_precision: str = "no",
    seed: int = 0,
) -> dict[str, Any]:
    """Train as the SDXL script does and return ``samples_per_second`` (over the training loop:
    data loading, encoding, UNet, optimizer) and the per-step ``losses``."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=mixed_precision)
    set_seed(seed)
    model_dir = Path(model_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    tokenizers = (
        CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"),
        CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2"),
    )
    text_encoders = (
        CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2"),
    )
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    for model in (unet, *text_encoders):
        model.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=lora_alpha,
            init_lora_weights="gaussian",
            target_modules=TARGET_MODULES,
        )
    )
    if mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_layers, lr=learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8
    )
    dataset = ImageCaptionFolderSDXL(train_data_dir, tokenizers, resolution)
    dataloader = torch.utils.data.DataLoader(
        dataset, shuffle=True, collate_fn=collate_sdxl, batch_size=batch_size, num_workers=0
    )
    lr_scheduler = get_scheduler(
        "constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=max_train_steps
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, dataloader, lr_scheduler
    )
    epochs = math.ceil(max_train_steps / len(dataloader))

    losses: list[float] = []
    samples = 0
    started = time.perf_counter()
    for _epoch in range(epochs):
        unet.train()
        for batch in dataloader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample()
                latents = (latents * vae.config.scaling_factor).to(weight_dtype)
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0,
                    noise_scheduler.config.num_train_timesteps,
                    (latents.shape[0],),
                    device=latents.device,
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                time_ids = torch.tensor(
                    [
                        [*original, *crop, resolution, resolution]
                        for original, crop in zip(
                            batch["original_sizes"], batch["crop_top_lefts"], strict=True
                        )
                    ]
                ).to(accelerator.device, dtype=weight_dtype)
                prompt_embeds, pooled_embeds = encode_captions(
                    text_encoders, (batch["input_ids_one"], batch["input_ids_two"])
                )
                model_pred = unet(
                    noisy_latents,
                    timesteps,
                    prompt_embeds,
                    added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled_embeds},
                    return_dict=False,
                )[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                losses.append(accelerator.gather(loss.detach().repeat(batch_size)).mean().item())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            samples += latents.shape[0]
            if len(losses) >= max_train_steps:
                break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    accelerator.end_training()
    return {"samples_per_second": samples / seconds, "losses": losses, "seconds": seconds}
