"""Training data: which images, which are held out, in which order, with which random draws.

Two inputs give the same list of ``Example``\\ s:

- a lorapipe dataset (a directory with ``_dataset.json``, local or s3://), what the pipeline
  passes. Its images are copied once into a content-addressed folder of the cache, so training
  reads files and never holds the dataset in memory;
- a folder of images with lora-scripts' ``metadata.csv`` (``filename,text``), what the seed
  article uses.

Every random choice for one sample (mirror it, where a random crop sits, caption shuffle and
dropout, timestep, latent and diffusion noise) comes from a generator seeded by (seed, epoch,
position in that epoch's order). A sample therefore gets the same draws whichever process
handles it and however often training is interrupted: 2 processes at batch b train exactly what
1 process at batch 2b trains, and a resumed run continues as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lorapipe import metadata_csv, store
from lorapipe.captions import split_caption, swap_left_right
from lorapipe.dataset import INFO_NAME, ImageRecord, is_dataset, read_records
from lorapipe.errors import ConfigError, InputError
from lorapipe.flip_rules import DEFAULT_SKIP_TAGS, flip_blocker
from lorapipe.train_config import TrainConfig
from lorapipe.training.buckets import BucketRule, Size, source_box

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


@dataclass(frozen=True)
class Example:
    """One image to train or validate on."""

    id: str
    image_path: Path
    sha256: str  # of the image content: part of the latent cache key
    caption: str
    tags: tuple[str, ...]
    group: str  # the original's id: an image and its mirrored copy are held out together
    mirrorable: bool  # flip_aug may mirror it (not a mirror, has none, no text/asymmetry tags)
    name: str  # what a person calls it: the file name in the folder or the dataset's source
    size: Size  # (width, height) of the upright image
    bucket: Size = (0, 0)  # the (width, height) it trains at: see ``with_buckets``


# --------------------------------------------------------------------------- loading


def load_examples(config: TrainConfig, image_cache: Path) -> list[Example]:
    """The examples of ``config.train_data_dir``: a lorapipe dataset or a folder + metadata.csv."""
    if not config.train_data_dir:
        raise ConfigError("train_data_dir is not set; give a folder with metadata.csv or a dataset")
    if is_dataset(config.train_data_dir):
        examples = _examples_from_dataset(config.train_data_dir, image_cache)
    elif store.is_s3(config.train_data_dir):
        raise InputError(
            f"'{config.train_data_dir}' is not a lorapipe dataset (no {INFO_NAME}); run "
            "`lorapipe ingest` on it first"
        )
    else:
        folder = Path(config.train_data_dir.removeprefix("file://")).expanduser()
        metadata = Path(config.metadata_path).expanduser() if config.metadata_path else None
        examples = _examples_from_folder(folder, metadata or folder / "metadata.csv")
    if not examples:
        raise InputError(f"'{config.train_data_dir}' has no images to train on")
    return examples


def _examples_from_dataset(uri: str, image_cache: Path) -> list[Example]:
    """Stream the dataset, copying each image once into ``image_cache`` (named by its hash)."""
    image_cache.mkdir(parents=True, exist_ok=True)
    examples = []
    for record in read_records(uri):
        path = image_cache / f"{record.sha256}.{record.format or 'png'}"
        if not path.exists():
            # per process: runs of a parallel sweep copy the same images at once
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_bytes(record.image)
            temporary.replace(path)
        examples.append(
            Example(
                id=record.id,
                image_path=path,
                sha256=record.sha256,
                caption=record.caption,
                tags=tuple(record.tags),
                group=record.parent_id if record.flipped and record.parent_id else record.id,
                mirrorable=not record.flipped and flip_blocker(record, DEFAULT_SKIP_TAGS) is None,
                name=record.source or record.id,
                size=(record.width, record.height),
            )
        )
    mirrored = {e.group for e in examples if e.group != e.id}
    return [dataclasses.replace(e, mirrorable=False) if e.id in mirrored else e for e in examples]


def _examples_from_folder(folder: Path, metadata: Path) -> list[Example]:
    if not folder.is_dir():
        raise InputError(f"train_data_dir '{folder}' is not a folder or a lorapipe dataset")
    if not metadata.is_file():
        raise InputError(
            f"'{metadata}' does not exist; a folder of images needs a metadata.csv "
            "(filename,text), or give a lorapipe dataset as train_data_dir"
        )
    root = folder.resolve()
    examples = []
    seen: dict[str, str] = {}  # sha256 of a file trained -> its name
    lines_of: dict[Path, list[int]] = {}  # file -> the lines naming it, the kept one first
    for row in metadata_csv.read(metadata):
        line, filename, caption = row.line, row.filename, row.text
        if not filename:
            raise InputError(f"{metadata} line {line}: no filename")
        path = (folder / filename).resolve()
        if not path.is_relative_to(root) or path.is_symlink():
            raise InputError(
                f"{metadata} line {line}: '{filename}' leaves {folder}; use a name inside it"
            )
        if not path.is_file():
            raise InputError(f"{metadata} line {line}: '{filename}' does not exist in {folder}")
        lines_of.setdefault(path, []).append(line)
        if len(lines_of[path]) > 1:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(
                f"{metadata} line {line}: '{filename}' is not an image "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        if sha256 in seen:
            log.warning(
                "%s line %d: '%s' is the same file as '%s'; it is trained once, with the "
                "first one's caption", metadata, line, filename, seen[sha256],
            )  # fmt: skip
            continue
        seen[sha256] = filename
        plain = ImageRecord(
            id="", image=b"", format="", width=0, height=0, sha256="", caption=caption
        )
        examples.append(
            Example(
                id=sha256[:16],
                image_path=path,
                sha256=sha256,
                caption=caption,
                tags=(),
                group=sha256[:16],
                mirrorable=flip_blocker(plain, DEFAULT_SKIP_TAGS) is None,
                name=filename,
                size=upright_size(path),
            )
        )
    for path, lines in lines_of.items():
        if len(lines) > 1:
            metadata_csv.warn_repeated(str(metadata), path.relative_to(root).as_posix(), lines)
    return examples


def upright_size(path: Path) -> Size:
    """(width, height) of the image as displayed: EXIF rotations by 90 degrees swap them.
    Reads the header only."""
    with Image.open(path) as opened:
        width, height = opened.size
        orientation = opened.getexif().get(EXIF_ORIENTATION, 1)
    return (height, width) if orientation in ROTATED_ORIENTATIONS else (width, height)


def with_buckets(examples: Sequence[Example], rule: BucketRule) -> list[Example]:
    """``examples`` with the bucket each trains at (a mirrored copy has its original's size,
    so it lands in the same bucket)."""
    return [dataclasses.replace(e, bucket=rule.bucket_for(e.size)) for e in examples]


def split_validation(
    examples: list[Example], validation_split: float
) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples. The held-out groups are the first by a hash of their id,
    so the same images are held out in every run on the same data, whatever the seed."""
    groups = sorted({e.group for e in examples}, key=lambda g: hashlib.sha256(g.encode()).digest())
    if validation_split <= 0:
        count = 0
    elif validation_split < 1:
        count = max(1, math.floor(validation_split * len(groups)))
    else:
        count = int(validation_split)
    if count >= len(groups):
        raise ConfigError(
            f"validation_split {validation_split:g} holds out {count} of {len(groups)} images, "
            "leaving none to train on; lower it (0 disables validation)"
        )
    held_out = set(groups[:count])
    return (
        [e for e in examples if e.group not in held_out],
        [e for e in examples if e.group in held_out],
    )


