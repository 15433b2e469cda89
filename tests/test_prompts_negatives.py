"""Negative layers and presets, and the lint rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapipe.errors import PromptError
from lorapipe.prompts import negatives
from lorapipe.prompts.negatives import (
    NegativeLibrary,
    NegativeRules,
    adapt_to_lora_scale,
    check_cfg_range,
    check_term_count,
    dedupe_terms,
    resolve_positive_conflicts,
    split_terms,
    suggest_lower_cfg,
    term_key,
    word_stem,
)

SEED_PROMPT = (
    "street photography of a man smoking under umbrella in Tokyo rain, 35mm film grain, "
    "muted colors, soft focus, candid moment, <lora:film_style:0.7>"
)


# --------------------------------------------------------------------------- layers and presets


def test_the_default_layers_and_presets_are_the_seed_articles_table() -> None:
    library = NegativeLibrary.load()
    assert library.layers["base"] == [
        "low quality", "worst quality", "blurry", "noisy", "grainy", "overexposed", "underexposed",
    ]  # fmt: skip
    assert library.layers["structure"] == [
        "bad anatomy", "extra limbs", "fused fingers", "malformed hands", "distorted face",
    ]  # fmt: skip
    assert library.layers["style"] == [
        "painting", "illustration", "cartoon", "anime", "3D render", "watermark", "logo", "text",
    ]  # fmt: skip
    assert "too many fingers" in library.layers["hands"]
    assert "brush strokes" in library.layers["painting_drift"]
    assert library.presets["landscape"] == ["base", "style"]
    assert library.presets["portrait"] == ["base", "structure", "style"]
    assert library.presets["product"] == ["base", "style"]
    assert library.rules == NegativeRules()


def test_a_user_file_adds_layers_and_presets_and_replaces_by_name(tmp_path: Path) -> None:
    user = tmp_path / "negatives.yaml"
    user.write_text(
        "layers:\n"
        "  base: [lowres, (worst quality:1.3)]\n"
        "  jpeg: jpeg artifacts, compression\n"
        "presets:\n"
        "  web: [base, jpeg]\n"
        "related:\n"
        "  - [jpeg artifacts, lossy]\n"
        "rules:\n"
        "  max_terms: 10\n"
        "  cfg_range: [5, 9]\n"
    )
    library = NegativeLibrary.load(user)
    assert library.build("web").text == "lowres, (worst quality:1.3), jpeg artifacts, compression"
    assert library.layers["style"][0] == "painting"  # untouched default
    assert library.rules.max_terms == 10 and library.rules.cfg_range == (5.0, 9.0)
    assert ["jpeg artifacts", "lossy"] in library.related


def test_presets_may_be_layer_sums_and_none_is_empty() -> None:
    library = NegativeLibrary.load()
    assert library.build("base+hands").terms == tuple(
        library.layers["base"] + library.layers["hands"]
    )
    assert library.build("none").text == ""


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("presets:\n  mine: [base, lighting]\n", "uses layer 'lighting', which no file defines"),
        ("layer:\n  x: [a]\n", "unknown key 'layer'"),
        ("rules:\n  max_term: 3\n", "rules key 'max_term' is unknown"),
        ("layers:\n  x: 3\n", "layer 'x' must be a list of strings"),
        ("layers: [\n", "not valid YAML"),
    ],
)
def test_bad_negative_files_are_one_line_errors(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    user = tmp_path / "negatives.yaml"
    user.write_text(yaml_text)
    with pytest.raises(PromptError, match=message) as error:
        NegativeLibrary.load(user)
    assert "\n" not in str(error.value)


def test_an_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(PromptError, match="'potrait' is not defined; use one of .*portrait"):
        NegativeLibrary.load().build("potrait")


def test_terms_split_on_top_level_commas_and_compare_without_emphasis() -> None:
    assert split_terms("a, (b, c:1.2),  d  e ,") == ["a", "(b, c:1.2)", "d e"]
    assert term_key("(Worst  Quality:1.4)") == "worst quality"
    assert term_key("[[blurry]]") == "blurry"


# --------------------------------------------------------------------------- rules


def test_dedupe_terms_keeps_the_first_spelling() -> None:
    terms, lints = dedupe_terms(["blurry", "Low Quality", "(blurry:1.2)", "low  quality"])
    assert terms == ["blurry", "Low Quality"]
    assert [lint.rule for lint in lints] == ["dedupe_terms"]
    assert "(blurry:1.2), low  quality" in lints[0].message


def test_check_term_count_warns_past_15_terms() -> None:
    assert check_term_count([f"t{i}" for i in range(15)], 15) == []
    (lint,) = check_term_count([f"t{i}" for i in range(16)], 15)
    assert lint.level == "warning" and "16 negative terms (more than 15)" in lint.message


def test_a_term_in_both_prompts_is_dropped_from_the_negative() -> None:
    terms, (lint,) = resolve_positive_conflicts(["soft focus", "text"], "soft focus, cat", [])
    assert terms == ["text"]
    assert "'soft focus' is in both" in lint.message and "dropped" in lint.message


def test_a_negative_word_contradicting_the_prompt_is_dropped() -> None:
    terms, (lint,) = resolve_positive_conflicts(["grainy", "blurry"], "35mm film grain", [])
    assert terms == ["blurry"]
    assert "asks for '35mm film grain' but the negative prompt rejects 'grainy'" in lint.message


def test_a_related_term_is_flagged_but_kept() -> None:
    related = [["blurry", "soft focus", "bokeh"]]
    terms, (lint,) = resolve_positive_conflicts(["blurry"], "portrait, soft focus", related)
    assert terms == ["blurry"]
    assert lint.level == "warning" and "related 'blurry'" in lint.message


def test_a_long_prompt_is_searched_only_for_the_related_groups_of_each_negative_term(
    monkeypatch,
) -> None:
    searched: list[str] = []
    contains = negatives._contains_phrase
    monkeypatch.setattr(
        negatives,
        "_contains_phrase",
        lambda text, phrase: searched.append(phrase) or contains(text, phrase),
    )
    related = [["blurry", "soft focus"], ["noisy", "film grain"], ["cartoon", "anime"]]
    prompt = ", ".join(f"street {i}" for i in range(2500))  # 5,000 tokens
    terms, lints = resolve_positive_conflicts(["blurry", "text"], prompt, related)
    assert terms == ["blurry", "text"] and lints == []
    assert set(searched) == {"blurry", "text", "soft focus"}  # not the other groups' terms


def test_conflicts_are_only_flagged_when_dropping_is_off() -> None:
    terms, (lint,) = resolve_positive_conflicts(["grainy"], "film grain", [], drop=False)
    assert terms == ["grainy"] and "remove it from one of them" in lint.message


def test_word_stems_meet_across_common_suffixes() -> None:
    assert word_stem("grainy") == word_stem("grain")
    assert word_stem("blurry") == word_stem("blur")
    assert word_stem("noisy") == word_stem("noise")
    assert word_stem("focus") == "focus"
    assert word_stem("text") != word_stem("textured")


LAYERS = {
    "base": ["blurry", "overexposed"],
    "structure": ["bad anatomy"],
    "style": ["painting", "anime"],
}


@pytest.mark.parametrize(
    ("scale", "expected", "rule_fired"),
    [
        (None, ["blurry", "overexposed", "bad anatomy", "painting", "anime"], False),
        (0.5, ["blurry", "overexposed", "bad anatomy"], True),
        (0.6, ["blurry", "overexposed", "bad anatomy", "painting", "anime"], False),
        (0.8, ["blurry", "overexposed", "bad anatomy", "painting", "anime"], False),
        (0.9, ["blurry", "overexposed", "bad anatomy", "painting", "anime"], False),
        (1.0, ["blurry", "overexposed", "bad anatomy", "painting", "anime", "garish colors"], True),
    ],
)
def test_adapt_to_lora_scale_follows_the_seeds_table(
    scale: float | None, expected: list[str], rule_fired: bool
) -> None:
    terms, lints = adapt_to_lora_scale(LAYERS, scale, NegativeRules())
    assert terms == expected
    assert [lint.rule for lint in lints] == (["adapt_to_lora_scale"] if rule_fired else [])


def test_check_cfg_range_warns_outside_7_to_11() -> None:
    assert check_cfg_range(7, (7, 11)) == [] and check_cfg_range(11, (7, 11)) == []
    assert "ignore the prompt" in check_cfg_range(5, (7, 11))[0].message
    assert "harsh colours" in check_cfg_range(12, (7, 11))[0].message


def test_suggest_lower_cfg_when_negatives_are_many() -> None:
    rules = NegativeRules()
    (lint,) = suggest_lower_cfg(12, 9, rules)
    assert "over-cautious" in lint.message and "CFG such as 8" in lint.message
    assert suggest_lower_cfg(11, 9, rules) == []
    assert suggest_lower_cfg(20, 7, rules) == []


def test_the_seed_articles_film_example_gets_its_conflicts_and_warnings() -> None:
    negative = NegativeLibrary.load().build(
        "portrait", positive=SEED_PROMPT, lora_scale=0.7, cfg_scale=8
    )
    assert "grainy" not in negative.terms  # the prompt wants film grain
    assert negative.terms[:3] == ("low quality", "worst quality", "blurry")
    rules = {lint.rule for lint in negative.lints}
    assert rules == {"resolve_positive_conflicts", "check_term_count", "suggest_lower_cfg"}
    assert negative.text == ", ".join(negative.terms)
