"""Tag spelling, tag rules, caption building and left/right mirroring of captions."""

from __future__ import annotations

import pytest

from lorapipe.captions import (
    TagRules,
    build_caption,
    find_mention,
    matching_pattern,
    merge_tags,
    normalize_tag,
    split_caption,
    swap_left_right,
)
from lorapipe.errors import ConfigError

# --------------------------------------------------------------------------- spelling


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("long_hair", "long hair"),
        ("  Long   Hair ", "long hair"),
        ("Hatsune_Miku_(Vocaloid)", "hatsune miku (vocaloid)"),
        ("rating:safe", "rating:safe"),
        ("1girl", "1girl"),
        ("^_^", "^_^"),
        ("o_o", "o_o"),
        (">_<", ">_<"),
        ("v_arms", "v arms"),
        (":D", ":d"),
        ("street photography\nin 1970s", "street photography in 1970s"),
    ],
)
def test_normalize_tag(raw: str, normalized: str) -> None:
    assert normalize_tag(raw) == normalized


def test_a_caption_splits_on_commas_and_drops_empty_parts() -> None:
    assert split_caption(" 1girl,solo , , long hair,") == ["1girl", "solo", "long hair"]
    assert split_caption("") == []


# --------------------------------------------------------------------------- rules


def test_the_default_rules_drop_ratings_and_post_metadata_but_keep_visible_tags() -> None:
    rules = TagRules.default()

    tags = [
        "rating:safe",
        "highres",
        "absurdres",
        "commentary_request",
        "english_commentary",
        "translated",
        "bad_pixiv_id",
        "has_bad_revision",
        "1girl",
        "lowres",
        "text",
    ]

    assert rules.clean(tags) == ["1girl", "lowres", "text"]


def test_the_default_aliases_give_hand_captions_danbooru_spelling() -> None:
    rules = TagRules.default()

    assert rules.clean(split_caption("1 Girl, Blond_Hair, smiling, gray eyes")) == [
        "1girl",
        "blonde hair",
        "smile",
        "grey eyes",
    ]


def test_rules_normalize_keys_values_and_patterns() -> None:
    rules = TagRules.parse(
        "aliases:\n  Kitty_Cat: Cat\nblacklist:\n  - 'watermark'\n  - 'Sample_*'\n", "rules.yaml"
    )

    assert rules.aliases == {"kitty cat": "cat"}
    assert rules.clean(["kitty cat", "Cat", "sample_watermark", "watermark", "dog"]) == [
        "cat",
        "dog",
    ]


def test_scored_tags_are_ordered_by_score_and_a_repeat_keeps_its_best_score() -> None:
    rules = TagRules(aliases={"gray hair": "grey hair"}, blacklist=("rating:*",))

    scored = [("solo", 0.6), ("grey_hair", 0.7), ("rating:safe", 0.99), ("gray hair", 0.9)]

    assert rules.clean_scored(scored) == [("grey hair", 0.9), ("solo", 0.6)]


def test_extra_blacklist_patterns_add_to_the_rules() -> None:
    rules = TagRules.default().with_blacklist(["simple_background", "*_focus"])

    assert rules.clean(["simple background", "male focus", "1boy", "rating:general"]) == ["1boy"]


def test_the_default_rules_name_defects_and_style_groups() -> None:
    """Spelled as DeepDanbooru's tags are once normalized; globs catch the variants."""
    rules = TagRules.default()

    defects = ["watermark", "sample_watermark", "english_text", "signature", "patreon_logo"]
    defects += ["twitter_username", "web_address", "jpeg_artifacts", "blurry", "white_border"]
    for tag in defects:
        assert rules.defect_pattern(rules.spell(tag)), tag
    for tag in ["blurry_background", "depth_of_field", "text_focus", "1girl", "film_grain"]:
        assert rules.defect_pattern(rules.spell(tag)) is None, tag
    assert [rules.style_group(rules.spell(t)) for t in ["photo_(medium)", "realistic"]] == [
        "photo",
        "photo",
    ]
    assert rules.style_group("traditional media") == "painting"
    assert rules.style_group("rough sketch") == "sketch"
    assert rules.style_group("3d") == "3d"
    assert rules.style_group("1girl") is None


