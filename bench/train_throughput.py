"""Training throughput: lorapipe (latent and caption caches on) against the per-step loop of
diffusers' examples/text_to_image/train_text_to_image_lora.py (``baseline_diffusers_lora.py``,
an independent re-implementation that decodes, VAE-encodes and text-encodes every batch), or
for an SDXL model that of train_text_to_image_lora_sdxl.py (``baseline_diffusers_lora_sdxl.py``:
both text encoders and the size conditioning as well), same model, images, LoRA (rank, alpha,
targets, Gaussian init), learning rate, batch, resolution and steps.

    python bench/train_throughput.py [--model bench] [--steps 50] [--images 16] [--batch-size 4]

The model is ``build_model(preset=NAME)`` with random weights (its size is printed): "bench"
(the default) is SD-1.5's block layout at reduced width, 256 px, and "bench-sdxl" SDXL's;
"sd15" and "sdxl" are the full architectures (for a GPU), "tiny"/"tiny-sdxl" the tests' ones
(``--preset`` is the same option under its older name). Each variant runs in its own process,
so its peak memory is its own: the peak resident set size (``VmHWM``) on CPU,
``torch.cuda.max_memory_allocated`` on a GPU. Samples/s counts the
training loop (lorapipe's includes writing its final checkpoint; the baseline saves nothing);
wall time includes model loading and, for lorapipe, filling an empty latent cache (each image
VAE-encoded once).

The two draw different samples, timesteps and noise (each its own seeded RNG), so their mean
losses agree only statistically: they are printed as a sanity check, not a bit-for-bit match.

``lorapipe`` trains square crops (``enable_bucket: false``), as the baseline does. A fourth
variant, ``lorapipe-buckets``, trains the same number of mixed-aspect photos (2:3, 3:2 and
square in turn) in aspect-ratio buckets: its samples/s against ``lorapipe``'s is the cost of
buckets (several tensor shapes, shorter batches for each bucket's remainder).

A third variant, ``bare-unet-step``, is no trainer: the LoRA's forward, backward and AdamW step
on one fixed batch of latents and text embeddings (and SDXL's pooled embeddings and time ids),
nothing else. It is the most any caching can reach, so baseline/bare is the ceiling of the
ratio on this model and machine.

Model FLOPs per step are one UNet forward and backward on a batch (``flops.py``); achieved
FLOP/s is that per sample times samples/s, the same for both variants, so the extra work the
baseline does every step (decode, VAE encode, text encoder) shows up as lower utilisation.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flops import human, lora_unet_and_batch, train_step_flops

from lorapipe.demo.tiny_model import PRESETS, SDXL_PRESETS

VARIANTS = ("lorapipe", "diffusers-script", "bare-unet-step", "lorapipe-buckets")
# the mixed-aspect set: portrait, landscape and square photos in turn
MIXED_SIZES = ((288, 432), (432, 288), (320, 320))
RANK = 16
ALPHA = 16.0
LEARNING_RATE = 1e-4
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", "--preset", default="bench", choices=(*PRESETS, *SDXL_PRESETS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(train_variant(args)))
        return
    with tempfile.TemporaryDirectory(prefix="lorapipe-bench-") as tmp:
        compare(args, Path(tmp))


def compare(args: argparse.Namespace, workdir: Path) -> None:
    from lorapipe.demo.tiny_model import build_model, describe
    from lorapipe.models import load_base_model

    model = build_model(workdir / "model", seed=0, preset=args.model)
    pipe = load_base_model(str(model))
    sizes = describe(pipe)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    del pipe
    write_images(workdir / "images", args.images, [(320, 288)])
    write_images(workdir / "mixed", args.images, MIXED_SIZES)
    text_encoders = " + ".join(
        f"{sizes[name] / 1e6:.1f}M" for name in ("text_encoder", "text_encoder_2") if name in sizes
    )
    print(
        f"model: {args.model} preset, UNet {sizes['unet'] / 1e6:.1f}M, VAE {sizes['vae'] / 1e6:.1f}M, "
        f"text encoder {text_encoders} parameters; {args.images} images at "
        f"{resolution} px, batch {args.batch_size}, {args.steps} steps, LoRA rank {RANK} "
        f"alpha {ALPHA:g}, lr {LEARNING_RATE:g}, mixed precision {args.mixed_precision}"
    )
    step_flops = train_step_flops(
        model,
        batch_size=args.batch_size,
        resolution=resolution,
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGET_MODULES,
    )
    print(
        f"model FLOPs per training step (UNet forward + backward, batch {args.batch_size}): "
        f"{human(step_flops)}FLOP ({human(step_flops / args.batch_size)}FLOP per sample)"
    )
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--workdir", str(workdir)]
        command += ["--model", args.model, "--steps", str(args.steps)]
        command += ["--images", str(args.images), "--batch-size", str(args.batch_size)]
        command += ["--mixed-precision", args.mixed_precision, "--resolution", str(resolution)]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            sys.exit(f"{variant} failed:\n{finished.stderr[-3000:]}")
        results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])
    print(
        f"{'variant':17} {'samples/s':>10} {'wall s':>8} {'peak MiB':>9} {'mean loss':>10} "
        f"{'FLOP/s':>10}"
    )
    for variant, result in results.items():
        achieved = step_flops / args.batch_size * result["samples_per_second"]
        # the FLOPs per sample are those of the square size; bucketed samples have other shapes
        flops = "-" if variant == "lorapipe-buckets" else f"{human(achieved)}F"
        print(
            f"{variant:17} {result['samples_per_second']:10.2f} {result['wall_seconds']:8.1f} "
            f"{result['peak_mib']:9.0f} {result['mean_loss']:10.5f} {flops:>10}"
        )
    lorapipe, baseline = results["lorapipe"], results["diffusers-script"]
    print(
        f"lorapipe / diffusers-script: "
        f"{lorapipe['samples_per_second'] / baseline['samples_per_second']:.2f}x samples/s, "
        f"{lorapipe['peak_mib'] / baseline['peak_mib']:.2f}x peak memory ({lorapipe['memory']}); "
        "mean losses differ only by their random draws (different noise and timesteps)"
    )
    bare = results["bare-unet-step"]["samples_per_second"]
    print(
        f"ceiling: bare-unet-step / diffusers-script = "
        f"{bare / baseline['samples_per_second']:.2f}x (lorapipe reaches "
        f"{lorapipe['samples_per_second'] / bare:.0%} of the bare step)"
    )
    buckets = results["lorapipe-buckets"]
    print(
        f"lorapipe-buckets / lorapipe: "
        f"{buckets['samples_per_second'] / lorapipe['samples_per_second']:.2f}x samples/s on "
        f"mixed-aspect photos ({buckets['buckets']}; {buckets['short_batches']} short batches) "
        f"against square crops"
    )


def write_images(folder: Path, count: int, sizes: Sequence[tuple[int, int]]) -> None:
    """Noise images (each different) of ``sizes`` in turn, with captions, as a lora-scripts
    folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rows = [("filename", "text")]
    generator = np.random.default_rng(0)
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
        rows.append((f"{index:03d}.png", f"street photo {index}, film grain, night, city lights"))
    with (folder / "metadata.csv").open("w", newline="") as file:
        csv.writer(file).writerows(rows)


