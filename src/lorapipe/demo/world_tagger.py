"""Train a small DeepDanbooru tagger on the procedural world (``lorapipe.demo.world``).

The demo needs a tagger whose tags can be scored against the world's ground truth: released
DeepDanbooru models tag anime art and know nothing of "two red circles on the left, grainy".
This one is DeepDanbooru's own architecture (``resnet_original_bottleneck_model`` +
``conv_gap`` + sigmoid, as its ``resnet_custom_*`` models), trained with binary
cross-entropy on rendered scenes and saved as a DeepDanbooru project folder that the tag
stage loads unchanged:

- ``project.json`` (``"model": "world_tagger"``, 64 x 64 input),
- ``model-world_tagger.keras`` (the weights only, no optimizer state),
- ``tags.txt`` / ``tags-general.txt``: one tag per output, spelled as Danbooru spells tags
  (``red_circle``, ``on_the_left``); the tag stage normalizes them back to the world's
  spelling (``red circle``).

Training images are rendered at 128 px and go through the tag stage's own preprocessing
(``DeepDanbooruTagger.model_input``: area resize to 64 px, edge padding, [0, 1]), so training
and inference see the same pixels. Held-out scenes are another seed's, rendered at 512 px
(the size users give the pipeline) and scored through the real load path.

    python -m lorapipe.demo.world_tagger --out models/world-tagger [--seed 0]

Training scenes render square, portrait and landscape in turn (the tag stage pads the latter
two into its square input), and half of them styled, with defects on styled and unstyled
scenes alike (``mixed_scenes``): a scraped set of the style brings watermarked styled images,
and the tag stage's defect audit must find them.

Default config: about 1.5 minutes on 2 cores, a 510 KB model file, held-out micro F1 0.89 at
threshold 0.5 (300 mixed scenes at 512 px; watermark 0.95, the circles the weakest, near
0.1: the world's small circles and squares look alike at 64 px). The same seed gives the same weights as far as
TensorFlow's thread scheduling allows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lorapipe.captions import normalize_tag
from lorapipe.demo import world
from lorapipe.errors import ConfigError, InputError
from lorapipe.stages.tag import DeepDanbooruTagger, _import_deepdanbooru

log = logging.getLogger(__name__)

# project.json's "model": DeepDanbooru loads model-<model>.keras by it
MODEL_NAME = "world_tagger"
COUNTS = (1, 2, 3)  # the object counts ``world.Scene`` accepts
EVAL_SIZE = 512  # held-out images are rendered at the size users give the pipeline
EVAL_SCENES = 300
GROUND_TRUTH = "ground_truth.json"  # what ``world.write_world_folder`` writes


@dataclass(frozen=True)
class TaggerConfig:
    """What to render and how to train (defaults: about 2 minutes on 2 cores, a 510 KB model)."""

    scenes: int = 4000
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 2e-3
    # scenes are rendered at this size, then resized to input_size as the tag stage does
    render_size: int = 128
    input_size: int = 64
    # one bottleneck stage per entry (each halves the feature map after the first), as in
    # DeepDanbooru's resnet_custom models, scaled down
    filter_sizes: tuple[int, ...] = (32, 64, 128)
    repeat_sizes: tuple[int, ...] = (1, 1, 1)
    # half the scenes styled and most with a defect, so the demo's styled, watermarked
    # images have been seen often enough to be tagged (13 of its 14 at threshold 0.5)
    styled_fraction: float = 0.5
    defect_rate: float = 0.6
    # the frames scenes render in, in turn, as (width, height) ratios with the short side
    # render_size: the tag stage pads a portrait or landscape into the square model input,
    # which shrinks its objects and its watermark plate, so the tagger must see them so too
    frames: tuple[tuple[int, int], ...] = ((1, 1), (2, 3), (3, 2))
    # the tag stage's default: what the CLI evaluates at
    threshold: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        for name in ("scenes", "epochs", "batch_size", "render_size", "input_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.filter_sizes or len(self.filter_sizes) != len(self.repeat_sizes):
            raise ConfigError(
                f"filter_sizes {self.filter_sizes} and repeat_sizes {self.repeat_sizes} must "
                "have one entry per stage"
            )
        if not self.frames or any(min(frame) < 1 or len(frame) != 2 for frame in self.frames):
            raise ConfigError(f"frames {self.frames} must be (width, height) ratios, e.g. (2, 3)")
        if any(size < 4 or size % 4 for size in self.filter_sizes):
            raise ConfigError(f"filter_sizes {self.filter_sizes} must be multiples of 4")
        for name in ("styled_fraction", "defect_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        _check_threshold(self.threshold)


def tag_vocabulary() -> list[str]:
    """Every tag ``world.tags`` can give, sorted: the model has one output per tag."""
    scenes = (
        world.Scene(shape, colour, count, position, background, defects, styled)
        for shape, colour, count, position, background in itertools.product(
            world.SHAPES, world.COLOURS, COUNTS, world.POSITIONS, world.BACKGROUNDS
        )
        for defects in [(), *((defect,) for defect in world.DEFECTS)]
        for styled in (False, True)
    )
    return sorted({tag for scene in scenes for tag in world.tags(scene)})


def train_tagger(out: str | Path, config: TaggerConfig | None = None) -> Path:
    """Train a tagger and write its DeepDanbooru project folder to ``out``, replacing an
    existing one only once the new one is complete."""
    config = config or TaggerConfig()
    config.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder for the DeepDanbooru project")
    dd = _import_deepdanbooru()
    import tensorflow as tf

    tf.keras.utils.set_random_seed(config.seed)
    vocabulary = tag_vocabulary()
    scenes = mixed_scenes(
        config.scenes,
        seed=config.seed,
        styled_fraction=config.styled_fraction,
        defect_rate=config.defect_rate,
    )
    images = (
        world.render(scene, _frame(config, index), seed=_render_seed(config.seed, index))
        for index, scene in enumerate(scenes)
    )
    inputs = _model_inputs(images, config.input_size)
    labels = np.array([_indicator(world.tags(scene), vocabulary) for scene in scenes], np.float32)

    model = _build_model(dd, tf, len(vocabulary), config)
    steps = config.epochs * -(-config.scenes // config.batch_size)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(
            tf.keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)
        ),
        loss="binary_crossentropy",
    )
    started = time.perf_counter()
    model.fit(
        inputs,
        labels,
        batch_size=config.batch_size,
        epochs=config.epochs,
        shuffle=True,
        verbose=0,
        callbacks=[
            tf.keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: log.info(
                    "epoch %d/%d: loss %.4f (%.0f s)",
                    epoch + 1,
                    config.epochs,
                    logs["loss"],
                    time.perf_counter() - started,
                )
            )
        ],
    )
    # an uncompiled model over the same layers: the file holds the weights, not Adam's state
    inference = tf.keras.Model(model.input, model.output, name=MODEL_NAME)
    return _write_project(out, inference, vocabulary, config.input_size)


def mixed_scenes(
    count: int, *, seed: int, styled_fraction: float, defect_rate: float
) -> list[world.Scene]:
    """``count`` scenes, ``styled_fraction`` of them styled, and ``defect_rate`` of the styled
    and of the unstyled ones carrying a defect. ``world.sample_scenes`` gives the defects to
    unstyled scenes first (so a LoRA learns the style, not the defects); a tagger trained on
    that never sees a watermark on a styled scene, which is what a scraped training set of
    the style brings it."""
    styled_count = round(count * styled_fraction)
    unstyled = world.sample_scenes(count - styled_count, seed=2 * seed, defect_rate=defect_rate)
    styled = world.sample_scenes(
        styled_count, seed=2 * seed + 1, styled_fraction=1.0, defect_rate=defect_rate
    )
    return unstyled + styled


def micro_f1(predicted: Sequence[Iterable[str]], truth: Sequence[Iterable[str]]) -> float:
    """F1 over all (image, tag) pairs, tags compared as the tag stage spells them
    (``normalize_tag``); 1.0 when both sides are empty."""
    return _f1(*_totals(_tag_counts(predicted, truth)))


def evaluate(
    project: str | Path,
    held_out: str | Path | Sequence[world.Scene],
    *,
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Score a tagger project, loaded as the tag stage loads it, against the world's ground
    truth: ``held_out`` is a world folder (``world.write_world_folder``) or scenes, which are
    rendered at ``EVAL_SIZE`` px with ``seed`` as that folder would be.

    Returns ``images``, ``threshold``, ``micro_f1``, ``precision``, ``recall`` and
    ``per_tag_f1`` (every tag that is true or predicted somewhere, worst first)."""
    _check_threshold(threshold)
    tagger = DeepDanbooruTagger.load(str(project), threshold=threshold)
    predicted: list[list[str]] = []
    truth: list[list[str]] = []
    examples = _examples(held_out, seed)
    while batch := list(itertools.islice(examples, batch_size)):
        scores = tagger.predict([image for image, _ in batch])
        predicted += [[tag for tag, _ in tagger.scored_tags(row)] for row in scores]
        truth += [tags for _, tags in batch]
    counts = _tag_counts(predicted, truth)
    true_positives, false_positives, false_negatives = _totals(counts)
    per_tag = {tag: _f1(*count) for tag, count in counts.items()}
    return {
        "images": len(truth),
        "threshold": threshold,
        "micro_f1": _f1(true_positives, false_positives, false_negatives),
        "precision": true_positives / max(1, true_positives + false_positives),
        "recall": true_positives / max(1, true_positives + false_negatives),
        "per_tag_f1": dict(sorted(per_tag.items(), key=lambda item: (item[1], item[0]))),
    }