def test_defects_and_styles_are_normalized_and_a_file_without_them_loads() -> None:
    rules = TagRules.parse(
        "defects:\n  - Sample_*\nstyles:\n  Photo  Set: [Photo_(Medium)]\n", "rules.yaml"
    )

    assert rules.defects == ("sample *",)
    assert rules.styles == {"Photo Set": ("photo (medium)",)}
    assert rules.defect_pattern("sample watermark") == "sample *"
    assert rules.style_group("photo (medium)") == "Photo Set"
    old = TagRules.parse("aliases:\n  a: b\nblacklist: [highres]\n", "old.yaml")
    assert (old.defects, old.styles) == ((), {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("aliases: [1, 2", "rules.yaml line 1: not valid YAML"),
        ("- just a list", "rules.yaml: expected a mapping"),
        (
            "alias:\n  a: b\n",
            "rules.yaml: unknown key 'alias'; the keys are 'aliases', 'blacklist', 'defects', "
            "'styles'",
        ),
        ("aliases:\n  - a\n", "rules.yaml: 'aliases' must map tag to tag"),
        ("blacklist: highres\n", "rules.yaml: 'blacklist' must be a list"),
        ("defects: watermark\n", "rules.yaml: 'defects' must be a list of tags"),
        ("defects: [watermark, 3]\n", "rules.yaml: 'defects' must be a list of tags"),
        ("styles: [photo]\n", "rules.yaml: 'styles' must map a style name to a list"),
        ("styles:\n  photo: realistic\n", "rules.yaml: 'styles' must map a style name"),
    ],
)
def test_a_bad_rules_file_is_a_one_line_error_naming_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        TagRules.parse(text, "rules.yaml")
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_glob_patterns_match_whole_tags() -> None:
    patterns = ["asymmetrical *", "single*glove"]

    assert matching_pattern("asymmetrical_hair", patterns) == "asymmetrical *"
    assert matching_pattern("single elbow glove", patterns) == "single*glove"
    assert matching_pattern("symmetrical hair", patterns) is None
    assert matching_pattern("gloves", patterns) is None


def test_mentions_are_found_as_whole_words_in_free_text() -> None:
    patterns = ["watermark", "asymmetrical *", "text"]

    assert find_mention("A photo, a Watermark in the corner", patterns) == (
        "watermark",
        "watermark",
    )
    assert find_mention("girl with asymmetrical hair, smile", patterns) == (
        "asymmetrical hair",
        "asymmetrical *",
    )
    assert find_mention("textured wall, context", patterns) is None


# --------------------------------------------------------------------------- captions


def test_merge_policies() -> None:
    hand = ["a street at night", "rain"]
    auto = ["rain", "city", "neon lights"]

    assert merge_tags(hand, auto, "keep") == hand
    assert merge_tags([], auto, "keep") == auto
    assert merge_tags(hand, auto, "append") == ["a street at night", "rain", "city", "neon lights"]
    assert merge_tags(hand, auto, "replace") == auto
    with pytest.raises(ConfigError, match="use one of keep, append, replace"):
        merge_tags(hand, auto, "merge")


def test_the_trigger_word_comes_first_then_the_keep_tags_that_are_present() -> None:
    tags = ["smile", "solo", "1girl", "long hair"]

    caption = build_caption(tags, trigger_word="sks_style", keep_tags=["1girl", "Solo", "1boy"])

    assert caption == "sks_style, 1girl, solo, smile, long hair"


def test_the_trigger_word_is_not_repeated_when_the_caption_already_has_it() -> None:
    assert build_caption(["sks style", "cat"], trigger_word="sks_style") == "sks_style, cat"
    assert build_caption([], trigger_word="sks") == "sks"
    assert build_caption(["cat", "cat"]) == "cat"


# --------------------------------------------------------------------------- mirroring


@pytest.mark.parametrize(
    ("caption", "mirrored"),
    [
        ("left hand on hip", "right hand on hip"),
        ("Left Hand, facing right", "Right Hand, facing left"),
        ("LEFT EYE closed", "RIGHT EYE closed"),
        ("looking to the left; Right.", "looking to the right; Left."),
        ("hand_on_left_hip", "hand_on_right_hip"),
        ("left-handed, leftmost figure", "right-handed, rightmost figure"),
        ("bright leftover copyright, upright, lefty", "bright leftover copyright, upright, lefty"),
        ("no sides here", "no sides here"),
    ],
)
def test_swap_left_right_on_word_boundaries_keeping_case(caption: str, mirrored: str) -> None:
    assert swap_left_right(caption) == mirrored


def test_mirroring_twice_gives_the_caption_back() -> None:
    caption = "Left arm up, right leg forward, leftwards glance"

    assert swap_left_right(swap_left_right(caption)) == caption
