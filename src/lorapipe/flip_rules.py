"""When a horizontally mirrored copy of an image is wrong, by its tags and caption.

Text, logos and signatures come out backwards in a mirrored copy, and an asymmetric design (a
single earring, a side ponytail, heterochromia) would be learned both ways round.
``DEFAULT_SKIP_TAGS`` lists them as glob patterns (``TEXT_TAGS`` + ``ASYMMETRY_TAGS``);
``flip_blocker`` says why one image must not be mirrored. ``lorapipe augment`` reads the rule to
decide which images get a mirrored copy, and training (``flip_aug``) to decide which it may
mirror on the fly. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorapipe.captions import find_mention, matching_pattern

if TYPE_CHECKING:
    from lorapipe.dataset import ImageRecord

# Tags (glob patterns, Danbooru spelling) that make a mirrored copy wrong.
TEXT_TAGS = (
    "text",
    "* text",
    "text *",
    "*logo",
    "logo *",
    "*watermark",
    "signature",
    "artist name",
    "character name",
    "copyright name",
    "circle name",
    "*username",
    "web address",
    "dated",
    "numbered",
    "* writing",
    "speech bubble",
    "sound effects",
    "subtitled",
    "comic",
    "4koma",
    "clock",
    "* clock",
)
ASYMMETRY_TAGS = (
    "asymmetrical *",
    "mismatched *",
    "single glove",
    "single *glove",
    "single earring",
    "single thighhigh",
    "single kneehigh",
    "single sock",
    "single sleeve",
    "single detached sleeve",
    "single leg pantyhose",
    "single pauldron",
    "single gauntlet",
    "single wing",
    "single bare shoulder",
    "single mechanical arm",
    "side ponytail",
    "side braid",
    "side bun",
    "one side up",
    "hair over one eye",
    "eyepatch",
    "heterochromia",
    "mole under eye",
    "scar across eye",
)
DEFAULT_SKIP_TAGS = TEXT_TAGS + ASYMMETRY_TAGS


def flip_blocker(record: ImageRecord, patterns: Sequence[str]) -> str | None:
    """Why the image must not be mirrored (``tag 'signature' matches 'signature'``), or None.

    Tags are matched whole; the caption is searched for mentions, so a hand-written
    "a watermark in the corner" counts as well as the tag ``watermark``."""
    for tag in record.tags:
        pattern = matching_pattern(tag, patterns)
        if pattern:
            return f"tag '{tag}' matches '{pattern}'"
    mention = find_mention(record.caption, patterns)
    if mention:
        phrase, pattern = mention
        return f"caption mentions '{phrase}' (matches '{pattern}')"
    return None
