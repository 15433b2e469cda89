"""Choosing ingest's keepers from what pass 1 learned: the sizes a LoRA can train on, then
one image of each set of exact duplicates (same pixels) and of near duplicates (perceptual
hashes at most ``near_dup_distance`` bits apart)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import TYPE_CHECKING

from lorapipe.ingestion.decoding import PHASH_BITS, Decoded
from lorapipe.ingestion.drops import (
    EXACT_DUPLICATE,
    EXTREME_ASPECT,
    NEAR_DUPLICATE,
    TOO_SMALL,
    Drop,
)

if TYPE_CHECKING:
    from lorapipe.stages.ingest import IngestConfig

NEAR_DUPLICATE_RULE = (
    " (kept: one the quality audit does not flag, then the larger, or of equal size the"
    " captioned or first-named)"
)


def usable(
    decoded: list[tuple[str, Decoded]], config: IngestConfig
) -> tuple[list[tuple[str, Decoded]], list[Drop]]:
    """The decoded files of a usable size, and a drop for every other one."""
    usable: list[tuple[str, Decoded]] = []
    drops: list[Drop] = []
    for name, result in decoded:
        drop = unusable(name, result, config)
        if drop:
            drops.append(drop)
        else:
            usable.append((name, result))
    return usable, drops


def choose(
    usable: list[tuple[str, Decoded]], distance: int, captioned: set[str], flagged: set[str]
) -> tuple[list[str], list[Drop]]:
    """The names to keep (sorted) and a drop for every duplicate.

    Of duplicates, exact or near, one the quality audit does not flag is kept, then the image
    with the most pixels, then one that metadata.csv captions, then the first by name; a
    duplicate names its final keeper."""

    def preference(item: tuple[str, Decoded]) -> tuple[bool, int, bool, str]:
        name, result = item
        return (name in flagged, -result.pixels, name not in captioned, name)

    drops: list[Drop] = []
    by_pixels: dict[str, list[tuple[str, Decoded]]] = defaultdict(list)
    for name, result in usable:
        by_pixels[result.sha256].append((name, result))

    unique: list[tuple[str, Decoded]] = []
    exact: list[tuple[str, str]] = []  # (duplicate, kept)
    for group in by_pixels.values():
        keeper, *copies = sorted(group, key=preference)
        unique.append(keeper)
        exact += [(name, keeper[0]) for name, _ in copies]

    index = NearDuplicateIndex(distance)
    replaced_by: dict[str, str] = {}
    for name, result in sorted(unique, key=preference):
        match = index.find(result.phash)
        if match:
            kept, distance = match
            replaced_by[name] = kept
            detail = f"perceptual hash {distance} bits from {kept}" + NEAR_DUPLICATE_RULE
            drops.append(Drop(name, NEAR_DUPLICATE, detail, kept))
        else:
            index.add(result.phash, name)
    for name, kept in exact:
        final = replaced_by.get(kept, kept)
        drops.append(Drop(name, EXACT_DUPLICATE, f"same pixels as {kept}", final))
    kept_names = sorted(name for name, _ in unique if name not in replaced_by)
    return kept_names, drops


def unusable(name: str, result: Decoded, config: IngestConfig) -> Drop | None:
    """The drop for a file that failed to decode or has the wrong size, or None."""
    if result.reason:
        return Drop(name, result.reason, result.detail)
    size = f"{result.width}x{result.height}"
    short, long = sorted((result.width, result.height))
    if short < config.min_size:
        return Drop(name, TOO_SMALL, f"{size}: shorter side {short} < min_size {config.min_size}")
    if long / short > config.max_aspect:
        ratio = long / short
        return Drop(
            name, EXTREME_ASPECT, f"{size}: aspect {ratio:.2f} > max_aspect {config.max_aspect:g}"
        )
    return None


class NearDuplicateIndex:
    """Kept perceptual hashes, searchable within ``distance`` bits without comparing with every
    kept image: the 64 bits are cut into ``distance + 1`` blocks, and two hashes that close
    agree on at least one whole block (pigeonhole), so only hashes sharing a block are compared.
    """

    def __init__(self, distance: int) -> None:
        self.distance = distance
        blocks = distance + 1
        edges = [round(i * PHASH_BITS / blocks) for i in range(blocks + 1)]
        self._blocks = list(itertools.pairwise(edges))
        self._buckets: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
        self._count = 0

    def _keys(self, phash: int) -> list[tuple[int, int]]:
        return [(lo, (phash >> lo) & ((1 << (hi - lo)) - 1)) for lo, hi in self._blocks]

    def add(self, phash: int, name: str) -> None:
        for key in self._keys(phash):
            self._buckets[key].append((self._count, phash, name))
        self._count += 1

    def find(self, phash: int) -> tuple[str, int] | None:
        """(name, distance) of the earliest added hash within ``distance`` bits, or None."""
        matches = [
            (order, name, (phash ^ kept).bit_count())
            for key in self._keys(phash)
            for order, kept, name in self._buckets.get(key, ())
            if (phash ^ kept).bit_count() <= self.distance
        ]
        if not matches:
            return None
        _, name, distance = min(matches)
        return name, distance
