"""Weighted, chunked CLIP conditioning of a parsed prompt (``lorapipe.prompts.syntax``), as
AUTOMATIC1111's WebUI computes it:

- Text is tokenized in chunks of 75 tokens (a chunk may end at the last comma of its final 20
  tokens so words stay together); ``BREAK`` ends a chunk early. Each chunk is wrapped in
  BOS/EOS, padded to 77, encoded by CLIP on its own, and the chunks are concatenated along the
  sequence axis: long prompts are not truncated.
- Weights multiply each token's hidden state, then the chunk is rescaled so its mean is what it
  was (A1111's "Original" emphasis): ``z = z * w; z *= mean_before / mean_after``.
- A family with several text encoders (SDXL) runs every chunk through each of them, each with
  its own tokenizer and emphasis, and concatenates their hidden states along the feature axis
  (WebUI's SDXL conditioner); the UNet also reads the last encoder's projected pooled output of
  the first chunk (``Conditioning.pooled``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorapipe.errors import ConfigError, PromptError
from lorapipe.prompts.syntax import ParsedPrompt, parse_prompt

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorapipe.models import ModelFamily

CLIP_CONTEXT = 77  # tokens CLIP encodes at once: BOS, 75 prompt tokens, EOS
COMMA_BACKTRACK = 20  # A1111's "comma_padding_backtrack": tokens a chunk may hand to the next


@dataclass
class PromptChunk:
    """77 token ids (BOS, up to 75 tokens, EOS, padding) and a weight for each."""

    tokens: list[int]
    weights: list[float]


def tokenize_chunks(tokenizer: CLIPTokenizer, parsed: ParsedPrompt) -> list[PromptChunk]:
    """Split a parsed prompt into A1111's 75-token chunks."""
    chunk_length = tokenizer.model_max_length - 2
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [segment.text for segment in parsed.segments]
    token_lists = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)[
        "input_ids"
    ]

    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append(_wrap_chunk(tokenizer, tokens, weights, chunk_length))
        tokens, weights, last_comma = [], [], -1

    for segment, segment_tokens in zip(parsed.segments, token_lists, strict=True):
        if segment.is_break:
            close_chunk()
            continue
        for token in segment_tokens:
            if token == comma:
                last_comma = len(tokens)
            elif (
                len(tokens) == chunk_length
                and last_comma != -1
                and len(tokens) - last_comma <= COMMA_BACKTRACK
            ):
                moved = last_comma + 1
                carried_tokens, carried_weights = tokens[moved:], weights[moved:]
                tokens, weights = tokens[:moved], weights[:moved]
                close_chunk()
                tokens, weights = carried_tokens, carried_weights
            if len(tokens) == chunk_length:
                close_chunk()
            tokens.append(token)
            weights.append(segment.weight)
    if tokens or not chunks:
        close_chunk()
    return chunks


