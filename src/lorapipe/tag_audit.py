"""The defect and style-outlier audit of ``lorapipe tag``: images a LoRA must not learn as is.

A LoRA learns whatever its images share. A watermark on a third of them that no caption
names is drawn on every prompt; a few paintings in a photo set pull every output toward brush
strokes. The tagger sees both, so the audit reads each image's tags: those at or above the
threshold, spelled by the tag rules (aliases applied) but before the blacklist and
``max_tags``, so a defect is found even where the caption would not carry its tag.

- **Defects**: tags matching the rules' ``defects`` patterns (``*watermark``, ``signature``,
  ``* text``, ``jpeg artifacts``, ``blurry``...).
- **Off style**: an image's style is the group (the rules' ``styles``: photo, painting,
  sketch...) of its best-scoring style tag, or none. An image whose style is not the set's
  most common, "no style tag" counting as a style, is off-style: a painting in a photo set,
  a photo in an anime set (where most images have no style tag). Styles tied for most common
  are all the majority, so a half-and-half set flags neither half.

The ``defects`` policy says what happens to a flagged image: ``caption`` writes its defect
tags (and an off-style image's style tags) into its caption whatever the merge policy, so the
LoRA ties the defect to the word and a negative prompt removes it; ``drop`` leaves it out of
the dataset; ``report`` only lists it.

The majority needs every image's tags, so :class:`TagAudit` collects a few tags per image
while tagging (never pixels) and :meth:`TagAudit.decide` judges them all at the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorapipe.captions import TagRules
from lorapipe.thumbnails import markdown_image, thumbnail_name

DEFECT_POLICIES = ("caption", "drop", "report")
ACTIONS = {"caption": "captioned", "drop": "dropped", "report": "reported"}
NO_STYLE = "no style tag"  # the style of an image with no tag in any style group, in reports

POLICY_SENTENCES = {
    "caption": "Policy `caption`: a flagged image stays, with its defect tags (and an "
    "off-style image's style tags) in its caption whatever `merge` says, so the LoRA ties "
    "the defect to its word and a negative prompt (`watermark, text`) removes it.",
    "drop": "Policy `drop`: flagged images are left out of the dataset and `metadata.csv`.",
    "report": "Policy `report`: flagged images are only listed here; their captions are as "
    "`merge` made them.",
}


@dataclass(frozen=True)
class Findings:
    """What one image's tags say about it: its defect tags and its style."""

    defects: tuple[tuple[str, float], ...] = ()  # (tag, score), best first
    style: str | None = None  # a style group of the rules; None: no tag in any group
    style_tags: tuple[str, ...] = ()  # the image's tags in that group, best first

    @classmethod
    def of(cls, scored: Iterable[tuple[str, float]], rules: TagRules) -> Findings:
        """The findings of the tagger's ``(tag, score)`` pairs (any spelling)."""
        spelled = rules.spell_scored(scored)
        defects = tuple((tag, score) for tag, score in spelled if rules.defect_pattern(tag))
        groups = [(tag, rules.style_group(tag)) for tag, _ in spelled]
        style = next((group for _, group in groups if group), None)
        style_tags = tuple(tag for tag, group in groups if style and group == style)
        return cls(defects, style, style_tags)


@dataclass(frozen=True)
class StyleCounts:
    """How many images of the set have each style (``None``: no style tag)."""

    counts: Mapping[str | None, int]  # most first, then by name
    total: int

    @classmethod
    def of(cls, styles: Iterable[str | None]) -> StyleCounts:
        counter = Counter(styles)
        order = sorted(counter.items(), key=lambda item: (-item[1], item[0] or ""))
        return cls(dict(order), sum(counter.values()))

    @property
    def majority(self) -> tuple[str | None, ...]:
        """The most common styles: one, or those tied for most common."""
        top = max(self.counts.values(), default=0)
        return tuple(style for style, count in self.counts.items() if count == top)

    def off_style(self, style: str | None) -> str | None:
        """Why an image of ``style`` is off the set's style, e.g. ``painting in a photo set
        (majority photo: 41 of 50)``; None for no style tag or a majority style."""
        majority = self.majority
        if style is None or style in majority:
            return None
        top = f"{self.counts[majority[0]]} of {self.total}" + (" each" if len(majority) > 1 else "")
        if majority == (None,):
            return f"{style} in a set mostly without a style tag ({NO_STYLE}: {top})"
        names = "/".join(style_label(name) for name in majority)
        return f"{style} in a {names} set (majority {names}: {top})"


def style_label(style: str | None) -> str:
    return NO_STYLE if style is None else style