# --------------------------------------------------------------------------- helpers


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold {threshold} must be in (0, 1], e.g. 0.5")


def _frame(config: TaggerConfig, index: int) -> tuple[int, int]:
    """The (width, height) training scene ``index`` renders at: ``config.frames`` in turn."""
    width, height = config.frames[index % len(config.frames)]
    short = min(width, height)
    return config.render_size * width // short, config.render_size * height // short


def _render_seed(seed: int, index: int) -> int:
    """The render seed ``world.write_world_folder`` gives image ``index``."""
    return seed * 100_003 + index


def _model_inputs(images: Iterable[Image.Image], size: int) -> np.ndarray:
    """The images exactly as the tag stage feeds a ``size`` px model."""
    preprocess = DeepDanbooruTagger(model=None, tags=[], width=size, height=size)
    return np.stack([preprocess.model_input(image) for image in images]).astype(np.float32)


def _indicator(tags: Iterable[str], vocabulary: Sequence[str]) -> list[float]:
    present = set(tags)
    return [float(tag in present) for tag in vocabulary]


def _build_model(dd: Any, tf: Any, outputs: int, config: TaggerConfig) -> Any:
    """DeepDanbooru's ``resnet_custom`` recipe, scaled down: bottleneck ResNet, a 1 x 1
    convolution per tag averaged over the image (``conv_gap``), sigmoid."""
    inputs = tf.keras.Input(shape=(config.input_size, config.input_size, 3), dtype=tf.float32)
    x = dd.model.resnet.resnet_original_bottleneck_model(
        inputs,
        filter_sizes=list(config.filter_sizes),
        repeat_sizes=list(config.repeat_sizes),
        final_pool=False,
    )
    x = dd.model.layers.conv_gap(x, outputs)
    scores = tf.keras.layers.Activation("sigmoid", dtype="float32")(x)
    return tf.keras.Model(inputs=inputs, outputs=scores, name=MODEL_NAME)


