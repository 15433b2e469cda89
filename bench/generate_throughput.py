"""Generation throughput: ``lorapipe generate`` on a grid against the naive loop, one
``StableDiffusionPipeline.__call__`` per image, same model, LoRA, grid, sampler and steps.

    python bench/generate_throughput.py [--preset bench] [--size 128] [--steps 8] [--batch-size 8]

The model is ``build_sd(preset="bench")`` (SD-1.5's block layout at reduced width; its size is
printed) unless ``--preset sd15`` asks for the full architecture (for a GPU); the LoRA is random
(rank 8 on the UNet's attention). The grid is 2 prompts x 1 negative preset x 2 LoRA scales x
2 CFG scales x 2 seeds = 16 images.

- lorapipe: ``stages.generate.run``, timed over its rendering phase (``render_seconds``: every
  UNet/VAE call plus writing the PNGs and computing metrics; model loading, contact sheets and
  the report are not counted).
- naive: for each image, set the LoRA scale, encode prompt and negative (the same A1111 weighted
  encoding), call the pipeline with ``generator=torch.Generator().manual_seed(seed)``.

Both produce the same images; the run asserts it (every pixel within one 8-bit level) and
prints images/s for each and the ratio.

Model FLOPs per image (``flops.py``): ``steps`` UNet forwards on a batch of 2 (classifier-free
guidance) plus one VAE decode (one UNet call per step holds for DPM++ 2M, Euler, DDIM; a
second-order sampler such as Heun calls it twice). Achieved FLOP/s is that times images/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flops import generation_flops, human

PROMPTS = [
    "street photography, 35mm film grain, muted colors, <lora:bench_style:0.7>",
    "cyberpunk city at night, neon lights, rain, <lora:bench_style:0.7>",
]
LORA_SCALES = [0.7, 1.0]
CFG_SCALES = [7.0, 9.0]
SEEDS = [1, 2]
PIXEL_TOLERANCE = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench", choices=("bench", "sd15"))
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sampler", default="DPM++ 2M Karras")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorapipe-bench-") as tmp:
        compare(args, Path(tmp))


def compare(args: argparse.Namespace, workdir: Path) -> None:
    from PIL import Image

    from lorapipe.demo.tiny_model import build_sd, describe
    from lorapipe.generation.infotext import parse_parameters
    from lorapipe.models import load_base_model
    from lorapipe.stages.generate import GenerateConfig, run

    model = build_sd(workdir / "model", seed=0, preset=args.preset)
    lora_file = write_random_lora(model, workdir / "lora")
    sizes = describe(load_base_model(str(model)))
    config = GenerateConfig(
        prompts=PROMPTS,
        loras={"bench_style": str(lora_file)},
        negative_presets=["portrait"],
        lora_scales=LORA_SCALES,
        cfg_scales=CFG_SCALES,
        seeds=SEEDS,
        samplers=[args.sampler],
        steps=args.steps,
        width=args.size,
        height=args.size,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    report = run(str(model), str(workdir / "out"), config)
    lorapipe_rate = report["images"] / report["render_seconds"]
    print(
        f"model: {args.preset} preset, UNet {sizes['unet'] / 1e6:.1f}M parameters; "
        f"{report['images']} images of {args.size}x{args.size}, {args.steps} steps "
        f"{args.sampler}, batch {args.batch_size}, {report['environment']['device']} "
        f"{report['environment']['dtype']}"
    )

    images = {}
    for path in sorted((workdir / "out" / "images").glob("*.png")):
        with Image.open(path) as image:
            images[path.name] = (
                np.asarray(image, np.int16),
                parse_parameters(image.info["parameters"]),
            )
    naive_seconds, naive_images = naive_loop(model, lora_file, config, report)
    worst = max(
        int(np.abs(images[name][0] - np.asarray(image, np.int16)).max())
        for name, image in naive_images.items()
    )
    assert naive_images.keys() == images.keys()
    assert worst <= PIXEL_TOLERANCE, f"images differ by {worst} levels"
    naive_rate = len(naive_images) / naive_seconds
    print(f"{'variant':28} {'images/s':>9} {'seconds':>8}")
    print(f"{'lorapipe generate':28} {lorapipe_rate:9.3f} {report['render_seconds']:8.2f}")
    print(f"{'naive pipeline loop':28} {naive_rate:9.3f} {naive_seconds:8.2f}")
    print(f"same images (max difference {worst}/255); speed-up x{lorapipe_rate / naive_rate:.2f}")
    image_flops = generation_flops(model, size=args.size, steps=args.steps)
    print(
        f"model FLOPs per image: {human(image_flops['total'])}FLOP = UNet "
        f"{human(image_flops['unet_per_step'])}FLOP x {args.steps} steps (batch 2, CFG) + VAE "
        f"decode {human(image_flops['vae_decode'])}FLOP; achieved: lorapipe "
        f"{human(image_flops['total'] * lorapipe_rate)}FLOP/s, naive "
        f"{human(image_flops['total'] * naive_rate)}FLOP/s"
    )


def naive_loop(model: Path, lora_file: Path, config, report) -> tuple[float, dict]:
    """One pipeline call per image, timed over the loop only."""
    import torch

    from lorapipe import lora_format
    from lorapipe.generation.grid import plan_grid
    from lorapipe.generation.rendering import device_and_dtype
    from lorapipe.generation.samplers import make_scheduler
    from lorapipe.models import load_base_model
    from lorapipe.prompts.encoding import PromptEncoder
    from lorapipe.prompts.negatives import NegativeLibrary
    from lorapipe.prompts.syntax import parse_prompt

    device, dtype = device_and_dtype(config.device, config.dtype)
    pipe = load_base_model(str(model), torch_dtype=dtype)
    lora_format.load_into_pipeline(pipe, str(lora_file), adapter_name="bench_style")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    scheduler_config = pipe.scheduler.config
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    cells = plan_grid(config, [parse_prompt(p) for p in config.prompts], NegativeLibrary.load())
    assert len(cells) == report["images"]
    images = {}
    started = time.monotonic()
    for cell in cells:
        (tag,) = cell.loras
        pipe.scheduler = make_scheduler(cell.sampler, scheduler_config)  # samplers are an axis
        pipe.set_adapters(["bench_style"], [tag.unet_weight])
        positive, negative = encoder.encode_pair(cell.parsed, cell.negative.text)
        images[cell.file_name] = pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            guidance_scale=cell.cfg_scale,
            num_inference_steps=cell.steps,
            width=config.width,
            height=config.height,
            generator=torch.Generator().manual_seed(cell.seed),
        ).images[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.monotonic() - started, images


def write_random_lora(model: Path, directory: Path) -> Path:
    """A rank-8 LoRA on the UNet's attention with random weights, saved as train saves it."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lorapipe.models import load_base_model

    pipe = load_base_model(str(model))
    pipe.unet.add_adapter(
        LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    return directory / "pytorch_lora_weights.safetensors"


if __name__ == "__main__":
    sys.exit(main())
