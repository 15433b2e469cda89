"""``lorapipe generate``: a grid of images over prompts, negative presets, image sizes,
samplers, step counts, LoRA scales, CFG scales and seeds, with the numbers and the report to
choose between them.

The grid (``GenerateConfig``, from a job file or flags) is every combination of

    prompts x negative_presets x sizes x samplers x steps x lora_scales x cfg_scales x seeds

Prompts use A1111 syntax (``lorapipe.prompts.syntax``); ``<lora:name:w>`` names a LoRA of the job's
``loras`` map. A LoRA scale from the grid *replaces* the weight written in every ``<lora:>``
tag of the prompt (a ``<lora:name:te:unet>`` tag keeps its text-encoder/UNet ratio: UNet gets
the scale, the text encoder the scale times te/unet); leaving ``lora_scales`` out runs the
weights as written. Each cell's negative prompt is built from its preset by the rules in
``lorapipe.prompts.negatives`` (the LoRA scale and CFG of the cell take part).

How it stays fast: images that share their LoRA weights, size, sampler, step count and
conditioning length run together, up to ``batch_size`` per UNet call, whatever their prompt,
negative or CFG (guidance is a per-image tensor). The grid streams: the batches are planned
from token counts, each batch's texts are encoded just before it runs (a text the recent
batches used is not encoded again), so the first image comes at once and memory does not grow
with the number of prompts.
Before rendering, the run logs how many images and batches the grid makes. Each image's noise
comes from its own ``torch.Generator`` seeded with its seed, used for the initial latents and,
in ancestral/SDE samplers, for the noise of every step; so an image does not depend on the
batch it ran in, and equals a one-off ``StableDiffusionPipeline(prompt_embeds=...,
negative_prompt_embeds=..., generator=torch.Generator().manual_seed(seed))`` call with the same
scheduler, steps and CFG (SDXL's ``StableDiffusionXLPipeline`` with ``pooled_prompt_embeds``
and ``negative_pooled_prompt_embeds`` too).

Every model family renders the same grid; what differs (SDXL's two text encoders, its pooled
embedding and size conditioning, its 1024 px native size) comes from the family
(``lorapipe.models.ModelFamily``) and the model's config.

Output (a directory, local or s3://, published whole when everything is written):

- ``images/*.png`` with A1111's ``parameters`` text (WebUI's PNG Info reads it)
- ``sheets/*.png``: contact sheets, ``grid_x`` across and ``grid_y`` down (LoRA scale x seed
  unless chosen), one per combination of the other axes' values
- ``index.parquet``: every image with its parameters and metrics
- ``report.html`` (self-contained), ``report.json``, ``report.md``, ``job.yaml`` (to rerun)

This module is the stage (the job, ``run``, publishing, the command line); the machinery is in
``lorapipe.generation``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from lorapipe import config as config_options
from lorapipe import image_metrics, outputs, store
from lorapipe.config import Where, option
from lorapipe.errors import ConfigError, InputError
from lorapipe.generation.grid import (
    check_lora_tags,
    checkpoint_label,
    checkpoint_lora_name,
    count_prompt_tokens,
    grid_summary,
    plan_grid,
)
from lorapipe.generation.index import write_index
from lorapipe.generation.infotext import ParameterContext
from lorapipe.generation.layout import IMAGES_DIR, SHEETS_DIR
from lorapipe.generation.loras import (
    basename,
    check_lora_family,
    locate_lora,
    model_short_hash,
    parse_lora_flag,
    resolve_lora,
)
from lorapipe.generation.rendering import (
    GridRenderer,
    device_and_dtype,
    load_pipeline,
    render_to_files,
)
from lorapipe.generation.report import lint_table, run_report, write_reports
from lorapipe.generation.samplers import SAMPLERS
from lorapipe.generation.sheets import SHEET_AXES, write_contact_sheets
from lorapipe.prompts.encoding import check_clip_skip
from lorapipe.prompts.negatives import NegativeLibrary
from lorapipe.prompts.syntax import parse_prompt

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")
OUTPUT_MARKERS = ("report.json", "index.parquet")  # an older output that may be replaced
OUTPUT_KIND = outputs.OutputKind(
    "a lorapipe generate output",
    OUTPUT_MARKERS,
    ConfigError,
    refusal="--out '{uri}' holds files that are not {name}; give a new or empty folder",
)


@dataclass
class GenerateConfig:
    """One generation job. Every field is a job-file key and a CLI flag (list flags repeat:
    ``--seed 1 --seed 2`` or ``--seeds 1 2``)."""

    COMMAND: ClassVar[str] = "generate"

    prompts: list[str] = option(
        default_factory=list,
        help="A1111-syntax prompts; `<lora:NAME:w>` refers to a LoRA in `loras`",
        aliases=("prompt",),
        separator=None,
    )
    loras: dict[str, str] = option(
        default_factory=dict,
        help="LoRA name -> diffusers or kohya .safetensors, or a directory holding one (local "
        "or `s3://`); on the command line `--lora [NAME=]URI` (NAME defaults to the file stem)",
        flag=False,
    )
    trained_lora: str | None = option(
        None,
        help="`lorapipe select`'s output directory: its LoRA joins `loras`, and every prompt that "
        "does not use it gets `<lora:NAME:1>` appended, so the grid's LoRA scales reach it",
    )
    negative_presets: list[str] = option(
        default_factory=lambda: ["base"],
        help="presets (landscape, portrait, product, none), layers, or layers joined by `+` "
        "(base+style); the base layer is what the article says every task needs",
        aliases=("negative_preset",),
    )
    negative_extra: str = option("", help="terms appended to every negative prompt")
    lora_scales: list[float] | None = option(
        None,
        help="grid LoRA scales, each replacing the weights in the prompts' `<lora:>` tags",
        aliases=("lora_scale",),
        default_text="none (the weights as written)",
        minimum=-10.0,
        maximum=10.0,
    )
    cfg_scales: list[float] = option(
        default_factory=lambda: [7.0],
        help="classifier-free guidance scales (the article recommends 7-11)",
        aliases=("cfg_scale",),
        minimum=1.0,
        maximum=100.0,
    )
    seeds: list[int] = option(
        default_factory=lambda: [1], help="seeds of the grid", aliases=("seed",), minimum=0
    )
    samplers: list[str] = option(
        default_factory=lambda: ["DPM++ 2M Karras"],
        help="A1111 sampler names; one (`sampler: Euler a`, `--sampler`) or several, an axis of "
        "the grid",
        former_names=("sampler",),
        choices=tuple(SAMPLERS),
        separator=None,
    )
    steps: list[int] = option(
        default_factory=lambda: [20], help="sampling steps", minimum=1, maximum=1000
    )
    sizes: list[str] = option(
        default_factory=list,
        help="image sizes of the grid, `WIDTHxHEIGHT` with sides multiples of 8 (`512x768`, "
        "`768x512`: review a portrait LoRA at portrait sizes); give either sizes or "
        "width/height",
        aliases=("size",),
        default_text="[] (one size: width x height)",
    )
    width: int | None = option(
        None,
        help="image width in pixels, a multiple of 8, when `sizes` is not given",
        default_text="the model's native size",
    )
    height: int | None = option(
        None,
        help="image height in pixels, a multiple of 8, when `sizes` is not given",
        default_text="the model's native size",
    )
    max_image_side: int = option(
        4096,
        help="the largest width or height the job accepts, in pixels: a larger one (a typo such "
        "as `--height 100000`) is refused before anything loads; raise it for a device that "
        "renders such sizes",
        minimum=8,
        maximum=16384,
    )
    guidance_rescale: float = option(
        0.0,
        help="`0`: off; 0.5-0.7 counters the overexposure of high LoRA scales / CFG (diffusers' "
        "option)",
        minimum=0.0,
        maximum=1.0,
    )
    clip_skip: int = option(
        1,
        help="WebUI's Clip skip: 1 = last CLIP layer (SD 1.x/2.x; SDXL reads the penultimate)",
        minimum=1,
        maximum=12,
    )
    batch_size: int = option(8, help="images per UNet call", minimum=1, maximum=4096)
    adapt_negatives: bool = option(
        True,
        help="apply the LoRA-scale rule to negatives (lean below 0.6, stronger above 0.9)",
    )
    drop_conflicting_negatives: bool = option(
        True, help='drop negative terms that the prompt itself asks for ("soft focus" in both)'
    )
    negative_prompts_file: str | None = option(
        None, help="your YAML of negative layers/presets/related/rules, merged over lorapipe's"
    )
    layers: dict[str, list[str]] = option(
        default_factory=dict,
        help="extra negative layers `{name: [terms]}`, merged last (job file only)",
        flag=False,
    )
    presets: dict[str, list[str]] = option(
        default_factory=dict,
        help="extra negative presets `{name: [layers]}`, merged last (job file only)",
        flag=False,
    )
    base_model_config: str = option(
        "",
        help="for a `.safetensors` base model of another architecture: a local diffusers "
        "directory whose component configs fit it",
        default_text="lorapipe's configs of the file's family",
    )
    clip_model: str | None = option(
        None, help="a local transformers CLIP model directory: adds a CLIP score per image"
    )
    device: str = option("auto", help="`auto` (cuda if available), `cpu`, `cuda`, `cuda:1`, ...")
    dtype: str = option("auto", help="`auto` is float16 on GPU, float32 on CPU", choices=DTYPES)
    sheet_cell_size: int = option(
        256,
        help="short side of a thumbnail in the contact sheets, pixels",
        minimum=128,
        maximum=2048,
    )
    grid_x: str = option(
        "lora_scale",
        help="what the contact sheets' columns vary; every other axis with more than one value "
        "makes separate sheets",
        choices=SHEET_AXES,
    )
    grid_y: str = option(
        "seed", help="what the contact sheets' rows vary (not grid_x's axis)", choices=SHEET_AXES
    )
    checkpoints: list[str] = option(
        default_factory=list,
        help="LoRA checkpoints to compare on the grid's `checkpoint` axis: train's "
        "`checkpoint-<step>` folders or `.safetensors` files (local or `s3://`); each image runs "
        "with one of them in place of the one LoRA the prompts use",
        aliases=("checkpoint",),
    )

    def __post_init__(self) -> None:
        """A lone sampler or step count (``steps=20``, as callers wrote it before these were
        lists) is a list of one, as it is in a job file."""
        if isinstance(self.samplers, str):
            self.samplers = [self.samplers]
        if isinstance(self.steps, int):
            self.steps = [self.steps]

    def validate(self, source: str | Where = "the job") -> None:
        """Raise ConfigError (one line naming the key) for anything that cannot run."""
        where = config_options.plain(source)
        for key, what in (
            ("prompts", "prompt"),
            ("negative_presets", "negative preset (e.g. base, portrait or none)"),
            ("cfg_scales", "CFG scale"),
            ("seeds", "seed"),
            ("samplers", "sampler"),
            ("steps", "step count"),
        ):
            if not getattr(self, key):
                raise ConfigError(f"{where(key)} is empty; give at least one {what}")
        if self.lora_scales is not None and not self.lora_scales:
            raise ConfigError(
                f"{where('lora_scales')} is empty; give scales or leave the key out to use the "
                "weights written in the <lora:> tags"
            )
        for sampler in self.samplers:
            if sampler not in SAMPLERS:
                raise ConfigError(
                    f"{where('samplers')} '{sampler}' is unknown; use one of {', '.join(SAMPLERS)}"
                )
        for key in ("grid_x", "grid_y"):
            if getattr(self, key) not in SHEET_AXES:
                raise ConfigError(
                    f"{where(key)} '{getattr(self, key)}' is not an axis; use one of "
                    f"{', '.join(SHEET_AXES)}"
                )
        if self.grid_x == self.grid_y:
            raise ConfigError(
                f"{where('grid_y')} is '{self.grid_y}', the axis grid_x already shows; give "
                "grid_x and grid_y two different axes (e.g. grid_x: lora_scale, grid_y: seed)"
            )
        for item in config_options.options(type(self)):
            spec = item.spec
            if spec.minimum is None or spec.maximum is None:
                continue
            value = getattr(self, item.name)
            for single in value if isinstance(value, list) else [value]:
                if single is not None:
                    _check_range(where, item.name, single, spec.minimum, spec.maximum)
        for seed in self.seeds:
            _check_range(where, "seeds", seed, 0, 2**63 - 1)
        for key in (
            "prompts",
            "negative_presets",
            "lora_scales",
            "cfg_scales",
            "seeds",
            "samplers",
            "steps",
        ):
            values = getattr(self, key) or []
            repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if repeated is not None:
                raise ConfigError(f"{where(key)} lists {repeated!r} twice; keep one")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is None:
                continue
            if value < 8 or value % 8:
                raise ConfigError(f"{where(key)} {value} must be a positive multiple of 8")
            self._check_side(where(key), str(value), value)
        if self.sizes and (self.width is not None or self.height is not None):
            raise ConfigError(
                f"{where('sizes')} and width/height are both set; give the sizes only "
                "(e.g. [512x768, 768x512]) or width and height only"
            )
        sizes = [parse_size(text, where) for text in self.sizes]
        for text, (width, height) in zip(self.sizes, sizes, strict=True):
            self._check_side(where("sizes"), repr(text), max(width, height))
        for index, size in enumerate(sizes):
            if size in sizes[:index]:
                raise ConfigError(f"{where('sizes')} lists {size_text(*size)} twice; keep one")
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"{where('dtype')} '{self.dtype}' is unknown; use {', '.join(DTYPES)}"
            )

    def _check_side(self, key: str, value: str, side: int) -> None:
        """Refuse a side past ``max_image_side``: such an image runs for hours or exhausts the
        device's memory, so it is refused before any work."""
        if side > self.max_image_side:
            limit = self.max_image_side
            raise ConfigError(
                f"{key} {value} is larger than max_image_side ({limit} px per side); give sides "
                f"of at most {limit}, or raise max_image_side (--max-image-side) for a device "
                "that renders such sizes"
            )

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each size of the grid: ``sizes``, else ``width`` x ``height``
        (``run`` resolves them into ``sizes`` with :func:`with_sizes_resolved`)."""
        if self.sizes:
            return [parse_size(text) for text in self.sizes]
        if self.width is None or self.height is None:
            raise ConfigError("width and height are not set; give both, or sizes")
        return [(self.width, self.height)]


def parse_size(text: str, source: str | Where = "the job") -> tuple[int, int]:
    """(width, height) of a ``sizes`` entry such as ``512x768``; each side a multiple of 8."""
    where = config_options.plain(source)
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"{where('sizes')} {text!r} is not WIDTHxHEIGHT; write e.g. 512x768")
    width, height = int(match[1]), int(match[2])
    if width < 8 or width % 8 or height < 8 or height % 8:
        nearest = size_text(*(max(8, 8 * round(side / 8)) for side in (width, height)))
        raise ConfigError(
            f"{where('sizes')} {text!r}: each side must be a positive multiple of 8, e.g. {nearest}"
        )
    return width, height


def size_text(width: int, height: int) -> str:
    """A size as A1111 writes it: ``512x768``."""
    return f"{width}x{height}"


def _check_range(where: Where, key: str, value: float, low: float, high: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{where(key)} value {value!r} must be between {low} and {high}")


# --------------------------------------------------------------------------- job files


def load_job(uri: str) -> tuple[dict[str, Any], str | None]:
    """(config values, base_model or None) from a YAML or JSON job file, local or s3://."""
    data, origins = config_options.read_mapping(uri)
    base_model = data.pop("base_model", None)
    if base_model is not None and not isinstance(base_model, str):
        raise ConfigError(f"{origins['base_model']} must be a string, got {base_model!r}")
    return config_values(data, origins), base_model