def train_variant(args: argparse.Namespace) -> dict[str, object]:
    """Train one variant in this process and measure it."""
    import torch

    started = time.perf_counter()
    extra: dict[str, object] = {}
    if args.variant in ("lorapipe", "lorapipe-buckets"):
        samples_per_second, losses, extra = train_lorapipe(args, buckets=args.variant != "lorapipe")
    elif args.variant == "bare-unet-step":
        samples_per_second, losses = train_bare_unet_step(args)
    else:
        workdir = Path(args.workdir)
        result = baseline_for(workdir / "model")(
            workdir / "model",
            workdir / "images",
            resolution=args.resolution,
            batch_size=args.batch_size,
            max_train_steps=args.steps,
            rank=RANK,
            lora_alpha=ALPHA,
            learning_rate=LEARNING_RATE,
            mixed_precision=args.mixed_precision,
            seed=SEED,
        )
        samples_per_second, losses = result["samples_per_second"], result["losses"]
    if torch.cuda.is_available():
        peak, memory = torch.cuda.max_memory_allocated() / 2**20, "CUDA max_memory_allocated"
    else:
        peak, memory = peak_rss_mib(), "peak RSS"
    return {
        "samples_per_second": samples_per_second,
        "wall_seconds": time.perf_counter() - started,
        "peak_mib": peak,
        "memory": memory,
        "mean_loss": sum(losses) / len(losses),
        **extra,
    }


