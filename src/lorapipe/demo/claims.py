"""What ``make run`` must show, measured on its outputs: each claim a number and a threshold.

The demo runs on the procedural world (``lorapipe.demo.inputs``), where everything has a ground
truth, so the pipeline's effects are measured rather than eyeballed:

- ingest drops exactly the planted bad files;
- the tagger's tags match the world's ground-truth tags on the demo images, which it never saw
  (micro F1);
- the LoRA learned the style: the mean ``world.style_score`` of the generated images at LoRA
  scale 0.8 is well above scale 0 (the base model), and it rises with the scale;
- selection picked a checkpoint near the validation minimum;
- bucketed training keeps the portrait scenes' top and bottom: over the portrait buckets, the
  crop removes at most ``MAX_PORTRAIT_CROP`` of the pixels (a square crop would remove a third);
- the article's negative preset measurably lowers the blur and watermark statistics of the
  generated images compared with an empty negative prompt, image pair by image pair (the
  watermark on the LoRA trained as scraped, where the negative is the only remedy);
- cleaning the data lowers the watermark rate at least as much as that negative preset does:
  the LoRA trained on the cleaned captions (the tag stage's ``defects: caption``) against the
  one trained on the captions as scraped (``defects: report``), same seeds, at LoRA scale 1.0.

The thresholds are set below what the committed world model measures (README, "What the demo
shows"), with room for thread-order noise, and far above what a model that learned nothing
reaches. The run report (``lorapipe.report``) shows the measured claims in its last section.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from lorapipe.checkpoint_layout import TRAINING_REPORT_NAME, find_checkpoints, read_record
from lorapipe.dataset import read_records
from lorapipe.demo import world
from lorapipe.demo.inputs import PLANTED_FILES
from lorapipe.demo.world_tagger import micro_f1

MIN_TAGGER_F1 = 0.8
STYLE_SCALE = 0.8
MIN_STYLE_GAIN = 0.5  # style_score at STYLE_SCALE minus at scale 0; a styled render is ~2
STYLE_SATURATION = 0.1  # above STYLE_SCALE the score may fall this share of its value there
# the negative preset's mean paired drop of a defect statistic, in standard errors
MIN_DROP_IN_SE = 3.0
NEGATIVE_PRESET, EMPTY_PRESET = "landscape", "none"
# the share of a portrait's pixels bucketed training may crop; square training crops 1/3 of 2:3
MAX_PORTRAIT_CROP = 0.05
# an image carries the watermark when its watermark_score is above this (clean renders: ~0)
WATERMARK_PRESENT = 0.1
CLEANING_SCALE = 1.0  # the LoRA scale at which cleaning and the negative preset are compared


@dataclass(frozen=True)
class Claim:
    """One thing the demo shows, as measured."""

    claim: str
    measured: str
    threshold: str
    passed: bool

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} {self.claim}: {self.measured} (needs {self.threshold})"


@dataclass(frozen=True)
class RunOutputs:
    """Where one pipeline run left what the claims read."""

    ingest_report: Path  # ingest's report.json
    tagged_dataset: Path | None  # the tag stage's dataset; None when it did not run
    training: Path  # the train stage's output (checkpoint_layout, training_report.json)
    selection_report: Path  # select's report.json
    generated: Path  # generate's output directory (index.parquet, images/)
    truth: Path  # the demo folder's ground truth (inputs.truth_file)
    # generate's output of the same run with the captions as scraped (defects: report);
    # None when the demo ran without that comparison
    scraped_generated: Path | None = None


def check_run(outputs: RunOutputs) -> list[Claim]:
    """Every claim, in pipeline order."""
    truth = json.loads(outputs.truth.read_text(encoding="utf-8"))
    index = pq.read_table(outputs.generated / "index.parquet").to_pylist()
    claims = [check_ingest(json.loads(outputs.ingest_report.read_text()), set(truth))]
    if outputs.tagged_dataset is not None:
        claims.append(check_tagger(outputs.tagged_dataset, truth))
    claims.append(check_style(index, outputs.generated))
    claims.append(
        check_selection(outputs.training, json.loads(outputs.selection_report.read_text()))
    )
    training_report = outputs.training / TRAINING_REPORT_NAME
    claims.append(check_portrait_crop(json.loads(training_report.read_text(encoding="utf-8"))))
    if outputs.scraped_generated is None:
        claims += check_negatives(index, outputs.generated)
        return claims
    scraped_index = pq.read_table(outputs.scraped_generated / "index.parquet").to_pylist()
    blur, _ = check_negatives(index, outputs.generated)
    _, watermark = check_negatives(scraped_index, outputs.scraped_generated)
    cleaning = check_cleaning(index, outputs.generated, scraped_index, outputs.scraped_generated)
    return [*claims, blur, watermark, cleaning]


def check_ingest(report: dict[str, Any], scene_files: set[str]) -> Claim:
    """The planted files, and nothing else, are dropped."""
    dropped = {entry["file"]: entry["reason"] for entry in report["dropped_files"]}
    lost_scenes = sorted(scene_files & set(dropped))
    planted_dropped = [name for name in PLANTED_FILES if name in dropped]
    measured = ", ".join(f"{name} ({dropped[name]})" for name in planted_dropped) or "none"
    if lost_scenes:
        measured += f"; also dropped {', '.join(lost_scenes)}"
    return Claim(
        "ingest drops the planted bad files",
        f"dropped {measured}",
        f"all {len(PLANTED_FILES)} planted files and no scene dropped",
        len(planted_dropped) == len(PLANTED_FILES) and not lost_scenes,
    )


def check_tagger(tagged_dataset: Path, truth: dict[str, Any]) -> Claim:
    """Micro F1 of the tag stage's tags against the ground truth, over the demo images."""
    predicted, expected = [], []
    for record in read_records(str(tagged_dataset), columns=["source", "tags"]):
        if record.source in truth:
            predicted.append(record.tags)
            expected.append(truth[record.source]["tags"])
    f1 = micro_f1(predicted, expected)
    return Claim(
        "the tagger finds the ground-truth tags on images it never saw",
        f"micro F1 {f1:.3f} over {len(predicted)} images",
        f">= {MIN_TAGGER_F1}",
        f1 >= MIN_TAGGER_F1,
    )


