"""LoRA files: diffusers/PEFT and kohya (A1111 WebUI, ComfyUI), converted both ways, loaded safely.

The proof that counts is diffusers' own loader: a kohya file written here, loaded with
``pipe.load_lora_weights``, generates the same image (max abs difference < 1e-4 on [0, 1] pixels)
as the diffusers file and as the adapted pipeline it came from, at the same scale and seed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_fixtures import (
    TEXT_ENCODER_TARGETS,
    UNET_ALL_TARGETS,
    add_random_lora,
    lora_state_dicts,
    save_lora,
)
from safetensors import safe_open
from safetensors.torch import save_file

from lorapipe import lora_format
from lorapipe.errors import LoraFormatError
from lorapipe.kohya_names import neutral_name
from lorapipe.lora_format import LoraModule, TrainingFacts

IMAGE_TOLERANCE = 1e-4


def _pipeline(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generate(pipeline, *, scale: float = 1.0) -> np.ndarray:
    return pipeline(
        "street photo of a man in the rain, film grain",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        cross_attention_kwargs={"scale": scale},
    ).images[0]


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# --------------------------------------------------------------------------- key names


def test_kohya_keys_use_sd_scripts_names_and_the_trained_alpha() -> None:
    modules = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(
            down=torch.ones(4, 32), up=torch.ones(32, 4), alpha=8.0
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LoraModule(
            down=torch.ones(4, 32), up=torch.ones(32, 4), alpha=2.0
        ),
    }

    kohya = lora_format.modules_to_kohya(modules)

    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    text = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert sorted(kohya) == sorted(
        f"{name}.{suffix}"
        for name in (unet, text)
        for suffix in ("alpha", "lora_down.weight", "lora_up.weight")
    )
    assert kohya[f"{unet}.alpha"].shape == () and kohya[f"{unet}.alpha"].dtype == torch.float32
    assert kohya[f"{unet}.alpha"].item() == 8.0  # the real lora_alpha, not the rank
    assert kohya[f"{text}.alpha"].item() == 2.0


def test_every_sd15_layer_name_survives_the_kohya_round_trip() -> None:
    """kohya names replace "." by "_"; turning them back must work for every layer SD 1.5's UNet
    and CLIP text encoder have (attention, feed-forward, resnets, samplers, embeddings)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        text_encoder = CLIPTextModel(CLIPTextConfig())
    names = [
        f"{component}.{path}"
        for component, model in (("unet", unet), ("text_encoder", text_encoder))
        for path, layer in model.named_modules()
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d)
    ]
    modules = {
        name: LoraModule(down=torch.ones(1, 1), up=torch.ones(1, 1), alpha=1.0) for name in names
    }
    expected = {neutral_name(*name.split(".", 1)) for name in names}

    assert len(names) > 250
    assert set(lora_format.modules_from_kohya(lora_format.modules_to_kohya(modules))) == expected


def _random_modules(rng: random.Random, names: list[str]) -> dict[str, LoraModule]:
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    modules = {}
    for name in rng.sample(names, rng.randint(1, len(names))):
        rank = rng.randint(1, 8)
        fan_in, fan_out = rng.randint(1, 16), rng.randint(1, 16)
        if rng.random() < 0.3:  # a conv LoRA: k x k down, 1 x 1 up
            kernel = rng.choice([1, 3])
            down, up = torch.randn(rank, fan_in, kernel, kernel), torch.randn(fan_out, rank, 1, 1)
        else:
            down, up = torch.randn(rank, fan_in), torch.randn(fan_out, rank)
        alpha = rng.choice([rank, 1, 0.5, 8, 16, 32, 12.5])
        modules[name] = LoraModule(down=down.to(dtype), up=up.to(dtype), alpha=float(alpha))
    return modules


def test_diffusers_to_kohya_to_diffusers_is_the_identity(tiny_model_dir: Path) -> None:
    names = lora_format.pipeline_module_names(_pipeline(tiny_model_dir))
    rng = random.Random(1234)
    for _ in range(25):
        torch.manual_seed(rng.randint(0, 2**31))
        modules = _random_modules(rng, names)
        state_dict, metadata = lora_format.modules_to_diffusers(modules)

        kohya = lora_format.diffusers_to_kohya(state_dict, metadata)
        back, back_metadata = lora_format.kohya_to_diffusers(kohya)

        assert list(back) == list(state_dict)
        assert all(
            torch.equal(back[key], state_dict[key]) and back[key].dtype == state_dict[key].dtype
            for key in state_dict
        )
        assert back_metadata == metadata
        assert lora_format.modules_from_diffusers(back, back_metadata) == modules


