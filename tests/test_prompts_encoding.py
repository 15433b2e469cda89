"""Weighted, chunked CLIP encoding as A1111 computes it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorapipe.models import SD1
from lorapipe.prompts.encoding import (
    ConditioningEncoder,
    PromptEncoder,
    chunk_count,
    tokenize_chunks,
)
from lorapipe.prompts.syntax import parse_prompt


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


@pytest.mark.parametrize("text", ["", "a cat", " ".join(["dog"] * 100), "a cat BREAK a dog BREAK"])
def test_the_chunk_count_is_known_from_the_tokens_before_encoding(clip, text: str) -> None:
    tokenizer, text_encoder = clip
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder)
    encoder = ConditioningEncoder(pipe, SD1)
    parsed = parse_prompt(text)
    assert encoder.count_chunks(parsed) == chunk_count(encoder.encode(parsed).embeds)


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
