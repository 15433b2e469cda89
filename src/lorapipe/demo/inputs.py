"""The inputs of ``make run``: the world's base model and tagger, and a folder of raw images.

The folder is what a user hands the pipeline: ``DEMO_IMAGES`` captioned scenes of the
procedural world (``lorapipe.demo.world``) in the ``filmstyle`` style, 512 px on the short
side, a quarter of them portrait (512 x 768) and an eighth landscape (768 x 512) so training
has aspect-ratio buckets to fill; a lora-scripts ``metadata.csv``; and three files that ingest
must drop (an exact duplicate, a truncated JPEG and an image below 512 px). Like a scraped set,
every ``WATERMARK_EVERY``-th image carries a stock-photo watermark its caption does not
mention: trained as scraped (``DEMO_SCRAPED_RUN``), the LoRA learns to draw it and the
negative prompt has something to remove; cleaned (the tagger finds the watermark and the tag
stage writes it into the caption), the LoRA binds it to its word. The
base model and the tagger were trained on the world without the style
(``lorapipe.demo.world_model``, ``lorapipe.demo.world_tagger``) and are committed under
``assets/``, so the run shows a LoRA learning something the base model cannot draw.
``DEMO_TRAINING_CONFIG`` and ``DEMO_REVIEW`` size the run for 2 CPU cores; what the run must
show is checked by ``lorapipe.demo.claims``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from lorapipe.demo import world
from lorapipe.errors import InputError

TRIGGER = world.STYLE
DEMO_IMAGES = 40
DEMO_SEED = 7
ASSETS = Path(__file__).resolve().parents[3] / "assets"
WORLD_MODEL = ASSETS / "world-sd"
WORLD_TAGGER = ASSETS / "world-tagger"
PLANTED_FILES = ("copy_of_first.png", "truncated.jpg", "too_small.png")
# more bits apart than ingest's near-duplicate distance (6), with a margin
MIN_HASH_DISTANCE = 12
WATERMARK_EVERY = 3
SQUARE, PORTRAIT, LANDSCAPE = (512, 512), (512, 768), (768, 512)  # (width, height)
# the images' frames, in turn: every 4th image (from the first) portrait, every 8th (from the
# third) landscape, so both meet watermarked ones. Landscapes are fewer because the world
# tagger sees one shrunk into its square input and finds its stacked objects less often
# (micro F1 0.85 on the landscapes, 0.92 on the squares and portraits)
FRAMES = (PORTRAIT, SQUARE, LANDSCAPE, SQUARE, PORTRAIT, SQUARE, SQUARE, SQUARE)
HASH_SCALE = 8  # the near-duplicate check hashes a render this many times smaller

# The seed article's keys, sized for the world model on a CPU: 64 px, a checkpoint (with
# validation loss) every 50 steps; aspect-ratio buckets (the default, stated because the
# portrait claim reads them).
DEMO_TRAINING_CONFIG = (
    f"{{output_name: {TRIGGER}, lora_rank: 8, lora_alpha: 8, batch_size: 4, "
    "max_train_steps: 300, learning_rate: 1e-3, optimizer: AdamW, scheduler: constant, "
    "save_steps: 50, resolution: 64, enable_bucket: true, validation_split: 0.2}"
)
# The review grid: the article's landscape preset against no negative, at four LoRA scales.
DEMO_PROMPTS = [
    f"{TRIGGER}, a red circle in the middle, white background, <lora:{TRIGGER}:0.8>",
    f"{TRIGGER}, two blue squares on the left, grey background, <lora:{TRIGGER}:0.8>",
    f"{TRIGGER}, a yellow triangle on the right, black background, <lora:{TRIGGER}:0.8>",
    f"{TRIGGER}, three green circles on the right, white background, <lora:{TRIGGER}:0.8>",
]
DEMO_REVIEW = {
    "prompts": DEMO_PROMPTS,
    "negative_presets": ["none", "landscape"],
    "lora_scales": [0.0, 0.4, 0.8, 1.0],
    "cfg_scales": [7.0],
    "seeds": [1, 2, 3, 4, 5, 6, 7, 8],
    "steps": 20,
}
# The article's lesson, "clean the data, don't only patch the negative prompt", measured: the
# demo also trains the LoRA on the captions as scraped (the tag stage only reports the
# watermarks it finds instead of captioning them), same seeds, and reviews it where the
# preset names "watermark"; it is published nowhere.
DEMO_SCRAPED_RUN = {"defect_policy": "report", "lora_scales": [0.8, 1.0], "publish_uri": ""}


def demo_scenes(count: int = DEMO_IMAGES) -> list[tuple[world.Scene, int, tuple[int, int]]]:
    """``count`` styled scenes with their render seeds and frames (``FRAMES`` in turn), every
    ``WATERMARK_EVERY``-th (from the first) watermarked, no two near duplicates to ingest
    (perceptual hashes, of a render at the scene's frame, more than ``MIN_HASH_DISTANCE`` bits
    apart): the hash is luma-only, so two scenes differing only in colour would otherwise be
    dropped."""
    from lorapipe.ingestion.decoding import perceptual_hash

    candidates = world.sample_scenes(10 * count, seed=DEMO_SEED, styled_fraction=1.0)
    kept: list[tuple[world.Scene, int, tuple[int, int], int]] = []
    for index, scene in enumerate(candidates):
        if len(kept) % WATERMARK_EVERY == 0:
            scene = replace(scene, defects=("watermark",))
        frame = FRAMES[len(kept) % len(FRAMES)]
        seed = DEMO_SEED * 100_003 + index
        small = (frame[0] // HASH_SCALE, frame[1] // HASH_SCALE)
        image_hash = perceptual_hash(world.render(scene, small, seed=seed))
        if all(bin(image_hash ^ other).count("1") > MIN_HASH_DISTANCE for *_, other in kept):
            kept.append((scene, seed, frame, image_hash))
        if len(kept) == count:
            return [(scene, seed, frame) for scene, seed, frame, _ in kept]
    raise InputError(f"the world has fewer than {count} scenes far enough apart for the demo")


def write_sample_folder(folder: str | Path, count: int = DEMO_IMAGES) -> Path:
    """The raw sample images, their ``metadata.csv`` and the files ingest must drop; the
    ground truth (scene and tags per file) goes next to the folder, as ``<folder>.truth.json``,
    where ingest does not see it. A file that is already there with the same bytes is left
    alone, so that a second run sees unchanged inputs (the pipeline's fingerprint reads
    modification times)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}-", dir=folder.parent) as fresh:
        truth = _write_samples(Path(fresh), count)
        _replace_changed_files(Path(fresh), folder)
    truth_file(folder).write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return folder