def test_a_kohya_module_without_alpha_has_alpha_equal_to_rank_as_in_webui_and_comfyui() -> None:
    """(diffusers' own reader differs here: it applies the other modules' alpha to it.)"""
    state_dict = {
        "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1),
        "lora_unet_conv_out.lora_down.weight": torch.ones(2, 32, 3, 3),
        "lora_unet_conv_out.lora_up.weight": torch.ones(4, 2, 1, 1),
        "lora_unet_conv_out.alpha": torch.tensor(1.0),
    }

    modules = lora_format.modules_from_kohya(state_dict)

    assert (modules["unet.conv_in"].scale, modules["unet.conv_out"].scale) == (1.0, 0.5)


def test_a_diffusers_file_without_alpha_loads_with_alpha_equal_to_rank_like_diffusers() -> None:
    state_dict = {
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 8),
        "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(8, 4),
    }

    assert (
        lora_format.modules_from_diffusers(state_dict)["unet.mid_block.attentions.0.proj_in"].alpha
        == 4.0
    )
    with_config = lora_format.modules_from_diffusers(state_dict, default_alpha=16.0)
    assert with_config["unet.mid_block.attentions.0.proj_in"].scale == 4.0


def test_flattened_clip_keys_from_newer_transformers_get_the_text_model_prefix() -> None:
    state_dict = {
        "text_encoder.encoder.layers.1.mlp.fc1.lora_A.weight": torch.ones(2, 8),
        "text_encoder.encoder.layers.1.mlp.fc1.lora_B.weight": torch.ones(8, 2),
    }

    kohya = lora_format.diffusers_to_kohya(state_dict)

    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight" in kohya


# --------------------------------------------------------------------------- diffusers loads our kohya files


@pytest.mark.parametrize(
    ("unet_targets", "text_encoder_targets"),
    [(UNET_ALL_TARGETS, ()), (("to_q",), TEXT_ENCODER_TARGETS)],
    ids=["unet-all-layer-kinds", "text-encoder"],
)
def test_diffusers_loads_the_kohya_file_and_generates_the_same_images(
    tiny_model_dir: Path, tmp_path: Path, unet_targets, text_encoder_targets
) -> None:
    trained = _pipeline(tiny_model_dir)
    base_image = _generate(trained)
    add_random_lora(
        trained,
        rank=4,
        alpha=12.0,
        unet_targets=unet_targets,
        text_encoder_targets=text_encoder_targets,
    )
    trained_images = {scale: _generate(trained, scale=scale) for scale in (1.0, 0.7)}
    assert _difference(trained_images[1.0], base_image) > 0.01  # the LoRA visibly changes the image
    if text_encoder_targets:
        trained.unet.disable_adapters()
        assert _difference(_generate(trained), base_image) > 0.01  # ...through the text encoder too
    modules = lora_format.modules_from_diffusers(
        lora_format.load_lora_state_dict(str(save_lora(trained, tmp_path / "train")))[0],
        default_alpha=12.0,
    )
    lora_format.save_kohya(
        tmp_path / "film_style.safetensors", modules, {"ss_output_name": "film_style"}
    )
    lora_format.save_diffusers(tmp_path / lora_format.DIFFUSERS_WEIGHT_NAME, modules)

    for weight_name in ("film_style.safetensors", lora_format.DIFFUSERS_WEIGHT_NAME):
        loaded = _pipeline(tiny_model_dir)
        loaded.load_lora_weights(tmp_path, weight_name=weight_name)
        for scale, trained_image in trained_images.items():
            assert _difference(_generate(loaded, scale=scale), trained_image) < IMAGE_TOLERANCE, (
                weight_name,
                scale,
            )