def check_style(index: list[dict[str, Any]], generated: Path) -> Claim:
    """The style score by LoRA scale: well above the base model at ``STYLE_SCALE``, rising up
    to it; above it the style has saturated, and the score may not fall by more than
    ``STYLE_SATURATION`` of its value at ``STYLE_SCALE``."""
    by_scale = _mean_by(index, generated, "lora_scale", world.style_score)
    scales = sorted(by_scale)
    up_to = [scale for scale in scales if scale <= STYLE_SCALE]
    rising = all(by_scale[a] < by_scale[b] for a, b in itertools.pairwise(up_to))
    at_scale = by_scale.get(STYLE_SCALE, float("nan"))
    rising = rising and all(
        by_scale[scale] >= (1 - STYLE_SATURATION) * at_scale
        for scale in scales
        if scale > STYLE_SCALE
    )
    gain = by_scale.get(STYLE_SCALE, float("nan")) - by_scale.get(0.0, float("nan"))
    curve = " -> ".join(f"{by_scale[scale]:.2f} ({scale:g})" for scale in scales)
    return Claim(
        "the LoRA learned the style",
        f"style score by LoRA scale {curve}",
        f"scale {STYLE_SCALE:g} at least {MIN_STYLE_GAIN} above scale 0, rising up to it and "
        f"above it within {STYLE_SATURATION:.0%} of it",
        bool(gain >= MIN_STYLE_GAIN) and rising,
    )


def check_selection(training: Path, selection: dict[str, Any]) -> Claim:
    """The chosen checkpoint's validation loss, as training recorded it, is within the
    selection epsilon of the lowest one training recorded."""
    val_loss_by_step = {
        record["step"]: record["val_loss"]
        for found in find_checkpoints(str(training))
        for record in map(read_record, found.values())
    }
    best_step = min(val_loss_by_step, key=val_loss_by_step.__getitem__)
    chosen_step = selection["chosen"]["step"]
    excess = val_loss_by_step[chosen_step] / val_loss_by_step[best_step] - 1.0
    curve = ", ".join(f"{loss:.4f} ({step})" for step, loss in sorted(val_loss_by_step.items()))
    return Claim(
        "selection picks a checkpoint near the validation minimum",
        f"step {chosen_step} chosen, {excess:.2%} above the minimum at step {best_step}; "
        f"validation loss by step {curve}",
        f"<= {selection['epsilon']:.0%} above the minimum",
        excess <= selection["epsilon"] + 1e-9,
    )