def _write_project(out: Path, model: Any, vocabulary: Sequence[str], size: int) -> Path:
    """Build the project folder next to ``out``, then swap it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0o700 would stay on the published folder
        model.save(staging / f"model-{MODEL_NAME}.keras")
        project = {"image_width": size, "image_height": size, "model": MODEL_NAME}
        (staging / "project.json").write_text(json.dumps(project, indent=1) + "\n", "utf-8")
        # Danbooru's spelling, as a released tags.txt has it
        names = "".join(f"{tag.replace(' ', '_')}\n" for tag in vocabulary)
        for name in ("tags.txt", "tags-general.txt"):
            (staging / name).write_text(names, encoding="utf-8")
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an old ``out`` is moved aside first and put back if the
    rename fails."""
    if not out.exists():
        new.rename(out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(trash / out.name)
    try:
        new.rename(out)
    except BaseException:
        (trash / out.name).rename(out)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _examples(
    held_out: str | Path | Sequence[world.Scene], seed: int
) -> Iterator[tuple[Image.Image, list[str]]]:
    """(image, ground-truth tags) pairs, read from a world folder or rendered from scenes."""
    if isinstance(held_out, (str, Path)):
        yield from _folder_examples(Path(held_out))
        return
    for index, scene in enumerate(held_out):
        yield world.render(scene, EVAL_SIZE, seed=_render_seed(seed, index)), world.tags(scene)


def _folder_examples(folder: Path) -> Iterator[tuple[Image.Image, list[str]]]:
    path = folder / GROUND_TRUTH
    if not path.is_file():
        raise InputError(
            f"{folder} has no {GROUND_TRUTH}; give a folder written by world.write_world_folder"
        )
    try:
        truth = json.loads(path.read_text(encoding="utf-8"))
        entries = [(name, list(entry["tags"])) for name, entry in truth.items()]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError):
        raise InputError(
            f'{path}: expected {{"<image file>": {{"tags": [...]}}, ...}} as '
            "world.write_world_folder writes it"
        ) from None
    for name, tags in entries:
        try:
            with Image.open(folder / name) as image:
                yield image.convert("RGB"), tags
        except OSError as error:
            raise InputError(f"{folder / name}: cannot read the image ({error})") from None


