"""Model families: what lorapipe needs to know about SD 1.x, SD 2.x and SDXL, in one object each.

A family is read off the base model (a diffusers directory's ``model_index.json``, or a single
file's tensor names) before anything heavy loads. Train, select, export and generate ask the
family what differs between them (text encoders, added conditioning, default resolution, kohya's
key prefixes and metadata values) rather than testing for a model by name. A family lorapipe
cannot train yet (SD3, Flux, ...) is refused with one line naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lorapipe.errors import ModelError


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family and everything the stages do differently for it."""

    name: str  # "sd1", "sd2", "sdxl"
    label: str  # for people: "SD 1.x"
    pipeline_class: str  # diffusers' pipeline class
    # the text encoders (diffusers component names), in the order their hidden states are
    # concatenated; their kohya LoRA key prefixes, one each
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    kohya_text_encoder_prefixes: tuple[str, ...]
    # SDXL: the last text encoder's pooled output and the (original size, crop, target size)
    # time ids condition the UNet besides the hidden states
    added_conditioning: bool
    default_resolution: int
    # the VAE overflows in fp16 (SDXL's): latents are encoded in float32 or bfloat16
    vae_overflows_in_fp16: bool
    base_model_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str  # ModelSpec's architecture, without the "/lora" suffix
    # the hidden states the UNet reads: the penultimate layer's (SDXL) or the last one's
    penultimate_hidden_states: bool = False
    has_safety_checker: bool = True  # the pipeline class takes a safety_checker component
    # text encoders whose last layer never reaches the UNet (SDXL's first: only its penultimate
    # hidden states are read); a LoRA there would never train
    unused_last_layer: tuple[str, ...] = ()


SD1 = ModelFamily(
    name="sd1",
    label="SD 1.x",
    pipeline_class="StableDiffusionPipeline",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    kohya_text_encoder_prefixes=("lora_te_",),
    added_conditioning=False,
    default_resolution=512,
    vae_overflows_in_fp16=False,
    base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1",
)
SD2 = ModelFamily(
    name="sd2",
    label="SD 2.x",
    pipeline_class="StableDiffusionPipeline",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    kohya_text_encoder_prefixes=("lora_te_",),
    added_conditioning=False,
    default_resolution=768,
    vae_overflows_in_fp16=False,
    base_model_version="sd_v2",
    modelspec_architecture="stable-diffusion-v2-768-v",
)
SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    kohya_text_encoder_prefixes=("lora_te1_", "lora_te2_"),
    added_conditioning=True,
    default_resolution=1024,
    vae_overflows_in_fp16=True,
    base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base",
    penultimate_hidden_states=True,
    has_safety_checker=False,
    unused_last_layer=("text_encoder",),
)
FAMILIES = (SD1, SD2, SDXL)

# pipeline classes of families lorapipe does not train yet -> how to name them
UNSUPPORTED_PIPELINES = {
    "StableDiffusion3Pipeline": "SD3",
    "FluxPipeline": "Flux",
    "PixArtAlphaPipeline": "PixArt-alpha",
    "PixArtSigmaPipeline": "PixArt-sigma",
    "KolorsPipeline": "Kolors",
    "HunyuanDiTPipeline": "Hunyuan-DiT",
    "StableCascadeDecoderPipeline": "Stable Cascade",
    "AuraFlowPipeline": "AuraFlow",
    "SanaPipeline": "Sana",
    "LuminaText2ImgPipeline": "Lumina",
    "CogView3PlusPipeline": "CogView",
    "StableDiffusionXLRefinerPipeline": "SDXL refiner",
}
# a single file's tensor-name prefixes -> the family they belong to (first match wins)
SINGLE_FILE_MARKERS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.joint_blocks.", "SD3"),
    ("double_blocks.", "Flux"),
    ("model.diffusion_model.double_blocks.", "Flux"),
    ("conditioner.embedders.1.model.", "sdxl"),
    ("conditioner.embedders.0.model.", "SDXL refiner"),
    ("cond_stage_model.model.", "sd2"),
    ("cond_stage_model.transformer.", "sd1"),
)


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelError(f"not supported yet: {name}")


def family_of_directory(directory: Path) -> ModelFamily:
    """The family of a diffusers directory, from ``model_index.json`` and, for SD 1.x vs 2.x,
    the text encoder's width (768 vs 1024)."""
    index = json.loads((directory / "model_index.json").read_text())
    pipeline_class = str(index.get("_class_name", ""))
    if pipeline_class in UNSUPPORTED_PIPELINES:
        raise ModelError(
            f"base model '{directory}': not supported yet: {UNSUPPORTED_PIPELINES[pipeline_class]}"
            " (lorapipe trains SD 1.x, SD 2.x and SDXL)"
        )
    if pipeline_class in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"):
        return SDXL
    if pipeline_class in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        return SD2 if _text_encoder_width(directory) == 1024 else SD1
    raise ModelError(
        f"base model '{directory}': not supported yet: {pipeline_class or 'no _class_name'} "
        "(lorapipe trains SD 1.x, SD 2.x and SDXL)"
    )


def family_of_keys(keys: Iterable[str], source: str) -> ModelFamily:
    """The family of a single-file checkpoint from its tensor names (kohya's and WebUI's rule:
    the text-conditioning module's names differ between families)."""
    keys = list(keys)
    for prefix, name in SINGLE_FILE_MARKERS:
        if any(key.startswith(prefix) for key in keys):
            if name in ("sd1", "sd2", "sdxl"):
                return family_named(name)
            raise ModelError(
                f"base model '{source}': not supported yet: {name} "
                "(lorapipe trains SD 1.x, SD 2.x and SDXL)"
            )
    raise ModelError(
        f"base model '{source}' is not a Stable Diffusion checkpoint lorapipe knows (no "
        "cond_stage_model. or conditioner. tensors); if it is one with another layout, give "
        "base_model_config: DIR, a diffusers directory whose configs fit it"
    )


def _text_encoder_width(directory: Path) -> int | None:
    config = directory / "text_encoder" / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("hidden_size")