def test_load_into_pipeline_reads_another_tools_kohya_file_like_diffusers_does(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A kohya file as sd-scripts writes it: one alpha per model, not equal to the rank."""
    torch.manual_seed(3)
    attention = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2"
    state_dict = {
        f"{attention}_to_k.lora_down.weight": torch.randn(2, 32),
        f"{attention}_to_k.lora_up.weight": torch.randn(64, 2),
        f"{attention}_to_k.alpha": torch.tensor(1.0),
        "lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.randn(32, 2, 1, 1),
        "lora_unet_conv_in.alpha": torch.tensor(1.0),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight": torch.randn(2, 32),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight": torch.randn(32, 2),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight": torch.randn(
            2, 32
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight": torch.randn(32, 2),
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj.alpha": torch.tensor(4.0),
    }
    save_file(state_dict, tmp_path / "other_tool.safetensors", metadata={"ss_network_dim": "2"})
    by_diffusers = _pipeline(tiny_model_dir)
    by_diffusers.load_lora_weights(tmp_path, weight_name="other_tool.safetensors")
    by_lorapipe = _pipeline(tiny_model_dir)

    modules = lora_format.load_into_pipeline(
        by_lorapipe, str(tmp_path / "other_tool.safetensors"), adapter_name="other_tool"
    )

    assert modules["unet.conv_in"].scale == 0.5
    assert (
        _difference(_generate(by_lorapipe, scale=0.7), _generate(by_diffusers, scale=0.7))
        < IMAGE_TOLERANCE
    )


def test_load_into_pipeline_reads_a_text_encoder_lora_on_q_and_v_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The seed config's target_modules ["q_proj", "v_proj"]. (diffusers' own kohya reader
    rejects such a file: it cannot tell the key style without out_proj or mlp keys.)"""
    trained = _pipeline(tiny_model_dir)
    add_random_lora(trained, unet_targets=("to_v",), text_encoder_targets=("q_proj", "v_proj"))
    expected = _generate(trained, scale=0.7)
    modules = lora_format.modules_from_diffusers(
        lora_format.load_lora_state_dict(str(save_lora(trained, tmp_path)))[0], default_alpha=8.0
    )
    lora_format.save_kohya(tmp_path / "qv.safetensors", modules, {})
    loaded = _pipeline(tiny_model_dir)

    lora_format.load_into_pipeline(loaded, str(tmp_path / "qv.safetensors"), adapter_name="qv")

    assert _difference(_generate(loaded, scale=0.7), expected) < IMAGE_TOLERANCE


def test_load_into_pipeline_keeps_a_different_alpha_per_module(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """(diffusers' own kohya reader drops per-module UNet alphas: its alpha_pattern keys do not
    match any layer, so every module gets the same alpha.)"""
    from peft.tuners.lora import LoraLayer

    state_dict = {
        "lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.randn(32, 2, 1, 1),
        "lora_unet_conv_in.alpha": torch.tensor(3.0),
        "lora_unet_conv_out.lora_down.weight": torch.randn(2, 32, 3, 3),
        "lora_unet_conv_out.lora_up.weight": torch.randn(4, 2, 1, 1),
        "lora_unet_conv_out.alpha": torch.tensor(1.0),
    }
    save_file(state_dict, tmp_path / "mixed.safetensors")
    pipeline = _pipeline(tiny_model_dir)

    lora_format.load_into_pipeline(
        pipeline, str(tmp_path / "mixed.safetensors"), adapter_name="mixed"
    )

    scales = {
        name: layer.scaling["mixed"]
        for name, layer in pipeline.unet.named_modules()
        if isinstance(layer, LoraLayer)
    }
    assert scales == {"conv_in": 1.5, "conv_out": 0.5}


# --------------------------------------------------------------------------- metadata and hashes


def _facts(**overrides) -> TrainingFacts:
    facts = dict(
        output_name="film_style",
        network_dim=16,
        network_alpha=32.0,
        steps=300,
        epoch=3,
        learning_rate=1e-4,
        unet_lr=1e-4,
        text_encoder_lr=None,
        num_train_images=12,
        resolution=(512, 512),
        seed=42,
        tag_frequency={"film_street": {"film grain": 12, "street": 9}},
        training_started_at=1735787045.0,
        training_finished_at=1735790645.0,
        lorapipe={
            "selection_rule": "earliest within 1%",
            "val_loss": 0.125,
            "pipeline_run_id": "run-1",
            "checkpoint_step": 300,
        },
    )
    facts.update(overrides)
    return TrainingFacts(**facts)


def test_kohya_metadata_is_all_strings_in_kohyas_shapes() -> None:
    metadata = lora_format.kohya_metadata(_facts())

    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("16", "32.0")
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v1", "False")
    assert metadata["ss_resolution"] == "(512, 512)"
    assert metadata["ss_text_encoder_lr"] == "None"
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "film_street": {"film grain": 12, "street": 9}
    }
    assert float(metadata["ss_training_started_at"]) == 1735787045.0
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert (metadata["modelspec.resolution"], metadata["modelspec.date"]) == (
        "512x512",
        "2025-01-02T04:04:05+00:00",
    )
    assert metadata["modelspec.title"] == metadata["ss_output_name"] == "film_style"
    assert (
        metadata["lorapipe.val_loss"] == "0.125" and metadata["lorapipe.checkpoint_step"] == "300"
    )


def test_kohya_file_hashes_are_the_ones_webui_recomputes(tmp_path: Path) -> None:
    """sd-webui-additional-networks hashes the bytes after the safetensors header; the legacy
    hash reads 64 KiB at 1 MiB, which a small LoRA does not reach (sha256 of nothing)."""
    torch.manual_seed(0)
    modules = {
        "unet.conv_in": LoraModule(
            down=torch.randn(4, 4, 3, 3), up=torch.randn(32, 4, 1, 1), alpha=2.0
        )
    }
    path = lora_format.save_kohya(
        tmp_path / "a.safetensors", modules, lora_format.kohya_metadata(_facts())
    )
    other = lora_format.save_kohya(
        tmp_path / "b.safetensors",
        modules,
        lora_format.kohya_metadata(_facts(output_name="renamed")),
    )

    data = path.read_bytes()
    tensor_bytes = data[8 + int.from_bytes(data[:8], "little") :]
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    with safe_open(other, "pt") as handle:
        other_metadata = handle.metadata()
    assert metadata["sshs_model_hash"] == hashlib.sha256(tensor_bytes).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    assert (
        other_metadata["sshs_model_hash"] == metadata["sshs_model_hash"]
    )  # metadata does not change it


# --------------------------------------------------------------------------- loading safely


class _WouldRunCode:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_a_pickle_offered_as_a_lora_is_refused_and_never_unpickled(
    tmp_path: Path, container: str
) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    if container == "torch-zip":
        torch.save({"lora_unet_x.lora_down.weight": _WouldRunCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"weights": _WouldRunCode(marker)}, protocol=2))

    with pytest.raises(LoraFormatError, match="pickled PyTorch checkpoint.*never unpickles"):
        lora_format.load_lora_state_dict(str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"not a model at all", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": [1, 2'],
    ids=["empty", "text", "cut"],
)
def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)

    with pytest.raises(LoraFormatError, match="broken.safetensors"):
        lora_format.load_lora_state_dict(str(path))


