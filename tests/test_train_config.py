"""The training config: the seed's YAML as written, typo-proof keys, typed values, and the
mapping of ``target_modules`` names onto the UNet and the text encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapipe.errors import ConfigError
from lorapipe.train_config import (
    SEED_KEYS,
    TrainConfig,
    load_config,
    resolve_target_modules,
    short_name,
)

# The seed article's my_film_config.yaml, as written there.
SEED_YAML = """\
train_data_dir: "./data/film_street"
metadata_path: "./data/film_street/metadata.csv"
base_model: "./models/sd_v15/v1-5-pruned.safetensors"
lora_rank: 16
lora_alpha: 32
target_modules: ["q_proj", "v_proj"]
batch_size: 4
epochs: 20
learning_rate: 1e-4
optimizer: "AdamW"
scheduler: "cosine"
output_dir: "./output/film_style_lora"
save_steps: 100
log_dir: "./output/film_style_lora/logs"
"""

UNET_LAYERS = [
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.resnets.0.conv1",
]
TEXT_ENCODER_LAYERS = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.0.self_attn.k_proj",
    "text_model.encoder.layers.0.self_attn.v_proj",
    "text_model.encoder.layers.0.self_attn.out_proj",
    "text_model.encoder.layers.0.mlp.fc1",
]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_the_seed_yaml_loads_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SEED_YAML))
    assert config.learning_rate == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string
    assert config.optimizer == "adamw"
    assert config.scheduler == "cosine"
    assert config.lora_alpha == 32.0
    assert config.target_modules == ["q_proj", "v_proj"]
    assert (config.batch_size, config.epochs, config.save_steps) == (4, 20, 100)
    assert config.log_dir == "./output/film_style_lora/logs"
    assert set(SEED_KEYS) <= set(config.to_dict())


def test_flags_override_the_file(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, SEED_YAML),
        {"learning_rate": "5e-5", "target_modules": "to_q,to_v", "flip_aug": True},
    )
    assert config.learning_rate == pytest.approx(5e-5)
    assert config.target_modules == ["to_q", "to_v"]
    assert config.flip_aug is True
    assert config.epochs == 20


def test_an_unknown_key_names_the_closest_valid_one_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "lora_rank: 8\nlearning_rat: 1e-4\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert (
        str(error.value)
        == f"{path} line 2: unknown key 'learning_rat'; did you mean 'learning_rate'?"
    )


def test_a_wrong_type_names_the_key_line_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, "epochs: 20\nbatch_size: four\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path} line 2: key 'batch_size' must be a whole number, got 'four'"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epochs", "2.5", "must be a whole number"),
        ("flip_aug", "maybe", "must be true or false"),
        ("lora_rank", "0", "must be at least 1"),
        ("optimizer", "Adam", "did you mean 'adamw'?"),
        ("scheduler", "cosine_annealing", "use one of constant"),
        ("validation_split", "2.5", "a whole number of images"),
        ("resolution", "100", "multiple of 8"),
        ("max_timestep", "0", "must be above min_timestep"),
        ("checkpoint_mirror", "/tmp/x", "s3:// prefix"),
        ("bucket_reso_steps", "60", "must be a multiple of 8"),
        ("min_bucket_reso", "4", "must be at least 8"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_flag(
    key: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(overrides={key: value})
    message = str(error.value)
    assert message.startswith(f"--{key.replace('_', '-')}")
    assert expected in message
    assert "\n" not in message


def test_numbers_written_as_strings_and_nulls_are_accepted() -> None:
    config = load_config(
        overrides={"max_train_steps": "1e3", "snr_gamma": "null", "text_encoder_lr": 5e-5}
    )
    assert config.max_train_steps == 1000
    assert config.snr_gamma is None
    assert config.text_encoder_lr == pytest.approx(5e-5)


def test_every_default_is_valid() -> None:
    assert load_config() == TrainConfig()


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_a_yaml_list_instead_of_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected 'key: value' lines"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_the_seed_target_modules_adapt_the_unet_attention() -> None:
    targets = resolve_target_modules(["q_proj", "v_proj"], UNET_LAYERS)
    assert targets.unet == ["to_q", "to_v"]
    assert targets.text_encoder == []


def test_with_the_text_encoder_the_clip_names_apply_there_as_is() -> None:
    targets = resolve_target_modules(
        ["q_proj", "to_v", "proj_in", "fc1"], UNET_LAYERS, TEXT_ENCODER_LAYERS
    )
    assert targets.unet == ["to_q", "to_v", "proj_in"]
    assert targets.text_encoder == ["q_proj", "v_proj", "fc1"]


def test_unet_names_with_dots_match_by_suffix() -> None:
    targets = resolve_target_modules(["to_out.0", "ff.net.0.proj"], UNET_LAYERS)
    assert targets.unet == ["to_out.0", "ff.net.0.proj"]


def test_a_target_matching_nothing_lists_the_available_names() -> None:
    with pytest.raises(ConfigError) as error:
        resolve_target_modules(["to_qq"], UNET_LAYERS)
    message = str(error.value)
    assert message.startswith("target_modules: 'to_qq' matches no layer of the UNet; available: ")
    for name in ("to_q", "to_out.0", "proj_in", "conv1", "q_proj"):
        assert name in message.split("available: ")[1].split(", ")


def test_short_names_keep_the_index_of_indexed_layers() -> None:
    assert short_name("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0") == "to_out.0"
    assert short_name("text_model.encoder.layers.1.mlp.fc2") == "fc2"


def test_every_key_is_in_the_readme_config_reference() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("<!-- section:train -->")[1].split("<!-- /section:train -->")[0]
    documented = {
        cell.strip("` ")
        for line in section.splitlines()
        if line.startswith("| `")
        for cell in line.split("|")[1].split(",")
    }
    assert set(TrainConfig().to_dict()) <= documented


def test_the_pipeline_parameter_is_checked_like_a_file() -> None:
    from lorapipe.train_config import load_config_text

    assert load_config_text("", {"lora_rank": 4}).lora_rank == 4
    with pytest.raises(ConfigError) as error:
        load_config_text("learning_rate: 1e-4\nlearning_rate: 1e-1\n")
    assert str(error.value) == (
        "training_config line 2: key 'learning_rate' is set twice (also on line 1); keep one"
    )
