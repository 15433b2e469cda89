"""Model FLOPs of one training step and of one generated image, counted with
``torch.utils.flop_counter.FlopCounterMode`` on the model as built (random inputs of the right
shapes; FLOPs do not depend on the values).

What is counted: matrix multiplies, convolutions and attention (a multiply-add is 2 FLOPs);
normalisations, activations and other elementwise work are not, as usual for "model FLOPs".
Attention is counted through PyTorch's math kernel: FlopCounterMode has no formula for the fused
CPU attention kernel and would silently count it as 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def count_flops(function) -> int:
    """FLOPs of ``function()``, with attention routed through countable kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def _shapes(model_dir: Path, resolution: int) -> tuple[int, int]:
    """(latent side, caption length) of this model at ``resolution``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    vae_config = AutoencoderKL.load_config(model_dir / "vae")
    latent_side = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    tokens = CLIPTokenizer.from_pretrained(model_dir / "tokenizer").model_max_length
    return latent_side, tokens


def added_conditions(
    unet: Any, *, batch_size: int, resolution: int, generator: Any
) -> dict[str, Any] | None:
    """SDXL's ``added_cond_kwargs`` for a batch, sized from the UNet's config: random pooled
    text embeddings and the time ids of an uncropped square image at ``resolution``. None for
    a UNet without added conditioning (SD 1.x, 2.x)."""
    import torch

    if unet.config.addition_embed_type != "text_time":
        return None
    # the add embedding reads the pooled text and the six time ids, each projected to
    # addition_time_embed_dim
    time_ids_width = 6 * unet.config.addition_time_embed_dim
    pooled_width = unet.config.projection_class_embeddings_input_dim - time_ids_width
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size)
    return {
        "text_embeds": torch.randn((batch_size, pooled_width), generator=generator),
        "time_ids": time_ids.float(),
    }


def lora_unet_and_batch(
    model_dir: str | Path,
    *,
    batch_size: int,
    resolution: int,
    rank: int,
    alpha: float,
    target_modules: list[str],
) -> tuple[Any, Any, Any, Any, Any, dict[str, Any] | None]:
    """The model's UNet, frozen, with a LoRA adapter (only its weights train), and one random
    batch of the shapes a training step sees: (unet, latents, noise, timesteps, text
    embeddings, SDXL's added conditions or None)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    model_dir = Path(model_dir)
    latent_side, tokens = _shapes(model_dir, resolution)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules
        )
    )
    unet.train()
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, unet.config.in_channels, latent_side, latent_side)
    latents = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    hidden = torch.randn((batch_size, tokens, unet.config.cross_attention_dim), generator=generator)
    added = added_conditions(
        unet, batch_size=batch_size, resolution=resolution, generator=generator
    )
    return unet, latents, noise, timesteps, hidden, added


def train_step_flops(
    model_dir: str | Path,
    *,
    batch_size: int,
    resolution: int,
    rank: int,
    alpha: float,
    target_modules: list[str],
) -> int:
    """One UNet forward and backward on a batch, with a LoRA adapter (only its weights train).
    The frozen VAE encode and text encoder are not counted: lorapipe caches them, the baseline
    runs them every step, and neither is the model being trained."""
    import torch

    unet, latents, noise, timesteps, hidden, added = lora_unet_and_batch(
        model_dir,
        batch_size=batch_size,
        resolution=resolution,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
    )

    def step() -> None:
        prediction = unet(latents, timesteps, hidden, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()

    return count_flops(step)


def generation_flops(model_dir: str | Path, *, size: int, steps: int) -> dict[str, int]:
    """Per generated image: ``steps`` UNet forwards on a batch of 2 (classifier-free guidance:
    conditional and unconditional) and one VAE decode. The text encoder (once per prompt, tiny)
    and LoRA layers (fused into the weights by lorapipe; a few % when not) are not counted."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model_dir = Path(model_dir)
    latent_side, tokens = _shapes(model_dir, size)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(
        (2, unet.config.in_channels, latent_side, latent_side), generator=generator
    )
    hidden = torch.randn((2, tokens, unet.config.cross_attention_dim), generator=generator)
    timestep = torch.tensor([500, 500])
    with torch.no_grad():
        unet_flops = count_flops(lambda: unet(latents, timestep, hidden))
        vae_flops = count_flops(lambda: vae.decode(latents[:1]))
    return {
        "unet_per_step": unet_flops,
        "unet": unet_flops * steps,
        "vae_decode": vae_flops,
        "total": unet_flops * steps + vae_flops,
    }


def human(flops: float) -> str:
    """1.23 GFLOP style."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} "