def check_portrait_crop(training_report: dict[str, Any]) -> Claim:
    """Over the portrait buckets (height above width) of ``training_report.json``, the mean
    share of pixels the crop removes, weighted by the buckets' images, is at most
    ``MAX_PORTRAIT_CROP``. The measurement also gives what square training (a centre crop of
    the short side) would have removed of the same images: the top and bottom bucketing keeps.
    Without a portrait bucket (``enable_bucket: false`` trains one square) it fails."""
    claim, threshold = (
        "the portrait scenes keep their top and bottom",
        f"at most {MAX_PORTRAIT_CROP:.0%}",
    )
    buckets = training_report.get("buckets", [])
    portrait = [b for b in buckets if b["resolution"][1] > b["resolution"][0] and b["images"]]
    if not portrait:
        if not training_report.get("enable_bucket"):
            measured = "no portrait bucket: training ran without buckets (enable_bucket false)"
        else:
            measured = f"no portrait bucket among the buckets {_bucket_sizes(buckets)}"
        return Claim(claim, measured, threshold, False)
    images = sum(bucket["images"] for bucket in portrait)
    cropped, square_cropped = (
        sum(bucket["images"] * bucket[key] for bucket in portrait) / images
        for key in ("mean_crop_fraction", "square_crop_fraction")
    )
    return Claim(
        claim,
        f"{cropped:.1%} of pixels cropped (square training: {square_cropped:.1%}) over "
        f"{images} images in the portrait buckets {_bucket_sizes(portrait)}",
        threshold,
        cropped <= MAX_PORTRAIT_CROP,
    )


def _bucket_sizes(buckets: list[dict[str, Any]]) -> str:
    """The buckets' resolutions as ``48x72, 64x64``."""
    return ", ".join(f"{width}x{height}" for width, height in (b["resolution"] for b in buckets))


def check_negatives(index: list[dict[str, Any]], generated: Path) -> list[Claim]:
    """Blur and watermark statistics with the negative preset against the empty negative,
    paired image by image (same prompt, LoRA scale, CFG and seed), over the cells whose
    negative prompt names the defect (the preset's rules leave a term out at some LoRA
    scales) and where the statistic can tell in both images (``world.blur_score`` is nan
    without an object edge). "Measurably lower" means the mean paired drop is at least
    ``MIN_DROP_IN_SE`` standard errors: a defect that only some images show moves the mean
    little, so a relative threshold would reward noise as readily as an effect."""
    pairs: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in index:
        pairs.setdefault(_cell(row), {})[row["negative_preset"]] = row
    claims = []
    for term, statistic in (("blurry", world.blur_score), ("watermark", world.watermark_score)):
        named = [
            pair
            for pair in pairs.values()
            if EMPTY_PRESET in pair
            and NEGATIVE_PRESET in pair
            and term in pair[NEGATIVE_PRESET]["negative_prompt"]
        ]
        with_term = np.array(
            [_score(pair[NEGATIVE_PRESET], generated, statistic) for pair in named]
        )
        empty = np.array([_score(pair[EMPTY_PRESET], generated, statistic) for pair in named])
        measurable = ~(np.isnan(with_term) | np.isnan(empty))
        with_term, empty = with_term[measurable], empty[measurable]
        drop_in_se = _mean_drop_in_standard_errors(empty - with_term)
        unmeasurable = len(named) - len(with_term)
        left_out = f" ({unmeasurable} where it cannot tell left out)" if unmeasurable else ""
        claims.append(
            Claim(
                f'the negative preset "{NEGATIVE_PRESET}" lowers {term} output',
                f"mean {statistic.__name__} {with_term.mean():.3f} with it, {empty.mean():.3f} "
                f"with an empty negative: a paired drop of {drop_in_se:.1f} standard errors "
                f"over {len(with_term)} image pairs{left_out}",
                f">= {MIN_DROP_IN_SE:g} standard errors",
                drop_in_se >= MIN_DROP_IN_SE,
            )
        )
    return claims


