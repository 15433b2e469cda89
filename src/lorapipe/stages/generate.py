"""``lorapipe generate``: a grid of images over prompts, negative presets, LoRA scales, CFG
scales and seeds, with the numbers and the report to choose between them.

The grid (``GenerateConfig``, from a job file or flags) is every combination of

    prompts x negative_presets x lora_scales x cfg_scales x seeds

Prompts use A1111 syntax (``lorapipe.prompts.syntax``); ``<lora:name:w>`` names a LoRA of the job's
``loras`` map. A LoRA scale from the grid *replaces* the weight written in every ``<lora:>``
tag of the prompt (a ``<lora:name:te:unet>`` tag keeps its text-encoder/UNet ratio: UNet gets
the scale, the text encoder the scale times te/unet); leaving ``lora_scales`` out runs the
weights as written. Each cell's negative prompt is built from its preset by the rules in
``lorapipe.prompts.negatives`` (the LoRA scale and CFG of the cell take part).

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

This module is the stage (the job, ``run``, publishing, the command line); the machinery is in
``lorapipe.generation``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorapipe import image_metrics, store
from lorapipe.errors import ConfigError, InputError
from lorapipe.generation.grid import check_lora_tags, count_prompt_tokens, plan_grid
from lorapipe.generation.index import write_index
from lorapipe.generation.infotext import ParameterContext
from lorapipe.generation.layout import IMAGES_DIR, SHEETS_DIR
from lorapipe.generation.loras import (
    basename,
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
from lorapipe.generation.sheets import write_contact_sheets
from lorapipe.prompts.negatives import NegativeLibrary
from lorapipe.prompts.syntax import parse_prompt

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")
OUTPUT_MARKERS = ("report.json", "index.parquet")  # an older output that may be replaced


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


# --------------------------------------------------------------------------- run


def run(base_model_uri: str, output_uri: str, config: GenerateConfig) -> dict[str, Any]:
    """Generate the grid of ``config`` with the base model and the job's LoRAs; write images,
    sheets, index and reports to ``output_uri``; return the report."""
    from lorapipe import __version__, models

    config.validate()
    started = time.monotonic()
    # 1. the grid: prompts parsed and checked, every cell with its negative prompt
    library = NegativeLibrary.load(
        *([config.negative_prompts_file] if config.negative_prompts_file else []),
        overrides={"layers": config.layers, "presets": config.presets},
    )
    prompts = [parse_prompt(p, where=f"prompt {i + 1}") for i, p in enumerate(config.prompts)]
    job_lints = check_lora_tags(prompts, config.loras)
    cells = plan_grid(config, prompts, library)
    # 2. the LoRAs: located, named and hashed as WebUI hashes them
    loras = [
        resolve_lora(name, uri, adapter=f"lora_{index}")
        for index, (name, uri) in enumerate(config.loras.items())
    ]

    # 3. the pipeline: base model with the LoRAs as adapters; the size defaults to its native one
    device, dtype = device_and_dtype(config.device, config.dtype)
    model_dir = models.resolve_model_dir(base_model_uri)
    pipe = load_pipeline(base_model_uri, loras, device=device, dtype=dtype)
    native_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    config = dataclasses.replace(
        config, width=config.width or native_size, height=config.height or native_size
    )
    job_lints += count_prompt_tokens(pipe.tokenizer, prompts)

    # 4. the renderer, what every image's parameters text shares, the optional CLIP scorer
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
        model_name=basename(base_model_uri),
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
        write_reports(staging, report, sheets, job_text)
        # 7. publish the whole output at once
        _publish(staging, output_uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d images to %s in %.1f s", len(rows), output_uri, report["seconds"])
    return report


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
