"""``lorapipe tag``: DeepDanbooru tags and a training caption for every image of a dataset.

The tagger is a DeepDanbooru project folder (local or s3://) as the DeepDanbooru releases
ship it: ``project.json``, ``model-<model>.h5`` or ``.keras`` (``<model>`` is project.json's
``"model"``), ``tags.txt`` with one tag per model output, and optionally
``tags-general.txt`` / ``tags-character.txt`` (used to label tags in the report). It needs the
``tagger`` extra (TensorFlow + deepdanbooru), imported only when this stage runs.

For each image: scores from the model, tags at or above ``threshold`` normalized by the tag
rules (``lorapipe.captions``), best ``max_tags`` kept; the hand-written caption (split on
commas) normalized by the same rules and merged with the tags (``merge``); the trigger word
and ``keep_tags`` put first.

Output (a dataset directory, local or s3://): the input dataset with ``tags``, ``tag_scores``
and ``caption`` filled and every other column unchanged; ``metadata.csv`` (``filename,text``
as lora-scripts reads it); ``report.json`` / ``report.md`` with the tag frequencies that later
become the LoRA's ``ss_tag_frequency``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from lorapipe import config as config_options
from lorapipe import store
from lorapipe.captions import (
    DEFAULT_TAG_RULES,
    MERGE_POLICIES,
    TagRules,
    build_caption,
    merge_tags,
    normalize_tag,
    split_caption,
)
from lorapipe.config import Where, option
from lorapipe.dataset import DatasetWriter, ImageRecord, count_rows, decode_image, read_records
from lorapipe.errors import ConfigError, DatasetError, ModelError, ObjectNotFoundError
from lorapipe.metadata_csv import METADATA_CSV, MetadataWriter

log = logging.getLogger(__name__)

FILE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
TAG_CATEGORY_FILES = {"general": "tags-general.txt", "character": "tags-character.txt"}
# DeepDanbooru's own default input size, for a model whose input shape leaves it open
DEFAULT_INPUT_SIZE = 299
REPORT_TABLE_ROWS = 50


@dataclass
class TagConfig:
    """How ``lorapipe tag`` tags images and builds captions."""

    COMMAND: ClassVar[str] = "tag"

    project: str = option(
        help="DeepDanbooru project folder (local or `s3://`): project.json, model-*.h5/.keras, "
        "tags.txt",
        aliases=("tagger_uri",),
    )
    threshold: float = option(
        0.5, help="a tag is kept when the model's score is at least this (DeepDanbooru's default)"
    )
    max_tags: int = option(
        30, help="at most this many auto tags per image, best first (CLIP reads ~30)", minimum=1
    )
    batch_size: int = option(16, help="images per model call", minimum=1)
    trigger_word: str = option(
        "", help='written first in every caption, exactly as given (e.g. "sks_style")'
    )
    keep_tags: tuple[str, ...] = option(
        (),
        help="tags moved to the front of a caption (after the trigger word) when the image has "
        'them, comma-separated (e.g. "1girl, solo")',
    )
    merge: str = option(
        "keep",
        help="with a hand-written caption: `keep` it (tags only where there is none), `append` "
        "the new tags to it, or `replace` it with the tags",
        choices=MERGE_POLICIES,
        aliases=("caption_merge",),
    )
    tag_rules: str | None = option(
        None,
        help="YAML file with aliases and blacklist (local or `s3://`)",
        default_text=f"lorapipe's own {DEFAULT_TAG_RULES}",
    )
    extra_blacklist: tuple[str, ...] = option(
        (),
        help="blacklist tags or glob patterns added to the rules', comma-separated (e.g. "
        '"simple background, *_focus")',
    )

    def validate(self, where: Where | None = None) -> None:
        where = where or (lambda key: key)
        if not self.project:
            raise ConfigError("project is empty; give the DeepDanbooru project folder")
        if not (math.isfinite(self.threshold) and 0 < self.threshold <= 1):
            raise ConfigError(f"{where('threshold')} {self.threshold} must be in (0, 1], e.g. 0.5")
        if self.max_tags < 1:
            raise ConfigError(f"{where('max_tags')} {self.max_tags} must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"{where('batch_size')} {self.batch_size} must be at least 1")
        if self.merge not in MERGE_POLICIES:
            raise ConfigError(
                f"{where('merge')} '{self.merge}' is unknown; use one of {', '.join(MERGE_POLICIES)}"
            )


def run(dataset_uri: str, output_uri: str, config: TagConfig) -> dict:
    """Tag every image of ``dataset_uri`` and write the captioned dataset, ``metadata.csv`` and
    the report to ``output_uri``; return the report."""
    config.validate()
    rules = _tag_rules(config)
    total = count_rows(dataset_uri)
    if total == 0:
        raise DatasetError(f"dataset '{dataset_uri}' has no images; run lorapipe ingest first")
    tagger = DeepDanbooruTagger.load(config.project, threshold=config.threshold)
    stats = _TagStats()

    with DatasetWriter(output_uri) as writer:
        with (
            MetadataWriter(writer.extra_file(METADATA_CSV)) as metadata,
            tqdm(total=total, desc="tag", unit="image", disable=None) as progress,
        ):
            records = read_records(dataset_uri, batch_rows=config.batch_size)
            for batch in _batches(records, config.batch_size):
                scores = tagger.predict([decode_image(record) for record in batch])
                for record, image_scores in zip(batch, scores, strict=True):
                    tagged = _tag_record(record, tagger.scored_tags(image_scores), rules, config)
                    writer.write(tagged)
                    metadata.write(metadata_filename(tagged), tagged.caption)
                    stats.add(record, tagged)
                progress.update(len(batch))
        report = _report(dataset_uri, output_uri, config, rules, tagger, stats)
        writer.write_extra("report.json", json.dumps(report, indent=2) + "\n")
        writer.write_extra("report.md", render_markdown(report))
    log.info(
        "tagged %d images (%d distinct tags); wrote %s",
        stats.rows,
        len(stats.tag_frequency),
        output_uri,
    )
    return report


def _tag_rules(config: TagConfig) -> TagRules:
    rules = (
        TagRules.parse(store.read_text(config.tag_rules), config.tag_rules)
        if config.tag_rules
        else TagRules.default()
    )
    return rules.with_blacklist(config.extra_blacklist)


def _tag_record(
    record: ImageRecord, scored: Sequence[tuple[str, float]], rules: TagRules, config: TagConfig
) -> ImageRecord:
    """The record with the model's clean tags, their scores and the merged caption."""
    auto = rules.clean_scored(scored)[: config.max_tags]
    auto_tags = [tag for tag, _ in auto]
    hand_tags = rules.clean(split_caption(record.caption))
    caption = build_caption(
        merge_tags(hand_tags, auto_tags, config.merge),
        trigger_word=config.trigger_word,
        # spelled like the tags they must match: "1 girl" leads a caption that has "1girl"
        keep_tags=rules.clean(config.keep_tags),
    )
    return dataclasses.replace(
        record, tags=auto_tags, tag_scores=[score for _, score in auto], caption=caption
    )