def job_values_from_text(text: str, source: str) -> dict[str, Any]:
    """The checked values of job YAML given as text (a pipeline parameter); empty: none."""
    if not text.strip():
        return {}
    data, origins = config_options.parse_mapping(text, source)
    if "base_model" in data:
        raise ConfigError(
            f"{origins['base_model']}: the pipeline sets the base model; leave it out"
        )
    return config_values(data, origins)


def config_values(data: Mapping[str, Any], source: str | Mapping[str, str]) -> dict[str, Any]:
    """Check keys and types of job values (a job file or flags) and normalize them;
    ``source`` names where they came from (a label, or ``{key: origin}``)."""

    def where(key: str) -> str:
        return source.get(key, key) if isinstance(source, Mapping) else f"{source}: key '{key}'"

    return config_options.checked_values(GenerateConfig, data, where)


def with_trained_lora(config: GenerateConfig) -> GenerateConfig:
    """``trained_lora`` resolved: its LoRA in ``loras`` and in every prompt."""
    if not config.trained_lora:
        return config
    name, lora_file = chosen_lora(config.trained_lora)
    return dataclasses.replace(
        config,
        prompts=[with_lora_tag(prompt, name) for prompt in config.prompts],
        loras={**config.loras, name: lora_file},
        trained_lora=None,
    )


