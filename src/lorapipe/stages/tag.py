"""``lorapipe tag``: DeepDanbooru tags and a training caption for every image of a dataset.

The tagger is a DeepDanbooru project folder (local or s3://) as the DeepDanbooru releases
ship it: ``project.json``, ``model-<model>.h5`` or ``.keras`` (``<model>`` is project.json's
``"model"``), ``tags.txt`` with one tag per model output, and optionally
``tags-general.txt`` / ``tags-character.txt`` (used to label tags in the report). It needs the
``tagger`` extra (TensorFlow + deepdanbooru), imported only when this stage runs.

For each image: scores from the model, tags at or above ``threshold`` normalized by the tag
rules (``lorapipe.captions``), best ``max_tags`` kept; the hand-written caption (split on
commas) normalized by the same rules and merged with the tags (``merge``); the trigger word
and ``keep_tags`` put first. Images whose tags name a defect or an off-set style are flagged
and captioned, dropped or only reported (``defects``; ``lorapipe.tag_audit``).

The off-style check needs the whole set's tags, so the stage reads the dataset twice: once to
run the model (keeping only each image's best tags, never its pixels), once to write it.

Output (a dataset directory, local or s3://): the input dataset with ``tags``, ``tag_scores``
and ``caption`` filled and every other column unchanged (less the dropped images);
``metadata.csv`` (``filename,text`` as lora-scripts reads it); ``report.json`` / ``report.md``
with the tag frequencies that later become the LoRA's ``ss_tag_frequency`` and the audit;
``flagged/<id>.jpg``, a thumbnail of every flagged image.
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
    find_mention,
    merge_tags,
    normalize_tag,
    split_caption,
)
from lorapipe.config import Where, option
from lorapipe.dataset import (
    DatasetWriter,
    ImageRecord,
    count_rows,
    decode_image,
    is_dataset,
    read_records,
)
from lorapipe.errors import ConfigError, DatasetError, ModelError, ObjectNotFoundError
from lorapipe.metadata_csv import METADATA_CSV, MetadataWriter
from lorapipe.tag_audit import DEFECT_POLICIES, AuditOutcome, TagAudit, Verdict, markdown_section
from lorapipe.thumbnails import THUMBNAIL_DIR, thumbnail_jpeg, thumbnail_name

log = logging.getLogger(__name__)

FILE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
TAG_CATEGORY_FILES = {"general": "tags-general.txt", "character": "tags-character.txt"}
# DeepDanbooru's own default input size, for a model whose input shape leaves it open
DEFAULT_INPUT_SIZE = 299
REPORT_TABLE_ROWS = 50
REPORT_FILES = ("report.json", "report.md")
# an image's tags with their scores, best first
ScoredTags = list[tuple[str, float]]


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
        help="YAML file with aliases, blacklist, defect tags and style groups (local or "
        "`s3://`); it replaces lorapipe's rules, a key it lacks is empty",
        default_text=f"lorapipe's own {DEFAULT_TAG_RULES}",
    )
    extra_blacklist: tuple[str, ...] = option(
        (),
        help="blacklist tags or glob patterns added to the rules', comma-separated (e.g. "
        '"simple background, *_focus")',
    )
    defects: str = option(
        "caption",
        help="images whose tags name a defect (watermark, text, signature...: the tag rules' "
        "`defects`) or a style unlike the set's (a painting in a photo set): `caption` writes "
        "those tags into their captions whatever `merge` says, so a negative prompt can "
        "remove them; `drop` leaves them out of the dataset; `report` only lists them",
        choices=DEFECT_POLICIES,
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
        if self.defects not in DEFECT_POLICIES:
            raise ConfigError(
                f"{where('defects')} '{self.defects}' is unknown; use one of "
                f"{', '.join(DEFECT_POLICIES)}"
            )


def run(dataset_uri: str, output_uri: str, config: TagConfig) -> dict:
    """Tag every image of ``dataset_uri`` and write the captioned dataset, ``metadata.csv``,
    the report and the flagged images' thumbnails to ``output_uri``; return the report.

    Raises DatasetError (after writing the report) when ``defects: drop`` drops every image.
    """
    config.validate()
    rules = _tag_rules(config)
    total = count_rows(dataset_uri)
    if total == 0:
        raise DatasetError(f"dataset '{dataset_uri}' has no images; run lorapipe ingest first")
    tagger = DeepDanbooruTagger.load(config.project, threshold=config.threshold)
    stats = _TagStats()
    audit = TagAudit(rules, config.defects)
    _remove_failed_report(output_uri)

    with DatasetWriter(output_uri) as writer:
        auto_tags = _tag_all(dataset_uri, tagger, rules, config, audit, stats, total)
        outcome = audit.decide()
        if outcome.kept:
            _write_all(dataset_uri, writer, auto_tags, outcome, rules, config, stats)
        report = _report(dataset_uri, output_uri, config, rules, tagger, stats, outcome)
        if outcome.kept:
            writer.write_extra("report.json", json.dumps(report, indent=2) + "\n")
            writer.write_extra("report.md", render_markdown(report))
        else:
            writer.abort()  # an empty dataset is never published

    if not outcome.kept:
        raise DatasetError(_nothing_kept(dataset_uri, output_uri, report, outcome))
    log.info(
        "tagged %d images (%d distinct tags, %d flagged, %d dropped); wrote %s",
        stats.images,
        len(stats.tag_frequency),
        len(outcome.flagged),
        stats.images - stats.rows,
        output_uri,
    )
    return report


def _tag_rules(config: TagConfig) -> TagRules:
    if not config.tag_rules:
        return TagRules.default().with_blacklist(config.extra_blacklist)
    rules = TagRules.parse(store.read_text(config.tag_rules), config.tag_rules)
    missing = [key for key in ("defects", "styles") if not getattr(rules, key)]
    if missing:
        log.warning(
            "%s has no %s: no image is flagged by them; copy them from lorapipe's own %s to "
            "flag watermarks, text and off-style images",
            config.tag_rules,
            " or ".join(f"'{key}'" for key in missing),
            DEFAULT_TAG_RULES,
        )
    return rules.with_blacklist(config.extra_blacklist)


def _tag_all(
    dataset_uri: str,
    tagger: DeepDanbooruTagger,
    rules: TagRules,
    config: TagConfig,
    audit: TagAudit,
    stats: _TagStats,
    total: int,
) -> list[tuple[str, ScoredTags]]:
    """The first pass: the model on every image; each image's auto tags (``(id, tags)``, in
    dataset order) returned, its findings added to the audit."""
    auto_tags: list[tuple[str, ScoredTags]] = []
    with tqdm(total=total, desc="tag", unit="image", disable=None) as progress:
        records = read_records(dataset_uri, batch_rows=config.batch_size)
        for batch in _batches(records, config.batch_size):
            scores = tagger.predict([decode_image(record) for record in batch])
            for record, image_scores in zip(batch, scores, strict=True):
                scored = tagger.scored_tags(image_scores)
                auto = rules.clean_scored(scored)[: config.max_tags]
                auto_tags.append((record.id, auto))
                audit.add(record.id, record.source or record.id, scored)
                stats.add_tagged(record, auto)
            progress.update(len(batch))
    return auto_tags


def _write_all(
    dataset_uri: str,
    writer: DatasetWriter,
    auto_tags: Sequence[tuple[str, ScoredTags]],
    outcome: AuditOutcome,
    rules: TagRules,
    config: TagConfig,
    stats: _TagStats,
) -> None:
    """The second pass: every image the audit keeps, captioned, into the dataset and
    ``metadata.csv``; a thumbnail of every flagged one beside them."""
    with (
        MetadataWriter(writer.extra_file(METADATA_CSV)) as metadata,
        tqdm(total=len(auto_tags), desc="write", unit="image", disable=None) as progress,
    ):
        pairs = zip(read_records(dataset_uri), auto_tags, outcome.verdicts, strict=True)
        for record, (record_id, auto), verdict in pairs:
            if record.id != record_id:
                raise DatasetError(
                    f"dataset '{dataset_uri}' changed while it was tagged (record "
                    f"{record_id!r} became {record.id!r}); tag it again"
                )
            if verdict.flagged:
                writer.write_extra(thumbnail_name(record.id), _thumbnail(record))
            if not verdict.dropped:
                tagged = _tag_record(record, auto, rules, config, verdict)
                writer.write(tagged)
                metadata.write(metadata_filename(tagged), tagged.caption)
                stats.add_written(record, tagged)
            progress.update(1)


def _tag_record(
    record: ImageRecord,
    auto: Sequence[tuple[str, float]],
    rules: TagRules,
    config: TagConfig,
    verdict: Verdict,
) -> ImageRecord:
    """The record with its auto tags, their scores and the merged caption; under ``defects:
    caption`` the caption also carries the image's defect (and off-style) tags, after its own
    ones, unless it already has or mentions them."""
    auto_tags = [tag for tag, _ in auto]
    hand_tags = rules.clean(split_caption(record.caption))
    tags = merge_tags(hand_tags, auto_tags, config.merge)
    for tag in verdict.caption_tags():
        if tag not in tags and not find_mention(", ".join(tags), [tag]):
            tags.append(tag)
    caption = build_caption(
        tags,
        trigger_word=config.trigger_word,
        # spelled like the tags they must match: "1 girl" leads a caption that has "1girl"
        keep_tags=rules.clean(config.keep_tags),
    )
    return dataclasses.replace(
        record, tags=auto_tags, tag_scores=[score for _, score in auto], caption=caption
    )


def _thumbnail(record: ImageRecord) -> bytes:
    return thumbnail_jpeg(decode_image(record))


def _nothing_kept(
    dataset_uri: str, output_uri: str, report: dict[str, Any], outcome: AuditOutcome
) -> str:
    """The error of a run that dropped every image. Its report (and thumbnails) go to the
    output folder when that holds no dataset; an older dataset there is left whole."""
    audit = report["audit"]
    summary = (
        f"defects: drop dropped every image of '{dataset_uri}' ({audit['images_flagged_defect']} "
        f"with defect tags, {audit['images_flagged_style']} off-style)"
    )
    hint = "or tag with defects: caption to keep them with the defect in their captions"
    if is_dataset(output_uri):
        return f"{summary}; the older dataset at {output_uri} is left as it was; {hint}"
    flagged = {verdict.id for verdict in outcome.flagged}
    for record in read_records(dataset_uri):
        if record.id in flagged:
            store.write_bytes(store.join(output_uri, thumbnail_name(record.id)), _thumbnail(record))
    store.write_text(store.join(output_uri, "report.json"), json.dumps(report, indent=2) + "\n")
    store.write_text(store.join(output_uri, "report.md"), render_markdown(report))
    return f"{summary}; see {store.join(output_uri, 'report.md')} for each and why, {hint}"


def _remove_failed_report(output_uri: str) -> None:
    """A run that dropped every image leaves only its report and thumbnails in the output
    folder; remove them, since a dataset is published only into an empty folder or over an
    older dataset."""
    base = output_uri.rstrip("/") + "/"
    found = {uri.removeprefix(base): uri for uri in store.list_uris(output_uri)}
    if found and all(
        name in REPORT_FILES or name.startswith(f"{THUMBNAIL_DIR}/") for name in found
    ):
        store.delete_many(list(found.values()))
        if not store.is_s3(output_uri):
            store.delete(store.join(output_uri, THUMBNAIL_DIR))  # the folder, now empty


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
    images: int = 0  # tagged
    hand_captions: int = 0
    auto_tag_count: int = 0
    untagged: list[str] = field(default_factory=list)
    rows: int = 0  # written to the output
    tag_frequency: Counter[str] = field(default_factory=Counter)
    empty_captions: list[str] = field(default_factory=list)

    def add_tagged(self, record: ImageRecord, auto: Sequence[tuple[str, float]]) -> None:
        self.images += 1
        self.hand_captions += bool(split_caption(record.caption))
        self.auto_tag_count += len(auto)
        if not auto:
            self.untagged.append(record.source or record.id)

    def add_written(self, original: ImageRecord, tagged: ImageRecord) -> None:
        self.rows += 1
        if not tagged.caption:
            self.empty_captions.append(original.source or original.id)
        self.tag_frequency.update(split_caption(tagged.caption))


def _report(
    dataset_uri: str,
    output_uri: str,
    config: TagConfig,
    rules: TagRules,
    tagger: DeepDanbooruTagger,
    stats: _TagStats,
    outcome: AuditOutcome,
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
        "images": stats.images,
        "rows": stats.rows,
        "hand_captions": stats.hand_captions,
        "mean_auto_tags": round(stats.auto_tag_count / stats.images, 2),
        "untagged": stats.untagged,
        "empty_captions": stats.empty_captions,
        "tag_frequency": frequency,
        "tag_categories": {t: tagger.categories[t] for t in frequency if t in tagger.categories},
        "audit": outcome.report(),
        "files": {"metadata_csv": METADATA_CSV, "report": "report.md", "thumbnails": THUMBNAIL_DIR},
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
        f"- images: {report['images']}, with a hand-written caption: {report['hand_captions']} "
        f"(merge: {config['merge']}), auto tags per image: {report['mean_auto_tags']}; "
        f"{report['rows']} in the output",
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
    lines += markdown_section(report["audit"])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the KFP UI shows for a tagging."""
    audit = report["audit"]
    return {
        "images_tagged": report["images"],
        "distinct_tags": len(report["tag_frequency"]),
        "images_flagged_defect": audit["images_flagged_defect"],
        "images_flagged_style": audit["images_flagged_style"],
        "images_dropped": audit["images_dropped"],
    }


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
    audit = report["audit"]
    print(f"tagged {report['images']} images; most frequent tags: {top}")
    print(
        f"flagged {audit['images_flagged_defect']} for defects and "
        f"{audit['images_flagged_style']} off-style (defects: {audit['policy']}); "
        f"{audit['images_dropped']} dropped, {report['rows']} in the output"
    )
    print(f"wrote {args.out} with {METADATA_CSV} and report.md")
    return 0
