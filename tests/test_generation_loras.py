"""generate's LoRAs against the base model's family: a LoRA made for another family (an SD 1.x
LoRA on SDXL, or the reverse) fails in one line naming the LoRA and both families, from the
file's header, before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorapipe import cli
from lorapipe.errors import LoraFormatError
from lorapipe.generation.loras import check_lora_family, resolve_lora
from lorapipe.models import SD1, SD2, SDXL

SD1_KEYS = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
)
SDXL_KEYS = (
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
)
SDXL_DIFFUSERS_KEYS = (
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
)


def _lora_file(path: Path, names: tuple[str, ...]) -> Path:
    state_dict = {}
    for name in names:
        down, up = ("lora_down", "lora_up") if name.startswith("lora_") else ("lora_A", "lora_B")
        state_dict[f"{name}.{down}.weight"] = torch.ones(2, 4)
        state_dict[f"{name}.{up}.weight"] = torch.ones(4, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, path)
    return path


@pytest.mark.parametrize(
    ("names", "family", "lora_family"),
    [(SD1_KEYS, SDXL, "SD 1.x or SD 2.x"), (SDXL_KEYS, SD1, "SDXL"), (SDXL_KEYS, SD2, "SDXL")],
    ids=["sd1-lora-on-sdxl", "sdxl-lora-on-sd1", "sdxl-lora-on-sd2"],
)
def test_a_lora_for_another_family_is_one_line_naming_it_and_both_families(
    tmp_path: Path, names: tuple[str, ...], family, lora_family: str
) -> None:
    path = _lora_file(tmp_path / "other.safetensors", names)
    lora = resolve_lora("other", str(path), adapter="lora_0")

    with pytest.raises(LoraFormatError) as error:
        check_lora_family(lora, family)

    message = str(error.value)
    assert message.startswith(f"LoRA 'other' ({path}) is for {lora_family} (key '")
    assert f"the base model is {family.label}" in message and "\n" not in message


def test_select_output_is_checked_by_the_file_generate_loads(tmp_path: Path) -> None:
    folder = tmp_path / "selected"
    _lora_file(folder / "pytorch_lora_weights.safetensors", SDXL_DIFFUSERS_KEYS)
    _lora_file(folder / "film_style.safetensors", SDXL_KEYS)
    lora = resolve_lora("", str(folder), adapter="lora_0")

    check_lora_family(lora, SDXL)
    with pytest.raises(LoraFormatError, match="key 'text_encoder_2.text_model.encoder"):
        check_lora_family(lora, SD1)


def test_a_lora_of_the_models_family_passes(tmp_path: Path) -> None:
    check_lora_family(
        resolve_lora("a", str(_lora_file(tmp_path / "a.safetensors", SD1_KEYS)), adapter="a"), SD1
    )
    check_lora_family(
        resolve_lora("b", str(_lora_file(tmp_path / "b.safetensors", SDXL_KEYS)), adapter="b"), SDXL
    )


def test_generate_refuses_an_sdxl_lora_for_an_sd1_model_before_loading_it(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    lora = _lora_file(tmp_path / "xl_style.safetensors", SDXL_KEYS)
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(tiny_model_dir), "--lora", str(lora)]

    assert cli.main([*argv, "--prompt", "a red dog", "--out", str(out)]) == 2

    error = capsys.readouterr().err.strip()
    assert error.startswith("lorapipe generate: error: LoRA 'xl_style'") and "\n" not in error
    assert "is for SDXL" in error and "the base model is SD 1.x" in error
    assert not out.exists()
