"""A1111 WebUI prompt syntax, read the way AUTOMATIC1111's WebUI reads it, so a prompt copied
from WebUI gives the same conditioning here (``lorapipe.prompts.encoding`` encodes it):

- ``<lora:name:w>`` applies LoRA ``name`` at weight ``w`` to text encoder and UNet;
  ``<lora:name:te:unet>`` (or ``te=``/``unet=``) weights them separately. Tags are removed from
  the text.
- ``(x)`` multiplies the attention to ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:1.3)`` sets
  1.3; nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters.
- ``BREAK`` ends a 75-token chunk early.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorapipe.errors import PromptError

ATTENTION_UP = 1.1


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: the LoRA's name and its text-encoder and UNet weights."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0

    def format(self) -> str:
        """The tag as A1111 writes it: one weight when both are equal."""
        if self.te_weight == self.unet_weight:
            return f"<lora:{self.name}:{self.unet_weight:g}>"
        return f"<lora:{self.name}:{self.te_weight:g}:{self.unet_weight:g}>"


@dataclass(frozen=True)
class Segment:
    """A run of prompt text with one attention weight, or a BREAK."""

    text: str
    weight: float = 1.0
    is_break: bool = False


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt split into weighted text and its LoRA tags."""

    source: str
    segments: tuple[Segment, ...]
    loras: tuple[LoraTag, ...]

    @property
    def plain_text(self) -> str:
        """The text without tags, brackets or weights (for term matching and CLIP score)."""
        text = "".join(" " if s.is_break else s.text for s in self.segments)
        return " ".join(text.split())