@dataclass(frozen=True)
class Verdict:
    """The audit's decision on one image."""

    id: str
    file: str  # the image's source file, or its id where it has none
    findings: Findings
    off_style: str | None  # why it is off-style, or None
    policy: str

    @property
    def flagged(self) -> bool:
        return bool(self.findings.defects) or self.off_style is not None

    @property
    def action(self) -> str | None:
        """``captioned`` / ``dropped`` / ``reported`` for a flagged image, else None."""
        return ACTIONS[self.policy] if self.flagged else None

    @property
    def dropped(self) -> bool:
        return self.action == "dropped"

    def caption_tags(self) -> list[str]:
        """The tags its caption must carry under ``caption``: the defect tags, then an
        off-style image's style tags. Empty under the other policies."""
        if self.action != "captioned":
            return []
        style_tags = self.findings.style_tags if self.off_style else ()
        return [*(tag for tag, _ in self.findings.defects), *style_tags]

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "id": self.id,
            "defects": [
                {"tag": tag, "score": round(score, 4)} for tag, score in self.findings.defects
            ],
            "style": self.findings.style,
            "off_style": self.off_style,
            "action": self.action,
            "thumbnail": thumbnail_name(self.id),
        }


@dataclass
class TagAudit:
    """Collects each image's findings while the set is tagged; :meth:`decide` judges them."""

    rules: TagRules
    policy: str
    _images: list[tuple[str, str, Findings]] = field(default_factory=list, init=False)

    def add(self, record_id: str, file: str, scored: Iterable[tuple[str, float]]) -> None:
        self._images.append((record_id, file, Findings.of(scored, self.rules)))

    def decide(self) -> AuditOutcome:
        """Every image's verdict, in the order added, against the style majority of all."""
        styles = StyleCounts.of(findings.style for _, _, findings in self._images)
        verdicts = [
            Verdict(record_id, file, findings, styles.off_style(findings.style), self.policy)
            for record_id, file, findings in self._images
        ]
        return AuditOutcome(self.rules, self.policy, styles, verdicts)


@dataclass(frozen=True)
class AuditOutcome:
    """The verdicts on a whole set, and what the report says about them."""

    rules: TagRules
    policy: str
    styles: StyleCounts
    verdicts: Sequence[Verdict]  # one per image, in dataset order

    @property
    def flagged(self) -> list[Verdict]:
        return [verdict for verdict in self.verdicts if verdict.flagged]

    @property
    def kept(self) -> int:
        """Images that stay in the dataset."""
        return sum(not verdict.dropped for verdict in self.verdicts)

    def report(self) -> dict[str, Any]:
        """The ``audit`` section of report.json."""
        flagged = self.flagged
        defect_counts = Counter(tag for v in self.verdicts for tag, _ in v.findings.defects)
        return {
            "policy": self.policy,
            "defect_tags": list(self.rules.defects),
            "style_groups": {group: list(tags) for group, tags in self.rules.styles.items()},
            "style_counts": {style_label(s): n for s, n in self.styles.counts.items()},
            "majority_style": [style_label(s) for s in self.styles.majority],
            "defect_counts": dict(sorted(defect_counts.items(), key=lambda i: (-i[1], i[0]))),
            "images_flagged_defect": sum(bool(v.findings.defects) for v in flagged),
            "images_flagged_style": sum(v.off_style is not None for v in flagged),
            "images_dropped": sum(v.dropped for v in flagged),
            "flagged": [verdict.as_dict() for verdict in flagged],
        }


def markdown_section(audit: Mapping[str, Any]) -> list[str]:
    """The report.md section of an ``audit`` report: the policy, counts and a table of every
    flagged image with its thumbnail."""
    lines = ["", "## Defects and style outliers", "", POLICY_SENTENCES[audit["policy"]], ""]
    counts = ", ".join(f"{tag} {n}" for tag, n in audit["defect_counts"].items())
    if audit["defect_tags"]:
        checked = ", ".join(f"`{pattern}`" for pattern in audit["defect_tags"])
        lines.append(
            f"- defects: {audit['images_flagged_defect']} images"
            + (f" ({counts})" if counts else "")
            + f"; tags checked: {checked}"
        )
    else:
        lines.append("- defects: none checked (the tag rules have no `defects` list)")
    if audit["style_groups"]:
        styles = ", ".join(f"{style} {n}" for style, n in audit["style_counts"].items())
        lines.append(
            f"- styles: {styles}; the set's: {' / '.join(audit['majority_style'])}; "
            f"{audit['images_flagged_style']} images off-style"
        )
    else:
        lines.append("- styles: none checked (the tag rules have no `styles` groups)")
    if audit["policy"] == "drop":
        lines.append(f"- dropped: {audit['images_dropped']} images")
    if not audit["flagged"]:
        return [*lines, "", "No image is flagged."]
    lines += ["", "| image | file | flags | action |", "| --- | --- | --- | --- |"]
    for entry in audit["flagged"]:
        flags = [f"{d['tag']} ({d['score']:.2f})" for d in entry["defects"]]
        if entry["off_style"]:
            flags.append(entry["off_style"])
        text = (cell.replace("|", "\\|") for cell in (entry["file"], "; ".join(flags)))
        image = markdown_image(entry["thumbnail"], entry["file"])
        lines.append(f"| {image} | {' | '.join(text)} | {entry['action']} |")
    return lines
