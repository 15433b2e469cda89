"""Which images a mirror would falsify, read the same way by augment and by training's
``flip_aug``: text and asymmetric designs, by tag or by a caption's mention."""

from __future__ import annotations

import pytest

from lorapipe.dataset import ImageRecord
from lorapipe.flip_rules import ASYMMETRY_TAGS, DEFAULT_SKIP_TAGS, TEXT_TAGS, flip_blocker


def record(tags: list[str], caption: str = "") -> ImageRecord:
    return ImageRecord(
        id="a", image=b"", format="png", width=8, height=8, sha256="", caption=caption, tags=tags
    )


@pytest.mark.parametrize(
    ("tags", "caption", "reason"),
    [
        (["1girl", "signature"], "", "tag 'signature' matches 'signature'"),
        (["english text"], "", "tag 'english text' matches '* text'"),
        (["single earring"], "", "tag 'single earring' matches 'single earring'"),
        ([], "a street, a watermark in the corner", "caption mentions 'watermark'"),
    ],
)
def test_text_and_asymmetry_block_the_mirror(tags: list[str], caption: str, reason: str) -> None:
    blocker = flip_blocker(record(tags, caption), DEFAULT_SKIP_TAGS)
    assert blocker is not None and blocker.startswith(reason)


def test_an_ordinary_image_may_be_mirrored() -> None:
    assert flip_blocker(record(["1girl", "umbrella", "rain"], "a girl"), DEFAULT_SKIP_TAGS) is None


def test_the_default_list_is_text_then_asymmetry() -> None:
    assert DEFAULT_SKIP_TAGS == TEXT_TAGS + ASYMMETRY_TAGS
    assert flip_blocker(record(["signature"]), ASYMMETRY_TAGS) is None
