"""The LoRA adapters: added with PEFT, their parameters named for checkpoints, saved for diffusers.

Adapters start as diffusers' train_text_to_image_lora.py starts them
(``LoraConfig(r, lora_alpha, init_lora_weights="gaussian")``: A random, B zero, so training
starts from the base model exactly). The UNet gets them through diffusers' ``add_adapter``; the
text encoders (SDXL has two) through PEFT's ``inject_adapter_in_model`` (transformers' own ``add_adapter``
insists on a newer PEFT than diffusers needs).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorapipe.errors import ConfigError
from lorapipe.train_config import TargetModules, TrainConfig, resolve_target_modules, short_name

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def adaptable_layers(model: torch.nn.Module) -> list[str]:
    """Paths of the layers a LoRA can adapt (Linear and Conv2d)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    ]


def add_adapters(
    config: TrainConfig,
    unet: UNet2DConditionModel,
    text_encoders: Mapping[str, torch.nn.Module],
    *,
    unused_last_layer: Collection[str] = (),
) -> TargetModules:
    """Add LoRA adapters to the UNet, and to every text encoder (SDXL has two) when
    ``train_text_encoder``, except the last layer of those in ``unused_last_layer`` (its output
    never reaches the UNet); only their parameters are trainable. Logs how many layers of which
    names got one."""
    from peft import LoraConfig, inject_adapter_in_model

    first_text_encoder = next(iter(text_encoders.values()))
    targets = resolve_target_modules(
        config.target_modules,
        adaptable_layers(unet),
        adaptable_layers(first_text_encoder) if config.train_text_encoder else None,
    )
    if not targets.unet:
        raise ConfigError(
            f"target_modules {config.target_modules} name no UNet layer; add UNet layers, "
            "e.g. to_q, to_k, to_v, to_out.0"
        )
    for model in (unet, *text_encoders.values()):
        model.requires_grad_(False)

    def lora_config(target_modules: list[str], **layers: Any) -> LoraConfig:
        return LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=target_modules,
            **layers,
        )

    unet.add_adapter(lora_config(targets.unet))
    _log_adapters("UNet", unet)
    for name, text_encoder in text_encoders.items():
        if targets.text_encoder:
            layers = {}
            if name in unused_last_layer:
                used = range(text_encoder.config.num_hidden_layers - 1)
                layers = {"layers_to_transform": list(used), "layers_pattern": "layers"}
            inject_adapter_in_model(lora_config(targets.text_encoder, **layers), text_encoder)
        _log_adapters(name.replace("_", " "), text_encoder if targets.text_encoder else None)
    return targets


def _log_adapters(model_name: str, model: torch.nn.Module | None) -> None:
    if model is None:
        log.info("LoRA on the %s: none", model_name)
        return
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    counts = collections.Counter(short_name(name) for name in adapted)
    summary = ", ".join(f"{name} ({count})" for name, count in counts.items())
    log.info("LoRA on %d %s layers: %s", len(adapted), model_name, summary)
    log.debug("LoRA layers of the %s: %s", model_name, ", ".join(adapted))


def lora_parameters(
    unet: UNet2DConditionModel, text_encoders: Mapping[str, torch.nn.Module]
) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters, named ``unet.<name>`` / ``<text encoder>.<name>`` (the text
    encoders that are trained, by their diffusers component names)."""
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    for component, text_encoder in text_encoders.items():
        named |= {
            f"{component}.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad
        }
    return named


def save_lora_weights(
    directory: Path,
    unet: UNet2DConditionModel,
    text_encoders: Mapping[str, torch.nn.Module],
    pipeline_class: str,
) -> None:
    """``pytorch_lora_weights.safetensors`` as the family's pipeline class
    (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) writes it with
    ``save_lora_weights``, each LoraConfig in the header so ``load_lora_weights`` applies the
    trained alpha. ``text_encoders``: the trained ones, by component name."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    layers: dict[str, Any] = {
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    for component, text_encoder in text_encoders.items():
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(text_encoder)
        layers[f"{component}_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    getattr(diffusers, pipeline_class).save_lora_weights(
        directory, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **layers
    )


def lora_config_record(config: TrainConfig, targets: TargetModules) -> dict[str, Any]:
    """``lora_config.json``: what ``lorapipe select`` needs to read the weights."""
    return {
        "rank": config.lora_rank,
        "alpha": config.lora_alpha,
        "unet_target_modules": targets.unet,
        "text_encoder_target_modules": targets.text_encoder,
    }
