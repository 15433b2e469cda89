"""A1111 WebUI prompt semantics for diffusers, and negative prompts built from layers.

Prompts are read the way AUTOMATIC1111's WebUI reads them, so a prompt copied from WebUI gives
the same conditioning here:

- ``<lora:name:w>`` applies LoRA ``name`` at weight ``w`` to text encoder and UNet;
  ``<lora:name:te:unet>`` (or ``te=``/``unet=``) weights them separately. Tags are removed from
  the text.
- ``(x)`` multiplies the attention to ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:1.3)`` sets
  1.3; nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters.
- Text is tokenized in chunks of 75 tokens (a chunk may end at the last comma of its final 20
  tokens so words stay together); ``BREAK`` ends a chunk early. Each chunk is wrapped in
  BOS/EOS, padded to 77, encoded by CLIP on its own, and the chunks are concatenated along the
  sequence axis: long prompts are not truncated.
- Weights multiply each token's hidden state, then the chunk is rescaled so its mean is what it
  was (A1111's "Original" emphasis): ``z = z * w; z *= mean_before / mean_after``.

Negative prompts are stacked from layers of terms (``data/negative_prompts.yaml``: base,
structure, style, ...) named by presets (landscape, portrait, product), and checked by small
named rules, each reporting what it found or did as a :class:`Lint`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lorapipe.errors import PromptError

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

ATTENTION_UP = 1.1
CLIP_CONTEXT = 77  # tokens CLIP encodes at once: BOS, 75 prompt tokens, EOS
COMMA_BACKTRACK = 20  # A1111's "comma_padding_backtrack": tokens a chunk may hand to the next
DEFAULT_NEGATIVES = "negative_prompts.yaml"

# --------------------------------------------------------------------------- prompt syntax


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


# --------------------------------------------------------------------------- weighted CLIP


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


# --------------------------------------------------------------------------- negative layers


@dataclass(frozen=True)
class Lint:
    """What one rule found or did. ``level`` is "warning" (look at it) or "info" (an
    adjustment the builder made); ``rule`` is the name of the function that made it."""

    rule: str
    message: str
    level: str = "warning"


@dataclass(frozen=True)
class NegativeRules:
    """The numbers behind the negative-prompt rules; defaults are the seed article's."""

    # more negative terms than this bring no benefit and start to conflict: warn
    max_terms: int = 15
    # this many terms or more make the model over-cautious at high CFG: suggest a lower one
    many_terms: int = 12
    # the CFG range the article recommends; outside it, warn
    cfg_range: tuple[float, float] = (7.0, 11.0)
    # a LoRA weaker than this gets leaner negatives: these layers are left out
    lean_below: float = 0.6
    lean_drop_layers: tuple[str, ...] = ("style",)
    # a LoRA stronger than this gets these terms against style overflow and colour distortion
    strong_above: float = 0.9
    strong_terms: tuple[str, ...] = ("overexposed", "garish colors")


@dataclass(frozen=True)
class NegativePrompt:
    """A built negative prompt, the layers it came from and what the rules said."""

    text: str
    terms: tuple[str, ...]
    preset: str
    layers: tuple[str, ...]
    lints: tuple[Lint, ...] = ()