def baseline_for(model_dir: Path) -> Callable[..., dict[str, Any]]:
    """The diffusers script re-implementation for the model's family: SDXL's has a loop of its
    own (two text encoders, pooled text and size conditioning)."""
    from lorapipe.models import model_family

    if model_family(str(model_dir)).added_conditioning:
        from baseline_diffusers_lora_sdxl import train_diffusers_lora_sdxl

        return train_diffusers_lora_sdxl
    from baseline_diffusers_lora import train_diffusers_lora

    return train_diffusers_lora


def peak_rss_mib() -> float:
    """This process's peak resident set size. Linux's ``VmHWM`` is the high-water mark of this
    program's own memory; ``getrusage``'s ``ru_maxrss`` would also carry the parent's size at
    ``fork`` across ``exec`` (so every variant would report at least the parent's size)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_lorapipe(
    args: argparse.Namespace, *, buckets: bool
) -> tuple[float, list[float], dict[str, object]]:
    """``lorapipe.stages.train.run`` with its caches on, on the square-ish images in square
    crops or on the mixed-aspect ones in buckets: (samples/s, per-step losses, the buckets)."""
    from lorapipe.stages.train import run
    from lorapipe.train_config import TrainConfig

    workdir = Path(args.workdir)
    config = TrainConfig(
        base_model=str(workdir / "model"),
        batch_size=args.batch_size,
        max_train_steps=args.steps,
        resolution=args.resolution,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        target_modules=TARGET_MODULES,
        learning_rate=LEARNING_RATE,
        save_steps=0,
        validation_split=0,
        sample_prompts=[],  # the bench times training: no sample images at the end
        mixed_precision=args.mixed_precision,
        seed=SEED,
        cache_dir=str(workdir / "cache-lorapipe"),
        cache_latents=True,
        cache_text_encoder_outputs=True,
        enable_bucket=buckets,
    )
    output = workdir / f"output-{args.variant}"
    report = run(str(workdir / ("mixed" if buckets else "images")), str(output), config)
    with (output / "loss_log.csv").open() as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file)]
    bucket_counts = ", ".join(
        f"{b['images']} at {b['resolution'][0]}x{b['resolution'][1]}" for b in report["buckets"]
    )
    extra = {"buckets": bucket_counts, "short_batches": report["short_batches"]}
    return report["samples_per_second"], losses, extra


def train_bare_unet_step(args: argparse.Namespace) -> tuple[float, list[float]]:
    """The LoRA's forward, backward and AdamW step on one fixed batch, and nothing else:
    (samples/s, per-step losses)."""
    import torch

    torch.manual_seed(SEED)
    unet, latents, noise, timesteps, hidden, added = lora_unet_and_batch(
        Path(args.workdir) / "model",
        batch_size=args.batch_size,
        resolution=args.resolution,
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGET_MODULES,
    )
    parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    losses = []
    started = time.perf_counter()
    for _ in range(args.steps):
        prediction = unet(latents, timesteps, hidden, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return args.steps * args.batch_size / (time.perf_counter() - started), losses


if __name__ == "__main__":
    main()
