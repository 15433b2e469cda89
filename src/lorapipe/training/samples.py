"""Sample images during training (kohya's ``sample_prompts``): at the checkpoints, the LoRA
being trained renders prompts x seeds into the checkpoint's ``samples/`` before it is published,
so the images are mirrored, pruned and resumed with it.

The pipeline of the model's family is assembled from the run's own modules (the UNet with its
adapters, the VAE, the text encoders and tokenizers): nothing is loaded again, and the LoRA is
active at weight 1. Images are rendered as ``lorapipe generate`` renders them (``GridRenderer``):
A1111 prompt syntax with attention weights and long-prompt chunks, one CPU ``torch.Generator``
per image seeded with its seed, so a sample is reproducible. ``<lora:...>`` tags in a sample
prompt are dropped: the LoRA being trained is the one applied.

Rendering leaves training as it was, to the bit: no gradients, eval mode for the block (then the
modes as they were), and every random state restored. Only the main process renders.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from lorapipe import __version__
from lorapipe.checkpoint_layout import SAMPLES_INDEX_NAME
from lorapipe.generation.grid import Cell
from lorapipe.generation.infotext import ParameterContext, a1111_parameters, png_bytes
from lorapipe.generation.loras import basename, model_short_hash
from lorapipe.generation.rendering import GridRenderer
from lorapipe.generation.samplers import make_scheduler
from lorapipe.models.loading import MODEL_INDEX
from lorapipe.prompts.negatives import NegativePrompt
from lorapipe.prompts.syntax import literal, parse_prompt, without_lora_tags
from lorapipe.train_config import DEFAULT_SAMPLE_PROMPTS, TrainConfig, sample_prompts
from lorapipe.training.checkpoints import restore_rng_state, rng_state
from lorapipe.training.validation import eval_mode

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from lorapipe.stages.train import Models, TrainingData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One sample image, its PNG file (with A1111's ``parameters`` text, encoded as part of
    rendering) and its ``samples.json`` entry."""

    image: Image.Image
    png: bytes
    record: dict[str, Any]  # "file" is its name

    @property
    def file_name(self) -> str:
        return self.record["file"]