@dataclass
class NegativeLibrary:
    """Layers of negative terms, presets stacking them, related-term groups and rules."""

    layers: dict[str, list[str]] = field(default_factory=dict)
    presets: dict[str, list[str]] = field(default_factory=dict)
    related: list[list[str]] = field(default_factory=list)
    rules: NegativeRules = field(default_factory=NegativeRules)

    @classmethod
    def load(
        cls,
        *user_files: str | Path,
        overrides: Mapping[str, Any] | None = None,
    ) -> NegativeLibrary:
        """The shipped defaults, then each user file, then ``overrides`` (same keys), merged."""
        library = cls()
        default = (resources.files("lorapipe") / "data" / DEFAULT_NEGATIVES).read_text("utf-8")
        library.merge(yaml.safe_load(default), DEFAULT_NEGATIVES)
        for path in user_files:
            library.merge(_read_yaml(Path(path)), str(path))
        if overrides:
            library.merge(overrides, "the job")
        library.check()
        return library

    def merge(self, data: Any, source: str) -> None:
        """Merge one YAML document: layers and presets replace by name, related groups are
        appended, rules replace by key."""
        if data is None:
            return
        if not isinstance(data, Mapping):
            raise PromptError(f"{source}: expected keys layers/presets/related/rules at the top")
        unknown = sorted(set(data) - {"layers", "presets", "related", "rules"})
        if unknown:
            raise PromptError(
                f"{source}: unknown key '{unknown[0]}'; use layers, presets, related or rules"
            )
        for name, terms in _mapping(data.get("layers"), source, "layers").items():
            self.layers[str(name)] = _term_list(terms, f"{source}: layer '{name}'")
        for name, layers in _mapping(data.get("presets"), source, "presets").items():
            self.presets[str(name)] = _term_list(layers, f"{source}: preset '{name}'")
        for group in data.get("related") or []:
            self.related.append(_term_list(group, f"{source}: related group"))
        self.rules = _merge_rules(self.rules, _mapping(data.get("rules"), source, "rules"), source)

    def check(self) -> None:
        """Every preset names defined layers; the rules' layers exist."""
        for preset in self.presets:
            self.preset_layers(preset)
        for layer in self.rules.lean_drop_layers:
            if layer not in self.layers:
                raise PromptError(
                    f"rules: lean_drop_layers names layer '{layer}', which no file defines; "
                    f"use one of {', '.join(sorted(self.layers))}"
                )

    def preset_layers(self, preset: str) -> list[str]:
        """The layers of a preset name, a single layer name, or layers joined with "+"
        ("base+style")."""
        if preset in self.presets:
            names = self.presets[preset]
        elif preset in self.layers:
            names = [preset]
        else:
            names = [name.strip() for name in preset.split("+")]
            if len(names) == 1:
                raise PromptError(
                    f"negative preset '{preset}' is not defined; use one of "
                    f"{', '.join(sorted(self.presets))}, a layer, or layers joined with '+'"
                )
        for name in names:
            if name not in self.layers:
                raise PromptError(
                    f"negative preset '{preset}' uses layer '{name}', which no file defines; "
                    f"define it under layers: or use one of {', '.join(sorted(self.layers))}"
                )
        return list(names)

    def build(
        self,
        preset: str,
        *,
        positive: str | ParsedPrompt = "",
        lora_scale: float | None = None,
        cfg_scale: float | None = None,
        extra: str = "",
        adapt_to_lora: bool = True,
        drop_conflicts: bool = True,
    ) -> NegativePrompt:
        """The negative prompt for one grid cell, with the seed's rules applied and reported."""
        layer_names = self.preset_layers(preset)
        layer_terms = {name: list(self.layers[name]) for name in layer_names}
        lints: list[Lint] = []
        if adapt_to_lora:
            terms, found = adapt_to_lora_scale(layer_terms, lora_scale, self.rules)
            lints += found
        else:
            terms = [term for layer in layer_terms.values() for term in layer]
        terms += split_terms(extra)
        terms, found = dedupe_terms(terms)
        lints += found
        parsed = parse_prompt(positive) if isinstance(positive, str) else positive
        terms, found = resolve_positive_conflicts(
            terms, parsed.plain_text, self.related, drop=drop_conflicts
        )
        lints += found
        lints += check_term_count(terms, self.rules.max_terms)
        if cfg_scale is not None:
            lints += check_cfg_range(cfg_scale, self.rules.cfg_range)
            lints += suggest_lower_cfg(len(terms), cfg_scale, self.rules)
        return NegativePrompt(
            text=", ".join(terms),
            terms=tuple(terms),
            preset=preset,
            layers=tuple(layer_names),
            lints=tuple(lints),
        )


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError as error:
        raise PromptError(f"negative prompt file '{path}' does not exist") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise PromptError(f"{path}{line}: not valid YAML; fix the syntax there") from error


