"""kohya's LoRA module names for each model family, and the diffusers module paths they stand for.

kohya sd-scripts names a module ``<prefix><module path with "." as "_">``: ``lora_unet_`` for the
UNet and one prefix per text encoder (the family's ``kohya_text_encoder_prefixes``: ``lora_te_``;
SDXL ``lora_te1_`` / ``lora_te2_``). The module path is the one of the UNet kohya trains:

- SD 1.x / 2.x: its UNet has diffusers' module tree, ``down_blocks_0_attentions_0_...``.
- SDXL: its UNet is the original SGM/LDM one (sd-scripts' ``library/sdxl_original_unet.py``):
  ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``middle_block_1_...``,
  ``output_blocks_0_1_...``, resnets as ``in_layers_2`` / ``emb_layers_1`` / ``out_layers_3`` /
  ``skip_connection``. A1111, ComfyUI and diffusers' ``load_lora_weights`` read SDXL files so.

The LDM block numbers follow from the UNet's layout (levels, resnets per level, which levels
attend), so they are derived from its config: tiny test models and full SDXL each get their own.
Other tools' SDXL files sometimes spell the UNet the diffusers way; those are read too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorapipe.errors import LoraFormatError
from lorapipe.models.families import ModelFamily

UNET_PREFIX = "lora_unet_"
# CLIP's layers live under "text_model." in checkpoints and kohya names; transformers >= 5
# flattens CLIPTextModel's module tree (not CLIPTextModelWithProjection's), and diffusers strips
# the prefix when it loads into a flattened model. text_projection sits beside text_model.
TEXT_MODEL_PREFIX = "text_model."
TEXT_MODEL_SIBLINGS = ("text_projection",)

# ModelSpec's ``implementation`` of a LoRA with LDM UNet names (kohya's sai_model_spec)
LDM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
DIFFUSERS_IMPLEMENTATION = "diffusers"
LDM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")

# Module-path segments that contain "_" (diffusers and LDM UNets, CLIP). kohya names join every
# segment with "_", so turning a kohya name back into a path needs to know these.
COMPOUND_SEGMENTS = frozenset(
    {
        # diffusers UNet
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out",
        "to_q", "to_k", "to_v", "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
        "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding",
        "class_embedding",
        # LDM UNet
        "input_blocks", "middle_block", "output_blocks", "in_layers", "emb_layers", "out_layers",
        "skip_connection", "time_embed", "label_emb",
        # CLIP text encoder
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
        "token_embedding", "position_embedding", "text_projection",
    }
)  # fmt: skip
LONGEST_COMPOUND = max(name.count("_") + 1 for name in COMPOUND_SEGMENTS)

# a diffusers resnet's layers -> their place in an LDM ResBlock (Sequential indices kept)
RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# UNet layers outside the blocks: diffusers path -> LDM path
UNET_OUTER_LAYERS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """What the diffusers <-> LDM block numbering depends on, read off a UNet config."""

    down_blocks: tuple[str, ...]
    up_blocks: tuple[str, ...]
    layers_per_block: tuple[int, ...]  # resnets per down level; an up level has one more
    mid_block: str | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        down = tuple(config.get("down_block_types") or ())
        layers = config.get("layers_per_block", 2)
        if isinstance(layers, int):
            layers = [layers] * len(down)
        return cls(
            down_blocks=down,
            up_blocks=tuple(config.get("up_block_types") or ()),
            layers_per_block=tuple(int(n) for n in layers),
            mid_block=config.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
        )


# SDXL base's UNet (and every fine-tune of it): what names a file when no config is at hand
SDXL_BASE_LAYOUT = UNetLayout(
    down_blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=(2, 2, 2),
    mid_block="UNetMidBlock2DCrossAttn",
)


def _attends(block_type: str | None) -> bool:
    return block_type is not None and "CrossAttn" in block_type


def ldm_blocks(layout: UNetLayout) -> list[tuple[str, str, bool]]:
    """(diffusers block path, LDM block path, is a resnet) for every block of the UNet, in the
    order the LDM UNet numbers them: ``input_blocks.<n>.<0 resnet | 1 attention>`` per down
    layer, a downsampler (``.0.op``) closing every level but the last; the middle block's
    resnet, attention, resnet; ``output_blocks`` likewise, the upsampler after the attention."""
    blocks: list[tuple[str, str, bool]] = []
    levels = len(layout.down_blocks)
    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(layout.down_blocks):
        for layer in range(layout.layers_per_block[level]):
            blocks.append((f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", True))
            if _attends(block_type):
                blocks.append(
                    (f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1", False)
                )
            index += 1
        if level < levels - 1:
            blocks.append(
                (f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op", False)
            )
            index += 1
    if layout.mid_block is not None:
        middle = ["resnets.0", "attentions.0", "resnets.1"]
        if not _attends(layout.mid_block):
            middle.remove("attentions.0")
        for position, part in enumerate(middle):
            is_resnet = part.startswith("resnets")
            blocks.append((f"mid_block.{part}", f"middle_block.{position}", is_resnet))
    index = 0
    for level, block_type in enumerate(layout.up_blocks):
        layers = layout.layers_per_block[levels - 1 - level] + 1
        for layer in range(layers):
            blocks.append((f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", True))
            if _attends(block_type):
                blocks.append(
                    (f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1", False)
                )
            if layer == layers - 1 and level < levels - 1:
                position = 2 if _attends(block_type) else 1
                blocks.append(
                    (
                        f"up_blocks.{level}.upsamplers.0.conv",
                        f"output_blocks.{index}.{position}.conv",
                        False,
                    )
                )
            index += 1
    return blocks


class LdmPaths:
    """Diffusers UNet module paths <-> the original LDM UNet's, for one layout."""

    def __init__(self, layout: UNetLayout) -> None:
        rows = [(diffusers, ldm, False) for diffusers, ldm in UNET_OUTER_LAYERS.items()]
        rows += ldm_blocks(layout)
        self._to_ldm = {diffusers: (ldm, resnet) for diffusers, ldm, resnet in rows}
        self._to_diffusers = {ldm: (diffusers, resnet) for diffusers, ldm, resnet in rows}
        self._resnet_back = {ldm: diffusers for diffusers, ldm in RESNET_LAYERS.items()}

    def to_ldm(self, path: str) -> str | None:
        """``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SDXL base);
        None for a module the LDM UNet has no place for."""
        return _translate(path, self._to_ldm, RESNET_LAYERS)

    def to_diffusers(self, path: str) -> str | None:
        return _translate(path, self._to_diffusers, self._resnet_back)