def test_load_reports_format_and_header(tmp_path: Path) -> None:
    modules = {
        "unet.conv_in": LoraModule(
            down=torch.ones(2, 4, 3, 3), up=torch.ones(32, 2, 1, 1), alpha=1.0
        )
    }
    lora_format.save_kohya(tmp_path / "k.safetensors", modules, {"ss_output_name": "k"})
    lora_format.save_diffusers(tmp_path / "d.safetensors", modules)

    kohya_state, kohya_header, kohya_format = lora_format.load_lora_state_dict(
        str(tmp_path / "k.safetensors")
    )
    _, diffusers_header, diffusers_format = lora_format.load_lora_state_dict(
        str(tmp_path / "d.safetensors")
    )

    assert (kohya_format, diffusers_format) == ("kohya", "diffusers")
    assert kohya_header["ss_output_name"] == "k" and "lora_unet_conv_in.alpha" in kohya_state
    assert json.loads(diffusers_header["lora_adapter_metadata"])["unet.lora_alpha"] == 1.0


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale", "DoRA"),
        ("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", "LDM module names"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "SDXL"),
        ("lora_unet_conv_in.hada_w1_a", "LyCORIS"),
        ("model.diffusion_model.conv_in.weight", "neither 'lora_unet_' nor 'lora_te_'"),
    ],
)
def test_unsupported_kohya_keys_are_named_in_one_line(key: str, message: str) -> None:
    state_dict = {
        "lora_unet_conv_in.lora_down.weight": torch.ones(1),
        "lora_unet_conv_in.lora_up.weight": torch.ones(1),
        key: torch.ones(1),
    }

    with pytest.raises(LoraFormatError, match=message) as error:
        lora_format.modules_from_kohya(state_dict)
    assert key in str(error.value) and "\n" not in str(error.value)


def test_a_half_pair_is_named() -> None:
    state_dict = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)}

    with pytest.raises(
        LoraFormatError, match="'lora_unet_conv_in.lora_down.weight' has no matching up weight"
    ):
        lora_format.modules_from_kohya(state_dict)


