"""LoRA adapters: where the configured names put them, and a saved file that diffusers'
``load_lora_weights`` loads back to the same model, trained alpha included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorapipe.errors import ConfigError
from lorapipe.models import load_base_model
from lorapipe.train_config import TrainConfig
from lorapipe.training.lora import (
    LORA_WEIGHT_NAME,
    add_adapters,
    lora_config_record,
    lora_parameters,
    save_lora_weights,
)


def adapted(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def test_the_seed_names_adapt_the_unet_attention_only(tiny_model_dir: Path) -> None:
    pipeline = load_base_model(str(tiny_model_dir))
    config = TrainConfig(target_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8)
    targets = add_adapters(config, pipeline.unet, {"text_encoder": pipeline.text_encoder})
    assert (targets.unet, targets.text_encoder) == (["to_q", "to_v"], [])
    layers = adapted(pipeline.unet)
    assert len(layers) == 16 and all(name.endswith(("to_q", "to_v")) for name in layers)
    assert not adapted(pipeline.text_encoder)
    parameters = lora_parameters(pipeline.unet, {})
    assert len(parameters) == 32 and all(".lora_" in name for name in parameters)
    trainable = [n for n, p in pipeline.unet.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(name.removeprefix("unet.") for name in parameters)
    assert lora_config_record(config, targets)["unet_target_modules"] == ["to_q", "to_v"]


def test_with_the_text_encoder_its_attention_gets_adapters_too(tiny_model_dir: Path) -> None:
    pipeline = load_base_model(str(tiny_model_dir))
    config = TrainConfig(target_modules=["q_proj", "to_v"], train_text_encoder=True)
    targets = add_adapters(config, pipeline.unet, {"text_encoder": pipeline.text_encoder})
    assert targets.text_encoder == ["q_proj", "v_proj"]
    assert len(adapted(pipeline.text_encoder)) == 4  # 2 layers x (q_proj, v_proj)
    assert any(
        name.startswith("text_encoder.")
        for name in lora_parameters(pipeline.unet, {"text_encoder": pipeline.text_encoder})
    )


def test_only_text_encoder_names_without_training_it_is_an_error(tiny_model_dir: Path) -> None:
    pipeline = load_base_model(str(tiny_model_dir))
    with pytest.raises(ConfigError, match="'fc1' matches no layer of the UNet"):
        add_adapters(
            TrainConfig(target_modules=["fc1"]),
            pipeline.unet,
            {"text_encoder": pipeline.text_encoder},
        )


def test_saved_weights_load_back_into_diffusers_with_their_alpha(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    trained = load_base_model(str(tiny_model_dir))
    add_adapters(
        TrainConfig(target_modules=["to_q", "to_v"], lora_rank=4, lora_alpha=2),
        trained.unet,
        {"text_encoder": trained.text_encoder},
    )
    with torch.no_grad():
        for name, parameter in lora_parameters(trained.unet, {}).items():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_lora_weights(tmp_path, trained.unet, {}, "StableDiffusionPipeline")

    loaded = load_base_model(str(tiny_model_dir))
    loaded.load_lora_weights(tmp_path, weight_name=LORA_WEIGHT_NAME)
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32))
    with torch.no_grad():
        expected = trained.unet(*inputs).sample
        base = load_base_model(str(tiny_model_dir)).unet(*inputs).sample
        torch.testing.assert_close(loaded.unet(*inputs).sample, expected)
    assert not torch.allclose(expected, base, atol=1e-3)  # the LoRA changes the output
