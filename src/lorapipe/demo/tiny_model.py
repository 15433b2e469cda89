"""``lorapipe tiny-model``: SD 1.x and SDXL pipelines with random weights, built offline.

``build_sd`` writes a complete SD 1.x pipeline with random weights in one of four sizes. The
"tiny" one is what tests use; "world" is the architecture of the demo's base model
(``lorapipe.demo.world_model`` trains it from these random weights); "bench" keeps SD-1.5's
block layout at reduced width so benchmark ratios mean something on a CPU; "sd15" is the full
SD-1.5 architecture for GPU benchmarks. ``build_sdxl`` does the same for SDXL: "tiny-sdxl"
(two text encoders, the added size conditioning, CPU-fast) for tests, "bench-sdxl" (SDXL's
block layout at reduced width) for CPU benchmarks and "sdxl", SDXL base's full architecture,
for GPU benchmarks. ``build_model`` takes any preset name. They are ordinary
diffusers directories: they load through ``lorapipe.models`` and nothing in lorapipe
special-cases them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapipe.errors import ConfigError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

# Words the generated tokenizer knows as whole tokens; everything else falls back to bytes.
TOKENIZER_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "photo",
    "photograph",
    "portrait",
    "landscape",
    "street",
    "city",
    "night",
    "rain",
    "neon",
    "light",
    "lights",
    "film",
    "grain",
    "style",
    "lora",
    "woman",
    "man",
    "cat",
    "dog",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "star",
    "background",
    "sky",
    "water",
    "tree",
    "house",
    "car",
    "flying",
    "cyberpunk",
    "vintage",
    "low",
    "high",
    "quality",
    "worst",
    "best",
    "blurry",
    "noisy",
    "grainy",
    "overexposed",
    "underexposed",
    "bad",
    "anatomy",
    "extra",
    "limbs",
    "hands",
    "fingers",
    "face",
    "painting",
    "illustration",
    "cartoon",
    "anime",
    "render",
    "watermark",
    "logo",
    "text",
]


@dataclass(frozen=True)
class SDPreset:
    """Sizes of one SD 1.x architecture variant."""

    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_attention_heads: int
    cross_attention_dim: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_vocab_size: int
    resolution: int
    unet_norm_groups: int = 32
    down_blocks: tuple[str, ...] = field(default=())
    up_blocks: tuple[str, ...] = field(default=())


PRESETS: dict[str, SDPreset] = {
    "tiny": SDPreset(
        unet_channels=(32, 64),
        unet_layers_per_block=1,
        unet_attention_heads=4,
        cross_attention_dim=32,
        vae_channels=(16, 32, 32, 32),
        vae_layers_per_block=1,
        vae_norm_groups=16,
        text_layers=2,
        text_heads=4,
        text_intermediate=64,
        text_vocab_size=0,
        resolution=64,
        down_blocks=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_blocks=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # the procedural world's base model (lorapipe.demo.world_model): 64 px, 8x8x4 latents
    "world": SDPreset(
        unet_channels=(32, 64, 64),
        unet_layers_per_block=1,
        unet_attention_heads=8,
        cross_attention_dim=64,
        vae_channels=(16, 32, 64, 64),
        vae_layers_per_block=1,
        vae_norm_groups=16,
        text_layers=2,
        text_heads=4,
        text_intermediate=128,
        text_vocab_size=0,
        resolution=64,
        down_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_blocks=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "bench": SDPreset(
        unet_channels=(64, 128, 256, 256),
        unet_layers_per_block=2,
        unet_attention_heads=8,
        cross_attention_dim=256,
        vae_channels=(32, 64, 128, 128),
        vae_layers_per_block=2,
        vae_norm_groups=32,
        text_layers=4,
        text_heads=4,
        text_intermediate=1024,
        text_vocab_size=0,
        resolution=256,
    ),
    "sd15": SDPreset(
        unet_channels=(320, 640, 1280, 1280),
        unet_layers_per_block=2,
        unet_attention_heads=8,
        cross_attention_dim=768,
        vae_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_norm_groups=32,
        text_layers=12,
        text_heads=12,
        text_intermediate=3072,
        text_vocab_size=49408,
        resolution=512,
    ),
}
SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD15_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def build_sd(path: str | os.PathLike, *, seed: int = 0, preset: str = "tiny") -> Path:
    """Write an SD 1.x diffusers pipeline with random weights to ``path`` and return it.

    The same seed gives byte-identical weight files. The directory appears complete or not at
    all: it is built under a temporary name and renamed into place.
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset '{preset}'; use one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{destination.name}.") as tmp:
        tokenizer = _build_tokenizer(Path(tmp) / "tokenizer-src")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=spec.resolution // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=spec.unet_channels,
            layers_per_block=spec.unet_layers_per_block,
            down_block_types=spec.down_blocks or SD15_DOWN_BLOCKS,
            up_block_types=spec.up_blocks or SD15_UP_BLOCKS,
            cross_attention_dim=spec.cross_attention_dim,
            attention_head_dim=spec.unet_attention_heads,
            norm_num_groups=spec.unet_norm_groups,
        )
        vae = _vae(spec.vae_channels, spec.vae_layers_per_block, spec.vae_norm_groups,
                   spec.resolution, scaling_factor=0.18215)  # fmt: skip
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=max(len(tokenizer), spec.text_vocab_size),
                hidden_size=spec.cross_attention_dim,
                intermediate_size=spec.text_intermediate,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=spec.cross_attention_dim,
            )
        )
        scheduler = PNDMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            steps_offset=1,
            set_alpha_to_one=False,
        )
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        _save_in_place(pipeline, Path(tmp), destination, {"tokenizer-src": "tokenizer"})
    log.info("wrote %s SD pipeline (seed %d) to %s", preset, seed, destination)
    return destination


