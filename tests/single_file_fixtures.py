"""Single-file checkpoints for tests: a diffusers directory written back as one LDM-layout
``.safetensors`` file, the layout WebUI, ComfyUI and kohya read and write.

The key mapping (diffusers name -> LDM name), for a UNet with ``L = layers_per_block``:

UNet, under ``model.diffusion_model.``
  ``time_embedding.linear_1/2``          -> ``time_embed.0/2``
  ``add_embedding.linear_1/2`` (SDXL)    -> ``label_emb.0.0/2``
  ``conv_in``                            -> ``input_blocks.0.0``
  ``conv_norm_out`` / ``conv_out``       -> ``out.0`` / ``out.2``
  ``down_blocks.b.resnets.j``            -> ``input_blocks.{(L+1)b + j + 1}.0``
  ``down_blocks.b.attentions.j``         -> ``input_blocks.{(L+1)b + j + 1}.1``
  ``down_blocks.b.downsamplers.0.conv``  -> ``input_blocks.{(L+1)(b+1)}.0.op``
  ``mid_block.resnets.j``                -> ``middle_block.{2j}``
  ``mid_block.attentions.0``             -> ``middle_block.1``
  ``up_blocks.b.resnets.j``              -> ``output_blocks.{(L+1)b + j}.0``  (j <= L)
  ``up_blocks.b.attentions.j``           -> ``output_blocks.{(L+1)b + j}.1``
  ``up_blocks.b.upsamplers.0``           -> ``output_blocks.{(L+1)b + L}.1``, or ``.2`` when
                                            that output block has an attention
  inside a resnet: ``norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut`` ->
  ``in_layers.0 in_layers.2 emb_layers.1 out_layers.0 out_layers.3 skip_connection``;
  attention (transformer) blocks keep their inner names.

VAE, under ``first_stage_model.``
  ``encoder.down_blocks.i.resnets.j`` / ``.downsamplers.0`` -> ``encoder.down.i.block.j`` /
  ``.downsample``; ``decoder.up_blocks.i`` -> ``decoder.up.{n-1-i}`` (LDM counts up blocks from
  the bottom), ``resnets.j`` -> ``block.j``, ``upsamplers.0`` -> ``upsample``;
  ``mid_block.resnets.j`` -> ``mid.block_{j+1}``; ``mid_block.attentions.0`` -> ``mid.attn_1``
  with ``group_norm to_q to_k to_v to_out.0`` -> ``norm q k v proj_out`` as 1x1 convolutions
  (linear weights get two trailing unit dimensions); ``conv_norm_out`` -> ``norm_out``,
  ``conv_shortcut`` -> ``nin_shortcut``.

Text encoders
  OpenAI CLIP (SD 1.x; SDXL's first): transformers' names under ``text_model.``, prefixed
  ``cond_stage_model.transformer.`` (SD 1.x) or ``conditioner.embedders.0.transformer.`` (SDXL).
  OpenCLIP (SD 2.x under ``cond_stage_model.model.``; SDXL's second under
  ``conditioner.embedders.1.model.``): ``token_embedding.weight``, ``positional_embedding``,
  ``transformer.resblocks.n.{ln_1, ln_2, attn.out_proj, mlp.c_fc, mlp.c_proj}``, the q/k/v
  projections concatenated into ``attn.in_proj_weight``/``in_proj_bias``, ``ln_final``, and
  ``text_projection`` as the transpose of transformers' projection weight.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
OPEN_CLIP_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def write_single_file(
    model_dir: Path, path: Path, *, text_layout: str = "", metadata: dict[str, str] | None = None
) -> Path:
    """``model_dir`` (a diffusers SD 1.x or SDXL directory) as one LDM-layout file at ``path``.
    ``text_layout="open_clip"`` writes an SD 1.x directory's text encoder the way SD 2.x files
    hold theirs, which makes an SD 2.x file of it."""
    index = json.loads((model_dir / "model_index.json").read_text())
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    unet = load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    state |= _prefixed("model.diffusion_model.", _unet_to_ldm(unet, unet_config))
    vae = load_file(model_dir / "vae" / "diffusion_pytorch_model.safetensors")
    vae_blocks = len(json.loads((model_dir / "vae" / "config.json").read_text())["up_block_types"])
    state |= _prefixed("first_stage_model.", _vae_to_ldm(vae, vae_blocks))
    text = _text_weights(model_dir / "text_encoder")
    if "text_encoder_2" in index:
        state |= _prefixed("conditioner.embedders.0.transformer.", text)
        text_2 = _text_weights(model_dir / "text_encoder_2")
        state |= _prefixed("conditioner.embedders.1.model.", _open_clip(text_2))
    elif text_layout == "open_clip":
        state |= _prefixed("cond_stage_model.model.", _open_clip(text))
    else:
        state |= _prefixed("cond_stage_model.transformer.", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    return path


def _prefixed(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in weights.items()}


def _unet_to_ldm(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    per_block = config["layers_per_block"] + 1  # LDM slots per resolution level
    up_attentions = {
        (int(b), int(j))
        for b, j in re.findall(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", "\n".join(weights), re.M)
    }

    def rename(key: str) -> str:
        for old, new in UNET_TOP.items():
            if key.startswith(old + "."):
                return new + key[len(old) :]
        if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(match[1]), match[2], int(match[3]), match[4]
            slot = f"input_blocks.{per_block * b + j + 1}"
            return f"{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"{slot}.1.{rest}"
        if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            return f"input_blocks.{per_block * (int(match[1]) + 1)}.0.op.{match[2]}"
        if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            return f"middle_block.{2 * int(match[1])}.{_resnet(match[2])}"
        if key.startswith("mid_block.attentions.0."):
            return "middle_block.1." + key.removeprefix("mid_block.attentions.0.")
        if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(match[1]), match[2], int(match[3]), match[4]
            slot = f"output_blocks.{per_block * b + j}"
            return f"{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"{slot}.1.{rest}"
        if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            b = int(match[1])
            position = 2 if (b, per_block - 1) in up_attentions else 1
            return f"output_blocks.{per_block * b + per_block - 1}.{position}.{match[2]}"
        raise AssertionError(f"no LDM name for UNet weight {key}")

    return {rename(key): value for key, value in weights.items()}


def _resnet(rest: str) -> str:
    name, _, tail = rest.rpartition(".")
    return f"{RESNET_NAMES.get(name, name)}.{tail}"


def _vae_to_ldm(weights: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in weights.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new
        )
        if match := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", new):
            level, part = blocks - 1 - int(match[1]), match[2]
            inner = "upsample" if part.startswith("upsamplers") else "block"
            new = f"decoder.up.{level}.{inner}.{match[3]}"
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            head, rest = new.split(".mid_block.attentions.0.")
            name, _, tail = rest.rpartition(".")
            new = f"{head}.mid.attn_1.{VAE_ATTENTION_NAMES[name]}.{tail}"
            if name != "group_norm" and value.ndim == 2:
                value = value[:, :, None, None]  # a linear layer as a 1x1 convolution
        converted[new] = value
    return converted


def _text_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A text encoder's weights under transformers' ``text_model.`` names, whichever way this
    transformers version nests them (``text_projection`` stays outside)."""
    weights = load_file(directory / "model.safetensors")
    return {
        key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}": value
        for key, value in weights.items()
    }


def _open_clip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key == "text_projection.weight":
            converted["text_projection"] = value.T.contiguous()
            continue
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            converted["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            converted["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            converted["ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif match := re.match(
            r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key
        ):
            continue  # concatenated below
        else:
            match = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", key)
            assert match, f"no OpenCLIP name for text weight {key}"
            name = OPEN_CLIP_NAMES[match[2]]
            converted[f"transformer.resblocks.{match[1]}.{name}.{match[3]}"] = value
    layers = {int(n) for n in re.findall(r"encoder\.layers\.(\d+)\.", "\n".join(weights))}
    for n in sorted(layers):
        for kind in ("weight", "bias"):
            parts = [
                weights[f"text_model.encoder.layers.{n}.self_attn.{p}_proj.{kind}"] for p in "qkv"
            ]
            converted[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(parts)
    return converted