def with_checkpoints(config: GenerateConfig) -> GenerateConfig:
    """``checkpoints`` loaded as LoRAs of their own (``NAME@checkpoint-300``) beside the one
    LoRA the prompts use, which the grid's checkpoint axis swaps for each of them."""
    if not config.checkpoints:
        return config
    where = "key 'checkpoints'"
    names = {
        tag.name
        for index, prompt in enumerate(config.prompts)
        for tag in parse_prompt(prompt, where=f"prompt {index + 1}").loras
    }
    if len(names) != 1:
        used = ", ".join(sorted(names)) or "none"
        raise ConfigError(
            f"{where}: comparing checkpoints swaps the one LoRA the prompts use, but they use "
            f"{used}; tag exactly one LoRA (or give trained_lora)"
        )
    (compared,) = names
    labels = [checkpoint_label(uri) for uri in config.checkpoints]
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"{where}: two checkpoints are named alike ({', '.join(labels)}); give each once"
        )
    extra = {
        checkpoint_lora_name(compared, label): uri
        for label, uri in zip(labels, config.checkpoints, strict=True)
    }
    return dataclasses.replace(config, loras={**config.loras, **extra})


def chosen_lora(lora_path: str) -> tuple[str, str]:
    """(name, kohya file) of the LoRA that ``select`` wrote to ``lora_path``."""
    root = store.resolve(lora_path)
    report_uri = store.join(root, "report.json")
    if not store.exists(report_uri):
        raise InputError(f"{lora_path}: no report.json; give the output of lorapipe select")
    files = json.loads(store.read_text(report_uri))["files"]
    kohya = store.join(root, files["kohya"])
    return Path(files["kohya"]).stem, kohya