def _translate(
    path: str, blocks: Mapping[str, tuple[str, bool]], resnet_layers: Mapping[str, str]
) -> str | None:
    """``path`` with its longest block prefix (at a "." boundary) replaced; inside a resnet the
    layer names are replaced too."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        block = ".".join(parts[:end])
        if block in blocks:
            target, resnet = blocks[block]
            rest = ".".join(parts[end:])
            if resnet:
                if rest not in resnet_layers:
                    return None
                rest = resnet_layers[rest]
            return f"{target}.{rest}" if rest else target
    return None


@dataclass(frozen=True)
class KohyaNames:
    """How kohya names one family's LoRA modules (see the module docstring)."""

    family: ModelFamily
    prefixes: Mapping[str, str]  # pipeline component -> kohya key prefix
    ldm: LdmPaths | None  # the UNet under its LDM names; None: its diffusers names

    def component(self, kohya_name: str) -> str | None:
        """The pipeline component a kohya name belongs to, None for a foreign prefix."""
        return next((c for c, p in self.prefixes.items() if kohya_name.startswith(p)), None)

    def kohya_name(self, name: str) -> str:
        """``unet.down_blocks.1.attentions.0.proj_in`` -> ``lora_unet_down_blocks_1_...``
        (SD 1.x) or ``lora_unet_input_blocks_4_1_proj_in`` (SDXL base)."""
        spellings = self.spellings(name)
        if not spellings:
            raise LoraFormatError(
                f"LoRA module '{name}' has no place in the original LDM UNet, so a kohya "
                f"{self.family.label} file cannot hold it; train without that module"
            )
        return spellings[0]

    def spellings(self, name: str) -> list[str]:
        """The kohya names a file may use for ``name``, the family's first; an LDM-named UNet's
        module also under the diffusers spelling other tools write. Empty for a UNet module
        the LDM UNet has no place for."""
        component, path = name.split(".", 1)
        diffusers = self.prefixes[component] + path.replace(".", "_")
        if component != "unet" or not self.ldm:
            return [diffusers]
        ldm = self.ldm.to_ldm(path)
        return [UNET_PREFIX + ldm.replace(".", "_"), diffusers] if ldm else []

    def neutral_name(self, kohya_name: str) -> str | None:
        """Inverse of ``kohya_name`` (either spelling): rejoin the segments that contain "_";
        None for an LDM name this UNet layout does not have."""
        component = next(c for c, p in self.prefixes.items() if kohya_name.startswith(p))
        path: str | None = _rejoin(kohya_name[len(self.prefixes[component]) :])
        if component == "unet" and self.ldm and path.split(".", 1)[0] in LDM_ROOTS:
            path = self.ldm.to_diffusers(path)
        return neutral_name(component, path) if path else None

    def lookup(self, module_names: Iterable[str]) -> dict[str, str]:
        """{kohya name: module name} over ``module_names`` in every spelling."""
        return {spelling: name for name in module_names for spelling in self.spellings(name)}


