"""Cells into images on one diffusers pipeline: LoRA weights set once per group, batched UNet
calls of one image size, sampler and step count (each cell's own), each image from its own
seed, each batch's conditioning encoded just before it runs (a grid of any length streams);
then PNGs with their parameters and index rows.
What differs between model families (text encoders, SDXL's pooled embedding and size
conditioning, a VAE that overflows in float16) is asked of the family."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from PIL import Image
from tqdm import tqdm

from lorapipe import image_metrics, lora_format
from lorapipe.errors import ConfigError
from lorapipe.generation.grid import Cell, group_by
from lorapipe.generation.index import index_row
from lorapipe.generation.infotext import ParameterContext, a1111_parameters, save_png
from lorapipe.generation.layout import IMAGES_DIR
from lorapipe.generation.loras import LoraSource
from lorapipe.generation.samplers import make_scheduler
from lorapipe.prompts.encoding import Conditioning, ConditioningEncoder, chunk_count
from lorapipe.prompts.syntax import LoraTag, ParsedPrompt, parse_prompt

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from lorapipe.models import ModelFamily

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

# batches' worth of conditioning kept, so that a text the next batches use again (a shared
# negative, a prompt split across sizes) is not encoded again
RECENT_BATCHES = 4


class RecentCache(Generic[K, T]):
    """The ``capacity`` values used last, nothing older: what every batch uses (the empty
    prompt, a shared negative) is computed once, and memory stays bounded however long the
    grid."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: OrderedDict[K, T] = OrderedDict()

    def get(self, key: K, compute: Callable[[], T]) -> T:
        if key in self._values:
            self._values.move_to_end(key)
        else:
            self._values[key] = compute()
            if len(self._values) > self.capacity:
                self._values.popitem(last=False)
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)