def check_cleaning(
    cleaned_index: list[dict[str, Any]],
    cleaned: Path,
    scraped_index: list[dict[str, Any]],
    scraped: Path,
) -> Claim:
    """The article's lesson, measured: at LoRA scale ``CLEANING_SCALE``, per grid cell (same
    prompt, CFG and seed), whether each image carries the watermark, for the LoRA trained on
    the captions as scraped with an empty negative and with the preset, and for the LoRA
    trained on the cleaned captions with an empty negative. It holds when cleaning lowers the
    watermark rate measurably (a paired drop of at least ``MIN_DROP_IN_SE`` standard errors,
    as the negative claims need) and at least as much as the preset does (the cleaned rate
    with no negative is not above the scraped rate with the preset)."""

    def present(index: list[dict[str, Any]], generated: Path, preset: str) -> dict:
        return {
            _cell(row): _score(row, generated, world.watermark_score) > WATERMARK_PRESENT
            for row in index
            if row["lora_scale"] == CLEANING_SCALE and row["negative_preset"] == preset
        }

    scraped_empty = present(scraped_index, scraped, EMPTY_PRESET)
    scraped_preset = present(scraped_index, scraped, NEGATIVE_PRESET)
    cleaned_empty = present(cleaned_index, cleaned, EMPTY_PRESET)
    cleaned_preset = present(cleaned_index, cleaned, NEGATIVE_PRESET)
    cells = sorted(set(scraped_empty) & set(scraped_preset) & set(cleaned_empty), key=repr)
    claim = f'cleaning the data lowers the watermark rate at least as much as "{NEGATIVE_PRESET}"'
    threshold = (
        f"cleaning's paired drop >= {MIN_DROP_IN_SE:g} standard errors, and its rate no higher "
        "than the scraped LoRA's with the preset"
    )
    if len(cells) < 2:
        return Claim(
            claim, f"{len(cells)} comparable images at scale {CLEANING_SCALE:g}", threshold, False
        )

    def rate(marked: dict) -> np.ndarray:
        return np.array([float(marked[cell]) for cell in cells])

    as_scraped, patched, cleaned_rate = (
        rate(scraped_empty),
        rate(scraped_preset),
        rate(cleaned_empty),
    )
    cleaning_drop = _mean_drop_in_standard_errors(as_scraped - cleaned_rate)
    advantage = _mean_drop_in_standard_errors(patched - cleaned_rate)
    both = [cell for cell in cells if cell in cleaned_preset]
    cleaned_and_patched = (
        f", cleaned with the preset {sum(cleaned_preset[cell] for cell in both)} of {len(both)}"
        if both
        else ""
    )
    count = len(cells)
    return Claim(
        claim,
        f"at LoRA scale {CLEANING_SCALE:g}, watermarked images: as scraped "
        f"{int(as_scraped.sum())} of {count}, as scraped with the preset {int(patched.sum())}, "
        f"cleaned {int(cleaned_rate.sum())}{cleaned_and_patched}; cleaning's paired drop "
        f"{cleaning_drop:.1f} standard errors, its lead over the preset "
        f"{int(patched.sum() - cleaned_rate.sum())} images ({advantage:.1f} standard errors)",
        threshold,
        bool(cleaning_drop >= MIN_DROP_IN_SE) and cleaned_rate.sum() <= patched.sum(),
    )


def _cell(row: dict[str, Any]) -> tuple[Any, ...]:
    """The grid cell of a generated image, all but its negative preset."""
    return row["prompt_index"], row["lora_scale"], row["cfg_scale"], row["seed"]


def _score(
    row: dict[str, Any], generated: Path, statistic: Callable[[Image.Image], float]
) -> float:
    with Image.open(generated / row["file"]) as image:
        return statistic(image)


def _mean_drop_in_standard_errors(drops: np.ndarray) -> float:
    """The mean of ``drops`` over its standard error (a paired t statistic); infinite when
    every pair drops by the same amount, nan with fewer than two pairs."""
    if len(drops) < 2:
        return float("nan")
    standard_error = float(drops.std(ddof=1) / np.sqrt(len(drops)))
    if standard_error == 0:
        return float(np.sign(drops.mean()) * np.inf)
    return float(drops.mean()) / standard_error


def _mean_by(
    rows: Iterable[dict[str, Any]],
    generated: Path,
    key: str,
    statistic: Callable[[Image.Image], float],
) -> dict[Any, float]:
    """Mean of ``statistic`` over the images of ``rows``, grouped by ``row[key]``."""
    values: dict[Any, list[float]] = {}
    for row in rows:
        values.setdefault(row[key], []).append(_score(row, generated, statistic))
    return {group: float(np.mean(scores)) for group, scores in values.items()}