def metadata_filename(record: ImageRecord) -> str:
    """The image's name in metadata.csv: its source file, or ``<id>.<ext>`` for an image that
    has none (a mirrored copy shares its original's source, so it gets its id)."""
    if record.source and not record.flipped:
        return record.source
    return f"{record.id}.{FILE_EXTENSIONS.get(record.format, record.format)}"


def _batches(records: Iterable[ImageRecord], size: int) -> Iterator[list[ImageRecord]]:
    iterator = iter(records)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# --------------------------------------------------------------------------- the tagger


@dataclass
class DeepDanbooruTagger:
    """A loaded DeepDanbooru model and the tag of each of its outputs."""

    model: Any  # a Keras model: images (n, height, width, 3) in [0, 1] -> scores (n, tags)
    tags: list[str]
    width: int
    height: int
    threshold: float = 0.5
    # normalized tag -> "general" / "character", from tags-general.txt / tags-character.txt
    categories: dict[str, str] = field(default_factory=dict)
    model_file: str = ""

    @classmethod
    def load(cls, project_uri: str, *, threshold: float = 0.5) -> DeepDanbooruTagger:
        """Load a project folder (local or s3://), checking its files before TensorFlow starts."""
        with contextlib.ExitStack() as stack:
            try:
                project_dir = stack.enter_context(store.local_dir(project_uri))
            except ObjectNotFoundError:
                raise ModelError(
                    f"DeepDanbooru project '{project_uri}' not found; give the folder (local or "
                    "s3://) that holds project.json, model-*.h5 and tags.txt"
                ) from None
            project = _read_project_json(project_dir, project_uri)
            model_path = _model_path(project_dir, project, project_uri)
            if not (project_dir / "tags.txt").is_file():
                raise ModelError(
                    f"DeepDanbooru project '{project_uri}' has no tags.txt; copy the tags.txt "
                    "that came with the model into the folder"
                )
            dd = _import_deepdanbooru()
            try:
                model = dd.project.load_model_from_project(str(project_dir), compile_model=False)
            except Exception as error:  # Keras raises ValueError, OSError, TypeError...
                raise ModelError(
                    f"{store.join(project_uri, model_path.name)}: Keras cannot load it "
                    f"({_first_line(error)}); give a DeepDanbooru model saved by Keras"
                ) from error
            tags = dd.project.load_tags_from_project(str(project_dir))
            # spelled as in captions, where the report looks them up ("long_hair" -> "long hair")
            categories = {
                normalize_tag(tag): category
                for category, name in TAG_CATEGORY_FILES.items()
                if (project_dir / name).is_file()
                for tag in dd.data.load_tags(str(project_dir / name))
            }

        outputs = model.output_shape[-1]
        if outputs != len(tags):
            raise ModelError(
                f"{store.join(project_uri, 'tags.txt')}: has {len(tags)} tags but "
                f"{model_path.name} outputs {outputs} scores; use the tags.txt that came "
                "with the model"
            )
        _, height, width, _ = model.input_shape
        return cls(
            model=model,
            tags=tags,
            width=width or int(project.get("image_width", DEFAULT_INPUT_SIZE)),
            height=height or int(project.get("image_height", DEFAULT_INPUT_SIZE)),
            threshold=threshold,
            categories=categories,
            model_file=model_path.name,
        )

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Scores in [0, 1], one row per image and one column per tag."""
        batch = np.stack([self.model_input(image) for image in images]).astype(np.float32)
        return np.asarray(self.model(batch, training=False))

    def model_input(self, image: Image.Image) -> np.ndarray:
        """The image as DeepDanbooru feeds it (``deepdanbooru.data.load_image_for_evaluate``):
        area-resized to fit the model input, centered and edge-padded, values in [0, 1].

        Images are decoded by Pillow rather than that function, which handles only PNG and
        WebP (the latter through tensorflow-io, whose kernels do not load with TF 2.21)."""
        import deepdanbooru as dd
        import tensorflow as tf

        resized = tf.image.resize(
            np.asarray(image.convert("RGB")),
            size=(self.height, self.width),
            method=tf.image.ResizeMethod.AREA,
            preserve_aspect_ratio=True,
        ).numpy()
        return dd.image.transform_and_pad_image(resized, self.width, self.height) / 255.0

    def scored_tags(self, scores: np.ndarray) -> list[tuple[str, float]]:
        """``(tag, score)`` for every output at or above the threshold."""
        return [
            (tag, float(score))
            for tag, score in zip(self.tags, scores, strict=True)
            if score >= self.threshold
        ]


def _import_deepdanbooru() -> Any:
    """deepdanbooru (and with it TensorFlow), or a ModelError saying how to install them."""
    try:
        # deepdanbooru's __init__ turns off every Python warning for the whole process and
        # imports tensorflow-io, which warns about plugins it cannot load: keep both local.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import deepdanbooru
    except ImportError as error:
        raise ModelError(
            f"the tag stage needs TensorFlow and deepdanbooru ({error.name or error} is not "
            "installed); pip install 'lorapipe[tagger]'"
        ) from error
    return deepdanbooru


def _read_project_json(project_dir: Path, project_uri: str) -> dict[str, Any]:
    path = project_dir / "project.json"
    where = store.join(project_uri, "project.json")
    if not path.is_file():
        raise ModelError(
            f"DeepDanbooru project '{project_uri}' has no project.json; give the folder that "
            "holds project.json, model-*.h5 and tags.txt"
        )
    try:
        project = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{where}: not valid JSON ({_first_line(error)})") from None
    if not isinstance(project, dict) or not isinstance(project.get("model"), str):
        raise ModelError(
            f'{where}: has no "model" name; DeepDanbooru loads model-<model>.h5 by it, e.g. '
            '"model": "resnet_custom_v3"'
        )
    return project


def _model_path(project_dir: Path, project: dict[str, Any], project_uri: str) -> Path:
    """``model-<model>.keras`` or ``.h5``, the names ``load_model_from_project`` looks for."""
    stem = f"model-{project['model']}"
    for suffix in (".keras", ".h5"):
        if (project_dir / f"{stem}{suffix}").is_file():
            return project_dir / f"{stem}{suffix}"
    found = sorted(p.name for p in project_dir.iterdir() if p.suffix in (".h5", ".keras"))
    hint = (
        f'found {", ".join(found)}: rename it or set project.json\'s "model" to match'
        if found
        else "copy the model file into the folder"
    )
    raise ModelError(
        f"DeepDanbooru project '{project_uri}' has no {stem}.h5 or {stem}.keras; {hint}"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


# --------------------------------------------------------------------------- report


@dataclass
class _TagStats:
    rows: int = 0
    tag_frequency: Counter[str] = field(default_factory=Counter)
    hand_captions: int = 0
    auto_tag_count: int = 0
    untagged: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)

    def add(self, original: ImageRecord, tagged: ImageRecord) -> None:
        self.rows += 1
        name = original.source or original.id
        self.hand_captions += bool(split_caption(original.caption))
        self.auto_tag_count += len(tagged.tags)
        if not tagged.tags:
            self.untagged.append(name)
        if not tagged.caption:
            self.empty_captions.append(name)
        self.tag_frequency.update(split_caption(tagged.caption))


def _report(
    dataset_uri: str,
    output_uri: str,
    config: TagConfig,
    rules: TagRules,
    tagger: DeepDanbooruTagger,
    stats: _TagStats,
) -> dict[str, Any]:
    frequency = dict(sorted(stats.tag_frequency.items(), key=lambda item: (-item[1], item[0])))
    return {
        "stage": "tag",
        "dataset": dataset_uri,
        "output": output_uri,
        "config": asdict(config),
        "tag_rules": config.tag_rules or DEFAULT_TAG_RULES,
        "blacklist": list(rules.blacklist),
        "model": {
            "file": tagger.model_file,
            "tags": len(tagger.tags),
            "input_size": [tagger.width, tagger.height],
        },
        "rows": stats.rows,
        "hand_captions": stats.hand_captions,
        "mean_auto_tags": round(stats.auto_tag_count / stats.rows, 2),
        "untagged": stats.untagged,
        "empty_captions": stats.empty_captions,
        "tag_frequency": frequency,
        "tag_categories": {t: tagger.categories[t] for t in frequency if t in tagger.categories},
        "files": {"metadata_csv": METADATA_CSV, "report": "report.md"},
    }


def render_markdown(report: dict[str, Any]) -> str:
    """A short human summary: counts, warnings and the most frequent caption tags."""
    config = report["config"]
    lines = [
        "# lorapipe tag",
        "",
        f"- dataset: `{report['dataset']}` -> `{report['output']}`",
        f"- model: `{report['model']['file']}` ({report['model']['tags']} tags, input "
        f"{report['model']['input_size'][0]}x{report['model']['input_size'][1]}), "
        f"threshold {config['threshold']}, at most {config['max_tags']} tags",
        f"- images: {report['rows']}, with a hand-written caption: {report['hand_captions']} "
        f"(merge: {config['merge']}), auto tags per image: {report['mean_auto_tags']}",
        f"- trigger word: `{config['trigger_word'] or '(none)'}`",
        f"- tag rules: `{report['tag_rules']}`; captions exported to `metadata.csv`",
    ]
    for key, what in (("untagged", "no tag above the threshold"), ("empty_captions", "empty")):
        if report[key]:
            lines.append(f"- **{len(report[key])} images {what}**: {', '.join(report[key][:20])}")
    frequency = report["tag_frequency"]
    lines += [
        "",
        f"## Caption tags ({len(frequency)} distinct; all in report.json)",
        "",
        "| tag | images | category |",
        "| --- | ---: | --- |",
    ]
    for tag, count in itertools.islice(frequency.items(), REPORT_TABLE_ROWS):
        category = report["tag_categories"].get(tag, "")
        cell = tag.replace("|", "\\|")
        lines.append(f"| {cell} | {count} | {category} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the KFP UI shows for a tagging."""
    return {"images_tagged": report["rows"], "distinct_tags": len(report["tag_frequency"])}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="input dataset (local or s3://)")
    parser.add_argument("--out", required=True, help="output dataset (local or s3://)")
    parser.add_argument("--config", help="YAML file of the options below")
    config_options.add_arguments(parser, TagConfig)


def main(args: argparse.Namespace) -> int:
    config = config_options.load(
        TagConfig, args.config, config_options.overrides_from_args(args, TagConfig)
    )
    report = run(args.dataset, args.out, config)
    top = ", ".join(itertools.islice(report["tag_frequency"], 10))
    print(f"tagged {report['rows']} images; most frequent tags: {top}")
    print(f"wrote {args.out} with {METADATA_CSV} and report.md")
    return 0
