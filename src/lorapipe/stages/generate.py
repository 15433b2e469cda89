"""``lorapipe generate``: a grid of images over prompts, negative presets, LoRA scales, CFG
scales and seeds, with the numbers and the report to choose between them.

The grid (``GenerateConfig``, from a job file or flags) is every combination of

    prompts x negative_presets x lora_scales x cfg_scales x seeds

Prompts use A1111 syntax (``lorapipe.prompts``); ``<lora:name:w>`` names a LoRA of the job's
``loras`` map. A LoRA scale from the grid *replaces* the weight written in every ``<lora:>``
tag of the prompt (a ``<lora:name:te:unet>`` tag keeps its text-encoder/UNet ratio: UNet gets
the scale, the text encoder the scale times te/unet); leaving ``lora_scales`` out runs the
weights as written. Each cell's negative prompt is built from its preset by the rules in
``lorapipe.prompts`` (the LoRA scale and CFG of the cell take part).

How it stays fast: text conditioning is computed once per distinct prompt and negative (and
text-encoder LoRA weight); images that share their LoRA weights run together, up to
``batch_size`` per UNet call, whatever their prompt, negative or CFG (guidance is a
per-image tensor). Each image's noise comes from its own ``torch.Generator`` seeded with its
seed, used for the initial latents and, in ancestral/SDE samplers, for the noise of every step;
so an image does not depend on the batch it ran in, and equals a one-off
``StableDiffusionPipeline(prompt_embeds=..., negative_prompt_embeds=...,
generator=torch.Generator().manual_seed(seed))`` call with the same scheduler, steps and CFG.

Output (a directory, local or s3://, published whole when everything is written):

- ``images/*.png`` with A1111's ``parameters`` text (WebUI's PNG Info reads it)
- ``sheets/*.png``: a contact sheet per prompt x preset (rows CFG, columns LoRA scale x seed)
- ``index.parquet``: every image with its parameters and metrics
- ``report.html`` (self-contained), ``report.json``, ``report.md``, ``job.yaml`` (to rerun)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from lorapipe import image_metrics, lora_format, store
from lorapipe.errors import ConfigError, InputError, ModelError, PromptError
from lorapipe.prompts import (
    Lint,
    LoraTag,
    NegativeLibrary,
    NegativePrompt,
    ParsedPrompt,
    PromptEncoder,
    chunk_count,
    count_tokens,
    pad_chunks,
    parse_prompt,
    with_lora_weights,
)
from lorapipe.report_html import ReportPage, SheetSection, draw_contact_sheet, render_report

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

T = TypeVar("T")

# A1111 sampler name -> (diffusers scheduler class, options over the model's scheduler config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2M": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
    ),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False},
    ),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    # latents are not in [-1, 1]: diffusers' DDIM clips to it unless the config says not to,
    # and a model that ships a DPM-Solver config (no clip_sample key) would get noise
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
OUTPUT_MARKERS = ("report.json", "index.parquet")  # an older output that may be replaced
IMAGES_DIR = "images"
SHEETS_DIR = "sheets"
HASH_CHUNK = 1 << 20


@dataclass
class GenerateConfig:
    """One generation job. Every field is a job-file key and a CLI flag (``--lora-scale`` etc.
    repeat for list fields)."""

    # A1111-syntax prompts; <lora:NAME:w> refers to a LoRA in `loras`
    prompts: list[str] = field(default_factory=list)
    # LoRA name -> diffusers or kohya .safetensors, or a directory holding one (local or s3://)
    loras: dict[str, str] = field(default_factory=dict)
    # presets (landscape, portrait, product, none), layers, or layers joined by "+" (base+style);
    # the default is the base layer, which the article says every task needs
    negative_presets: list[str] = field(default_factory=lambda: ["base"])
    # terms appended to every negative prompt
    negative_extra: str = ""
    # grid LoRA scales, each replacing the weights in the prompts' <lora:> tags;
    # None: the weights as written
    lora_scales: list[float] | None = None
    # classifier-free guidance scales (the article recommends 7-11)
    cfg_scales: list[float] = field(default_factory=lambda: [7.0])
    seeds: list[int] = field(default_factory=lambda: [1])
    # an A1111 sampler name (see SAMPLERS)
    sampler: str = "DPM++ 2M Karras"
    steps: int = 20
    # image size in pixels (multiples of 8); None: the model's native size
    width: int | None = None
    height: int | None = None
    # 0 = off; 0.5-0.7 counters the overexposure of high LoRA scales / CFG (diffusers' option)
    guidance_rescale: float = 0.0
    # WebUI's "Clip skip": 1 = last CLIP layer
    clip_skip: int = 1
    # images per UNet call
    batch_size: int = 8
    # apply the LoRA-scale rule to negatives (lean below 0.6, stronger above 0.9)
    adapt_negatives: bool = True
    # drop negative terms that the prompt itself asks for ("soft focus" in both)
    drop_conflicting_negatives: bool = True
    # your YAML of negative layers/presets/related/rules, merged over lorapipe's
    negative_prompts_file: str | None = None
    # extra layers {name: [terms]} and presets {name: [layers]}, merged last
    layers: dict[str, list[str]] = field(default_factory=dict)
    presets: dict[str, list[str]] = field(default_factory=dict)
    # a local transformers CLIP model directory: adds a CLIP score per image
    clip_model: str | None = None
    # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # "auto" (float16 on GPU, float32 on CPU), "float32", "float16", "bfloat16"
    dtype: str = "auto"
    # longest side of an image in the contact sheets, pixels
    sheet_cell_size: int = 256

    def validate(self, source: str = "the job") -> None:
        """Raise ConfigError (one line naming the key) for anything that cannot run."""
        for key, what in (
            ("prompts", "prompt"),
            ("negative_presets", "negative preset (e.g. base, portrait or none)"),
            ("cfg_scales", "CFG scale"),
            ("seeds", "seed"),
        ):
            if not getattr(self, key):
                raise ConfigError(f"{source}: {key} is empty; give at least one {what}")
        if self.lora_scales is not None and not self.lora_scales:
            raise ConfigError(
                f"{source}: lora_scales is empty; give scales or leave the key out to use the "
                "weights written in the <lora:> tags"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"{source}: sampler '{self.sampler}' is unknown; use one of {', '.join(SAMPLERS)}"
            )
        _check_range(source, "steps", self.steps, 1, 1000)
        _check_range(source, "batch_size", self.batch_size, 1, 4096)
        _check_range(source, "clip_skip", self.clip_skip, 1, 12)
        _check_range(source, "guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _check_range(source, "sheet_cell_size", self.sheet_cell_size, 16, 2048)
        for cfg in self.cfg_scales:
            _check_range(source, "cfg_scales", cfg, 1.0, 100.0)
        for scale in self.lora_scales or []:
            _check_range(source, "lora_scales", scale, -10.0, 10.0)
        for seed in self.seeds:
            _check_range(source, "seeds", seed, 0, 2**63 - 1)
        for key in ("prompts", "negative_presets", "lora_scales", "cfg_scales", "seeds"):
            values = getattr(self, key) or []
            repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if repeated is not None:
                raise ConfigError(f"{source}: {key} lists {repeated!r} twice; keep one")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"{source}: {key} {value} must be a positive multiple of 8")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{source}: dtype '{self.dtype}' is unknown; use {', '.join(DTYPES)}")


def _check_range(source: str, key: str, value: float, low: float, high: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{source}: {key} value {value!r} must be between {low} and {high}")


# --------------------------------------------------------------------------- job files

JOB_KEYS = {f.name for f in dataclasses.fields(GenerateConfig)} | {"base_model"}


def load_job(uri: str) -> tuple[dict[str, Any], str | None]:
    """(config values, base_model or None) from a YAML or JSON job file, local or s3://."""
    text = store.read_text(uri)
    try:
        data = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        mark = getattr(error, "problem_mark", None)
        line = getattr(error, "lineno", None) or (mark.line + 1 if mark else "?")
        raise InputError(f"{uri} line {line}: not valid YAML/JSON; fix the syntax there") from error
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"{uri}: a job file is a mapping of keys (prompts:, seeds:, ...)")
    values = config_values(data, uri)
    base_model = values.pop("base_model", None)
    return values, base_model