@dataclass(frozen=True)
class SDXLPreset:
    """Sizes of one SDXL architecture variant (two CLIP text encoders, the second with a
    projection whose pooled output and the six size/crop time ids condition the UNet)."""

    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    transformer_layers_per_block: tuple[int, ...]
    attention_head_dim: tuple[int, ...]
    down_blocks: tuple[str, ...]
    up_blocks: tuple[str, ...]
    addition_time_embed_dim: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    text_hidden: tuple[int, int]  # text_encoder, text_encoder_2
    text_layers: tuple[int, int]
    text_heads: tuple[int, int]
    text_intermediate: tuple[int, int]
    text_vocab_size: int
    resolution: int
    unet_norm_groups: int = 32


SDXL_PRESETS: dict[str, SDXLPreset] = {
    "tiny-sdxl": SDXLPreset(
        unet_channels=(32, 64),
        unet_layers_per_block=1,
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
        down_blocks=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_blocks=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_time_embed_dim=8,
        vae_channels=(16, 32, 32, 32),
        vae_layers_per_block=1,
        vae_norm_groups=16,
        text_hidden=(32, 32),
        text_layers=(2, 2),
        text_heads=(4, 4),
        text_intermediate=(64, 64),
        text_vocab_size=0,
        resolution=64,
        unet_norm_groups=16,
    ),
    # SDXL's block layout, attention-free first level and deeper transformers further down at
    # reduced width (64-channel heads as in SDXL), 256 px, so benchmark ratios mean something
    # on a CPU
    "bench-sdxl": SDXLPreset(
        unet_channels=(64, 128, 256),
        unet_layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(1, 2, 4),
        down_blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_time_embed_dim=64,
        vae_channels=(32, 64, 128, 128),
        vae_layers_per_block=2,
        vae_norm_groups=32,
        text_hidden=(256, 384),
        text_layers=(4, 6),
        text_heads=(4, 6),
        text_intermediate=(1024, 1536),
        text_vocab_size=0,
        resolution=256,
    ),
    "sdxl": SDXLPreset(
        unet_channels=(320, 640, 1280),
        unet_layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        down_blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_time_embed_dim=256,
        vae_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_norm_groups=32,
        text_hidden=(768, 1280),
        text_layers=(12, 32),
        text_heads=(12, 20),
        text_intermediate=(3072, 5120),
        text_vocab_size=49408,
        resolution=1024,
    ),
}


def build_model(path: str | os.PathLike, *, seed: int = 0, preset: str = "tiny") -> Path:
    """``build_sd`` or ``build_sdxl``, whichever has ``preset``."""
    if preset in SDXL_PRESETS:
        return build_sdxl(path, seed=seed, preset=preset)
    return build_sd(path, seed=seed, preset=preset)


