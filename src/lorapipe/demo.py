"""Sample inputs for ``make run``: the tiny offline SD model and a folder of raw images.

The folder is what a user hands the pipeline: nine captioned 512 px PNGs in a film style, a
lora-scripts ``metadata.csv``, and three files that ingest must drop (an exact duplicate, a
truncated JPEG and an image below 512 px), so the run shows cleaning as well as training.
``DEMO_TRAINING_CONFIG`` and ``DEMO_REVIEW`` size the run for 2 CPU cores.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SAMPLE_SIZE = 512
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200)}
POSITIONS = {"on the left": 0.3, "in the middle": 0.5, "on the right": 0.7}
TRIGGER = "filmstyle"

# The seed article's keys, sized for the tiny model on a CPU: 64 px, 30 steps, a checkpoint
# (with validation loss) every 10.
DEMO_TRAINING_CONFIG = f"""\
output_name: {TRIGGER}
lora_rank: 4
lora_alpha: 4
target_modules: [q_proj, v_proj]
batch_size: 2
max_train_steps: 30
learning_rate: 1e-3
optimizer: AdamW
scheduler: constant
save_steps: 10
resolution: 64
validation_split: 0.25
"""
# The review grid: LoRA scales x CFG scales x seeds, with the article's landscape preset.
DEMO_REVIEW = {
    "prompts": [f"{TRIGGER}, a red circle in the middle, <lora:{TRIGGER}:0.7>"],
    "negative_presets": ["landscape"],
    "lora_scales": [0.0, 0.7, 1.0],
    "cfg_scales": [5.0, 7.0],
    "seeds": [1, 2],
    "steps": 8,
}


def sample_image(shape: str, colour: str, position: str, seed: int) -> Image.Image:
    """A film-style sample: one coloured shape on a warm grainy background with a soft
    vertical light falloff; size, height and light vary with ``seed`` so no two samples are
    near duplicates."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, SAMPLE_SIZE, dtype=np.float32)[:, None, None]
    light = rows if seed % 2 else 1.0 - rows
    background = np.empty((SAMPLE_SIZE, SAMPLE_SIZE, 3), dtype=np.float32)
    background[:] = (226, 205, 170)
    background *= 0.75 + 0.25 * light
    background += rng.normal(0, 14, size=background.shape)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(70, 130))
    centre_x = SAMPLE_SIZE * POSITIONS[position]
    centre_y = SAMPLE_SIZE * float(rng.uniform(0.35, 0.65))
    box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(centre_x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image.filter(ImageFilter.GaussianBlur(1.2))


def sample_scenes() -> list[tuple[str, str, str]]:
    """Nine (shape, colour, position) scenes: every shape in every colour, each shape once in
    every position."""
    positions = list(POSITIONS)
    return [
        (shape, colour, positions[(shape_index + colour_index) % len(positions)])
        for shape_index, shape in enumerate(SHAPES)
        for colour_index, colour in enumerate(COLOURS)
    ]


def write_sample_folder(folder: str | Path) -> Path:
    """The raw sample images, their ``metadata.csv`` and the files ingest must drop."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rows = []
    for index, (shape, colour, position) in enumerate(sample_scenes()):
        name = f"{TRIGGER}_{index:02d}.png"
        sample_image(shape, colour, position, seed=index).save(folder / name)
        rows.append((name, f"{TRIGGER}, a {colour} {shape} {position}, film grain"))
    shutil.copyfile(folder / rows[0][0], folder / "copy_of_first.png")
    truncated = folder / "truncated.jpg"
    sample_image("circle", "blue", "on the left", seed=99).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:4000])
    sample_image("square", "red", "in the middle", seed=98).resize((256, 256)).save(
        folder / "too_small.png"
    )
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filename", "text"])
        writer.writerows(rows)
    return folder


def prepare_inputs(out: str | Path) -> tuple[Path, Path]:
    """(raw image folder, tiny model) under ``out``; the model is built once and reused."""
    from lorapipe.models import build_sd

    out = Path(out)
    model = out / "tiny-sd"
    if not (model / "model_index.json").is_file():
        build_sd(model, seed=0, preset="tiny")
    return write_sample_folder(out / "raw-images"), model
