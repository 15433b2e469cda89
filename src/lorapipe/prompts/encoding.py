"""Weighted, chunked CLIP conditioning of a parsed prompt (``lorapipe.prompts.syntax``), as
AUTOMATIC1111's WebUI computes it:

- Text is tokenized in chunks of 75 tokens (a chunk may end at the last comma of its final 20
  tokens so words stay together); ``BREAK`` ends a chunk early. Each chunk is wrapped in
  BOS/EOS, padded to 77, encoded by CLIP on its own, and the chunks are concatenated along the
  sequence axis: long prompts are not truncated.
- Weights multiply each token's hidden state, then the chunk is rescaled so its mean is what it
  was (A1111's "Original" emphasis): ``z = z * w; z *= mean_before / mean_after``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorapipe.errors import PromptError
from lorapipe.prompts.syntax import ParsedPrompt, parse_prompt

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

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
    """Weighted, chunked CLIP conditioning for SD 1.x, as A1111 computes it.

    ``clip_skip`` follows WebUI's "Clip skip" setting: 1 uses the last layer, 2 the one before
    it (then the final layer norm), and so on.
    """

    def __init__(
        self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, *, clip_skip: int = 1
    ) -> None:
        if clip_skip < 1:
            raise PromptError(f"clip_skip {clip_skip} must be 1 (last layer) or more")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip

    def encode(self, prompt: str | ParsedPrompt) -> torch.Tensor:
        """(1, 77 * chunks, hidden) conditioning for one prompt."""
        import torch

        parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        chunks = tokenize_chunks(self.tokenizer, parsed)
        device = self.text_encoder.device
        token_ids = torch.tensor([c.tokens for c in chunks], device=device)
        weights = torch.tensor([c.weights for c in chunks], device=device)
        with torch.no_grad():
            hidden = self._hidden_states(token_ids)
            weights = weights.to(hidden.dtype)
            mean_before = hidden.mean(dim=(1, 2), keepdim=True)
            hidden = hidden * weights.unsqueeze(-1)
            mean_after = hidden.mean(dim=(1, 2), keepdim=True)
            # chunks without emphasis stay exactly as CLIP gave them (and a zero mean, which a
            # randomly initialized CLIP can have, does not turn into 0/0)
            emphasized = (weights != 1).any(dim=1).view(-1, 1, 1) & (mean_after != 0)
            hidden = torch.where(emphasized, hidden * (mean_before / mean_after), hidden)
        return hidden.reshape(1, -1, hidden.shape[-1])

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

    def _hidden_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        output = self.text_encoder(token_ids, output_hidden_states=self.clip_skip > 1)
        if self.clip_skip == 1:
            return output[0]
        # transformers >= 5 flattens CLIPTextModel; older versions keep .text_model
        text_model = getattr(self.text_encoder, "text_model", self.text_encoder)
        return text_model.final_layer_norm(output.hidden_states[-self.clip_skip])


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