def with_sizes_resolved(config: GenerateConfig, native_size: int) -> GenerateConfig:
    """``config`` with its grid sizes in ``sizes``: width x height when no sizes are given,
    each side defaulting to the model's ``native_size``; so ``job.yaml`` records them and a
    rerun's ``--size`` replaces them."""
    if config.sizes:
        return config
    width, height = config.width or native_size, config.height or native_size
    return dataclasses.replace(config, sizes=[size_text(width, height)], width=None, height=None)


def with_lora_tag(prompt: str, name: str) -> str:
    """The prompt with ``<lora:name:1>`` appended unless it already uses that LoRA, so a
    grid's LoRA scales always reach the LoRA just trained."""
    if re.search(rf"<lora:{re.escape(name)}:", prompt):
        return prompt
    return f"{prompt}, <lora:{name}:1>"


# --------------------------------------------------------------------------- run


def run(base_model_uri: str, output_uri: str, config: GenerateConfig) -> dict[str, Any]:
    """Generate the grid of ``config`` with the base model and the job's LoRAs; write images,
    sheets, index and reports to ``output_uri``; return the report."""
    from lorapipe import __version__, models

    config.validate()
    config = with_checkpoints(with_trained_lora(config))
    started = time.monotonic()
    # 1. the prompts parsed and checked, the negative library, the LoRAs located, named and
    # hashed as WebUI hashes them
    library = NegativeLibrary.load(
        *([config.negative_prompts_file] if config.negative_prompts_file else []),
        overrides={"layers": config.layers, "presets": config.presets},
    )
    for preset in config.negative_presets:
        library.preset_layers(preset)  # an unknown preset fails here, before the model loads
    prompts = [parse_prompt(p, where=f"prompt {i + 1}") for i, p in enumerate(config.prompts)]
    job_lints = check_lora_tags(prompts, config.loras)
    loras = [
        resolve_lora(name, uri, adapter=f"lora_{index}")
        for index, (name, uri) in enumerate(config.loras.items())
    ]

    # 2. the pipeline: base model with the LoRAs (made for its family) as adapters; the size
    # defaults to its native one
    device, dtype = device_and_dtype(config.device, config.dtype)
    model_dir = models.resolve_model_dir(base_model_uri, config_dir=config.base_model_config)
    family = models.model_family(str(model_dir))
    check_clip_skip(family, config.clip_skip)  # before the model loads
    for lora in loras:
        check_lora_family(lora, family)
    pipe = load_pipeline(str(model_dir), loras, family=family, device=device, dtype=dtype)
    config = with_sizes_resolved(config, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    job_lints += count_prompt_tokens([getattr(pipe, name) for name in family.tokenizers], prompts)

    # 3. the grid: every cell with its size and negative prompt
    cells = plan_grid(config, prompts, library)

    # 4. the renderer, what every image's parameters text shares, the optional CLIP scorer
    renderer = GridRenderer(
        pipe,
        family=family,
        adapters={lora.name: lora.adapter for lora in loras},
        guidance_rescale=config.guidance_rescale,
        batch_size=config.batch_size,
        clip_skip=config.clip_skip,
    )
    context = ParameterContext(
        model_hash=model_short_hash(model_dir),
        model_name=basename(base_model_uri).removesuffix(".safetensors"),  # WebUI: the stem
        clip_skip=config.clip_skip,
        guidance_rescale=config.guidance_rescale,
        lora_hashes={lora.name: lora.webui_hash for lora in loras},
        version=f"lorapipe {__version__}",
    )
    scorer = None
    if config.clip_model:
        scorer = image_metrics.ClipScorer(config.clip_model, device=str(device))
    batches = len(renderer.batches(cells))
    log.info("generate: %s", grid_summary(config, len(cells), batches))

    with outputs.staged_output(output_uri, OUTPUT_KIND) as staging:
        # 5. images, contact sheets, index and job file, into a private staging directory
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
        # 6. the reports: report.json, report.md and the self-contained report.html
        report = run_report(
            base_model_uri=base_model_uri,
            output_uri=output_uri,
            job=job,
            model_hash=context.model_hash,
            loras=loras,
            lints=lint_table(cells, job_lints),
            rows=rows,
            sheets=sheets,
            environment={
                "lorapipe": __version__,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
            },
            render_seconds=render_seconds,
            seconds=time.monotonic() - started,
        )
        write_reports(staging, report)
        # 7. the whole output is published at once when the block ends
    log.info("wrote %d images to %s in %.1f s", len(rows), output_uri, report["seconds"])
    return report


# --------------------------------------------------------------------------- command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", help="YAML or JSON job file: the options below + base_model")
    parser.add_argument("--base-model", help="diffusers dir or .safetensors file, local or s3://")
    parser.add_argument("--out", required=True, help="output directory, local or s3://")
    parser.add_argument(
        "--lora",
        action="append",
        metavar="[NAME=]URI",
        help="a LoRA file or select's output directory; NAME is what <lora:NAME:w> uses "
        "(default: the file stem). Repeatable",
    )
    config_options.add_arguments(parser, GenerateConfig)


def config_from_args(args: argparse.Namespace) -> tuple[GenerateConfig, str]:
    """The job file's values with the flags given on top; (config, base model URI)."""
    values, base_model = load_job(args.job) if args.job else ({}, None)
    flags = config_options.overrides_from_args(args, GenerateConfig)
    values |= config_values(flags, {key: config_options.flag(key) for key in flags})
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
