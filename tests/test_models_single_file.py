"""A `.safetensors` single file as the base model: local or s3://, converted once into the model
cache under its sha256, with lorapipe's configs for a standard architecture or the user's
`base_model_config` for any other; it then trains and generates as its diffusers directory does.
Pickled checkpoints are refused unread, other families before anything heavy loads, and the PNG
`Model hash` is WebUI's hash of the file."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from single_file_fixtures import write_single_file

from lorapipe import store
from lorapipe.errors import ModelError
from lorapipe.generation.infotext import parse_parameters
from lorapipe.generation.loras import model_short_hash
from lorapipe.models import SD2, load_base_model, model_cache_root, model_family, resolve_model_dir
from lorapipe.models.single_file import SHIPPED_CONFIGS
from lorapipe.stages import generate, train
from lorapipe.train_config import TrainConfig

MISFIT_FIX = "give base_model_config: DIR, a diffusers directory whose configs fit it"


@pytest.fixture(autouse=True)
def model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test converts into a cache of its own."""
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    return model_cache_root()


@pytest.fixture(scope="module")
def sd_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x model as one file, named like the seed article's."""
    return write_single_file(
        tiny_model_dir, tmp_path_factory.mktemp("files") / "v1-5-pruned.safetensors"
    )


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorapipe.demo.tiny_model import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", preset="tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_file(sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file(sdxl_dir, tmp_path_factory.mktemp("files") / "tiny-xl.safetensors")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_weights(pipeline, reference) -> None:
    for name, component in reference.components.items():
        if isinstance(component, torch.nn.Module):
            ours, theirs = getattr(pipeline, name).state_dict(), component.state_dict()
            assert ours.keys() == theirs.keys(), name
            for key in theirs:
                assert torch.equal(ours[key], theirs[key]), f"{name}: {key}"


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    """The UNet's prediction for fixed inputs (with SDXL's added conditioning)."""
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(1, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    with torch.no_grad():
        return unet(sample, 500, context, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------- the shipped configs


@pytest.mark.parametrize(
    ("tokenizer", "pad"),
    [
        ("sd1/tokenizer", "<|endoftext|>"),
        ("sd2/tokenizer", "!"),
        ("sdxl/tokenizer", "<|endoftext|>"),
        ("sdxl/tokenizer_2", "!"),
    ],
)
def test_the_shipped_tokenizers_are_clips(tokenizer: str, pad: str) -> None:
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer.from_pretrained(SHIPPED_CONFIGS / tokenizer, local_files_only=True)
    assert len(clip) == 49408
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip("an astronaut riding a horse").input_ids[1:-1] == [550, 18376, 6765, 320, 4558]
    assert (clip.bos_token, clip.eos_token, clip.pad_token) == (
        "<|startoftext|>",
        "<|endoftext|>",
        pad,
    )


@pytest.mark.parametrize(
    ("family", "millions"),
    [
        ("sd1", {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06}),
        ("sd2", {"unet": 865.91, "vae": 83.65, "text_encoder": 340.39}),
        ("sdxl", {"unet": 2567.46, "vae": 83.65, "text_encoder": 123.06, "text_encoder_2": 694.66}),
    ],
)
def test_the_shipped_configs_build_the_published_architectures(
    family: str, millions: dict[str, float]
) -> None:
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    configs = SHIPPED_CONFIGS / family
    index = json.loads((configs / "model_index.json").read_text())
    for component, expected in millions.items():
        library, class_name = index[component]
        model_class = getattr(
            {"diffusers": diffusers, "transformers": transformers}[library], class_name
        )
        with init_empty_weights():
            if library == "diffusers":
                model = model_class.from_config(model_class.load_config(configs / component))
            else:
                model = model_class(model_class.config_class.from_pretrained(configs / component))
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == expected, component


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_tiny_single_file_loads_with_base_model_config_as_its_directory(
    family: str, request: pytest.FixtureRequest
) -> None:
    directory = request.getfixturevalue("tiny_model_dir" if family == "sd1" else "sdxl_dir")
    single_file = request.getfixturevalue("sd_file" if family == "sd1" else "sdxl_file")

    from_file = load_base_model(str(single_file), config_dir=str(directory))
    from_directory = load_base_model(str(directory))

    assert type(from_file) is type(from_directory)
    assert_same_weights(from_file, from_directory)
    assert torch.equal(unet_output(from_file.unet), unet_output(from_directory.unet))
    assert (
        from_file.tokenizer("a red dog").input_ids
        == from_directory.tokenizer("a red dog").input_ids
    )


def test_the_conversion_is_done_once_and_keyed_by_the_files_sha256(
    sd_file: Path, tiny_model_dir: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionPipeline

    converted = resolve_model_dir(str(sd_file), config_dir=str(tiny_model_dir))
    assert converted.parent == model_cache / "single-file"
    assert converted.name.startswith(sha256(sd_file)[:32])

    def reconvert(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", reconvert)
    assert resolve_model_dir(str(sd_file), config_dir=str(tiny_model_dir)) == converted
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no leftovers


def test_a_single_file_on_s3_is_downloaded_and_converted_once(
    sd_file: Path, tiny_model_dir: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = store.join(s3_bucket, "models", "v1-5-pruned.safetensors")
    store.upload_file(sd_file, uri)

    converted = resolve_model_dir(uri, config_dir=str(tiny_model_dir))
    assert converted == resolve_model_dir(str(sd_file), config_dir=str(tiny_model_dir))
    assert_same_weights(load_base_model(str(converted)), load_base_model(str(tiny_model_dir)))

    def download(*args: object) -> None:
        raise AssertionError("downloaded a second time")

    monkeypatch.setattr(store, "download_file", download)
    assert resolve_model_dir(uri, config_dir=str(tiny_model_dir)) == converted
    assert model_family(uri).name == "sd1"  # from the header, a ranged read


def test_an_sd2_file_is_v_prediction_when_its_metadata_says_so(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # the tiny SD 1.x weights with the text encoder in OpenCLIP's layout: an SD 2.x file
    v_file = write_single_file(
        tiny_model_dir,
        tmp_path / "v2-768-v.safetensors",
        text_layout="open_clip",
        metadata={"modelspec.prediction_type": "v"},
    )
    plain_file = write_single_file(
        tiny_model_dir, tmp_path / "v2-base.safetensors", text_layout="open_clip"
    )
    assert model_family(str(v_file)) is SD2

    v_model = load_base_model(str(v_file), config_dir=str(tiny_model_dir))
    plain_model = load_base_model(str(plain_file), config_dir=str(tiny_model_dir))

    assert v_model.scheduler.config.prediction_type == "v_prediction"
    assert plain_model.scheduler.config.prediction_type == "epsilon"  # the configs' own
    assert_same_weights(v_model, load_base_model(str(tiny_model_dir)))


# --------------------------------------------------------------------------- refusals


def test_a_tiny_file_without_base_model_config_names_the_fix(sd_file: Path) -> None:
    with pytest.raises(ModelError) as error:
        resolve_model_dir(str(sd_file))
    message = str(error.value)
    assert message.startswith(f"base model '{sd_file}' does not fit lorapipe's SD 1.x configs (")
    assert message.endswith(MISFIT_FIX) and "\n" not in message


def test_base_model_config_of_another_family_is_refused(
    sdxl_file: Path, tiny_model_dir: Path
) -> None:
    with pytest.raises(ModelError, match="is a StableDiffusionPipeline directory but .* is SDXL"):
        resolve_model_dir(str(sdxl_file), config_dir=str(tiny_model_dir))


class _Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_a_pickled_checkpoint_is_refused_without_being_unpickled(
    suffix: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / f"v1-5-pruned-emaonly{suffix}"
    torch.save({"state_dict": {"x": _Payload(marker)}}, checkpoint)
    with pytest.raises(ModelError) as error:
        resolve_model_dir(str(checkpoint))
    assert "never unpickles" in str(error.value) and "convert it to .safetensors" in str(
        error.value
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "SD3"),
        ("double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
    ],
)
def test_another_family_is_refused_in_one_line_before_anything_heavy_loads(
    key: str, family: str, tmp_path: Path, s3_bucket: str, model_cache: Path
) -> None:
    local = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(4)}, local)
    uri = store.join(s3_bucket, "model.safetensors")
    store.upload_file(local, uri)
    for base_model in (str(local), uri):
        with pytest.raises(ModelError) as error:
            resolve_model_dir(base_model)
        assert f"not supported yet: {family} " in str(error.value)
        assert "\n" not in str(error.value)
    assert not model_cache.exists()  # not downloaded, hashed or converted


def test_a_file_that_is_not_safetensors_is_one_line(tmp_path: Path) -> None:
    impostor = tmp_path / "v1-5-pruned.safetensors"
    impostor.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="is not a safetensors file"):
        resolve_model_dir(str(impostor))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing.safetensors"))


# --------------------------------------------------------------------------- train and generate


def write_images(folder: Path, count: int = 4) -> Path:
    """Coloured squares with captions in a lora-scripts folder."""
    folder.mkdir(parents=True)
    with (folder / "metadata.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filename", "text"])
        for index, color in enumerate(("red", "green", "blue", "yellow")[:count]):
            image = Image.new("RGB", (64, 64), "white")
            image.paste(color, (12 + index, 12, 52, 52))
            image.save(folder / f"img_{index}.png")
            writer.writerow([f"img_{index}.png", f"a {color} square"])
    return folder


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_single_file_base_trains_to_the_loss_of_its_directory(
    family: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single_file, model_dir = (
        (request.getfixturevalue("sd_file"), request.getfixturevalue("tiny_model_dir"))
        if family == "sd1"
        else (request.getfixturevalue("sdxl_file"), request.getfixturevalue("sdxl_dir"))
    )
    # the seed article's base_model, as written, holding the tiny model
    seed_path = tmp_path / "models" / "sd_v15" / "v1-5-pruned.safetensors"
    seed_path.parent.mkdir(parents=True)
    seed_path.write_bytes(single_file.read_bytes())
    monkeypatch.chdir(tmp_path)
    images = write_images(tmp_path / "data")

    def train_on(base_model: str, name: str, **extra: str) -> list[float]:
        config = TrainConfig(
            base_model=base_model,
            cache_dir=str(tmp_path / f"cache-{name}"),
            batch_size=2,
            learning_rate=3e-3,
            validation_split=0,
            save_steps=0,
            max_train_steps=2,
            **extra,
        )
        report = train.run(str(images), str(tmp_path / name), config)
        assert report["base_model"] == base_model
        with (tmp_path / name / "loss_log.csv").open() as file:
            return [float(row["loss"]) for row in csv.DictReader(file)]

    from_file = train_on(
        "./models/sd_v15/v1-5-pruned.safetensors", "file", base_model_config=str(model_dir)
    )
    assert len(from_file) == 2
    assert from_file == train_on(str(model_dir), "directory")


def test_generated_pngs_carry_webuis_model_hash_of_the_file(
    sd_file: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = generate.GenerateConfig(
        prompts=["a red dog"], steps=1, base_model_config=str(tiny_model_dir)
    )
    report = generate.run(str(sd_file), str(tmp_path / "out"), config)

    assert report["model_hash"] == sha256(sd_file)[:10]  # WebUI's short hash of the file
    (png,) = (tmp_path / "out" / "images").glob("*.png")
    with Image.open(png) as image:
        parameters = parse_parameters(image.info["parameters"])
    assert (parameters["Model hash"], parameters["Model"]) == (sha256(sd_file)[:10], "v1-5-pruned")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["base_model"] == str(sd_file)


def test_a_directory_keeps_its_model_hash_of_the_unet_weights(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert model_short_hash(tiny_model_dir) == sha256(weights)[:10]


# --------------------------------------------------------------------------- a full-size file


@pytest.mark.slow
def test_a_full_size_sd15_file_loads_with_no_config_given(tmp_path: Path) -> None:
    """The standard SD 1.5 layout converts with lorapipe's shipped configs alone (about 3
    minutes and 8 GB of memory on 2 cores)."""
    from transformers import CLIPTokenizer

    from lorapipe.demo.tiny_model import build_model

    directory = build_model(tmp_path / "sd15", preset="sd15")
    single_file = write_single_file(directory, tmp_path / "v1-5-pruned.safetensors")

    converted = resolve_model_dir(str(single_file))

    for component, weights in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        ours, theirs = (
            load_file(converted / component / weights),
            load_file(directory / component / weights),
        )
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), component
    tokenizer = CLIPTokenizer.from_pretrained(converted / "tokenizer", local_files_only=True)
    assert len(tokenizer) == 49408  # the real CLIP vocabulary, shipped
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