class GridRenderer:
    """Turns cells into images on one pipeline: LoRA weights set once per group, up to
    ``batch_size`` images of one size, sampler and step count per UNet call, each from its own
    seed, each batch's texts encoded when it runs."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        family: ModelFamily,
        adapters: Mapping[str, str],
        guidance_rescale: float = 0.0,
        batch_size: int = 8,
        clip_skip: int = 1,
    ) -> None:
        self.pipe = pipe
        self.family = family
        self.adapters = dict(adapters)  # LoRA name -> adapter name
        self.guidance_rescale = guidance_rescale
        self.batch_size = batch_size
        self.encoder = ConditioningEncoder(pipe, family, clip_skip=clip_skip)
        # SDXL's: an empty negative prompt conditions with zeros, as WebUI does
        self.zeros_for_empty_negative = bool(pipe.config.get("force_zeros_for_empty_prompt"))
        texts = RECENT_BATCHES * (2 * batch_size + 1)  # a prompt and a negative per image, ""
        self.recent_conditioning: RecentCache[tuple[Any, ...], Conditioning] = RecentCache(texts)
        self._chunk_counts: dict[tuple[Any, ...], int] = {}  # an int per text, not its tensors

    def render(self, cells: Sequence[Cell]) -> Iterator[tuple[list[Cell], list[Image.Image]]]:
        """Yield (cells, images) batch by batch, in the order of :meth:`batches`. A batch's
        texts are encoded just before it runs: the first image comes at once and memory holds
        a few batches' conditioning, however many prompts the grid has."""
        applied: tuple[LoraTag, ...] | None = None
        for batch in self.batches(cells):
            if batch[0].loras != applied:
                applied = batch[0].loras
                self.apply_loras(applied)
            yield batch, self.denoise(batch, *self.batch_conditioning(batch))

    def batches(self, cells: Sequence[Cell]) -> list[list[Cell]]:
        """The UNet calls of a grid in render order: cells grouped by LoRA weights, then by size,
        sampler, steps and conditioning length, up to ``batch_size`` each; planned from token
        counts, before anything is encoded."""
        planned = []
        for _, group in group_by(cells, lambda cell: cell.loras):
            for _, batchable in group_by(
                group,
                lambda cell: (
                    cell.width,
                    cell.height,
                    cell.sampler,
                    cell.steps,
                    self.chunk_count(cell),
                ),
            ):
                planned += _batched(batchable, self.batch_size)
        return planned

    def chunk_count(self, cell: Cell) -> int:
        """The 77-token chunks of a cell's conditioning (its prompt's or its negative's, the
        longer), counted from tokens alone."""
        return max(self._count_chunks(cell.parsed), self._count_chunks(_negative(cell)))

    def _count_chunks(self, parsed: ParsedPrompt) -> int:
        if parsed.segments not in self._chunk_counts:
            self._chunk_counts[parsed.segments] = self.encoder.count_chunks(parsed)
        return self._chunk_counts[parsed.segments]

    def batch_conditioning(self, batch: Sequence[Cell]) -> tuple[Conditioning, Conditioning]:
        """(prompt, negative) conditioning of a batch, stacked along the batch axis."""
        pairs = [self.conditioning(cell) for cell in batch]
        return _stack([positive for positive, _ in pairs]), _stack([neg for _, neg in pairs])

    def apply_loras(self, loras: Sequence[LoraTag]) -> None:
        """Activate exactly these LoRAs at these weights (per component)."""
        if not self.adapters:
            return
        if not loras:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        adapters_by_component = self.pipe.get_list_adapters()
        names = [self.adapters[tag.name] for tag in loras]
        weights = [
            {"unet": tag.unet_weight}
            | {
                component: tag.te_weight
                for component in self.family.text_encoders  # both of SDXL's
                if name in adapters_by_component.get(component, [])
            }
            for name, tag in zip(names, loras, strict=True)
        ]
        self.pipe.set_adapters(names, weights)

    def conditioning(self, cell: Cell) -> tuple[Conditioning, Conditioning]:
        """(prompt, negative) conditioning of a cell, padded to the same chunk count with the
        empty prompt's; a text is encoded once per text-encoder LoRA weights while recent batches
        use it."""
        text_encoder_weights = tuple((tag.name, tag.te_weight) for tag in cell.loras)
        positive = self._encode(cell.parsed, text_encoder_weights)
        negative = self._encode(_negative(cell), text_encoder_weights)
        if self.zeros_for_empty_negative and not cell.negative.text:
            negative = negative.zeros()
        empty = self._encode(parse_prompt(""), text_encoder_weights)
        chunks = max(chunk_count(positive.embeds), chunk_count(negative.embeds))
        return positive.padded(chunks, empty), negative.padded(chunks, empty)

    def _encode(self, parsed: ParsedPrompt, text_encoder_weights: tuple[Any, ...]) -> Conditioning:
        key = (parsed.segments, text_encoder_weights)
        return self.recent_conditioning.get(key, lambda: self.encoder.encode(parsed))

    def denoise(
        self, cells: Sequence[Cell], positive: Conditioning, negative: Conditioning
    ) -> list[Image.Image]:
        """The images of one batch (one size, sampler and step count): per-image seeds and CFG,
        one UNet call per step (negatives first, as diffusers' pipelines batch them)."""
        import inspect

        import torch
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            rescale_noise_cfg,
        )
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        device, dtype = pipe.unet.device, pipe.unet.dtype
        scheduler = make_scheduler(cells[0].sampler, pipe.scheduler.config)
        generators = [torch.Generator("cpu").manual_seed(cell.seed) for cell in cells]
        scheduler.set_timesteps(cells[0].steps, device=device)
        shape = (
            len(cells),
            pipe.unet.config.in_channels,
            cells[0].height // pipe.vae_scale_factor,
            cells[0].width // pipe.vae_scale_factor,
        )
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        step_options = (
            {"generator": generators}
            if "generator" in inspect.signature(scheduler.step).parameters
            else {}
        )
        conditioning = torch.cat([negative.embeds, positive.embeds]).to(device=device, dtype=dtype)
        added_conditioning = self.added_conditioning(cells, positive, negative)
        guidance = torch.tensor([c.cfg_scale for c in cells], device=device, dtype=dtype)
        guidance = guidance.view(-1, 1, 1, 1)
        with torch.inference_mode():
            for timestep in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
                noise = pipe.unet(
                    model_input,
                    timestep,
                    encoder_hidden_states=conditioning,
                    return_dict=False,
                    **added_conditioning,
                )[0]
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance * (noise_text - noise_uncond)
                if self.guidance_rescale > 0:
                    noise = rescale_noise_cfg(noise, noise_text, self.guidance_rescale)
                latents = scheduler.step(
                    noise, timestep, latents, **step_options, return_dict=False
                )[0]
            latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
            decoded = pipe.vae.decode(latents, return_dict=False)
        return pipe.image_processor.postprocess(decoded[0], output_type="pil")

    def added_conditioning(
        self, cells: Sequence[Cell], positive: Conditioning, negative: Conditioning
    ) -> dict[str, Any]:
        """The UNet's extra inputs for a family with added conditioning (SDXL): the pooled
        embeddings and the size time ids, original size = target size = the image's, crop
        (0, 0), as WebUI sets them; none for the other families."""
        import torch

        if not self.family.added_conditioning:
            return {}
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        height, width = cells[0].height, cells[0].width
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        pooled = torch.cat([negative.pooled, positive.pooled]).to(device=device, dtype=dtype)
        return {
            "added_cond_kwargs": {
                "text_embeds": pooled,
                "time_ids": time_ids.repeat(len(pooled), 1),
            }
        }


def _negative(cell: Cell) -> ParsedPrompt:
    return parse_prompt(cell.negative.text)


def _batched(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _stack(conditionings: Sequence[Conditioning]) -> Conditioning:
    """One batch's conditioning: the cells' along the batch axis."""
    import torch

    embeds = torch.cat([c.embeds for c in conditionings])
    if conditionings[0].pooled is None:
        return Conditioning(embeds)
    return Conditioning(embeds, torch.cat([c.pooled for c in conditionings]))


def load_pipeline(
    base_model_uri: str,
    loras: Sequence[LoraSource],
    *,
    family: ModelFamily,
    device: torch.device,
    dtype: torch.dtype,
) -> DiffusionPipeline:
    """The base model with each LoRA loaded as its adapter, on ``device``, progress bars off;
    a VAE that overflows in float16 (SDXL's) stays in float32, as diffusers upcasts it."""
    import torch

    from lorapipe import models

    pipe = models.load_base_model(base_model_uri, torch_dtype=dtype)
    for lora in loras:
        lora_format.load_into_pipeline(pipe, lora.weights_uri, adapter_name=lora.adapter)
    pipe.to(device)
    if family.vae_overflows_in_fp16 and dtype == torch.float16:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
