"""Model families: read off a diffusers directory's model_index.json (SD 1.x and SD 2.x told
apart by the text encoder's width) or a single file's tensor names; a family lorapipe cannot
train yet is refused in one line that names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapipe.errors import ModelError
from lorapipe.models import SD1, SD2, SDXL
from lorapipe.models.families import family_of_directory, family_of_keys


def diffusers_dir(path: Path, pipeline_class: str, text_width: int | None = None) -> Path:
    """Just what the family is read from: model_index.json and the text encoder's config."""
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    if text_width is not None:
        (path / "text_encoder").mkdir()
        (path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": text_width}))
    return path


def test_the_tiny_presets_are_sd1_and_sdxl(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lorapipe.demo.tiny_model import build_model

    assert family_of_directory(tiny_model_dir) is SD1
    assert family_of_directory(build_model(tmp_path / "xl", preset="tiny-sdxl")) is SDXL


@pytest.mark.parametrize(("width", "family"), [(768, SD1), (1024, SD2)])
def test_sd1_and_sd2_directories_differ_by_text_encoder_width(
    width: int, family: object, tmp_path: Path
) -> None:
    model = diffusers_dir(tmp_path / "model", "StableDiffusionPipeline", width)
    assert family_of_directory(model) is family


@pytest.mark.parametrize(
    ("pipeline_class", "name"),
    [
        ("StableDiffusion3Pipeline", "SD3"),
        ("FluxPipeline", "Flux"),
        ("StableDiffusionXLRefinerPipeline", "SDXL refiner"),
        ("KandinskyV22Pipeline", "KandinskyV22Pipeline"),
    ],
)
def test_other_directories_are_refused_in_one_line_naming_them(
    pipeline_class: str, name: str, tmp_path: Path
) -> None:
    model = diffusers_dir(tmp_path / "model", pipeline_class)
    with pytest.raises(ModelError) as error:
        family_of_directory(model)
    assert f"not supported yet: {name}" in str(error.value)
    assert "\n" not in str(error.value)


# tensor names as real checkpoints have them (a few of each)
SD1_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "first_stage_model.encoder.conv_in.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
]
SD2_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "cond_stage_model.model.token_embedding.weight",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
]
SDXL_KEYS = [
    "model.diffusion_model.label_emb.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
    "conditioner.embedders.1.model.positional_embedding",
]


@pytest.mark.parametrize(("keys", "family"), [(SD1_KEYS, SD1), (SD2_KEYS, SD2), (SDXL_KEYS, SDXL)])
def test_a_single_file_family_comes_from_its_tensor_names(keys: list[str], family: object) -> None:
    assert family_of_keys(keys, "model.safetensors") is family


@pytest.mark.parametrize(
    ("keys", "name"),
    [
        (["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"], "SD3"),
        (["double_blocks.0.img_attn.norm.key_norm.scale"], "Flux"),
        (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "Flux"),
        (["conditioner.embedders.0.model.positional_embedding"], "SDXL refiner"),
    ],
)
def test_single_files_of_other_families_are_refused_in_one_line(keys: list[str], name: str) -> None:
    with pytest.raises(ModelError) as error:
        family_of_keys(keys, "other.safetensors")
    message = str(error.value)
    assert message.startswith("base model 'other.safetensors': not supported yet: ")
    assert f"not supported yet: {name} " in message and "\n" not in message


def test_a_file_without_a_text_encoder_is_not_a_checkpoint_lorapipe_knows() -> None:
    lora_keys = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    with pytest.raises(ModelError, match="is not a Stable Diffusion checkpoint lorapipe knows"):
        family_of_keys(lora_keys, "style.safetensors")


def test_a_directory_of_another_family_on_s3_is_refused_before_it_is_downloaded(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorapipe import store
    from lorapipe.models import model_cache_root, resolve_model_dir

    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    flux = diffusers_dir(tmp_path / "flux", "FluxPipeline")
    (flux / "transformer").mkdir()
    (flux / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1024)
    uri = store.join(s3_bucket, "models", "flux")
    store.put_dir(flux, uri)
    with pytest.raises(ModelError, match=f"base model '{uri}': not supported yet: Flux "):
        resolve_model_dir(uri)
    assert not model_cache_root().exists()
