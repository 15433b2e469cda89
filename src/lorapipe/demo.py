"""``make run``: the pipeline's stages, one after the other, on sample data and the tiny model.

It builds what it needs on first use (the tiny offline SD model and a small procedural sample
dataset of 512 px images with captions), then runs flip-augment -> train -> select ->
generate through the same ``run()`` functions the CLI and the Kubeflow components call, and
prints where the report is.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lorapipe.dataset import DatasetWriter, ImageRecord

SAMPLE_SIZE = 512
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200)}
POSITIONS = {"on the left": 0.3, "in the middle": 0.5, "on the right": 0.7}


def sample_image(shape: str, colour: str, position: str, seed: int) -> Image.Image:
    """A film-style sample: one coloured shape on a warm grainy background."""
    rng = np.random.default_rng(seed)
    background = np.empty((SAMPLE_SIZE, SAMPLE_SIZE, 3), dtype=np.float32)
    background[:] = (226, 205, 170)
    background += rng.normal(0, 14, size=background.shape)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    centre_x, centre_y, radius = SAMPLE_SIZE * POSITIONS[position], SAMPLE_SIZE * 0.5, 90
    box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(centre_x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image.filter(ImageFilter.GaussianBlur(1.2))


def write_sample_dataset(uri: str) -> int:
    """Nine captioned sample images as a lorapipe dataset; returns the row count."""
    with DatasetWriter(uri) as writer:
        for index, (shape, colour, position) in enumerate(
            (s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS
        ):
            if index % 3 != SHAPES.index(shape):
                continue
            image = sample_image(shape, colour, position, seed=index)
            encoded = io.BytesIO()
            image.save(encoded, format="PNG")
            pixels_sha = hashlib.sha256(image.tobytes()).hexdigest()
            writer.write(
                ImageRecord(
                    id=pixels_sha[:16],
                    image=encoded.getvalue(),
                    format="png",
                    width=SAMPLE_SIZE,
                    height=SAMPLE_SIZE,
                    sha256=pixels_sha,
                    caption=f"filmstyle, a {colour} {shape} {position}, film grain",
                    tags=["filmstyle", f"{colour} {shape}", "film grain"],
                    source=f"sample_{index:02d}.png",
                )
            )
        return writer.close()


def run_demo(out: Path) -> Path:
    """Run the stages on the sample data under ``out``; return the report's path."""
    from lorapipe.models import build_sd
    from lorapipe.stages import augment, generate, select, train
    from lorapipe.train_config import TrainConfig

    model = out / "tiny-sd"
    if not (model / "model_index.json").is_file():
        build_sd(model, seed=0, preset="tiny")
    raw = out / "dataset-raw"
    write_sample_dataset(str(raw))

    augmented = out / "dataset-augmented"
    augment.run(str(raw), str(augmented))

    training = out / "training"
    train.run(
        str(augmented),
        str(training),
        TrainConfig(
            base_model=str(model),
            output_dir=str(training),
            resolution=64,
            lora_rank=4,
            lora_alpha=4,
            batch_size=2,
            max_train_steps=30,
            save_steps=10,
            learning_rate=1e-3,
            validation_split=0.25,
            output_name="filmstyle",
        ),
    )

    chosen = out / "lora"
    select.run(str(training), str(chosen), select.SelectConfig(output_name="filmstyle"))

    grid = out / "generate"
    generate.run(
        str(model),
        str(grid),
        generate.GenerateConfig(
            prompts=["filmstyle, a red circle in the middle, <lora:filmstyle:0.7>"],
            loras={"filmstyle": str(chosen / "filmstyle.safetensors")},
            negative_presets=["landscape"],
            lora_scales=[0.0, 0.7, 1.0],
            cfg_scales=[5.0, 7.0],
            seeds=[1, 2],
            steps=8,
        ),
    )
    return grid / "report.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="where every stage writes (replaced)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for stale in ("dataset-raw", "dataset-augmented", "training", "lora", "generate"):
        if (out / stale).exists():
            shutil.rmtree(out / stale)
    report = run_demo(out)
    print(f"report: {report.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
