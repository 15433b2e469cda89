"""A1111 prompt syntax: emphasis, escapes, BREAK, LoRA tags and one-line errors."""

from __future__ import annotations

import pytest

from lorapipe.errors import PromptError
from lorapipe.prompts.syntax import (
    LoraTag,
    literal,
    parse_prompt,
    with_lora_weights,
    without_lora_tags,
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


def test_lora_tags_can_be_dropped_from_a_prompt() -> None:
    assert (
        without_lora_tags("<lora:a:1> a cat, (smiling:1.2), <lora:b:0.5>") == "a cat, (smiling:1.2)"
    )


def test_a_caption_becomes_a_prompt_that_means_exactly_it() -> None:
    caption = r"hat (object), [sic] a\b"
    assert weights_of(literal(caption)) == [(caption, 1.0)]


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
