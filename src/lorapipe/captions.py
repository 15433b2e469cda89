"""Tags and captions: how lorapipe spells a tag, builds a caption and mirrors one.

A caption is a comma-separated list of tags (or phrases), the way kohya sd-scripts and
lora-scripts read ``metadata.csv``. The same rules apply to tags from DeepDanbooru and to
hand-written captions, because one concept spelled two ways (``long_hair`` / ``Long Hair``)
teaches the LoRA two words where it should learn one:

1. ``normalize_tag``: underscores to spaces (except in kaomoji such as ``^_^``), lower case,
   single spaces. CLIP's tokenizer lower-cases text anyway, so nothing is lost.
2. ``TagRules``: an alias map to one spelling, then a blacklist of glob patterns for tags that
   say nothing about the pixels (``rating:*``, ``highres``, ``commentary request``...). The
   rules also name the defect tags (``watermark``, ``* text``...) and the style groups
   (``photo``, ``painting``...) that ``lorapipe.tag_audit`` flags images by. Defaults live in
   ``lorapipe/data/tag_rules.yaml``.
3. Duplicates dropped, scored tags ordered by score.

``swap_left_right`` rewrites a caption for a mirrored image.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import yaml

from lorapipe.errors import ConfigError

MERGE_POLICIES = ("keep", "append", "replace")
DEFAULT_TAG_RULES = "lorapipe/data/tag_rules.yaml"
RULE_KEYS = ("aliases", "blacklist", "defects", "styles")

# A tag with no run of two letters or digits is a kaomoji (^_^, o_o, >_<): its underscore is
# part of the face, not a word separator.
_WORD = re.compile(r"[^\W_]{2,}")
# left/right (and leftmost, rightward...) as whole words: not glued to another letter or
# digit, so "bright", "leftover" and "copyright" stay as they are; "left_hand" still swaps.
_LEFT_RIGHT = re.compile(r"(?<![^\W_])(left|right)(most|wards?)?(?![^\W_])", re.IGNORECASE)


def normalize_tag(tag: str) -> str:
    """``Long_Hair `` -> ``long hair``; kaomoji like ``^_^`` keep their underscores."""
    tag = tag.strip().lower()
    if _WORD.search(tag):
        tag = tag.replace("_", " ")
    return " ".join(tag.split())


def split_caption(caption: str) -> list[str]:
    """The comma-separated parts of a caption, stripped, empty parts dropped."""
    return [part.strip() for part in caption.split(",") if part.strip()]


def matching_pattern(tag: str, patterns: Iterable[str]) -> str | None:
    """The first glob pattern (``asymmetrical *``) that matches the whole normalized tag."""
    tag = normalize_tag(tag)
    return next((p for p in patterns if fnmatch.fnmatchcase(tag, normalize_tag(p))), None)


def find_mention(text: str, patterns: Iterable[str]) -> tuple[str, str] | None:
    """``(phrase, pattern)`` for the first pattern that occurs in free text as whole words.

    For hand-written captions, where "a watermark in the corner" must count as ``watermark``.
    A ``*`` stands for any text within one comma-separated part.
    """
    for part in split_caption(text):
        part = normalize_tag(part)
        for pattern in patterns:
            found = _phrase_regex(normalize_tag(pattern)).search(part)
            if found:
                return found.group(0), pattern
    return None


def _phrase_regex(pattern: str) -> re.Pattern[str]:
    pieces = [re.escape(piece) for piece in pattern.split("*")]
    body = ".*?".join(pieces)
    if len(pieces) > 1 and not pieces[0]:
        # A leading * stands for the word the mention starts with ("english text" for
        # "* text"), not for all the text before it, which the leftmost match would give
        # ("a sign with english text"). The same texts match either way.
        body = r"\S*" + ".*?".join(pieces[1:])
    return re.compile(rf"(?<![^\W_]){body}(?![^\W_])")


@dataclass(frozen=True)
class TagRules:
    """How tags are spelled and which say what about an image.

    ``aliases`` (normalized spelling -> canonical spelling) and ``blacklist`` (glob patterns)
    decide the caption tags; ``defects`` (glob patterns) and ``styles`` (style group -> glob
    patterns) decide which images the tag stage flags (``lorapipe.tag_audit``).
    """

    aliases: Mapping[str, str]
    blacklist: tuple[str, ...]
    defects: tuple[str, ...] = ()
    styles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def default(cls) -> TagRules:
        """The packaged rules, ``lorapipe/data/tag_rules.yaml``."""
        text = (resources.files("lorapipe") / "data" / "tag_rules.yaml").read_text("utf-8")
        return cls.parse(text, DEFAULT_TAG_RULES)

    @classmethod
    def parse(cls, text: str, source: str) -> TagRules:
        """Rules from YAML text with the keys ``aliases`` (a mapping), ``blacklist`` and
        ``defects`` (lists) and ``styles`` (a mapping of lists). The text replaces the
        defaults: a key it leaves out is empty, so a rules file written before ``defects``
        and ``styles`` existed still loads (and flags nothing)."""
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{source}{where}: not valid YAML; fix the syntax there") from None
        document = {} if document is None else document
        if not isinstance(document, dict):
            raise ConfigError(f"{source}: expected a mapping with the keys {_quoted(RULE_KEYS)}")
        unknown = sorted(str(key) for key in set(document) - set(RULE_KEYS))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key '{unknown[0]}'; the keys are {_quoted(RULE_KEYS)}"
            )
        aliases = document.get("aliases") or {}
        styles = document.get("styles") or {}
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
        ):
            raise ConfigError(
                f"{source}: 'aliases' must map tag to tag, e.g. 'blond hair: blonde hair'"
            )
        if not isinstance(styles, dict) or not all(
            isinstance(group, str) and group.strip() and _is_patterns(patterns)
            for group, patterns in styles.items()
        ):
            raise ConfigError(
                f"{source}: 'styles' must map a style name to a list of tags or glob patterns, "
                "e.g. 'painting: [traditional media, \"* (medium)\"]'"
            )
        blacklist = document.get("blacklist") or []
        defects = document.get("defects") or []
        for key, patterns in (("blacklist", blacklist), ("defects", defects)):
            if not _is_patterns(patterns):
                raise ConfigError(f"{source}: '{key}' must be a list of tags or glob patterns")
        return cls(
            aliases={normalize_tag(k): normalize_tag(v) for k, v in aliases.items()},
            blacklist=_patterns(blacklist),
            defects=_patterns(defects),
            styles={" ".join(group.split()): _patterns(tags) for group, tags in styles.items()},
        )

    def with_blacklist(self, patterns: Iterable[str]) -> TagRules:
        """These rules with more blacklist patterns."""
        return replace(self, blacklist=self.blacklist + _patterns(patterns))

    def spell(self, tag: str) -> str:
        """The tag normalized and aliased (the blacklist not applied)."""
        tag = normalize_tag(tag)
        return self.aliases.get(tag, tag)

    def canonical(self, tag: str) -> str | None:
        """The tag normalized and aliased, or ``None`` when it is empty or blacklisted."""
        tag = self.spell(tag)
        if not tag or matching_pattern(tag, self.blacklist):
            return None
        return tag

    def clean(self, tags: Iterable[str]) -> list[str]:
        """Canonical tags in their given order, blacklisted and repeated ones dropped."""
        return _unique(t for t in map(self.canonical, tags) if t is not None)

    def spell_scored(self, scored: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
        """Normalized, aliased ``(tag, score)`` pairs, best score first, a repeat keeping its
        best score; blacklisted tags included (the defect and style audit reads them)."""
        best: dict[str, float] = {}
        for tag, score in sorted(scored, key=lambda pair: -pair[1]):
            spelled = self.spell(tag)
            if spelled:
                best.setdefault(spelled, score)
        return list(best.items())

    def clean_scored(self, scored: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
        """Canonical ``(tag, score)`` pairs, best score first; a repeat keeps its best score."""
        return [
            (tag, score)
            for tag, score in self.spell_scored(scored)
            if not matching_pattern(tag, self.blacklist)
        ]

    def defect_pattern(self, tag: str) -> str | None:
        """The ``defects`` pattern a tag (as ``spell`` gives it) matches, or ``None``."""
        return matching_pattern(tag, self.defects)

    def style_group(self, tag: str) -> str | None:
        """The first style group with a pattern a tag (as ``spell`` gives it) matches, or
        ``None``."""
        return next(
            (g for g, patterns in self.styles.items() if matching_pattern(tag, patterns)), None
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "aliases": dict(self.aliases),
            "blacklist": list(self.blacklist),
            "defects": list(self.defects),
            "styles": {group: list(patterns) for group, patterns in self.styles.items()},
        }


def _is_patterns(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(p, str) for p in value)


def _patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    return tuple(normalize_tag(p) for p in patterns)


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def merge_tags(hand_tags: Sequence[str], auto_tags: Sequence[str], policy: str) -> list[str]:
    """Combine a hand-written caption's tags with auto tags.

    ``keep``: the hand caption when it has any tags, else the auto tags. ``append``: the hand
    caption, then the auto tags it does not already have. ``replace``: the auto tags only.
    """
    if policy == "keep":
        return list(hand_tags) if hand_tags else list(auto_tags)
    if policy == "append":
        return _unique([*hand_tags, *auto_tags])
    if policy == "replace":
        return list(auto_tags)
    raise ConfigError(f"merge policy '{policy}' is unknown; use one of {', '.join(MERGE_POLICIES)}")


def build_caption(
    tags: Sequence[str], *, trigger_word: str = "", keep_tags: Sequence[str] = ()
) -> str:
    """``trigger, keep tags (those present, in the given order), other tags`` joined by ", ".

    The trigger word is written exactly as given (``sks_style`` keeps its underscore) and is
    never repeated when the tags already contain it.
    """
    trigger = " ".join(trigger_word.split())
    present = set(tags)
    leading = [t for t in _unique(map(normalize_tag, keep_tags)) if t in present]
    rest = [t for t in tags if t not in leading]
    caption = [trigger] if trigger else []
    caption += [t for t in _unique([*leading, *rest]) if t != normalize_tag(trigger)]
    return ", ".join(caption)


def swap_left_right(text: str) -> str:
    """Swap ``left`` and ``right`` for a mirrored image, keeping case: ``Left Hand`` ->
    ``Right Hand``, ``LEFT`` -> ``RIGHT``, ``leftmost`` -> ``rightmost``. Words that only
    contain them (``bright``, ``leftover``) are untouched."""
    return _LEFT_RIGHT.sub(_swapped, text)


def _swapped(match: re.Match[str]) -> str:
    word, suffix = match.group(1), match.group(2) or ""
    other = "right" if word.lower() == "left" else "left"
    if word.isupper():
        other = other.upper()
    elif word[0].isupper():
        other = other.capitalize()
    return other + suffix


def _unique(tags: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(tags))
