"""Choosing ingest's keepers: one image of each set of exact duplicates (same pixels) and of
near duplicates (perceptual hashes within the distance), preferring an unflagged one, then the
larger, then the captioned, then the first by name; a duplicate names its final keeper."""

from __future__ import annotations

import random

from lorapipe.ingestion.choosing import NearDuplicateIndex, choose
from lorapipe.ingestion.decoding import Decoded


def _decoded(sha: str, phash: int, side: int = 600) -> Decoded:
    return Decoded(width=side, height=side, sha256=sha, phash=phash)


def test_the_index_finds_the_earliest_hash_within_the_distance_as_a_full_scan_would() -> None:
    rng = random.Random(0)
    kept = [rng.getrandbits(64) for _ in range(300)]
    index = NearDuplicateIndex(distance=6)
    for position, phash in enumerate(kept):
        index.add(phash, f"image-{position}")
    for probe in [*kept[:50], *(rng.getrandbits(64) for _ in range(50))]:
        flipped = probe ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64))
        near = [(i, (flipped ^ h).bit_count()) for i, h in enumerate(kept)]
        expected = next(((f"image-{i}", d) for i, d in near if d <= 6), None)
        assert index.find(flipped) == expected


def test_exact_duplicates_keep_the_larger_then_the_captioned_then_the_first_name() -> None:
    found = [
        ("a.png", _decoded("same", 1)),
        ("b.png", _decoded("same", 1)),
        ("c.png", _decoded("same", 1)),
    ]
    kept, drops = choose(found, distance=6, captioned={"b.png"}, flagged=set())
    assert kept == ["b.png"]
    assert {(d.file, d.reason, d.kept) for d in drops} == {
        ("a.png", "exact_duplicate", "b.png"),
        ("c.png", "exact_duplicate", "b.png"),
    }


def test_a_near_duplicate_unflagged_wins_over_a_larger_flagged_one() -> None:
    found = [
        ("big.jpg", _decoded("x", 0b1111, side=1200)),
        ("small.jpg", _decoded("y", 0b1110, side=600)),
    ]
    kept, drops = choose(found, distance=6, captioned=set(), flagged={"big.jpg"})
    assert kept == ["small.jpg"]
    (drop,) = drops
    assert (drop.file, drop.reason, drop.kept) == ("big.jpg", "near_duplicate", "small.jpg")
    assert drop.detail.startswith("perceptual hash 1 bits from small.jpg")


def test_an_exact_copy_of_a_near_duplicate_names_the_final_keeper() -> None:
    found = [
        ("a_copy.png", _decoded("small", 0b1)),
        ("b_original.png", _decoded("small", 0b1)),
        ("large.png", _decoded("large", 0b11, side=1000)),
    ]
    kept, drops = choose(found, distance=6, captioned=set(), flagged=set())
    assert kept == ["large.png"]
    # the pair's keeper (first by name) is the near duplicate; the other names large.png too
    assert {d.file: (d.reason, d.kept) for d in drops} == {
        "a_copy.png": ("near_duplicate", "large.png"),
        "b_original.png": ("exact_duplicate", "large.png"),
    }