def build_sdxl(path: str | os.PathLike, *, seed: int = 0, preset: str = "tiny-sdxl") -> Path:
    """Write an SDXL diffusers pipeline with random weights to ``path`` and return it (the same
    guarantees as ``build_sd``: byte-identical for a seed, complete or absent)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if preset not in SDXL_PRESETS:
        raise ConfigError(f"unknown SDXL preset '{preset}'; use one of {', '.join(SDXL_PRESETS)}")
    spec = SDXL_PRESETS[preset]
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{destination.name}.") as tmp:
        tokenizer = _build_tokenizer(Path(tmp) / "tokenizer-src")
        tokenizer_2 = _build_tokenizer(Path(tmp) / "tokenizer-2-src", pad_token="!")
        torch.manual_seed(seed)

        def text_config(index: int) -> CLIPTextConfig:
            return CLIPTextConfig(
                vocab_size=max(len(tokenizer), spec.text_vocab_size),
                hidden_size=spec.text_hidden[index],
                intermediate_size=spec.text_intermediate[index],
                num_hidden_layers=spec.text_layers[index],
                num_attention_heads=spec.text_heads[index],
                max_position_embeddings=77,
                hidden_act=("quick_gelu", "gelu")[index],
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=(tokenizer.pad_token_id, tokenizer_2.pad_token_id)[index],
                projection_dim=spec.text_hidden[1],
            )

        text_encoder = CLIPTextModel(text_config(0))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(1))
        unet = UNet2DConditionModel(**sdxl_unet_config(spec))
        vae = _vae(spec.vae_channels, spec.vae_layers_per_block, spec.vae_norm_groups,
                   spec.resolution, scaling_factor=0.13025)  # fmt: skip
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
        tokenizer_dirs = {"tokenizer-src": "tokenizer", "tokenizer-2-src": "tokenizer_2"}
        _save_in_place(pipeline, Path(tmp), destination, tokenizer_dirs)
    log.info("wrote %s SDXL pipeline (seed %d) to %s", preset, seed, destination)
    return destination


def sdxl_unet_config(spec: SDXLPreset) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments of an SDXL preset: cross-attention over both text
    encoders' widths, and the added embedding of the pooled text (the second encoder's width)
    and the six size/crop time ids."""
    return {
        "sample_size": spec.resolution // 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": spec.unet_channels,
        "layers_per_block": spec.unet_layers_per_block,
        "transformer_layers_per_block": spec.transformer_layers_per_block,
        "attention_head_dim": spec.attention_head_dim,
        "down_block_types": spec.down_blocks,
        "up_block_types": spec.up_blocks,
        "cross_attention_dim": sum(spec.text_hidden),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": spec.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": 6 * spec.addition_time_embed_dim
        + spec.text_hidden[1],
        "norm_num_groups": spec.unet_norm_groups,
    }


def _vae(
    channels: tuple[int, ...],
    layers_per_block: int,
    norm_groups: int,
    resolution: int,
    *,
    scaling_factor: float,
) -> Any:
    """The KL autoencoder of SD 1.x (scaling 0.18215) and SDXL (0.13025), at the preset's
    widths (with diffusers' default ``force_upcast``: decoded in float32 under float16)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_groups,
        sample_size=resolution,
        scaling_factor=scaling_factor,
    )


def _save_in_place(
    pipeline: Any, tmp: Path, destination: Path, tokenizer_dirs: dict[str, str]
) -> None:
    """Save ``pipeline`` under ``tmp`` with the tokenizers' vocabulary files (for slow-tokenizer
    readers) and rename it to ``destination``: the directory is complete or absent."""
    staged = tmp / "pipeline"
    pipeline.save_pretrained(staged, safe_serialization=True)
    for source, target in tokenizer_dirs.items():
        for vocabulary_file in ("vocab.json", "merges.txt"):
            shutil.copy(tmp / source / vocabulary_file, staged / target)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(staged, destination)


def _byte_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _build_tokenizer(directory: Path, *, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer from a locally generated vocabulary: every byte character (with and
    without the end-of-word marker ``</w>``), merges that make whole tokens of common prompt
    words, and CLIP's special tokens. SDXL's second tokenizer pads with "!" (as OpenCLIP
    does), the first with the end token."""
    from transformers import CLIPTokenizer

    alphabet = list(_byte_to_unicode().values())
    vocab_tokens = alphabet + [f"{char}</w>" for char in alphabet]
    merges: list[tuple[str, str]] = []
    for word in TOKENIZER_WORDS:
        pieces = list(word[:-1]) + [f"{word[-1]}</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair = (merged, piece)
            merged += piece
            if pair not in merges:
                merges.append(pair)
                vocab_tokens.append(merged)
    vocab_tokens = list(dict.fromkeys(vocab_tokens)) + ["<|startoftext|>", "<|endoftext|>"]

    directory.mkdir(parents=True)
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab_tokens)}))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad_token,
                "unk_token": "<|endoftext|>",
                "model_max_length": 77,
            }
        )
    )
    return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="where to write the pipeline (replaced if present)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--preset",
        choices=sorted({*PRESETS, *SDXL_PRESETS}),
        default="tiny",
        help="architecture: SD 1.x tiny, world, bench, sd15; SDXL tiny-sdxl, bench-sdxl, sdxl "
        "(default tiny)",
    )


def main(args: argparse.Namespace) -> int:
    path = build_model(args.directory, seed=args.seed, preset=args.preset)
    print(path)
    return 0


def describe(pipeline: Any) -> dict[str, int]:
    """Parameter counts per component, for logs and benchmark headers."""
    return {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters())
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(pipeline, name, None) is not None
    }