def _wrap_chunk(
    tokenizer: CLIPTokenizer, tokens: list[int], weights: list[float], chunk_length: int
) -> PromptChunk:
    padding = chunk_length - len(tokens)
    return PromptChunk(
        tokens=[tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
        + [tokenizer.pad_token_id] * padding,
        weights=[1.0, *weights, 1.0] + [1.0] * padding,
    )


def count_tokens(tokenizer: CLIPTokenizer, parsed: ParsedPrompt) -> int:
    """Tokens in the prompt text (what WebUI shows as "n/75")."""
    texts = [s.text for s in parsed.segments if not s.is_break]
    token_lists = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return sum(len(ids) for ids in token_lists)


class PromptEncoder:
    """Weighted, chunked conditioning from one CLIP text encoder, as A1111 computes it.

    ``clip_skip`` follows WebUI's "Clip skip" setting: 1 uses the last layer, 2 the one before
    it (then the final layer norm), and so on. ``penultimate_hidden_states`` is SDXL's reading
    instead: the layer before the last as it is, without the final layer norm (``clip_skip`` is
    then not used).
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        *,
        clip_skip: int = 1,
        penultimate_hidden_states: bool = False,
    ) -> None:
        if clip_skip < 1:
            raise PromptError(f"clip_skip {clip_skip} must be 1 (last layer) or more")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.penultimate_hidden_states = penultimate_hidden_states

    def encode(self, prompt: str | ParsedPrompt) -> torch.Tensor:
        """(1, 77 * chunks, hidden) conditioning for one prompt."""
        return self._encode(prompt)[0]

    def encode_with_pooled(self, prompt: str | ParsedPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioning and, from a text encoder with a projection, the projected pooled
        output of the first chunk, unweighted: WebUI conditions SDXL's UNet on that one only."""
        hidden, output = self._encode(prompt)
        return hidden, output.text_embeds[:1]

    def encode_pair(
        self, positive: str | ParsedPrompt, negative: str | ParsedPrompt
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditioning for a prompt and its negative, padded to the same number of chunks."""
        positive_embeds = self.encode(positive)
        negative_embeds = self.encode(negative)
        chunks = max(chunk_count(positive_embeds), chunk_count(negative_embeds))
        empty = self.encode("")
        return pad_chunks(positive_embeds, chunks, empty), pad_chunks(
            negative_embeds, chunks, empty
        )

    def _encode(self, prompt: str | ParsedPrompt) -> tuple[torch.Tensor, Any]:
        import torch

        parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        chunks = tokenize_chunks(self.tokenizer, parsed)
        device = self.text_encoder.device
        token_ids = torch.tensor([c.tokens for c in chunks], device=device)
        weights = torch.tensor([c.weights for c in chunks], device=device)
        with torch.no_grad():
            output = self.text_encoder(
                token_ids,
                output_hidden_states=self.penultimate_hidden_states or self.clip_skip > 1,
            )
            hidden = emphasize(self._hidden_states(output), weights)
        return hidden.reshape(1, -1, hidden.shape[-1]), output

    def _hidden_states(self, output: Any) -> torch.Tensor:
        if self.penultimate_hidden_states:
            return output.hidden_states[-2]
        if self.clip_skip == 1:
            return output[0]
        # transformers >= 5 flattens CLIPTextModel; older versions keep .text_model
        text_model = getattr(self.text_encoder, "text_model", self.text_encoder)
        return text_model.final_layer_norm(output.hidden_states[-self.clip_skip])


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on (chunks, 77, width) hidden states: each token's times its
    weight, then each chunk rescaled to the mean it had."""
    import torch

    weights = weights.to(hidden.dtype)
    mean_before = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * weights.unsqueeze(-1)
    mean_after = weighted.mean(dim=(1, 2), keepdim=True)
    # chunks without emphasis stay exactly as CLIP gave them (and a zero mean, which a randomly
    # initialized CLIP can have, does not turn into 0/0)
    emphasized = (weights != 1).any(dim=1).view(-1, 1, 1) & (mean_after != 0)
    return torch.where(emphasized, weighted * (mean_before / mean_after), weighted)


@dataclass(frozen=True)
class Conditioning:
    """What the UNet reads of one prompt: the hidden states it cross-attends to,
    (1, 77 * chunks, width), and for a family with added conditioning (SDXL) the pooled
    embedding, (1, pooled width)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def padded(self, chunks: int, empty: Conditioning) -> Conditioning:
        """Padded to ``chunks`` with the empty prompt's chunk (see :func:`pad_chunks`); the
        pooled embedding stays the first chunk's."""
        return Conditioning(pad_chunks(self.embeds, chunks, empty.embeds), self.pooled)

    def zeros(self) -> Conditioning:
        """All zeros, as SDXL conditions on an empty negative prompt (WebUI's and diffusers'
        ``force_zeros_for_empty_prompt``)."""
        import torch

        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return Conditioning(torch.zeros_like(self.embeds), pooled)


def check_clip_skip(family: ModelFamily, clip_skip: int) -> None:
    """Refuse a Clip skip the family's reading of its text encoders ignores (SDXL's is fixed
    to the penultimate layer, and WebUI ignores Clip skip there too)."""
    if family.penultimate_hidden_states and clip_skip != 1:
        raise ConfigError(
            f"clip_skip {clip_skip}: {family.label} reads the penultimate layer of its text "
            "encoders (as WebUI does); leave clip_skip at 1"
        )


class ConditioningEncoder:
    """A prompt's conditioning for a model family, as WebUI computes it: every text encoder of
    the family (in its order) encodes every chunk with its own tokenizer and emphasis, their
    hidden states are concatenated along the feature axis, and for a family with added
    conditioning the last encoder's pooled output of the first chunk comes along."""

    def __init__(self, pipe: DiffusionPipeline, family: ModelFamily, *, clip_skip: int = 1):
        check_clip_skip(family, clip_skip)
        self.encoders = [
            PromptEncoder(
                getattr(pipe, tokenizer),
                getattr(pipe, text_encoder),
                clip_skip=clip_skip,
                penultimate_hidden_states=family.penultimate_hidden_states,
            )
            for tokenizer, text_encoder in zip(family.tokenizers, family.text_encoders, strict=True)
        ]
        self.with_pooled = family.added_conditioning

    def encode(self, prompt: str | ParsedPrompt) -> Conditioning:
        """The conditioning of one prompt (padding to a negative's chunks is the caller's)."""
        import torch

        prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        *others, last = self.encoders
        if self.with_pooled:
            last_hidden, pooled = last.encode_with_pooled(prompt)
        else:
            last_hidden, pooled = last.encode(prompt), None
        hidden = [encoder.encode(prompt) for encoder in others] + [last_hidden]
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def count_chunks(self, prompt: ParsedPrompt) -> int:
        """The 77-token chunks :meth:`encode` gives the prompt, from its tokens alone (the text
        encoders agree on it: their hidden states are concatenated chunk by chunk)."""
        return len(tokenize_chunks(self.encoders[-1].tokenizer, prompt))


def chunk_count(embeds: torch.Tensor) -> int:
    """How many 77-token chunks a conditioning tensor holds."""
    return embeds.shape[1] // CLIP_CONTEXT


def pad_chunks(embeds: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """Append ``empty`` (the encoding of the empty prompt) until ``embeds`` has ``chunks``
    chunks: what WebUI does when the prompt and negative prompt differ in length."""
    import torch

    missing = chunks - chunk_count(embeds)
    if missing <= 0:
        return embeds
    return torch.cat([embeds, empty.repeat(1, missing, 1)], dim=1)
