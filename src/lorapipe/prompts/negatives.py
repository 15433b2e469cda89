"""Negative prompts stacked from layers of terms (``data/negative_prompts.yaml``: base,
structure, style, ...) named by presets (landscape, portrait, product), and checked by small
named rules, each reporting what it found or did as a :class:`Lint`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lorapipe.errors import PromptError
from lorapipe.prompts.syntax import ParsedPrompt, parse_prompt

DEFAULT_NEGATIVES = "negative_prompts.yaml"


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
            # the prompt is searched for the term's own groups only: it may be 5,000 tokens
            for group in (group for group in groups if key in group):
                others = group - {key}
                partner = next(
                    (p for p in positive_terms if any(_contains_phrase(p, m) for m in others)),
                    None,
                )
                if partner:
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
