"""A1111 prompt syntax, weighted chunked CLIP encoding, negative layers and the lint rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorapipe.errors import PromptError
from lorapipe.prompts import (
    LoraTag,
    NegativeLibrary,
    NegativeRules,
    PromptEncoder,
    adapt_to_lora_scale,
    check_cfg_range,
    check_term_count,
    dedupe_terms,
    parse_prompt,
    resolve_positive_conflicts,
    split_terms,
    suggest_lower_cfg,
    term_key,
    tokenize_chunks,
    with_lora_weights,
    word_stem,
)

SEED_PROMPT = (
    "street photography of a man smoking under umbrella in Tokyo rain, 35mm film grain, "
    "muted colors, soft focus, candid moment, <lora:film_style:0.7>"
)


def weights_of(prompt: str) -> list[tuple[str, float]]:
    return [(s.text, round(s.weight, 6)) for s in parse_prompt(prompt).segments]


# --------------------------------------------------------------------------- syntax


def test_round_brackets_raise_square_brackets_lower_and_nesting_multiplies() -> None:
    assert weights_of("a (b) [c] ((d)) (e:1.3) ((f:1.5))") == [
        ("a ", 1.0),
        ("b", 1.1),
        (" ", 1.0),
        ("c", round(1 / 1.1, 6)),
        (" ", 1.0),
        ("d", 1.21),
        (" ", 1.0),
        ("e", 1.3),
        (" ", 1.0),
        ("f", 1.65),
    ]


def test_escaped_brackets_are_literal_text() -> None:
    assert weights_of(r"a \(b\) \[c\] d\\e") == [(r"a (b) [c] d\e", 1.0)]


def test_break_ends_a_chunk_and_is_not_text() -> None:
    segments = parse_prompt("red sky BREAK blue water").segments
    assert [(s.text, s.is_break) for s in segments] == [
        ("red sky", False),
        ("BREAK", True),
        ("blue water", False),
    ]


@pytest.mark.parametrize(
    ("prompt", "tag"),
    [
        ("<lora:film:0.7>", LoraTag("film", 0.7, 0.7)),
        ("<lora:film>", LoraTag("film", 1.0, 1.0)),
        ("<lora:film:0.5:1.0>", LoraTag("film", 0.5, 1.0)),
        ("<lora:film:te=0.2:unet=0.8>", LoraTag("film", 0.2, 0.8)),
        ("<lora:film:0.6:unet=0>", LoraTag("film", 0.6, 0.0)),
    ],
)
def test_lora_tags_are_read_and_removed_from_the_text(prompt: str, tag: LoraTag) -> None:
    parsed = parse_prompt(f"a cat, {prompt} on a mat")
    assert parsed.loras == (tag,)
    assert parsed.plain_text == "a cat, on a mat"


def test_lora_tags_can_be_rewritten_with_other_weights() -> None:
    weights = {"film_style": LoraTag("film_style", 0.25, 0.5)}
    assert with_lora_weights("x, <lora:film_style:1>", weights) == "x, <lora:film_style:0.25:0.5>"
    weights = {"film_style": LoraTag("film_style", 0.9, 0.9)}
    assert with_lora_weights("x <lora:film_style:0.5:1.0>", weights) == "x <lora:film_style:0.9>"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a (cat", "prompt 3, column 3: '(' is never closed"),
        ("a cat)", "prompt 3, column 6: ')' closes no '('"),
        ("(a [cat)]", "prompt 3, column 8: ')' closes no '('"),
        ("[a:b:10]", "prompt editing"),
        ("(cat:1.2.3)", "'1.2.3' is not a number"),
        ("cat:1.2)", "column 4: weight ':1.2)' closes no '('"),
        ("<lora:film:0.5:1:8>", "not a LoRA tag lorapipe reads"),
        ("<hypernet:x:1>", "<hypernet:...> is not supported"),
    ],
)
def test_malformed_prompts_are_one_line_errors_with_a_column(prompt: str, message: str) -> None:
    with pytest.raises(PromptError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        parse_prompt(prompt, where="prompt 3")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- tokens and CLIP


@pytest.fixture(scope="module")
def clip(tiny_model_dir: Path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").eval()
    # a trained CLIP's final layer norm has a bias; a random one has none, which makes every
    # chunk's mean zero and the mean-restoring rescale meaningless
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.fill_(0.3)
    return tokenizer, text_encoder


def test_a_short_prompt_is_one_chunk_tokenized_like_diffusers(clip) -> None:
    tokenizer, _ = clip
    (chunk,) = tokenize_chunks(tokenizer, parse_prompt("a photo of a cat, film grain"))
    expected = tokenizer("a photo of a cat, film grain", padding="max_length", max_length=77)
    assert chunk.tokens == expected.input_ids
    assert chunk.weights == [1.0] * 77


def test_a_long_prompt_is_split_into_75_token_chunks_not_truncated(clip) -> None:
    tokenizer, _ = clip
    words = " ".join(["dog"] * 100)
    chunks = tokenize_chunks(tokenizer, parse_prompt(words))
    assert len(chunks) == 2
    for chunk in chunks:
        assert len(chunk.tokens) == 77
        assert chunk.tokens[0] == tokenizer.bos_token_id
    content = [t for c in chunks for t in c.tokens if t not in tokenizer.all_special_ids]
    assert content == tokenizer(words, add_special_tokens=False).input_ids


def test_a_full_chunk_breaks_after_its_last_comma_to_keep_words_together(clip) -> None:
    tokenizer, _ = clip
    # "dog" is one token here: 70 dogs, a comma, then 10 more dogs
    prompt = " ".join(["dog"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = tokenize_chunks(tokenizer, parse_prompt(prompt))
    comma = tokenizer.get_vocab()[",</w>"]
    assert first.tokens[71] == comma and first.tokens[72] == tokenizer.eos_token_id
    assert second.tokens[1:11] == [tokenizer.get_vocab()["dog</w>"]] * 10


def test_break_starts_a_new_chunk(clip) -> None:
    tokenizer, _ = clip
    chunks = tokenize_chunks(tokenizer, parse_prompt("red dog BREAK blue sky"))
    assert len(chunks) == 2
    assert chunks[1].tokens[1:3] == tokenizer("blue sky", add_special_tokens=False).input_ids


def test_weights_follow_their_tokens(clip) -> None:
    tokenizer, _ = clip
    (chunk,) = tokenize_chunks(tokenizer, parse_prompt("red (dog:1.5) [blue]"))
    vocab = tokenizer.get_vocab()
    by_token = dict(zip(chunk.tokens, chunk.weights, strict=True))
    assert by_token[vocab["dog</w>"]] == 1.5
    assert by_token[vocab["blue</w>"]] == pytest.approx(1 / 1.1)
    assert by_token[vocab["red</w>"]] == 1.0


def test_an_unweighted_prompt_encodes_exactly_like_the_plain_text_encoder(clip) -> None:
    tokenizer, text_encoder = clip
    ids = tokenizer("a red cat", padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = text_encoder(ids.input_ids)[0]
    assert torch.equal(PromptEncoder(tokenizer, text_encoder).encode("a red cat"), expected)


def test_emphasis_scales_its_tokens_and_restores_the_chunk_mean(clip) -> None:
    tokenizer, text_encoder = clip
    encoder = PromptEncoder(tokenizer, text_encoder)
    plain = encoder.encode("red dog")
    weighted = encoder.encode("red (dog:1.5)")
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    dog = tokenizer("red dog").input_ids.index(tokenizer.get_vocab()["dog</w>"])
    ratio = weighted[0, dog] / plain[0, dog]
    others = weighted[0, dog + 1] / plain[0, dog + 1]
    assert torch.allclose(ratio / others, torch.full_like(ratio, 1.5), rtol=1e-4)


def test_long_prompts_concatenate_chunk_encodings_along_the_sequence(clip) -> None:
    tokenizer, text_encoder = clip
    encoder = PromptEncoder(tokenizer, text_encoder)
    embeds = encoder.encode("dog " * 100)
    assert embeds.shape == (1, 154, text_encoder.config.hidden_size)
    assert torch.equal(embeds[:, :77], encoder.encode("dog " * 75))


def test_prompt_and_negative_are_padded_to_the_same_chunks_with_the_empty_prompt(clip) -> None:
    tokenizer, text_encoder = clip
    encoder = PromptEncoder(tokenizer, text_encoder)
    positive, negative = encoder.encode_pair("dog " * 100, "blurry")
    assert positive.shape == negative.shape == (1, 154, text_encoder.config.hidden_size)
    assert torch.equal(negative[:, :77], encoder.encode("blurry"))
    assert torch.equal(negative[:, 77:], encoder.encode(""))


def test_clip_skip_2_uses_the_penultimate_layer_through_the_final_norm(clip) -> None:
    tokenizer, text_encoder = clip
    ids = tokenizer("a red cat", padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        hidden = text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
        expected = text_encoder.final_layer_norm(hidden)
    encoded = PromptEncoder(tokenizer, text_encoder, clip_skip=2).encode("a red cat")
    assert torch.equal(encoded, expected)


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
