"""The training baseline: the per-step loop of diffusers'
``examples/text_to_image/train_text_to_image_lora.py``, written again here (independent of
lorapipe) so that ``train_throughput.py`` measures lorapipe against what users run today.

What it keeps from the script, step for step:

- data: a folder of images with a lora-scripts ``metadata.csv`` (``file_name``/``filename``,
  ``text``); every time a sample is drawn its file is opened and decoded again and put through
  the script's transforms (``Resize(resolution)`` bilinear on the shorter side,
  ``CenterCrop(resolution)`` (``--center_crop``), no flip (``--random_flip`` off),
  ``ToTensor``, ``Normalize([0.5], [0.5])``), written here with PIL and numpy since torchvision
  is not a dependency; the caption is tokenized (padding to ``model_max_length``) on every draw;
  ``DataLoader(shuffle=True, num_workers=0)`` (``--dataloader_num_workers`` defaults to 0).
- models: the frozen VAE, text encoder and UNet in ``weight_dtype``; the UNet gets a peft LoRA
  adapter with ``unet.add_adapter(LoraConfig(r, lora_alpha, init_lora_weights="gaussian",
  target_modules=[to_k, to_q, to_v, to_out.0]))``; under fp16 the LoRA weights are cast back to
  fp32 (``cast_training_params``), as the script does.
- each step: ``vae.encode(pixels).latent_dist.sample() * scaling_factor``, ``randn_like`` noise,
  uniform timesteps, ``noise_scheduler.add_noise``, ``text_encoder(input_ids)[0]``, the UNet,
  MSE against the noise (epsilon prediction) or the velocity, ``accelerator.backward``,
  gradient clipping at ``max_grad_norm``, AdamW, the constant learning-rate schedule,
  ``loss.item()`` for the log every step.

Left out: validation images, checkpoints, trackers, EMA, SNR weighting and noise offset (all
off by default in the script, or outside the per-step loop).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def script_transforms(image: Any, resolution: int) -> Any:
    """``Resize(resolution) + CenterCrop(resolution) + ToTensor() + Normalize([0.5], [0.5])``
    on a PIL image: a (3, resolution, resolution) float tensor in [-1, 1]."""
    import torch
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    # torchvision's Resize(int): the shorter side becomes ``resolution``, the longer is truncated
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left = int(round((image.width - resolution) / 2.0))
    top = int(round((image.height - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 255.0  # ToTensor
    array = (array - 0.5) / 0.5  # Normalize([0.5], [0.5])
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionFolder:
    """The script's ``imagefolder`` dataset with its ``with_transform(preprocess_train)``: each
    item is decoded, transformed and tokenized when it is drawn, every epoch."""

    def __init__(self, folder: str | Path, tokenizer: Any, resolution: int) -> None:
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.resolution = resolution
        with (self.folder / "metadata.csv").open(newline="") as file:
            rows = list(csv.DictReader(file))
        name_column = "file_name" if "file_name" in rows[0] else "filename"
        self.rows = [(row[name_column], row["text"]) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        name, caption = self.rows[index]
        with Image.open(self.folder / name) as image:
            pixel_values = script_transforms(image, self.resolution)
        input_ids = self.tokenizer(
            caption,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": pixel_values, "input_ids": input_ids}


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    pixel_values = torch.stack([e["pixel_values"] for e in examples])
    pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
    return {
        "pixel_values": pixel_values,
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
    }


def train_diffusers_lora(
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
    """Train as the script does and return ``samples_per_second`` (over the training loop:
    data loading, encoding, UNet, optimizer) and the per-step ``losses``."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=mixed_precision)
    set_seed(seed)
    model_dir = Path(model_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    for model in (unet, vae, text_encoder):
        model.to(accelerator.device, dtype=weight_dtype)
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
    # a list, not the script's ``filter``: the script hands that iterator to the optimizer and
    # then to clip_grad_norm_, which finds it exhausted and clips nothing; here clipping is real,
    # as in lorapipe (it costs one pass over the LoRA gradients)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_layers, lr=learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8
    )
    dataset = ImageCaptionFolder(train_data_dir, tokenizer, resolution)
    dataloader = torch.utils.data.DataLoader(
        dataset, shuffle=True, collate_fn=collate, batch_size=batch_size, num_workers=0
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
                pixels = batch["pixel_values"].to(dtype=weight_dtype)
                latents = vae.encode(pixels).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0,
                    noise_scheduler.config.num_train_timesteps,
                    (latents.shape[0],),
                    device=latents.device,
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                model_pred = unet(
                    noisy_latents, timesteps, encoder_hidden_states, return_dict=False
                )[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                losses.append(accelerator.gather(loss.detach()).mean().item())
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