def _mapping(value: Any, source: str, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PromptError(f"{source}: '{key}' must be a mapping of name: value")
    return value


def _term_list(value: Any, where: str) -> list[str]:
    """A YAML list of strings, or one comma-separated string."""
    if isinstance(value, str):
        return split_terms(value)
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise PromptError(f"{where} must be a list of strings, e.g. [low quality, blurry]")
    return [str(v).strip() for v in value if str(v).strip()]


def _merge_rules(rules: NegativeRules, changes: Mapping[str, Any], source: str) -> NegativeRules:
    known = {f.name: f for f in fields(NegativeRules)}
    values = {name: getattr(rules, name) for name in known}
    for key, value in changes.items():
        if key not in known:
            raise PromptError(
                f"{source}: rules key '{key}' is unknown; use one of {', '.join(known)}"
            )
        default = values[key]
        try:
            if isinstance(default, tuple) and key == "cfg_range":
                low, high = (float(v) for v in value)
                values[key] = (low, high)
            elif isinstance(default, tuple):
                values[key] = tuple(_term_list(value, f"{source}: rules.{key}"))
            else:
                values[key] = type(default)(value)
        except (TypeError, ValueError) as error:
            raise PromptError(
                f"{source}: rules.{key} = {value!r} is not like the default {default!r}"
            ) from error
    return NegativeRules(**values)


# --------------------------------------------------------------------------- terms


def split_terms(text: str) -> list[str]:
    """Comma-separated terms, keeping commas inside brackets with their term."""
    terms: list[str] = []
    depth = 0
    current = ""
    escaped = False
    for char in text:
        if escaped:
            current += char
            escaped = False
            continue
        if char == "\\":
            escaped = True
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [" ".join(term.split()) for term in terms if term.strip()]


def term_key(term: str) -> str:
    """A term without emphasis, weights, tags or case: "(Worst  Quality:1.4)" -> "worst quality"."""
    text = re.sub(r"<\w+:[^>]*>", " ", term)
    text = re.sub(r":\s*[+-]?[.\d]+\s*\)", ")", text)
    text = re.sub(r"(?<!\\)[()\[\]]", " ", text).replace("\\", "")
    return " ".join(text.lower().split())


def word_stem(word: str) -> str:
    """A crude stem so that "grainy"/"grain", "blurry"/"blur", "noisy"/"noise" meet."""
    word = word.lower()
    for suffix in ("ness", "ing", "ies", "ed", "es", "y", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith(("ss", "us")):
                break
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word[-1] == word[-2]:
        word = word[:-1]
    return word[:-1] if len(word) > 3 and word.endswith("e") else word


def _contains_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


# --------------------------------------------------------------------------- rules


def dedupe_terms(terms: Iterable[str]) -> tuple[list[str], list[Lint]]:
    """Keep the first of terms that differ only in case, spacing or emphasis."""
    kept: dict[str, str] = {}
    repeated: list[str] = []
    for term in terms:
        key = term_key(term)
        if not key:
            continue
        if key in kept:
            repeated.append(term)
        else:
            kept[key] = term
    lints = []
    if repeated:
        lints.append(
            Lint(
                "dedupe_terms",
                f"removed repeated negative terms: {', '.join(repeated)}",
                level="info",
            )
        )
    return list(kept.values()), lints


def check_term_count(terms: Sequence[str], limit: int) -> list[Lint]:
    """Past ~15 related negative terms the benefit falls off sharply and terms start to
    conflict or degrade the image (the seed's warning)."""
    if len(terms) <= limit:
        return []
    return [
        Lint(
            "check_term_count",
            f"{len(terms)} negative terms (more than {limit}): past {limit} they stop helping "
            "and start to conflict; drop a layer or the terms your images do not show",
        )
    ]


def resolve_positive_conflicts(
    terms: Sequence[str], positive: str, related: Sequence[Sequence[str]], *, drop: bool = True
) -> tuple[list[str], list[Lint]]:
    """Find negative terms the prompt itself asks for.

    - the same term in both prompts ("soft focus" in both): they cancel;
    - a one-word negative term whose stem is a word of the prompt ("grainy" against
      "film grain"): the negative fights what the prompt wants;
    - a negative term related (same group in ``related``) to a prompt term ("blurry" against
      "soft focus"): flagged only.

    The first two are removed from the negative when ``drop`` is true.
    """
    positive_terms = [term_key(t) for t in split_terms(positive)]
    positive_stems = {
        word_stem(word): term for term in positive_terms for word in re.findall(r"\w+", term)
    }
    groups = [{term_key(t) for t in group} for group in related]
    kept: list[str] = []
    lints: list[Lint] = []
    for term in terms:
        key = term_key(term)
        same = next((p for p in positive_terms if _contains_phrase(p, key)), None)
        stem_match = positive_stems.get(word_stem(key)) if " " not in key else None
        if same is not None or stem_match is not None:
            if same is not None:
                found = f"'{term}' is in both the prompt and the negative prompt, so they cancel"
            else:
                found = (
                    f"the prompt asks for '{stem_match}' but the negative prompt rejects '{term}'"
                )
            action = "dropped it from the negative" if drop else "remove it from one of them"
            lints.append(Lint("resolve_positive_conflicts", f"{found}; {action}"))
            if drop:
                continue
        else:
            for group in groups:
                others = group - {key}
                partner = next(
                    (p for p in positive_terms if any(_contains_phrase(p, m) for m in others)),
                    None,
                )
                if key in group and partner:
                    lints.append(
                        Lint(
                            "resolve_positive_conflicts",
                            f"the prompt asks for '{partner}' while the negative prompt rejects "
                            f"the related '{term}'; they pull against each other",
                        )
                    )
                    break
        kept.append(term)
    return kept, lints


def adapt_to_lora_scale(
    layer_terms: Mapping[str, Sequence[str]], lora_scale: float | None, rules: NegativeRules
) -> tuple[list[str], list[Lint]]:
    """Couple negative strength to LoRA strength (the seed's table): below ``lean_below`` leave
    out ``lean_drop_layers`` so the negatives do not suppress a weak LoRA's style; up to 0.8
    use the preset as is (0.8-0.9, where the table is silent, too); above ``strong_above`` add
    ``strong_terms`` against style overflow and colour distortion."""
    if lora_scale is not None and lora_scale < rules.lean_below:
        dropped = [name for name in layer_terms if name in rules.lean_drop_layers]
        terms = [t for name, ts in layer_terms.items() if name not in dropped for t in ts]
        if not dropped:
            return terms, []
        return terms, [
            Lint(
                "adapt_to_lora_scale",
                f"LoRA scale {lora_scale:g} < {rules.lean_below:g}: left out the "
                f"{', '.join(dropped)} layer so the negatives do not suppress the LoRA's style",
                level="info",
            )
        ]
    terms = [term for layer in layer_terms.values() for term in layer]
    if lora_scale is None or lora_scale <= rules.strong_above:
        return terms, []
    present = {term_key(term) for term in terms}
    added = [term for term in rules.strong_terms if term_key(term) not in present]
    if not added:
        return terms, []
    return terms + added, [
        Lint(
            "adapt_to_lora_scale",
            f"LoRA scale {lora_scale:g} > {rules.strong_above:g}: added '{', '.join(added)}' "
            "against style overflow and colour distortion (guidance_rescale 0.5-0.7 also "
            "tames overexposure)",
            level="info",
        )
    ]


def check_cfg_range(cfg_scale: float, cfg_range: tuple[float, float]) -> list[Lint]:
    """Low CFG lets the model ignore the prompt; high CFG gives harsh colours, jagged edges and
    stiff compositions."""
    low, high = cfg_range
    if cfg_scale < low:
        return [
            Lint(
                "check_cfg_range",
                f"CFG {cfg_scale:g} is below {low:g}: the model starts to ignore the prompt and "
                f"images get random; use {low:g}-{high:g}",
            )
        ]
    if cfg_scale > high:
        return [
            Lint(
                "check_cfg_range",
                f"CFG {cfg_scale:g} is above {high:g}: expect harsh colours, jagged edges and a "
                f"stiff composition; use {low:g}-{high:g}",
            )
        ]
    return []


def suggest_lower_cfg(term_count: int, cfg_scale: float, rules: NegativeRules) -> list[Lint]:
    """With many negatives a high CFG makes the model over-cautious: flat, empty images."""
    low = rules.cfg_range[0]
    if term_count < rules.many_terms or cfg_scale <= low:
        return []
    return [
        Lint(
            "suggest_lower_cfg",
            f"{term_count} negative terms at CFG {cfg_scale:g}: many negatives make the model "
            f"over-cautious (flat, empty images); try a lower CFG such as "
            f"{max(low, cfg_scale - 1):g}",
        )
    ]
