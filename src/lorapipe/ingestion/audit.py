"""ingest's quality audit over a run: the measures of every usable image, the flags of the
keepers, what ``quality: report|drop`` does with them, and where their thumbnails went."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorapipe import quality as image_quality
from lorapipe.dataset import DatasetWriter
from lorapipe.ingestion.decoding import Decoded
from lorapipe.ingestion.drops import Drop
from lorapipe.thumbnails import thumbnail_name

if TYPE_CHECKING:
    from lorapipe.stages.ingest import IngestConfig

QUALITY_REPORT, QUALITY_DROP = "report", "drop"


@dataclass
class Audit:
    """The quality audit of a run: the measures of every usable image, the flags of those
    that survive deduplication, what was done with them and where their thumbnails went."""

    thresholds: image_quality.Thresholds
    action: str
    measures: dict[str, image_quality.Measures]  # every usable image that could be measured
    median_focus: float | None  # of those; None for a set too small to compare with
    flags: dict[str, list[image_quality.Flag]]  # flagged images only
    ids: dict[str, str]  # record id of each flagged image, naming its thumbnail
    audited: int = 0  # measured images among the keepers
    dropped: set[str] = field(default_factory=set)
    thumbnails: dict[str, str] = field(default_factory=dict)  # written, relative to the dataset

    @classmethod
    def of(cls, usable: list[tuple[str, Decoded]], config: IngestConfig) -> Audit:
        thresholds = config.thresholds()
        measures = {name: result.measures for name, result in usable if result.measures}
        median = image_quality.set_median_focus([found.focus for found in measures.values()])
        flags = {
            name: found
            for name, measured in measures.items()
            if (found := image_quality.verdict(measured, thresholds, median))
        }
        ids = {name: result.sha256[:16] for name, result in usable if name in flags}
        return cls(thresholds, config.quality, measures, median, flags, ids)

    def settle(self, kept: list[str]) -> tuple[list[str], list[Drop]]:
        """The keepers after the audit, and its drops (with ``drop``). Only keepers keep their
        flags: a duplicate is reported as a duplicate, not for its quality."""
        self.audited = sum(name in self.measures for name in kept)
        self.flags = {name: self.flags[name] for name in kept if name in self.flags}
        if self.action != QUALITY_DROP:
            return kept, []
        self.dropped = set(self.flags)
        drops = [
            Drop(name, flags[0].code, "; ".join(flag.detail for flag in flags))
            for name, flags in self.flags.items()
        ]
        return [name for name in kept if name not in self.dropped], drops

    def write_thumbnail(self, writer: DatasetWriter, name: str, jpeg: bytes) -> None:
        path = thumbnail_name(self.ids[name])
        writer.write_extra(path, jpeg)
        self.thumbnails[name] = path