def _write_samples(folder: Path, count: int) -> dict[str, dict]:
    """Write the sample images, the planted files and metadata.csv; the ground truth."""
    rows, truth = [], {}
    for index, (scene, seed, frame) in enumerate(demo_scenes(count)):
        name = f"{TRIGGER}_{index:02d}.png"
        world.render(scene, frame, seed=seed).save(folder / name)
        rows.append((name, world.caption(replace(scene, defects=()))))
        truth[name] = {"scene": asdict(scene), "tags": world.tags(scene)}
    first, copy, truncated, small = (folder / rows[0][0], *(folder / n for n in PLANTED_FILES))
    shutil.copyfile(first, copy)
    spare = world.Scene("circle", "blue", 1, "left", "grey", styled=True)
    world.render(spare, 512).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:4000])
    world.render(spare, 256, seed=1).save(small)
    world.write_metadata_csv(folder / "metadata.csv", rows)
    return truth


def _replace_changed_files(fresh: Path, folder: Path) -> None:
    """Make ``folder`` hold exactly ``fresh``'s files, touching only those that differ."""
    folder.mkdir(exist_ok=True)
    for stale in folder.iterdir():
        if not (fresh / stale.name).is_file():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for new in fresh.iterdir():
        old = folder / new.name
        if not (old.is_file() and old.read_bytes() == new.read_bytes()):
            new.replace(old)


def truth_file(folder: str | Path) -> Path:
    """Where ``write_sample_folder`` put the ground truth of ``folder``."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}.truth.json")


def prepare_inputs(out: str | Path) -> tuple[Path, Path, Path]:
    """(raw image folder, world base model, world tagger project) for a run under ``out``."""
    for asset, script in ((WORLD_MODEL, "world_model"), (WORLD_TAGGER, "world_tagger")):
        if not asset.is_dir():
            raise InputError(
                f"{asset} is missing: the demo needs the committed world assets; run from a "
                f"lorapipe checkout or rebuild it with python -m lorapipe.demo.{script} --out {asset}"
            )
    return write_sample_folder(Path(out) / "raw-images"), WORLD_MODEL, WORLD_TAGGER