def test_a_mix_of_formats_is_refused() -> None:
    with pytest.raises(LoraFormatError, match="'unet.conv_in.lora_A.weight' mixes kohya"):
        lora_format.detect_format({"lora_unet_conv_in.alpha": 1, "unet.conv_in.lora_A.weight": 1})


def test_checking_against_the_pipeline_names_the_extra_or_misshaped_key(
    tiny_model_dir: Path,
) -> None:
    pipeline = _pipeline(tiny_model_dir)
    fits = {
        "unet.conv_in": LoraModule(
            down=torch.ones(2, 4, 3, 3), up=torch.ones(32, 2, 1, 1), alpha=1.0
        )
    }
    lora_format.check_against_pipeline(fits, pipeline)

    misshaped = lora_format.modules_from_kohya(
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.ones(320, 2, 1, 1),
        }
    )
    with pytest.raises(
        LoraFormatError,
        match=r"'lora_unet_conv_in.lora_down.weight' has shapes .* needs \[2, 4, 3, 3\]/\[32, 2, 1, 1\]",
    ):
        lora_format.check_against_pipeline(misshaped, pipeline)

    extra = {"unet.down_blocks.3.resnets.0.conv1": fits["unet.conv_in"]}
    with pytest.raises(
        LoraFormatError,
        match="'unet.down_blocks.3.resnets.0.conv1', which the base model does not have",
    ):
        lora_format.check_against_pipeline(extra, pipeline)


def test_train_style_save_is_what_the_reader_expects(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The fixture saves like train; every key it writes is read back into a module."""
    pipeline = _pipeline(tiny_model_dir)
    add_random_lora(pipeline, text_encoder_targets=("q_proj",))
    written = sum(len(layers) for layers in lora_state_dicts(pipeline).values())

    state_dict, _, found = lora_format.load_lora_state_dict(str(save_lora(pipeline, tmp_path)))

    assert (
        found == "diffusers" and len(lora_format.modules_from_diffusers(state_dict)) * 2 == written
    )


# --------------------------------------------------------------------------- SDXL

SDXL_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL pipeline (two text encoders, DownBlock2D first), built once per module."""
    from lorapipe.demo.tiny_model import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", preset="tiny-sdxl")


def _sdxl_pipeline(model_dir: Path):
    from lorapipe.models import load_base_model

    pipeline = load_base_model(str(model_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generate_sdxl(pipeline, *, scale: float = 1.0) -> np.ndarray:
    return pipeline(
        "street photo of a man in the rain, film grain",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        cross_attention_kwargs={"scale": scale},
    ).images[0]


def _enable_adapters(*models, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(enabled)


def _meta_sdxl_unet(preset: str):
    """An SDXL preset's UNet without weights (as ``build_sdxl`` configures it)."""
    from diffusers import UNet2DConditionModel

    from lorapipe.demo.tiny_model import SDXL_PRESETS, sdxl_unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**sdxl_unet_config(SDXL_PRESETS[preset]))


# kohya sd-scripts' names (library/sdxl_original_unet.py) for layers of SDXL base's UNet
FULL_SDXL_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj": "input_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0": "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
    "down_blocks.2.attentions.0.proj_in": "input_blocks_7_1_proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block_1_transformer_blocks_0_attn2_to_k",
    "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
    "up_blocks.0.attentions.0.proj_out": "output_blocks_0_1_proj_out",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_v": "output_blocks_2_1_transformer_blocks_0_attn1_to_v",
    "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2": "output_blocks_5_1_transformer_blocks_1_ff_net_2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks_8_0_skip_connection",
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.0.resnets.1.conv2": "input_blocks_2_0_out_layers_3",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.1.downsamplers.0.conv": "input_blocks_6_0_op",
    "conv_in": "input_blocks_0_0",
    "conv_out": "out_2",
    "time_embedding.linear_1": "time_embed_0",
    "add_embedding.linear_2": "label_emb_0_2",
}  # fmt: skip
# the same layers' names in tiny-sdxl (one resnet per level, two levels)
TINY_SDXL_NAMES = {
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_2_0_op",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_3_1_transformer_blocks_0_attn1_to_q",
    "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": "output_blocks_1_1_transformer_blocks_0_attn2_to_k",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_1_2_conv",
    "up_blocks.1.resnets.1.time_emb_proj": "output_blocks_3_0_emb_layers_1",
}  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("sdxl", FULL_SDXL_NAMES), ("tiny-sdxl", TINY_SDXL_NAMES)],
    ids=["full-sdxl", "tiny-sdxl"],
)
def test_sdxl_kohya_names_are_sd_scripts_ldm_names_numbered_by_the_unet_config(
    preset: str, expected: dict[str, str]
) -> None:
    """Spot checks against sd-scripts' own names, and diffusers' single-file converter (LDM
    checkpoint -> diffusers) turning the LDM path of every UNet parameter back into its own."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lorapipe.kohya_names import kohya_names
    from lorapipe.models import SDXL

    unet = _meta_sdxl_unet(preset)
    names = kohya_names(SDXL, unet.config)

    assert {path: names.kohya_name(f"unet.{path}") for path in expected} == {
        path: f"lora_unet_{name}" for path, name in expected.items()
    }
    checkpoint = {}
    for parameter, _ in unet.named_parameters():
        module, leaf = parameter.rsplit(".", 1)
        checkpoint[f"model.diffusion_model.{names.ldm.to_ldm(module)}.{leaf}"] = torch.zeros(1)
    converted = convert_ldm_unet_checkpoint(checkpoint, unet.config)
    assert set(converted) == {parameter for parameter, _ in unet.named_parameters()}


def test_every_full_sdxl_layer_name_survives_the_kohya_round_trip() -> None:
    """Without a UNet config the names are SDXL base's; both CLIPs under lora_te1_/lora_te2_."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorapipe.models import SDXL

    unet = _meta_sdxl_unet("sdxl")
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig())
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20)
        )
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    names = [
        f"{component}.{path}"
        for component, model in models.items()
        for path, layer in model.named_modules()
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d)
    ]
    modules = {
        name: LoraModule(down=torch.ones(1, 1), up=torch.ones(1, 1), alpha=1.0) for name in names
    }

    kohya = lora_format.modules_to_kohya(modules, family=SDXL)

    assert len(names) > 1000
    assert {key.split("_", 2)[1] for key in kohya} == {"unet", "te1", "te2"}
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2.alpha" in kohya
    assert "lora_te2_text_projection.alpha" in kohya
    expected = {neutral_name(*name.split(".", 1)) for name in names}
    assert set(lora_format.modules_from_kohya(kohya, family=SDXL)) == expected