# one token of the prompt grammar; the order of alternatives matters
_PROMPT_TOKEN = re.compile(
    r"""
      (?P<tag><(?P<kind>\w+):(?P<args>[^>]*)>)
    | (?P<escape>\\[()\[\]\\])
    | (?P<weight>:\s*(?P<number>[+-]?[.\d]+)\s*\))
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:<]+|[\\:<])
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt(prompt: str, *, where: str = "prompt") -> ParsedPrompt:
    """Parse A1111 prompt syntax. Unbalanced brackets, bad weights and unsupported syntax raise
    :class:`PromptError` naming ``where`` and the 1-based column."""
    pieces: list[list[Any]] = []  # [text, weight]
    loras: list[LoraTag] = []
    open_brackets: list[tuple[str, int, int]] = []  # (bracket, first piece index, column)
    for match in _PROMPT_TOKEN.finditer(prompt):
        column = match.start() + 1
        if match["tag"]:
            loras.append(_lora_tag(match["kind"], match["args"], where, column))
        elif match["escape"]:
            pieces.append([match["escape"][1], 1.0])
        elif match["weight"]:
            if not open_brackets or open_brackets[-1][0] != "(":
                raise PromptError(
                    f"{where}, column {column}: weight '{match['weight']}' closes no '('; "
                    "write (text:1.2)"
                )
            weight = _number(
                match["number"], where, column + match["weight"].index(match["number"])
            )
            _multiply(pieces, open_brackets.pop()[1], weight)
        elif match["open"]:
            open_brackets.append((match["open"], len(pieces), column))
        elif match["close"]:
            _close_bracket(pieces, open_brackets, match["close"], where, column)
        else:
            pieces.append([match["text"], 1.0])
    if open_brackets:
        bracket, _, column = open_brackets[-1]
        closing = ")" if bracket == "(" else "]"
        raise PromptError(
            f"{where}, column {column}: '{bracket}' is never closed; add '{closing}' or write "
            f"'\\{bracket}' for a literal bracket"
        )
    return ParsedPrompt(source=prompt, segments=_split_breaks(_merge(pieces)), loras=tuple(loras))


def _close_bracket(
    pieces: list[list[Any]],
    open_brackets: list[tuple[str, int, int]],
    bracket: str,
    where: str,
    column: int,
) -> None:
    opening = "(" if bracket == ")" else "["
    if not open_brackets or open_brackets[-1][0] != opening:
        raise PromptError(
            f"{where}, column {column}: '{bracket}' closes no '{opening}'; remove it or write "
            f"'\\{bracket}' for a literal bracket"
        )
    start = open_brackets.pop()[1]
    if bracket == "]" and any(":" in text or "|" in text for text, _ in pieces[start:]):
        raise PromptError(
            f"{where}, column {column}: prompt editing/alternation ([a:b:step], [a|b]) is a "
            "WebUI sampler feature lorapipe does not run; write the prompt for one image"
        )
    _multiply(pieces, start, ATTENTION_UP if bracket == ")" else 1 / ATTENTION_UP)


def _multiply(pieces: list[list[Any]], start: int, factor: float) -> None:
    for piece in pieces[start:]:
        piece[1] *= factor


def _number(text: str, where: str, column: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PromptError(f"{where}, column {column}: '{text}' is not a number; write e.g. 1.2")
    return value


def _lora_tag(kind: str, args: str, where: str, column: int) -> LoraTag:
    if kind not in ("lora", "lyco"):
        raise PromptError(
            f"{where}, column {column}: <{kind}:...> is not supported; only <lora:name:weight>"
        )
    name, *rest = [item.strip() for item in args.split(":")]
    positional = [item for item in rest if "=" not in item]
    named = dict(item.split("=", 1) for item in rest if "=" in item)
    unknown = sorted(set(named) - {"te", "unet"}) + (["dyn"] if len(positional) > 2 else [])
    if not name or unknown:
        raise PromptError(
            f"{where}, column {column}: <{kind}:{args}> is not a LoRA tag lorapipe reads; "
            "write <lora:name:weight> or <lora:name:te_weight:unet_weight>"
        )
    te_text = named.get("te", positional[0] if positional else "1")
    te_weight = _number(te_text, where, column)
    unet_text = named.get("unet", positional[1] if len(positional) > 1 else None)
    unet_weight = te_weight if unet_text is None else _number(unet_text, where, column)
    return LoraTag(name=name, te_weight=te_weight, unet_weight=unet_weight)


def _merge(pieces: list[list[Any]]) -> list[list[Any]]:
    """Join neighbouring pieces of equal weight; an empty prompt is one empty piece."""
    merged: list[list[Any]] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged or [["", 1.0]]


def _split_breaks(pieces: list[list[Any]]) -> tuple[Segment, ...]:
    segments: list[Segment] = []
    for text, weight in pieces:
        parts = _BREAK.split(text)
        for index, part in enumerate(parts):
            if index:
                segments.append(Segment("BREAK", -1.0, is_break=True))
            if part or len(parts) == 1:
                segments.append(Segment(part, weight))
    return tuple(segments)


def with_lora_weights(prompt: str, weights: Mapping[str, LoraTag]) -> str:
    """``prompt`` with each ``<lora:name:...>`` tag rewritten to the tag in ``weights``."""

    def rewrite(match: re.Match[str]) -> str:
        if match["kind"] not in ("lora", "lyco"):
            return match[0]
        name = match["args"].split(":", 1)[0].strip()
        return weights[name].format() if name in weights else match[0]

    return re.sub(r"<(?P<kind>\w+):(?P<args>[^>]*)>", rewrite, prompt)


_LORA_TAG = re.compile(r"\s*<(?:lora|lyco):[^>]*>")
_SYNTAX_CHARACTER = re.compile(r"([()\[\]\\])")


def without_lora_tags(prompt: str) -> str:
    """``prompt`` with its ``<lora:...>`` tags (and the commas they leave at the ends) removed."""
    return _LORA_TAG.sub("", prompt).strip(" ,")


def literal(text: str) -> str:
    """A prompt that means exactly ``text`` (a caption): brackets and backslashes escaped."""
    return _SYNTAX_CHARACTER.sub(r"\\\1", text)
