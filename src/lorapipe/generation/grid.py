"""The grid: every combination of prompt, negative preset, image size, sampler, step count, LoRA
scale, CFG and seed as a :class:`Cell`, with its LoRA weights and negative prompt; and the
job's prompt checks."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from lorapipe.errors import PromptError
from lorapipe.prompts.encoding import count_tokens
from lorapipe.prompts.negatives import Lint, NegativeLibrary, NegativePrompt
from lorapipe.prompts.syntax import LoraTag, ParsedPrompt, with_lora_weights

if TYPE_CHECKING:
    from lorapipe.stages.generate import GenerateConfig

T = TypeVar("T")
CHECKPOINT_SEPARATOR = "@"  # film@checkpoint-300: checkpoint-300 of the LoRA film


@dataclass(frozen=True)
class Cell:
    """One image of the grid."""

    prompt_index: int
    negative_preset: str
    width: int
    height: int
    lora_scale: float | None  # the grid value; None: weights as written in the tags
    cfg_scale: float
    seed: int
    sampler: str
    steps: int
    parsed: ParsedPrompt  # the job's prompt
    prompt: str  # the prompt with this cell's LoRA weights written into its tags
    loras: tuple[LoraTag, ...]  # the weights this image runs with
    negative: NegativePrompt
    # tells the file apart from cells of other samplers, step counts or checkpoints; empty
    # when the job has one of each, so file names stay those of a job without them
    name_suffix: str = ""
    checkpoint: str | None = None  # the checkpoint axis's value (``checkpoint-300``), if any

    @property
    def size(self) -> str:
        """``512x768``, as A1111 writes it."""
        return f"{self.width}x{self.height}"

    @property
    def file_name(self) -> str:
        scale = "-tagged" if self.lora_scale is None else f"{self.lora_scale:g}"
        return (
            f"p{self.prompt_index + 1:02d}_{safe_name(self.negative_preset)}_{self.size}"
            f"_lora{scale}_cfg{self.cfg_scale:g}_seed{self.seed}{self.name_suffix}.png"
        )

    @property
    def label(self) -> str:
        scale = "as tagged" if self.lora_scale is None else f"{self.lora_scale:g}"
        return (
            f"prompt {self.prompt_index + 1} / {self.negative_preset} / {self.size} / "
            f"LoRA {scale} / CFG {self.cfg_scale:g}"
        )


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "none"


def scaled_lora_tags(tags: Iterable[LoraTag], scale: float | None) -> tuple[LoraTag, ...]:
    """The tags at a grid LoRA scale: the scale replaces the weight; a split tag keeps its
    text-encoder/UNet ratio (a text-encoder-only tag, unet 0, gets the scale on its te)."""
    if scale is None:
        return tuple(tags)
    scaled = []
    for tag in tags:
        if tag.te_weight == tag.unet_weight:
            scaled.append(LoraTag(tag.name, scale, scale))
        elif tag.unet_weight == 0:
            scaled.append(LoraTag(tag.name, scale, 0.0))
        else:
            scaled.append(LoraTag(tag.name, tag.te_weight * scale / tag.unet_weight, scale))
    return tuple(scaled)


def checkpoint_label(uri: str) -> str:
    """What the checkpoint axis calls a checkpoint: its folder's or file's name
    (``checkpoint-300``, ``my_lora-000004``)."""
    return PurePosixPath(uri.rstrip("/")).name.removesuffix(".safetensors")


def checkpoint_lora_name(lora: str, label: str) -> str:
    """The name the job loads checkpoint ``label`` of ``lora`` under."""
    return f"{lora}{CHECKPOINT_SEPARATOR}{label}"


def lora_of_checkpoint(name: str) -> str:
    """The LoRA a ``checkpoint_lora_name`` stands in for (a plain LoRA name: itself)."""
    return name.split(CHECKPOINT_SEPARATOR, 1)[0]


def swapped_for(tags: Sequence[LoraTag], checkpoint: str) -> tuple[LoraTag, ...]:
    """The tags with their LoRA (the one the prompts use) swapped for its ``checkpoint``."""
    return tuple(
        LoraTag(checkpoint_lora_name(tag.name, checkpoint), tag.te_weight, tag.unet_weight)
        for tag in tags
    )


def effective_lora_scale(tags: Sequence[LoraTag]) -> float | None:
    """The LoRA strength the negative-prompt rules see: the largest UNet weight."""
    return max((tag.unet_weight for tag in tags), default=None)


def plan_grid(
    config: GenerateConfig, prompts: Sequence[ParsedPrompt], library: NegativeLibrary
) -> list[Cell]:
    """Every cell in grid order: prompt, preset, size, sampler, steps, LoRA scale, CFG, seed
    (the negative prompt does not depend on the size, sampler or steps)."""
    cells = []
    negatives: dict[tuple[int, str, tuple[LoraTag, ...], float], NegativePrompt] = {}
    checkpoints = [checkpoint_label(uri) for uri in config.checkpoints] or [None]
    for (index, parsed), preset, (
        width,
        height,
    ), checkpoint, sampler, steps, scale, cfg in itertools.product(
        enumerate(prompts),
        config.negative_presets,
        config.image_sizes(),
        checkpoints,
        config.samplers,
        config.steps,
        config.lora_scales or [None],
        config.cfg_scales,
    ):
        tags = scaled_lora_tags(parsed.loras, scale)
        key = (index, preset, tags, cfg)
        if key not in negatives:
            negatives[key] = library.build(
                preset,
                positive=parsed,
                lora_scale=effective_lora_scale(tags),
                cfg_scale=cfg,
                extra=config.negative_extra,
                adapt_to_lora=config.adapt_negatives,
                drop_conflicts=config.drop_conflicting_negatives,
            )
        prompt = with_lora_weights(parsed.source, {tag.name: tag for tag in tags})
        suffix = f"_{safe_name(sampler)}" if len(config.samplers) > 1 else ""
        suffix += f"_steps{steps}" if len(config.steps) > 1 else ""
        suffix += f"_{safe_name(checkpoint)}" if checkpoint else ""
        for seed in config.seeds:
            cells.append(
                Cell(
                    prompt_index=index,
                    negative_preset=preset,
                    width=width,
                    height=height,
                    lora_scale=scale,
                    cfg_scale=cfg,
                    seed=seed,
                    sampler=sampler,
                    steps=steps,
                    parsed=parsed,
                    prompt=prompt,
                    loras=tags if checkpoint is None else swapped_for(tags, checkpoint),
                    negative=negatives[key],
                    name_suffix=suffix,
                    checkpoint=checkpoint,
                )
            )
    return cells


def grid_summary(config: GenerateConfig, images: int, batches: int) -> str:
    """What a run is about to render, said before it starts, e.g. ``3 prompts x 2 negative
    presets x 4 seeds = 24 images in 6 batches of up to 4``: the prompts and every other axis
    with more than one value."""
    axes = [
        ("negative preset", len(config.negative_presets)),
        ("size", len(config.image_sizes())),
        ("checkpoint", len(config.checkpoints)),
        ("sampler", len(config.samplers)),
        ("step count", len(config.steps)),
        ("LoRA scale", len(config.lora_scales or [None])),
        ("CFG scale", len(config.cfg_scales)),
        ("seed", len(config.seeds)),
    ]
    factors = [_counted(len(config.prompts), "prompt")]
    factors += [_counted(count, axis) for axis, count in axes if count > 1]
    return (
        f"{' x '.join(factors)} = {_counted(images, 'image')} in {_counted(batches, 'batch')} "
        f"of up to {config.batch_size}"
    )


def _counted(count: int, noun: str) -> str:
    plural = "es" if noun.endswith("ch") else "s"
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{plural}"


def check_lora_tags(prompts: Sequence[ParsedPrompt], lora_names: Iterable[str]) -> list[Lint]:
    """Raise PromptError for a tag naming no loaded LoRA or a LoRA tagged twice; return
    warnings for loaded LoRAs no prompt uses."""
    known = set(lora_names)
    used: set[str] = set()
    for index, parsed in enumerate(prompts):
        names = [tag.name for tag in parsed.loras]
        for name in names:
            if name not in known:
                loaded = ", ".join(sorted(known)) or "none"
                raise PromptError(
                    f"prompt {index + 1}: <lora:{name}:...> names a LoRA the job does not load "
                    f"(loaded: {loaded}); add it with --lora {name}=URI or loras: in the job"
                )
            if names.count(name) > 1:
                raise PromptError(f"prompt {index + 1}: LoRA '{name}' is tagged twice; keep one")
        used.update(names)
    # a checkpoint of a LoRA the prompts use (checkpoint_lora_name) is applied in its place
    used |= {name for name in known if lora_of_checkpoint(name) in used}
    return [
        Lint(
            "check_lora_tags",
            f"LoRA '{name}' is loaded but no prompt has <lora:{name}:...>, so it is not applied "
            "(WebUI applies a LoRA only where a prompt tags it)",
        )
        for name in sorted(known - used)
    ]


def count_prompt_tokens(tokenizers: Sequence[Any], prompts: Sequence[ParsedPrompt]) -> list[Lint]:
    """A note for each prompt longer than one 75-token chunk of any of the model's tokenizers
    (nothing is cut, as in WebUI)."""
    notes = []
    limit = min(tokenizer.model_max_length for tokenizer in tokenizers) - 2
    for index, parsed in enumerate(prompts):
        tokens = max(count_tokens(tokenizer, parsed) for tokenizer in tokenizers)
        if tokens > limit:
            notes.append(
                Lint(
                    "count_prompt_tokens",
                    f"prompt {index + 1} has {tokens} tokens: encoded in chunks of {limit} and "
                    "concatenated, as WebUI does; nothing is cut",
                    level="info",
                )
            )
    return notes


def group_by(items: Iterable[T], key: Callable[[T], Any]) -> list[tuple[Any, list[T]]]:
    """Groups in order of first appearance (unlike itertools.groupby, not only neighbours)."""
    groups: dict[Any, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.items())
