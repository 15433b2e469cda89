"""Training throughput: lorapipe (latent and caption caches) against the per-step-encoding loop
of diffusers' train_text_to_image_lora.py (``cache_latents: false``,
``cache_text_encoder_outputs: false``), same model, data, hyperparameters and steps.

    python bench/train_throughput.py [--preset bench] [--steps 10] [--images 8] [--batch-size 4]

The model is ``build_sd(preset="bench")`` (SD-1.5's block layout at reduced width, 256 px; its
size is printed) unless ``--preset sd15`` asks for the full architecture (for a GPU). Each
variant runs in its own process, so its peak memory is its own: the peak resident set size
(``getrusage``) on CPU, ``torch.cuda.max_memory_allocated`` on a GPU. Samples/s counts the
training loop; wall time includes model loading and, for lorapipe, filling an empty latent cache
(each image VAE-encoded once). Both variants draw the same samples, timesteps and noise, so their
losses match to float rounding: the printed mean losses show it.
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
from pathlib import Path

VARIANTS = {
    "lorapipe": {"cache_latents": True, "cache_text_encoder_outputs": True},
    "baseline": {"cache_latents": False, "cache_text_encoder_outputs": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench", choices=("bench", "sd15"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(train_variant(args)))
        return
    with tempfile.TemporaryDirectory(prefix="lorapipe-bench-") as tmp:
        compare(args, Path(tmp))


def compare(args: argparse.Namespace, workdir: Path) -> None:
    from lorapipe.models import build_sd, describe, load_base_model

    model = build_sd(workdir / "model", seed=0, preset=args.preset)
    sizes = describe(load_base_model(str(model)))
    write_images(workdir / "images", args.images)
    print(
        f"model: {args.preset} preset, UNet {sizes['unet'] / 1e6:.1f}M, VAE {sizes['vae'] / 1e6:.1f}M, "
        f"text encoder {sizes['text_encoder'] / 1e6:.1f}M parameters; {args.images} images, "
        f"batch {args.batch_size}, {args.steps} steps, mixed precision {args.mixed_precision}"
    )
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--workdir", str(workdir)]
        command += [
            "--preset",
            args.preset,
            "--steps",
            str(args.steps),
            "--images",
            str(args.images),
        ]
        command += ["--batch-size", str(args.batch_size), "--mixed-precision", args.mixed_precision]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            sys.exit(f"{variant} failed:\n{finished.stderr[-3000:]}")
        results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])
    print(f"{'variant':10} {'samples/s':>10} {'wall s':>8} {'peak MiB':>9} {'mean loss':>10}")
    for variant, result in results.items():
        print(
            f"{variant:10} {result['samples_per_second']:10.2f} {result['wall_seconds']:8.1f} "
            f"{result['peak_mib']:9.0f} {result['mean_loss']:10.5f}"
        )
    lorapipe, baseline = results["lorapipe"], results["baseline"]
    print(
        f"lorapipe / baseline: {lorapipe['samples_per_second'] / baseline['samples_per_second']:.2f}x "
        f"samples/s, {lorapipe['peak_mib'] / baseline['peak_mib']:.2f}x peak memory "
        f"({results['lorapipe']['memory']})"
    )


def write_images(folder: Path, count: int) -> None:
    """Photos-like noise images (each different) with captions, as a lora-scripts folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rows = [("filename", "text")]
    generator = np.random.default_rng(0)
    for index in range(count):
        pixels = generator.integers(0, 256, (320, 288, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
        rows.append((f"{index:03d}.png", f"street photo {index}, film grain, night, city lights"))
    with (folder / "metadata.csv").open("w", newline="") as file:
        csv.writer(file).writerows(rows)


def train_variant(args: argparse.Namespace) -> dict[str, object]:
    """Train one variant in this process and measure it."""
    import torch

    from lorapipe.stages.train import run
    from lorapipe.train_config import TrainConfig

    workdir = Path(args.workdir)
    config = TrainConfig(
        base_model=str(workdir / "model"),
        batch_size=args.batch_size,
        max_train_steps=args.steps,
        save_steps=0,
        validation_split=0,
        mixed_precision=args.mixed_precision,
        cache_dir=str(workdir / f"cache-{args.variant}"),
        **VARIANTS[args.variant],
    )
    started = time.perf_counter()
    output = workdir / f"output-{args.variant}"
    report = run(str(workdir / "images"), str(output), config)
    with (output / "loss_log.csv").open() as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file)]
    if torch.cuda.is_available():
        peak, memory = torch.cuda.max_memory_allocated() / 2**20, "CUDA max_memory_allocated"
    else:
        peak, memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"
    return {
        "samples_per_second": report["samples_per_second"],
        "wall_seconds": time.perf_counter() - started,
        "peak_mib": peak,
        "memory": memory,
        "mean_loss": sum(losses) / len(losses),
    }


if __name__ == "__main__":
    main()