def test_sdxl_kohya_to_diffusers_to_kohya_is_exact(sdxl_model_dir: Path) -> None:
    from lorapipe.models import SDXL

    pipeline = _sdxl_pipeline(sdxl_model_dir)
    names = lora_format.pipeline_module_names(pipeline)
    unet_config = pipeline.unet.config
    assert {name.split(".", 1)[0] for name in names} == {"unet", *SDXL_TEXT_ENCODERS}
    rng = random.Random(99)
    for _ in range(10):
        torch.manual_seed(rng.randint(0, 2**31))
        kohya = lora_format.modules_to_kohya(
            _random_modules(rng, names), family=SDXL, unet_config=unet_config
        )

        for module_names in (None, names):
            state_dict, metadata = lora_format.kohya_to_diffusers(
                kohya, family=SDXL, module_names=module_names, unet_config=unet_config
            )
            back = lora_format.diffusers_to_kohya(
                state_dict, metadata, family=SDXL, unet_config=unet_config
            )

            assert list(back) == list(kohya)
            assert all(
                torch.equal(back[key], kohya[key]) and back[key].dtype == kohya[key].dtype
                for key in kohya
            )


def test_diffusers_loads_the_sdxl_kohya_file_and_generates_the_same_images(
    sdxl_model_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    from lorapipe.models import SDXL

    trained = _sdxl_pipeline(sdxl_model_dir)
    base_image = _generate_sdxl(trained)
    add_random_lora(
        trained,
        alpha=12.0,
        unet_targets=UNET_ALL_TARGETS,
        text_encoder_targets=TEXT_ENCODER_TARGETS,
    )
    trained_image = _generate_sdxl(trained)
    assert _difference(trained_image, base_image) > 0.01
    _enable_adapters(trained.unet, trained.text_encoder, enabled=False)
    assert _difference(_generate_sdxl(trained), base_image) > 0.01  # text_encoder_2 alone
    _enable_adapters(trained.unet, trained.text_encoder, enabled=True)
    state_dict, metadata, _ = lora_format.load_lora_state_dict(
        str(save_lora(trained, tmp_path / "train"))
    )
    assert any(key.startswith("text_encoder_2.") for key in state_dict)
    modules = lora_format.modules_from_diffusers(state_dict, metadata, default_alpha=12.0)
    lora_format.save_kohya(
        tmp_path / "film_style.safetensors",
        modules,
        {},
        family=SDXL,
        unet_config=trained.unet.config,
    )
    lora_format.save_diffusers(tmp_path / lora_format.DIFFUSERS_WEIGHT_NAME, modules)
    with safe_open(tmp_path / "film_style.safetensors", "pt") as handle:
        prefixes = {key.split("_", 2)[1] for key in handle.keys()}  # noqa: SIM118
    assert prefixes == {"unet", "te1", "te2"}

    for weight_name in ("film_style.safetensors", lora_format.DIFFUSERS_WEIGHT_NAME):
        loaded = _sdxl_pipeline(sdxl_model_dir)
        assert isinstance(loaded, StableDiffusionXLPipeline)
        loaded.load_lora_weights(tmp_path, weight_name=weight_name)
        assert _difference(_generate_sdxl(loaded), trained_image) < IMAGE_TOLERANCE, weight_name
    by_lorapipe = _sdxl_pipeline(sdxl_model_dir)
    lora_format.load_into_pipeline(
        by_lorapipe, str(tmp_path / "film_style.safetensors"), adapter_name="film_style"
    )
    assert _difference(_generate_sdxl(by_lorapipe), trained_image) < IMAGE_TOLERANCE


@pytest.mark.parametrize("unet_spelling", ["ldm", "diffusers"])
def test_load_into_pipeline_reads_another_tools_sdxl_kohya_file_like_diffusers_does(
    sdxl_model_dir: Path, tmp_path: Path, unet_spelling: str
) -> None:
    """Another tool's SDXL file: float16 weights and alphas, one alpha per model, no hashes, the
    UNet under LDM names (sd-scripts) or under diffusers names (some converters)."""
    from lorapipe.kohya_names import kohya_names
    from lorapipe.models import SDXL

    trained = _sdxl_pipeline(sdxl_model_dir)
    add_random_lora(trained, rank=2, alpha=1.0, text_encoder_targets=TEXT_ENCODER_TARGETS)
    modules = lora_format.modules_from_diffusers(
        lora_format.load_lora_state_dict(str(save_lora(trained, tmp_path / "train")))[0],
        default_alpha=1.0,
    )
    names = kohya_names(SDXL, trained.unet.config)
    state_dict = {}
    for name, module in modules.items():
        kohya_name = names.spellings(name)[-1 if unet_spelling == "diffusers" else 0]
        state_dict[f"{kohya_name}.lora_down.weight"] = module.down.to(torch.float16)
        state_dict[f"{kohya_name}.lora_up.weight"] = module.up.to(torch.float16)
        state_dict[f"{kohya_name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    assert any(key.startswith("lora_unet_input_blocks_") for key in state_dict) == (
        unet_spelling == "ldm"
    )
    save_file(state_dict, tmp_path / "other.safetensors", metadata={"ss_network_dim": "2"})
    by_diffusers = _sdxl_pipeline(sdxl_model_dir)
    by_diffusers.load_lora_weights(tmp_path, weight_name="other.safetensors")
    by_lorapipe = _sdxl_pipeline(sdxl_model_dir)

    loaded = lora_format.load_into_pipeline(
        by_lorapipe, str(tmp_path / "other.safetensors"), adapter_name="other"
    )

    assert set(loaded) == set(modules)
    expected = _generate_sdxl(by_diffusers, scale=0.7)
    assert _difference(_generate_sdxl(by_lorapipe, scale=0.7), expected) < IMAGE_TOLERANCE


def test_kohya_metadata_says_the_family() -> None:
    from lorapipe.models import SD2, SDXL

    sdxl = lora_format.kohya_metadata(_facts(family=SDXL, resolution=(1024, 1024)))
    sd2 = lora_format.kohya_metadata(_facts(family=SD2, resolution=(768, 768)))

    assert (sdxl["ss_base_model_version"], sdxl["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sdxl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (sdxl["modelspec.resolution"], sdxl["ss_resolution"]) == ("1024x1024", "(1024, 1024)")
    assert (sd2["ss_base_model_version"], sd2["ss_v2"]) == ("sd_v2", "True")
    assert sd2["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert sd2["modelspec.implementation"] == "diffusers"


def _tiny_file(path: Path, names: list[str], metadata: dict[str, str] | None = None) -> str:
    """A LoRA file with one-number weights for module ``names`` (kohya or diffusers ones)."""
    state_dict = {}
    for name in names:
        down, up = ("lora_down", "lora_up") if name.startswith("lora_") else ("lora_A", "lora_B")
        state_dict[f"{name}.{down}.weight"] = torch.ones(1, 1)
        state_dict[f"{name}.{up}.weight"] = torch.ones(1, 1)
    save_file(state_dict, path, metadata=metadata)
    return str(path)


SD1_KOHYA = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
SDXL_KOHYA = ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]


@pytest.mark.parametrize(
    ("model", "keys", "metadata", "evidence"),
    [
        ("sdxl", SD1_KOHYA, None, "key 'lora_te_text_model"),
        ("sd1", SDXL_KOHYA, None, "key 'lora_te2_text_model"),
        ("sd1", ["text_encoder_2.text_model.encoder.layers.0.mlp.fc1"], None, "text_encoder_2."),
        ("sd1", ["lora_unet_input_blocks_4_1_proj_in"], None, "original LDM module names"),
        (
            "sd1",
            ["lora_unet_down_blocks_1_attentions_0_proj_in"],
            {"ss_base_model_version": "sdxl_base_v1-0"},
            "ss_base_model_version is 'sdxl_base_v1-0'",
        ),
        (
            "sdxl",
            ["unet.down_blocks.1.attentions.0.proj_in"],
            {"modelspec.architecture": "stable-diffusion-v1/lora"},
            "modelspec.architecture is 'stable-diffusion-v1'",
        ),
    ],
    ids=["sd1-on-sdxl", "sdxl-on-sd1", "diffusers-te2", "ldm-unet", "ss-metadata", "modelspec"],
)
def test_a_lora_for_another_family_is_one_line_naming_the_lora_and_both_families(
    tiny_model_dir: Path,
    sdxl_model_dir: Path,
    tmp_path: Path,
    model: str,
    keys: list[str],
    metadata: dict[str, str] | None,
    evidence: str,
) -> None:
    pipeline = _sdxl_pipeline(sdxl_model_dir) if model == "sdxl" else _pipeline(tiny_model_dir)
    uri = _tiny_file(tmp_path / "other_family.safetensors", keys, metadata)
    lora_family, model_family = ("SD 1.x", "SDXL") if model == "sdxl" else ("SDXL", "SD 1.x")

    with pytest.raises(LoraFormatError) as error:
        lora_format.load_into_pipeline(pipeline, uri, adapter_name="other")

    message = str(error.value)
    assert uri in message and evidence in message and "\n" not in message
    assert f"is for {lora_family}" in message and f"the base model is {model_family}" in message


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("lora_unet_input_blocks_4_1_proj_in.dora_scale", "DoRA"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a", "LyCORIS"),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "not an SDXL kohya LoRA"),
        ("lora_te3_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "none of 'lora_unet_'"),
    ],
)
def test_unsupported_sdxl_kohya_keys_are_named_in_one_line(key: str, message: str) -> None:
    from lorapipe.models import SDXL

    state_dict = {
        "lora_unet_input_blocks_0_0.lora_down.weight": torch.ones(1),
        "lora_unet_input_blocks_0_0.lora_up.weight": torch.ones(1),
        key: torch.ones(1),
    }

    with pytest.raises(LoraFormatError, match=message) as error:
        lora_format.modules_from_kohya(state_dict, family=SDXL)
    assert key in str(error.value) and "\n" not in str(error.value)


def test_a_unet_module_the_ldm_unet_lacks_cannot_go_into_an_sdxl_kohya_file() -> None:
    from lorapipe.models import SDXL

    modules = {
        "unet.class_embedding.linear_1": LoraModule(
            down=torch.ones(1, 1), up=torch.ones(1, 1), alpha=1.0
        )
    }

    with pytest.raises(LoraFormatError, match="'unet.class_embedding.linear_1' has no place"):
        lora_format.modules_to_kohya(modules, family=SDXL)


def test_a_v_prediction_lora_says_so_in_its_modelspec() -> None:
    assert lora_format.kohya_metadata(_facts())["modelspec.prediction_type"] == "epsilon"
    v_prediction = lora_format.kohya_metadata(_facts(prediction_type="v_prediction"))
    assert v_prediction["modelspec.prediction_type"] == "v"
