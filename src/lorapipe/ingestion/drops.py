"""Why a file is not in the dataset: the reason codes of ingest's report, and one drop."""

from __future__ import annotations

from dataclasses import dataclass

from lorapipe import quality

UNSAFE_PATH = "unsafe_path"
ZERO_BYTE = "zero_byte"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
UNREADABLE = "unreadable"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
EXTREME_ASPECT = "extreme_aspect"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
# drops whose file is never decoded again, not even for a thumbnail
UNDECODABLE = {UNSAFE_PATH, ZERO_BYTE, NOT_AN_IMAGE, TRUNCATED, UNREADABLE, DECOMPRESSION_BOMB}
# in the order the report lists them
REASONS = (
    UNSAFE_PATH,
    ZERO_BYTE,
    NOT_AN_IMAGE,
    TRUNCATED,
    UNREADABLE,
    DECOMPRESSION_BOMB,
    TOO_SMALL,
    EXTREME_ASPECT,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    *quality.CODES,
)


@dataclass
class Drop:
    """A file that is not in the dataset, and why."""

    file: str
    reason: str
    detail: str
    kept: str | None = None  # for duplicates: the file kept instead
    thumbnail: str | None = None  # relative to the dataset, for a drop that decodes


def one_line(error: BaseException) -> str:
    """An exception's message on one line, for a drop's detail or an error."""
    return " ".join(str(error).split()) or type(error).__name__