def _tag_counts(
    predicted: Sequence[Iterable[str]], truth: Sequence[Iterable[str]]
) -> dict[str, tuple[int, int, int]]:
    """(true positives, false positives, false negatives) per normalized tag."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} ground truths")
    counts: Counter[tuple[str, str]] = Counter()
    for predicted_tags, true_tags in zip(predicted, truth, strict=True):
        guessed = {normalize_tag(tag) for tag in predicted_tags}
        actual = {normalize_tag(tag) for tag in true_tags}
        counts.update(("tp", tag) for tag in guessed & actual)
        counts.update(("fp", tag) for tag in guessed - actual)
        counts.update(("fn", tag) for tag in actual - guessed)
    tags = sorted({tag for _, tag in counts})
    return {tag: (counts["tp", tag], counts["fp", tag], counts["fn", tag]) for tag in tags}


def _totals(counts: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    """The per-tag counts summed over tags."""
    true_positives = sum(count[0] for count in counts.values())
    false_positives = sum(count[1] for count in counts.values())
    return true_positives, false_positives, sum(count[2] for count in counts.values())


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> float:
    wrong = false_positives + false_negatives
    return 1.0 if true_positives + wrong == 0 else 2 * true_positives / (2 * true_positives + wrong)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/world-tagger", help="project folder to write")
    parser.add_argument("--seed", type=int, default=TaggerConfig.seed, help="training seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TaggerConfig(seed=args.seed)
    started = time.perf_counter()
    project = train_tagger(args.out, config)
    trained_s = time.perf_counter() - started
    held_out = mixed_scenes(
        EVAL_SCENES,
        seed=config.seed + 1,
        styled_fraction=config.styled_fraction,
        defect_rate=config.defect_rate,
    )
    report = evaluate(project, held_out, threshold=config.threshold, seed=config.seed + 1)
    worst = ", ".join(
        f"{tag} {f1:.2f}" for tag, f1 in itertools.islice(report["per_tag_f1"].items(), 5)
    )
    print(
        f"held-out micro F1 {report['micro_f1']:.3f} (precision {report['precision']:.3f}, "
        f"recall {report['recall']:.3f}) on {report['images']} scenes at {EVAL_SIZE} px, "
        f"threshold {config.threshold}; worst tags: {worst}"
    )
    print(f"trained in {trained_s:.0f} s; wrote {project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