def kohya_names(family: ModelFamily, unet_config: Mapping[str, Any] | None = None) -> KohyaNames:
    """kohya's names for ``family``; an LDM-named UNet is numbered by ``unet_config`` (the base
    model's ``unet/config.json``), SDXL base's layout when None."""
    prefixes = {
        "unet": UNET_PREFIX,
        **dict(zip(family.text_encoders, family.kohya_text_encoder_prefixes, strict=True)),
    }
    ldm = None
    if numbers_unet_blocks(family):
        layout = UNetLayout.from_config(unet_config) if unet_config else SDXL_BASE_LAYOUT
        ldm = LdmPaths(layout)
    return KohyaNames(family=family, prefixes=prefixes, ldm=ldm)


def numbers_unet_blocks(family: ModelFamily) -> bool:
    """Whether ``family``'s kohya names number the UNet's blocks by its layout (LDM names), so
    that writing them wants the base model's UNet config."""
    return family.kohya_ldm_unet_names


def modelspec_implementation(family: ModelFamily) -> str:
    """ModelSpec's ``modelspec.implementation`` of a kohya LoRA: whose module names it uses."""
    return LDM_IMPLEMENTATION if numbers_unet_blocks(family) else DIFFUSERS_IMPLEMENTATION


def neutral_name(component: str, path: str) -> str:
    """``component.path``, a text-encoder path with its ``text_model.`` prefix."""
    if (
        component != "unet"
        and not path.startswith(TEXT_MODEL_PREFIX)
        and path.split(".", 1)[0] not in TEXT_MODEL_SIBLINGS
    ):
        path = TEXT_MODEL_PREFIX + path
    return f"{component}.{path}"


def _rejoin(joined: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    words = joined.split("_")
    segments: list[str] = []
    start = 0
    while start < len(words):
        for length in range(min(LONGEST_COMPOUND, len(words) - start), 0, -1):
            candidate = "_".join(words[start : start + length])
            if length == 1 or candidate in COMPOUND_SEGMENTS:
                segments.append(candidate)
                start += length
                break
    return ".".join(segments)