def config_values(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check keys and types of job values (a job file or flags) and normalize them."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in JOB_KEYS:
            close = difflib.get_close_matches(str(key), sorted(JOB_KEYS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use {', '.join(sorted(JOB_KEYS))}"
            raise ConfigError(f"{source}: key '{key}' is unknown; {hint}")
        values[key] = _coerce(key, value, source)
    return values


def _coerce(key: str, value: Any, source: str) -> Any:
    where = f"{source}: {key}"
    if key in ("prompts", "negative_presets"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where} must be a list of strings")
        return list(items)
    if key in ("cfg_scales", "lora_scales", "seeds"):
        if value is None and key == "lora_scales":
            return None
        items = value if isinstance(value, list) else [value]
        kind = int if key == "seeds" else float
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            raise ConfigError(f"{where} must be a list of numbers, e.g. [1, 2, 3]")
        if kind is int and not all(float(v).is_integer() for v in items):
            raise ConfigError(f"{where} must be whole numbers")
        return [kind(v) for v in items]
    if key in ("loras", "layers", "presets"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of name: value")
        return {str(k): (str(v) if key == "loras" else v) for k, v in value.items()}
    if key in ("adapt_negatives", "drop_conflicting_negatives"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if key in ("steps", "batch_size", "clip_skip", "sheet_cell_size", "width", "height"):
        if value is None and key in ("width", "height"):
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number")
        return value
    if key == "guidance_rescale":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number")
        return float(value)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return value


# --------------------------------------------------------------------------- LoRAs


@dataclass(frozen=True)
class LoraSource:
    """A LoRA of the job: the name prompts use, the file loaded, the hash WebUI shows."""

    name: str
    uri: str  # as given
    weights_uri: str  # the .safetensors file loaded
    webui_hash: str  # 12 hex: A1111's "Lora hashes" value for this LoRA
    adapter: str  # adapter name inside the pipeline


def parse_lora_flag(text: str) -> tuple[str, str]:
    """``NAME=URI`` or a bare URI (named after its file stem / directory)."""
    name, separator, uri = text.partition("=")
    if separator and "/" not in name and not name.startswith("s3:"):
        return name.strip(), uri.strip()
    return "", text.strip()


def locate_lora(uri: str) -> tuple[str, str, str]:
    """(default name, file to load, file WebUI would hash) of a LoRA given as a .safetensors
    file or a directory. select's output holds ``pytorch_lora_weights.safetensors`` and a kohya
    ``<name>.safetensors``: the diffusers file is loaded, the kohya file names and hashes the
    LoRA, as WebUI sees it."""
    if uri.rstrip("/").endswith(".safetensors"):
        return _stem(uri), uri, uri
    files = [u for u in store.list_uris(uri) if u.endswith(".safetensors")]
    diffusers = [u for u in files if _basename(u) == lora_format.DIFFUSERS_WEIGHT_NAME]
    others = [u for u in files if u not in diffusers]
    if not files:
        raise ModelError(
            f"LoRA '{uri}' has no .safetensors file; give a LoRA file or select's output"
        )
    if not diffusers and len(others) > 1:
        raise ModelError(
            f"LoRA '{uri}' holds {len(others)} .safetensors files; give the LoRA file itself"
        )
    weights = diffusers[0] if diffusers else others[0]
    if len(others) == 1:
        return _stem(others[0]), weights, others[0]
    return _basename(uri), weights, weights


def resolve_lora(name: str, uri: str, *, adapter: str) -> LoraSource:
    """The LoRA of the job called ``name`` (or its default name) at ``uri``."""
    default_name, weights, hash_file = locate_lora(uri)
    return LoraSource(
        name=name or default_name,
        uri=uri,
        weights_uri=weights,
        webui_hash=webui_lora_hash(hash_file),
        adapter=adapter,
    )


def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1].removeprefix("file://")


def _stem(uri: str) -> str:
    return _basename(uri).rsplit(".", 1)[0]


def webui_lora_hash(uri: str) -> str:
    """A1111's LoRA short hash: the first 12 hex digits of the sha256 of a safetensors file's
    tensor data (everything after the header), kohya's ``sshs_model_hash``."""
    digest = hashlib.sha256()
    with store.local_file(uri) as path, path.open("rb") as file:
        lora_format._safetensors_header(path, uri)  # not safetensors: one line, never unpickled
        header_length = int.from_bytes(file.read(8), "little")
        file.seek(8 + header_length)
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def model_short_hash(model_dir: Path) -> str:
    """10 hex digits, like WebUI's model short hash, of the sha256 of the UNet weights (a
    diffusers directory has no single checkpoint file); the start of training's
    ``base_model_hash``."""
    digest = hashlib.sha256()
    weights = sorted((model_dir / "unet").glob("*.safetensors")) or sorted(
        (model_dir / "unet").glob("*.bin")
    )
    for path in weights:
        with path.open("rb") as file:
            while chunk := file.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:10]


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Cell:
    """One image of the grid."""

    prompt_index: int
    negative_preset: str
    lora_scale: float | None  # the grid value; None: weights as written in the tags
    cfg_scale: float
    seed: int
    parsed: ParsedPrompt  # the job's prompt
    prompt: str  # the prompt with this cell's LoRA weights written into its tags
    loras: tuple[LoraTag, ...]  # the weights this image runs with
    negative: NegativePrompt

    @property
    def file_name(self) -> str:
        scale = "-tagged" if self.lora_scale is None else f"{self.lora_scale:g}"
        return (
            f"p{self.prompt_index + 1:02d}_{_safe(self.negative_preset)}_lora{scale}"
            f"_cfg{self.cfg_scale:g}_seed{self.seed}.png"
        )

    @property
    def label(self) -> str:
        scale = "as tagged" if self.lora_scale is None else f"{self.lora_scale:g}"
        return (
            f"prompt {self.prompt_index + 1} / {self.negative_preset} / LoRA {scale} / "
            f"CFG {self.cfg_scale:g}"
        )


def _safe(text: str) -> str:
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


def effective_lora_scale(tags: Sequence[LoraTag]) -> float | None:
    """The LoRA strength the negative-prompt rules see: the largest UNet weight."""
    return max((tag.unet_weight for tag in tags), default=None)


def plan_grid(
    config: GenerateConfig, prompts: Sequence[ParsedPrompt], library: NegativeLibrary
) -> list[Cell]:
    """Every cell in grid order: prompt, preset, LoRA scale, CFG, seed."""
    cells = []
    negatives: dict[tuple[int, str, tuple[LoraTag, ...], float], NegativePrompt] = {}
    for (index, parsed), preset, scale, cfg in itertools.product(
        enumerate(prompts), config.negative_presets, config.lora_scales or [None], config.cfg_scales
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
        for seed in config.seeds:
            cells.append(
                Cell(index, preset, scale, cfg, seed, parsed, prompt, tags, negatives[key])
            )
    return cells


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
    return [
        Lint(
            "check_lora_tags",
            f"LoRA '{name}' is loaded but no prompt has <lora:{name}:...>, so it is not applied "
            "(WebUI applies a LoRA only where a prompt tags it)",
        )
        for name in sorted(known - used)
    ]


# --------------------------------------------------------------------------- rendering


def make_scheduler(sampler: str, scheduler_config: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler for an A1111 sampler name, over the model's config."""
    import diffusers

    class_name, options = SAMPLERS[sampler]
    return getattr(diffusers, class_name).from_config(scheduler_config, **options)


class GridRenderer:
    """Turns cells into images on one pipeline: LoRA weights set once per group, conditioning
    cached, up to ``batch_size`` images per UNet call, each from its own seed."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        *,
        adapters: Mapping[str, str],
        sampler: str,
        steps: int,
        width: int,
        height: int,
        guidance_rescale: float = 0.0,
        batch_size: int = 8,
        clip_skip: int = 1,
    ) -> None:
        self.pipe = pipe
        self.adapters = dict(adapters)  # LoRA name -> adapter name
        self.sampler = sampler
        self.steps = steps
        self.width = width
        self.height = height
        self.guidance_rescale = guidance_rescale
        self.batch_size = batch_size
        self.encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, clip_skip=clip_skip)
        self._conditioning: dict[tuple[Any, ...], torch.Tensor] = {}

    def render(self, cells: Sequence[Cell]) -> Iterator[tuple[list[Cell], list[Image.Image]]]:
        """Yield (cells, images) batch by batch, grouped by LoRA weights."""
        for loras, group in _group_by(cells, lambda cell: cell.loras):
            self.apply_loras(loras)
            conditioned = [(cell, *self.conditioning(cell)) for cell in group]
            for _, same_length in _group_by(conditioned, lambda item: item[1].shape[1]):
                for batch in _batched(same_length, self.batch_size):
                    batch_cells = [cell for cell, _, _ in batch]
                    positive = _cat([pos for _, pos, _ in batch])
                    negative = _cat([neg for _, _, neg in batch])
                    yield batch_cells, self.denoise(batch_cells, positive, negative)

    def apply_loras(self, loras: Sequence[LoraTag]) -> None:
        """Activate exactly these LoRAs at these weights (per component)."""
        if not self.adapters:
            return
        if not loras:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        with_text_encoder = set(self.pipe.get_list_adapters().get("text_encoder", []))
        names = [self.adapters[tag.name] for tag in loras]
        weights = [
            {"unet": tag.unet_weight}
            | ({"text_encoder": tag.te_weight} if name in with_text_encoder else {})
            for name, tag in zip(names, loras, strict=True)
        ]
        self.pipe.set_adapters(names, weights)

    def conditioning(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative) conditioning of a cell, padded to the same chunk count; each text
        is encoded once per text-encoder LoRA weights."""
        text_encoder_weights = tuple((tag.name, tag.te_weight) for tag in cell.loras)
        positive = self._encode(cell.parsed, text_encoder_weights)
        negative = self._encode(parse_prompt(cell.negative.text), text_encoder_weights)
        empty = self._encode(parse_prompt(""), text_encoder_weights)
        chunks = max(chunk_count(positive), chunk_count(negative))
        return pad_chunks(positive, chunks, empty), pad_chunks(negative, chunks, empty)

    def _encode(self, parsed: ParsedPrompt, text_encoder_weights: tuple[Any, ...]) -> torch.Tensor:
        key = (parsed.segments, text_encoder_weights)
        if key not in self._conditioning:
            self._conditioning[key] = self.encoder.encode(parsed)
        return self._conditioning[key]

    def denoise(
        self, cells: Sequence[Cell], positive: torch.Tensor, negative: torch.Tensor
    ) -> list[Image.Image]:
        """The images of one batch: per-image seeds and CFG, one UNet call per step."""
        import inspect

        import torch
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            rescale_noise_cfg,
        )
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        device, dtype = pipe.unet.device, pipe.unet.dtype
        scheduler = make_scheduler(self.sampler, pipe.scheduler.config)
        generators = [torch.Generator("cpu").manual_seed(cell.seed) for cell in cells]
        scheduler.set_timesteps(self.steps, device=device)
        shape = (
            len(cells),
            pipe.unet.config.in_channels,
            self.height // pipe.vae_scale_factor,
            self.width // pipe.vae_scale_factor,
        )
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        step_options = (
            {"generator": generators}
            if "generator" in inspect.signature(scheduler.step).parameters
            else {}
        )
        conditioning = torch.cat([negative, positive]).to(device=device, dtype=dtype)
        guidance = torch.tensor([c.cfg_scale for c in cells], device=device, dtype=dtype)
        guidance = guidance.view(-1, 1, 1, 1)
        with torch.inference_mode():
            for timestep in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
                noise = pipe.unet(
                    model_input, timestep, encoder_hidden_states=conditioning, return_dict=False
                )[0]
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance * (noise_text - noise_uncond)
                if self.guidance_rescale > 0:
                    noise = rescale_noise_cfg(noise, noise_text, self.guidance_rescale)
                latents = scheduler.step(
                    noise, timestep, latents, **step_options, return_dict=False
                )[0]
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)
        return pipe.image_processor.postprocess(decoded[0], output_type="pil")


def _group_by(items: Iterable[T], key: Callable[[T], Any]) -> list[tuple[Any, list[T]]]:
    """Groups in order of first appearance (unlike itertools.groupby, not only neighbours)."""
    groups: dict[Any, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.items())


def _batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.cat(list(tensors))


# --------------------------------------------------------------------------- PNG parameters


@dataclass(frozen=True)
class ParameterContext:
    """What every image's parameters text shares."""

    sampler: str
    steps: int
    width: int
    height: int
    model_hash: str
    model_name: str
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    lora_hashes: Mapping[str, str] = field(default_factory=dict)  # LoRA name -> 12 hex
    version: str = ""


def a1111_parameters(cell: Cell, context: ParameterContext) -> str:
    """The ``parameters`` text WebUI writes into its PNGs (and reads back in PNG Info)."""
    lines = [cell.prompt]
    if cell.negative.text:
        lines.append(f"Negative prompt: {cell.negative.text}")
    used_hashes = ", ".join(
        f"{re.sub('[:,]', '', tag.name)}: {context.lora_hashes[tag.name]}"
        for tag in cell.loras
        if tag.name in context.lora_hashes
    )
    fields = {
        "Steps": context.steps,
        "Sampler": context.sampler,
        "CFG scale": f"{cell.cfg_scale:g}",
        "Seed": cell.seed,
        "Size": f"{context.width}x{context.height}",
        "Model hash": context.model_hash,
        "Model": context.model_name,
        "Clip skip": context.clip_skip if context.clip_skip > 1 else None,
        "Guidance rescale": f"{context.guidance_rescale:g}" if context.guidance_rescale else None,
        "Lora hashes": used_hashes or None,
        "Version": context.version or None,
    }
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def _quote(value: Any) -> str:
    """WebUI quotes a value that holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if re.search(r"[,:\n]", text) else text


_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Read a ``parameters`` text back: ``prompt``, ``negative_prompt`` and every field."""
    lines = text.strip().split("\n")
    result: dict[str, str] = {}
    if len(_PARAMETER.findall(lines[-1])) >= 3:
        for key, value in _PARAMETER.findall(lines.pop()):
            result[key] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result["prompt"] = "\n".join(prompt)
    result["negative_prompt"] = "\n".join(negative)
    return result


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    info = PngInfo()
    info.add_text("parameters", parameters)  # Pillow falls back to iTXt for non-Latin-1 text
    image.save(path, pnginfo=info)


# --------------------------------------------------------------------------- run


def run(base_model_uri: str, output_uri: str, config: GenerateConfig) -> dict[str, Any]:
    """Generate the grid of ``config`` with the base model and the job's LoRAs; write images,
    sheets, index and reports to ``output_uri``; return the report."""
    from lorapipe import __version__, models

    config.validate()
    started = time.monotonic()
    library = NegativeLibrary.load(
        *([config.negative_prompts_file] if config.negative_prompts_file else []),
        overrides={"layers": config.layers, "presets": config.presets},
    )
    prompts = [parse_prompt(p, where=f"prompt {i + 1}") for i, p in enumerate(config.prompts)]
    job_lints = check_lora_tags(prompts, config.loras)
    cells = plan_grid(config, prompts, library)
    loras = [
        resolve_lora(name, uri, adapter=f"lora_{index}")
        for index, (name, uri) in enumerate(config.loras.items())
    ]

    device, dtype = device_and_dtype(config.device, config.dtype)
    model_dir = models.resolve_model_dir(base_model_uri)
    pipe = models.load_base_model(base_model_uri, torch_dtype=dtype)
    for lora in loras:
        lora_format.load_into_pipeline(pipe, lora.weights_uri, adapter_name=lora.adapter)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    native_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    config = dataclasses.replace(
        config, width=config.width or native_size, height=config.height or native_size
    )
    job_lints += count_prompt_tokens(pipe.tokenizer, prompts)

    renderer = GridRenderer(
        pipe,
        adapters={lora.name: lora.adapter for lora in loras},
        sampler=config.sampler,
        steps=config.steps,
        width=config.width,
        height=config.height,
        guidance_rescale=config.guidance_rescale,
        batch_size=config.batch_size,
        clip_skip=config.clip_skip,
    )
    context = ParameterContext(
        sampler=config.sampler,
        steps=config.steps,
        width=config.width,
        height=config.height,
        model_hash=model_short_hash(model_dir),
        model_name=_basename(base_model_uri),
        clip_skip=config.clip_skip,
        guidance_rescale=config.guidance_rescale,
        lora_hashes={lora.name: lora.webui_hash for lora in loras},
        version=f"lorapipe {__version__}",
    )
    scorer = None
    if config.clip_model:
        scorer = image_metrics.ClipScorer(config.clip_model, device=str(device))

    staging = _staging_dir(output_uri)
    try:
        (staging / IMAGES_DIR).mkdir()
        (staging / SHEETS_DIR).mkdir()
        render_started = time.monotonic()
        rows = render_to_files(renderer, cells, context, scorer, staging)
        render_seconds = time.monotonic() - render_started
        sheets = write_contact_sheets(staging, cells, config)
        write_index(staging / "index.parquet", rows)
        job = {"base_model": base_model_uri, **asdict(config)}
        job_text = yaml.safe_dump(job, sort_keys=False, allow_unicode=True)
        (staging / "job.yaml").write_text(job_text, encoding="utf-8")
        report = {
            "base_model": base_model_uri,
            "model_hash": context.model_hash,
            "loras": {lora.name: asdict(lora) for lora in loras},
            "output": output_uri,
            "images": len(rows),
            "sheets": [sheet.file for sheet in sheets],
            "lints": lint_table(cells, job_lints),
            "metrics": metrics_table(rows),
            "reproduce": f"lorapipe generate --job {store.join(output_uri, 'job.yaml')} "
            f"--out {output_uri}",
            "environment": {
                "lorapipe": __version__,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
            },
            "render_seconds": round(render_seconds, 3),
            "images_per_second": round(len(rows) / render_seconds, 4) if render_seconds else None,
            "seconds": round(time.monotonic() - started, 3),
            "config": job,
            "files": {
                "images": f"{IMAGES_DIR}/",
                "sheets": f"{SHEETS_DIR}/",
                "index": "index.parquet",
                "html": "report.html",
                "job": "job.yaml",
            },
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (staging / "report.md").write_text(render_markdown(report), encoding="utf-8")
        page = report_page(report, sheets, job_text)
        (staging / "report.html").write_text(render_report(page), encoding="utf-8")
        _publish(staging, output_uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d images to %s in %.1f s", len(rows), output_uri, report["seconds"])
    return report


def device_and_dtype(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    import torch

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError as error:
        raise ConfigError(
            f"device '{device_name}' is not a torch device; use cpu or cuda"
        ) from error
    if dtype_name == "auto":
        dtype_name = "float32" if device.type == "cpu" else "float16"
    return device, getattr(torch, dtype_name)


def count_prompt_tokens(tokenizer: Any, prompts: Sequence[ParsedPrompt]) -> list[Lint]:
    """A note for each prompt longer than one 75-token chunk (nothing is cut, as in WebUI)."""
    notes = []
    limit = tokenizer.model_max_length - 2
    for index, parsed in enumerate(prompts):
        tokens = count_tokens(tokenizer, parsed)
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


def render_to_files(
    renderer: GridRenderer,
    cells: Sequence[Cell],
    context: ParameterContext,
    scorer: image_metrics.ClipScorer | None,
    directory: Path,
) -> list[dict[str, Any]]:
    """Render every cell into ``directory/images`` as PNG with its parameters; return the index
    rows (parameters and metrics) in grid order."""
    rows = {}
    with tqdm(total=len(cells), unit="image", desc="generate", mininterval=1.0) as progress:
        for batch, images in renderer.render(cells):
            texts = [cell.parsed.plain_text for cell in batch]
            clip_scores = scorer.score(images, texts) if scorer else [None] * len(batch)
            for cell, image, clip_score in zip(batch, images, clip_scores, strict=True):
                parameters = a1111_parameters(cell, context)
                save_png(image, directory / IMAGES_DIR / cell.file_name, parameters)
                metrics = {**image_metrics.compute_metrics(image), "clip_score": clip_score}
                rows[cell.file_name] = index_row(cell, context, parameters, metrics)
            progress.update(len(batch))
    return [rows[cell.file_name] for cell in cells]


def index_row(
    cell: Cell, context: ParameterContext, parameters: str, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "file": f"{IMAGES_DIR}/{cell.file_name}",
        "prompt_index": cell.prompt_index + 1,
        "prompt": cell.prompt,
        "negative_preset": cell.negative_preset,
        "negative_prompt": cell.negative.text,
        "lora_scale": cell.lora_scale,
        "loras": [asdict(tag) for tag in cell.loras],
        "cfg_scale": cell.cfg_scale,
        "seed": cell.seed,
        "sampler": context.sampler,
        "steps": context.steps,
        "width": context.width,
        "height": context.height,
        "guidance_rescale": context.guidance_rescale,
        "clip_skip": context.clip_skip,
        "model_hash": context.model_hash,
        "parameters": parameters,
        **metrics,
    }


def index_schema() -> Any:
    import pyarrow as pa

    lora = pa.struct(
        [("name", pa.string()), ("te_weight", pa.float64()), ("unet_weight", pa.float64())]
    )
    return pa.schema(
        [
            ("file", pa.string()),
            ("prompt_index", pa.int32()),
            ("prompt", pa.string()),
            ("negative_preset", pa.string()),
            ("negative_prompt", pa.string()),
            ("lora_scale", pa.float64()),
            ("loras", pa.list_(lora)),
            ("cfg_scale", pa.float64()),
            ("seed", pa.int64()),
            ("sampler", pa.string()),
            ("steps", pa.int32()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("guidance_rescale", pa.float64()),
            ("clip_skip", pa.int32()),
            ("model_hash", pa.string()),
            ("parameters", pa.string()),
            *[(name, pa.float64()) for name in (*image_metrics.METRIC_NAMES, "clip_score")],
        ]
    )


def write_index(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows), schema=index_schema()), path)


def write_contact_sheets(
    directory: Path, cells: Sequence[Cell], config: GenerateConfig
) -> list[SheetSection]:
    """One sheet per prompt x negative preset: rows CFG, columns LoRA scale, one image per
    seed inside each column."""
    scales = config.lora_scales or [None]
    columns = [f"LoRA {s:g}" if s is not None else "LoRA as tagged" for s in scales]
    sheets = []
    for (prompt_index, preset), group in _group_by(
        cells, lambda cell: (cell.prompt_index, cell.negative_preset)
    ):
        images = {
            (
                config.cfg_scales.index(cell.cfg_scale),
                scales.index(cell.lora_scale),
                config.seeds.index(cell.seed),
            ): directory / IMAGES_DIR / cell.file_name
            for cell in group
        }
        title = f"prompt {prompt_index + 1} / {preset}"
        image = draw_contact_sheet(
            f"{title}: {group[0].parsed.plain_text}",
            rows=[f"CFG {cfg:g}" for cfg in config.cfg_scales],
            columns=columns,
            subcolumns=[f"seed {seed}" for seed in config.seeds],
            images=images,
            cell_size=config.sheet_cell_size,
        )
        file = f"{SHEETS_DIR}/p{prompt_index + 1:02d}_{_safe(preset)}.png"
        image.save(directory / file)
        negatives = {columns[scales.index(cell.lora_scale)]: cell.negative.text for cell in group}
        sheets.append(
            SheetSection(
                title=title,
                prompt=config.prompts[prompt_index],
                image=image,
                file=file,
                negatives=list(negatives.items()),
            )
        )
    return sheets


def lint_table(cells: Sequence[Cell], job_lints: Sequence[Lint]) -> list[dict[str, Any]]:
    """Every distinct lint message with how many grid cells (seeds not counted) it concerns
    and one of them; warnings first."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for lint in job_lints:
        found.setdefault((lint.level, lint.rule, lint.message), []).append("the job")
    seen = set()
    for cell in cells:
        if cell.label in seen:
            continue
        seen.add(cell.label)
        for lint in cell.negative.lints:
            found.setdefault((lint.level, lint.rule, lint.message), []).append(cell.label)
    rows = [
        {"level": level, "rule": rule, "message": message, "count": len(where), "where": where[0]}
        for (level, rule, message), where in found.items()
    ]
    return sorted(rows, key=lambda row: (row["level"] != "warning", -row["count"]))


def metrics_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean metrics per negative preset x LoRA scale x CFG, in grid order."""
    names = [*image_metrics.METRIC_NAMES, "clip_score"]
    table = []
    for (preset, scale, cfg), group in _group_by(
        rows, lambda row: (row["negative_preset"], row["lora_scale"], row["cfg_scale"])
    ):
        entry: dict[str, Any] = {
            "negative_preset": preset,
            "lora_scale": "as tagged" if scale is None else scale,
            "cfg_scale": cfg,
            "images": len(group),
        }
        for name in names:
            values = [row[name] for row in group if row[name] is not None]
            entry[name] = sum(values) / len(values) if values else None
        table.append(entry)
    return table


METRIC_COLUMNS = {
    "negative_preset": "negative preset",
    "lora_scale": "LoRA scale",
    "cfg_scale": "CFG",
    "images": "images",
    "sharpness": "sharpness (var. of Laplacian)",
    "highlight_clipping": "highlight clipping",
    "shadow_clipping": "shadow clipping",
    "mean_luminance": "mean luminance",
    "colorfulness": "colorfulness",
    "clip_score": "CLIP score",
}


def report_page(
    report: Mapping[str, Any], sheets: Sequence[SheetSection], job_text: str
) -> ReportPage:
    config = report["config"]
    columns = dict(METRIC_COLUMNS)
    if not config.get("clip_model"):
        columns.pop("clip_score")
    loras = ", ".join(f"{name} ({lora['webui_hash']})" for name, lora in report["loras"].items())
    return ReportPage(
        title=f"lorapipe generate: {report['images']} images",
        summary={
            "base model": f"{report['base_model']} (hash {report['model_hash']})",
            "LoRAs": loras or "none",
            "sampler": f"{config['sampler']}, {config['steps']} steps",
            "size": f"{config['width']}x{config['height']}",
            "guidance rescale": config["guidance_rescale"],
            "grid": f"{len(config['prompts'])} prompts x {len(config['negative_presets'])} "
            f"presets x {len(config['lora_scales'] or [None])} LoRA scales x "
            f"{len(config['cfg_scales'])} CFG x {len(config['seeds'])} seeds",
            "time": f"{report['seconds']:.1f} s ({report['images_per_second']} images/s rendering)",
            "device": f"{report['environment']['device']}, {report['environment']['dtype']}",
        },
        sheets=sheets,
        lints=report["lints"],
        metric_columns=columns,
        metric_rows=report["metrics"],
        reproduce_command=report["reproduce"],
        job_text=job_text,
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# lorapipe generate: {report['images']} images",
        "",
        f"- base model: `{report['base_model']}` (hash {report['model_hash']})",
        f"- LoRAs: {', '.join(report['loras']) or 'none'}",
        f"- contact sheets: {', '.join(report['sheets'])}",
        "- index: `index.parquet`; full report: `report.html`",
        f"- reproduce: `{report['reproduce']}`",
        "",
        "## Prompt checks",
        "",
    ]
    lines += [
        f"- **{lint['level']}** `{lint['rule']}` ({lint['count']} cells): {lint['message']}"
        for lint in report["lints"]
    ] or ["No warnings."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- publishing


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _staging_dir(output_uri: str) -> Path:
    """A private directory for the outputs: a hidden sibling of a local destination (so that
    publishing is a rename), a temporary directory for S3."""
    _check_replaceable(output_uri)
    if store.is_s3(output_uri):
        return Path(tempfile.mkdtemp(prefix="lorapipe-generate-"))
    destination = _local_path(output_uri)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    return staging


def _check_replaceable(output_uri: str) -> None:
    """An output may replace nothing, an empty folder or an older generate output."""
    if store.is_s3(output_uri):
        existing = store.list_uris(output_uri)
        is_output = store.exists(store.join(output_uri, OUTPUT_MARKERS[0]))
    else:
        destination = _local_path(output_uri)
        if destination.exists() and not destination.is_dir():
            raise ConfigError(f"--out '{output_uri}' is a file; give a folder")
        existing = list(destination.iterdir()) if destination.is_dir() else []
        is_output = all((destination / name).is_file() for name in OUTPUT_MARKERS)
    if existing and not is_output:
        raise ConfigError(
            f"--out '{output_uri}' holds files that are not a lorapipe generate output; "
            "give a new or empty folder"
        )


def _publish(staging: Path, output_uri: str) -> None:
    """Local: rename into place (an older output is moved aside first and deleted after).
    S3: upload with the manifest last, then delete objects the new output does not have."""
    if store.is_s3(output_uri):
        store.put_dir(staging, output_uri)
        keep = {
            store.join(output_uri, p.relative_to(staging).as_posix())
            for p in staging.rglob("*")
            if p.is_file()
        } | {store.join(output_uri, store.MANIFEST_NAME)}
        for uri in store.list_uris(output_uri):
            if uri not in keep:
                store.delete(uri)
        return
    destination = _local_path(output_uri)
    if not destination.exists():
        os.rename(staging, destination)
        return
    retired = destination.parent / f".{destination.name}.{uuid.uuid4().hex[:8]}.old"
    os.rename(destination, retired)
    try:
        os.rename(staging, destination)
    except OSError:
        os.rename(retired, destination)
        raise
    shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------- command line

# CLI flag (argparse dest) -> config field, for flags whose name differs from the field
LIST_FLAGS = {
    "prompt": "prompts",
    "negative_preset": "negative_presets",
    "lora_scale": "lora_scales",
    "cfg_scale": "cfg_scales",
    "seed": "seeds",
}
SCALAR_FLAGS = (
    "negative_extra",
    "sampler",
    "steps",
    "width",
    "height",
    "guidance_rescale",
    "clip_skip",
    "batch_size",
    "adapt_negatives",
    "drop_conflicting_negatives",
    "negative_prompts_file",
    "clip_model",
    "device",
    "dtype",
    "sheet_cell_size",
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = GenerateConfig()
    parser.add_argument("--job", help="YAML or JSON job file: GenerateConfig keys + base_model")
    parser.add_argument("--base-model", help="diffusers model directory, local or s3://")
    parser.add_argument("--out", required=True, help="output directory, local or s3://")
    parser.add_argument(
        "--lora",
        action="append",
        metavar="[NAME=]URI",
        help="a LoRA file or select's output directory; NAME is what <lora:NAME:w> uses "
        "(default: the file stem). Repeatable",
    )
    parser.add_argument("--prompt", action="append", help="an A1111 prompt. Repeatable")
    parser.add_argument(
        "--negative-preset",
        action="append",
        help="preset, layer or layers joined by + (default base). Repeatable",
    )
    parser.add_argument("--negative-extra", help="terms appended to every negative prompt")
    parser.add_argument(
        "--lora-scale", action="append", type=float, help="replaces <lora:> weights. Repeatable"
    )
    parser.add_argument("--cfg-scale", action="append", type=float, help="Repeatable")
    parser.add_argument("--seed", action="append", type=int, help="Repeatable")
    parser.add_argument(
        "--sampler", help=f"A1111 name (default {defaults.sampler}): {', '.join(SAMPLERS)}"
    )
    parser.add_argument("--steps", type=int, help=f"default {defaults.steps}")
    parser.add_argument("--width", type=int, help="default: the model's native size")
    parser.add_argument("--height", type=int, help="default: the model's native size")
    parser.add_argument("--guidance-rescale", type=float, help="0-1 (default 0: off)")
    parser.add_argument("--clip-skip", type=int, help="WebUI's Clip skip (default 1)")
    parser.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    parser.add_argument(
        "--adapt-negatives",
        action=argparse.BooleanOptionalAction,
        help="lean negatives below LoRA scale 0.6, stronger above 0.9 (default on)",
    )
    parser.add_argument(
        "--drop-conflicting-negatives",
        action=argparse.BooleanOptionalAction,
        help="drop negative terms the prompt asks for (default on)",
    )
    parser.add_argument("--negative-prompts-file", help="your layers/presets YAML")
    parser.add_argument("--clip-model", help="local CLIP model directory for a CLIP score")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=DTYPES, help="default auto")
    parser.add_argument("--sheet-cell-size", type=int, help="thumbnail size in contact sheets")


def config_from_args(args: argparse.Namespace) -> tuple[GenerateConfig, str]:
    """The job file's values with the flags given on top; (config, base model URI)."""
    values, base_model = load_job(args.job) if args.job else ({}, None)
    flags = {field_name: getattr(args, dest) for dest, field_name in LIST_FLAGS.items()}
    flags |= {name: getattr(args, name) for name in SCALAR_FLAGS}
    values |= config_values({k: v for k, v in flags.items() if v is not None}, "command line")
    loras = dict(values.get("loras", {}))
    for text in args.lora or []:
        name, uri = parse_lora_flag(text)
        loras[name or locate_lora(uri)[0]] = uri
    values["loras"] = loras
    base_model = args.base_model or base_model
    if not base_model:
        raise ConfigError("no base model: give --base-model DIR or base_model: in the job file")
    config = GenerateConfig(**values)
    config.validate(args.job or "command line")
    return config, base_model


def main(args: argparse.Namespace) -> int:
    config, base_model = config_from_args(args)
    report = run(base_model, args.out, config)
    warnings = sum(1 for lint in report["lints"] if lint["level"] == "warning")
    print(
        f"wrote {report['images']} images and {len(report['sheets'])} contact sheets to "
        f"{args.out} ({warnings} prompt warnings); open {store.join(args.out, 'report.html')}"
    )
    return 0