# --------------------------------------------------------------------------- order


@dataclass(frozen=True)
class Sample:
    """One use of an example: the ``position``-th sample of ``epoch``'s order."""

    example_index: int
    epoch: int
    position: int
    counts: bool = True  # False: a stand-in that only joins the gradient all-reduce (weight 0)


@dataclass(frozen=True)
class GlobalBatch:
    """The examples of one optimizer step (all from one bucket) and where they start in their
    epoch's order."""

    first_position: int
    example_indices: tuple[int, ...]


@dataclass(frozen=True)
class SamplePlan:
    """Which samples each process trains on at each optimizer step.

    Every epoch, each bucket's examples are shuffled (seeded by seed, epoch and bucket) and cut
    into global batches of ``global_batch``; a bucket's remainder is one shorter batch. The
    batches of all buckets are then shuffled together (seeded by seed and epoch), so every
    optimizer step trains on one bucket and the epoch order is a pure function of (seed, epoch).
    Micro-step ``m`` gives process ``r`` the ``batch_size`` examples starting at
    ``(m * num_processes + r) * batch_size`` within the step's global batch.
    """

    buckets: tuple[Size, ...]  # the bucket of each example, by example index
    batch_size: int
    num_processes: int
    accumulation_steps: int
    seed: int

    @property
    def num_examples(self) -> int:
        return len(self.buckets)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes * self.accumulation_steps

    @functools.cached_property
    def examples_by_bucket(self) -> dict[Size, list[int]]:
        by_bucket: dict[Size, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            by_bucket.setdefault(bucket, []).append(index)
        return dict(sorted(by_bucket.items()))

    @property
    def steps_per_epoch(self) -> int:
        return sum(math.ceil(len(m) / self.global_batch) for m in self.examples_by_bucket.values())

    @property
    def short_batches_per_epoch(self) -> int:
        """Steps of an epoch that train on fewer than ``global_batch`` samples."""
        return sum(1 for m in self.examples_by_bucket.values() if len(m) % self.global_batch)

    @property
    def signature(self) -> dict[str, int | str]:
        """What a resumed run must share with the run it resumes to see the same samples in the
        same order (the number of processes may change; the global batch may not)."""
        buckets = hashlib.sha256(repr(self.buckets).encode()).hexdigest()[:16]
        return {
            "num_examples": self.num_examples,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "buckets": buckets,
        }

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def samples_seen(self, steps: int) -> int:
        """How many samples the first ``steps`` optimizer steps train on."""
        full_epochs, rest = divmod(steps, self.steps_per_epoch)
        partial = sum(len(batch.example_indices) for batch in self.order(full_epochs)[:rest])
        return full_epochs * self.num_examples + partial

    def short_batches(self, total_steps: int) -> int:
        """Steps of the first ``total_steps`` that train on fewer than ``global_batch``."""
        full_epochs, rest = divmod(total_steps, self.steps_per_epoch)
        last = self.order(full_epochs)[:rest] if rest else []
        partial = sum(1 for batch in last if len(batch.example_indices) < self.global_batch)
        return full_epochs * self.short_batches_per_epoch + partial

    @functools.lru_cache(maxsize=2)  # noqa: B019 - plans are few and immutable
    def order(self, epoch: int) -> list[GlobalBatch]:
        """The global batches of ``epoch``, in training order."""
        batches = []
        for (width, height), members in self.examples_by_bucket.items():
            generator = torch.Generator().manual_seed(
                _seed_of("order", self.seed, epoch, width, height)
            )
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator)]
            batches += [
                shuffled[start : start + self.global_batch]
                for start in range(0, len(shuffled), self.global_batch)
            ]
        generator = torch.Generator().manual_seed(_seed_of("batches", self.seed, epoch))
        ordered, position = [], 0
        for index in torch.randperm(len(batches), generator=generator).tolist():
            ordered.append(GlobalBatch(position, tuple(batches[index])))
            position += len(batches[index])
        return ordered

    def step_samples(self, step: int) -> int:
        """How many samples optimizer step ``step`` trains on (less than ``global_batch`` for a
        bucket's remainder)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return len(self.order(epoch)[index].example_indices)

    def micro_batches(self, step: int, rank: int) -> list[list[Sample]]:
        """The samples of process ``rank`` for each of its micro-steps of optimizer step
        ``step``. A short batch leaves some micro-steps empty: they are skipped, except that
        with several processes the last one (where gradients are all-reduced) gets a stand-in
        sample that counts for nothing."""
        epoch, index = divmod(step, self.steps_per_epoch)
        batch = self.order(epoch)[index]
        micro_batches = []
        for micro_step in range(self.accumulation_steps):
            first = (micro_step * self.num_processes + rank) * self.batch_size
            members = batch.example_indices[first : first + self.batch_size]
            micro_batches.append(
                [
                    Sample(example_index, epoch, batch.first_position + first + offset)
                    for offset, example_index in enumerate(members)
                ]
            )
        if self.num_processes > 1 and not micro_batches[-1]:
            stand_in = Sample(batch.example_indices[0], epoch, batch.first_position, counts=False)
            micro_batches[-1] = [stand_in]
        return [samples for samples in micro_batches if samples]


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------- random draws


@dataclass(frozen=True)
class Draws:
    """Every random choice for one sample."""

    flip: bool
    crop_position: tuple[float, float]  # where a random crop sits: fractions of the free space
    caption_seed: int
    timestep: int
    latent_noise: torch.Tensor  # samples the VAE's latent distribution
    noise: torch.Tensor  # the diffusion noise, noise offset included


def draw(
    config: TrainConfig, sample: Sample, example: Example, latent_shape: tuple[int, ...]
) -> Draws:
    """The draws of ``sample``: a pure function of the seed, the epoch and the position."""
    generator = torch.Generator().manual_seed(
        _seed_of("sample", config.seed, sample.epoch, sample.position)
    )
    flip = (
        bool(torch.rand((), generator=generator) < 0.5) and config.flip_aug and example.mirrorable
    )
    crop_x, crop_y = torch.rand(2, generator=generator).tolist()
    caption_seed = int(torch.randint(0, 2**62, (), generator=generator))
    timestep = int(torch.randint(config.min_timestep, config.max_timestep, (), generator=generator))
    latent_noise = torch.randn(latent_shape, generator=generator)
    noise = torch.randn(latent_shape, generator=generator)
    if config.noise_offset:
        offset = torch.randn((latent_shape[0], 1, 1), generator=generator)
        noise = noise + config.noise_offset * offset
    return Draws(flip, (crop_x, crop_y), caption_seed, timestep, latent_noise, noise)


def validation_noise(example: Example, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed noise of a held-out image: seeded by its id alone."""
    generator = torch.Generator().manual_seed(_seed_of("validation", example.id))
    return torch.randn(latent_shape, generator=generator)


# --------------------------------------------------------------------------- captions and pixels


def training_caption(
    caption: str,
    *,
    flip: bool,
    shuffle: bool,
    keep_tokens: int,
    dropout_rate: float,
    seed: int,
) -> str:
    """The caption a sample trains with: left/right swapped for a mirrored image, parts after
    the first ``keep_tokens`` shuffled, or empty with probability ``dropout_rate``."""
    rng = random.Random(seed)
    if dropout_rate and rng.random() < dropout_rate:
        return ""
    if flip:
        caption = swap_left_right(caption)
    if shuffle:
        parts = split_caption(caption)
        kept, rest = parts[:keep_tokens], parts[keep_tokens:]
        rng.shuffle(rest)
        caption = ", ".join(kept + rest)
    return caption


def load_pixels(
    path: Path, bucket: Size, *, flip: bool, crop_position: tuple[float, float] | None
) -> torch.Tensor:
    """The image as a (3, height, width) tensor in [-1, 1] for its ``bucket``: scaled to cover
    it and cropped by what is left over, at the centre (``crop_position`` None) or at that
    position (fractions of the free space)."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    box = source_box(image.size, bucket, crop_position)
    image = image.resize(bucket, Image.Resampling.LANCZOS, box=box)
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