@dataclass(frozen=True)
class RenderedSamples:
    """The sample images of one checkpoint and the seconds they took (rendering and PNG
    encoding)."""

    step: int
    seconds: float
    samples: list[Sample]

    def write(self, directory: Path) -> None:
        """``directory`` (new) with every PNG and ``samples.json``."""
        directory.mkdir()
        for sample in self.samples:
            (directory / sample.file_name).write_bytes(sample.png)
        index = {
            "step": self.step,
            "seconds": round(self.seconds, 3),
            "samples": [sample.record for sample in self.samples],
        }
        (directory / SAMPLES_INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")


def prompts_for_run(config: TrainConfig, data: TrainingData) -> list[str]:
    """The configured sample prompts; by default the captions (as literal prompts) of the first
    validation images, or of the first training images when nothing is held out."""
    prompts = sample_prompts(config)
    if prompts is not None:
        return prompts
    examples = data.val_examples or data.train_examples
    return [literal(example.caption) for example in examples[:DEFAULT_SAMPLE_PROMPTS]]


class TrainingSamples:
    """Renders a run's sample images at its checkpoints; does nothing on other processes than
    the main one, or without prompts (``sample_prompts: []``)."""

    def __init__(
        self, config: TrainConfig, models: Models, prompts: list[str], *, enabled: bool
    ) -> None:
        self.models = models
        self.every = config.sample_every_n_steps
        # images per UNet call: a training micro-batch's worth fits beside the training state
        # (no activations are kept for a backward pass); an image does not depend on its batch
        self.batch_size = config.batch_size
        self.cells = sample_cells(config, prompts, models.resolution) if enabled else []
        if not self.cells:
            return
        self.pipe = sampling_pipeline(models, config.sample_sampler)
        self.context = ParameterContext(
            model_hash=model_short_hash(models.model_dir),
            model_name=basename(config.base_model).removesuffix(".safetensors"),
            version=f"lorapipe {__version__}",
        )

    def render(self, step: int, *, last: bool) -> RenderedSamples | None:
        """The sample images of checkpoint ``step`` when it gets them (every
        ``sample_every_n_steps``, always the ``last``), else None."""
        if not self.cells or not (last or not self.every or step % self.every == 0):
            return None
        started = time.perf_counter()
        models = self.models
        # a renderer per checkpoint: its cached conditioning is stale once a trained text
        # encoder has moved on
        renderer = GridRenderer(
            self.pipe,
            family=models.family,
            adapters={},
            batch_size=self.batch_size,
        )
        images: dict[tuple[int, int], Image.Image] = {}
        random_states = rng_state()
        try:
            modules = (models.unet, models.vae, *models.text_encoders.values())
            with torch.no_grad(), eval_mode(*modules):
                for batch, rendered in renderer.render(self.cells):
                    images.update(
                        ((cell.prompt_index, cell.seed), image)
                        for cell, image in zip(batch, rendered, strict=True)
                    )
        finally:
            restore_rng_state(random_states)
        samples = []
        for cell in self.cells:  # encoded here: PNG encoding is part of the sampling time
            image = images[cell.prompt_index, cell.seed]
            png = png_bytes(image, a1111_parameters(cell, self.context))
            samples.append(Sample(image, png, sample_record(cell)))
        seconds = time.perf_counter() - started
        log.info("step %d: %d sample images in %.1f s", step, len(samples), seconds)
        return RenderedSamples(step, seconds, samples)


def sample_cells(config: TrainConfig, prompts: list[str], resolution: int) -> list[Cell]:
    """prompts x seeds as grid cells at the square training resolution, without LoRA tags (the
    LoRA being trained is always on)."""
    negative = NegativePrompt(
        text=config.sample_negative_prompt, terms=(), preset="sample_negative_prompt", layers=()
    )
    cells = []
    for index, written in enumerate(prompts):
        prompt = without_lora_tags(written)
        if prompt != written:
            log.info("sample prompt %d: <lora:> tags ignored (the trained LoRA is on)", index + 1)
        parsed = parse_prompt(prompt, where=f"sample prompt {index + 1}")
        for seed in config.sample_seeds:
            cells.append(
                Cell(
                    prompt_index=index,
                    negative_preset=negative.preset,
                    width=resolution,
                    height=resolution,
                    lora_scale=None,
                    cfg_scale=config.sample_cfg_scale,
                    seed=seed,
                    sampler=config.sample_sampler,
                    steps=config.sample_steps,
                    parsed=parsed,
                    prompt=prompt,
                    loras=(),
                    negative=negative,
                )
            )
    return cells


def sample_record(cell: Cell) -> dict[str, Any]:
    """A sample's ``samples.json`` entry."""
    return {
        "file": f"p{cell.prompt_index + 1:02d}_seed{cell.seed}.png",
        "prompt_index": cell.prompt_index,
        "prompt": cell.prompt,
        "negative_prompt": cell.negative.text,
        "seed": cell.seed,
        "sampler": cell.sampler,
        "steps": cell.steps,
        "cfg_scale": cell.cfg_scale,
        "width": cell.width,
        "height": cell.height,
    }


def sampling_pipeline(models: Models, sampler: str) -> DiffusionPipeline:
    """The family's diffusers pipeline over the run's own modules, with the sampler's scheduler
    (over the training schedule: v-prediction and zero terminal SNR carry over) and the base
    model's pipeline settings (SDXL's ``force_zeros_for_empty_prompt``); no safety checker."""
    import diffusers

    pipeline_class = getattr(diffusers, models.family.pipeline_class)
    parts: dict[str, Any] = {
        "unet": models.unet,
        "vae": models.vae,
        "scheduler": make_scheduler(sampler, models.noise_scheduler.config),
        **models.text_encoders,
        **dict(zip(models.family.tokenizers, models.tokenizers, strict=True)),
    }
    settings = json.loads((models.model_dir / MODEL_INDEX).read_text())
    settings["requires_safety_checker"] = False
    for name, parameter in inspect.signature(pipeline_class).parameters.items():
        if name in parts:
            continue
        if parameter.default is inspect.Parameter.empty:
            parts[name] = None  # safety_checker, feature_extractor
        elif name in settings and not isinstance(settings[name], list):
            parts[name] = settings[name]
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
