"""Latent and caption caches: each image (and mirror) VAE-encoded once, the same latents as
encoding every step, keyed so that another VAE or bucket never reuses them."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorapipe.models import load_base_model
from lorapipe.training.data import Example
from lorapipe.training.encoders import (
    CaptionEncoder,
    EncodeEveryStep,
    LatentCache,
    sample_latents,
    vae_identity,
)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path):  # a diffusers StableDiffusionPipeline
    return load_base_model(str(tiny_model_dir))


@pytest.fixture
def examples(tmp_path: Path) -> list[Example]:
    made = []
    for index, color in enumerate(("red", "blue", "green")):
        path = tmp_path / f"{color}.png"
        Image.new("RGB", (72, 64), color).save(path)
        made.append(
            Example(color, path, f"{index}" * 64, color, (), color, True, path.name, (72, 64))
        )
    # two in the 64x56 bucket, one in a portrait bucket: the cache encodes each bucket apart
    made[:2] = [dataclasses.replace(e, bucket=(64, 56)) for e in made[:2]]
    made[2] = dataclasses.replace(made[2], bucket=(48, 80))
    return made


def test_each_image_and_mirror_is_encoded_once(
    pipeline, examples: list[Example], tmp_path: Path
) -> None:
    cache = LatentCache(tmp_path / "latents", pipeline.vae, "vae-a")
    wanted = [(e, False) for e in examples] + [(examples[0], True)]
    assert cache.fill(wanted, rank=0, num_processes=1) == 4
    assert cache.fill(wanted, rank=0, num_processes=1) == 0
    assert len(list((tmp_path / "latents").rglob("*.safetensors"))) == 4
    parameters = cache.latent_parameters([(examples[0], False, None), (examples[0], True, None)])
    assert parameters.shape == (2, 8, 7, 8)  # mean and log-variance of 4 channels, 8x7
    assert cache.latent_parameters([(examples[2], False, None)]).shape == (1, 8, 10, 6)


def test_processes_split_the_encoding(pipeline, examples: list[Example], tmp_path: Path) -> None:
    cache = LatentCache(tmp_path / "latents", pipeline.vae, "vae-a")
    wanted = [(e, False) for e in examples]
    assert cache.fill(wanted, rank=0, num_processes=2) == 2
    assert cache.fill(wanted, rank=1, num_processes=2) == 1


def test_another_vae_or_bucket_gets_its_own_entries(
    pipeline, examples: list[Example], tmp_path: Path
) -> None:
    paths = {
        LatentCache(tmp_path, pipeline.vae, vae).path(
            dataclasses.replace(examples[0], bucket=b), False
        )
        for vae, b in (("vae-a", (64, 56)), ("vae-b", (64, 56)), ("vae-a", (128, 112)))
    }
    assert len(paths) == 3


def test_cached_latents_equal_latents_encoded_every_step(
    pipeline, examples: list[Example], tmp_path: Path
) -> None:
    cache = LatentCache(tmp_path / "latents", pipeline.vae, "vae-a")
    cache.fill([(e, f) for e in examples for f in (False, True)], rank=0, num_processes=1)
    for items in (
        [(examples[1], True, None), (examples[0], False, None)],
        [(examples[2], False, None)],
    ):
        torch.testing.assert_close(
            cache.latent_parameters(items),
            EncodeEveryStep(pipeline.vae).latent_parameters(items),
            atol=1e-5,
            rtol=0,
        )


def test_sampling_with_zero_noise_gives_the_scaled_mean() -> None:
    parameters = torch.cat([torch.full((1, 4, 2, 2), 2.0), torch.zeros((1, 4, 2, 2))], dim=1)
    assert torch.equal(
        sample_latents(parameters, torch.zeros(1, 4, 2, 2), 0.5), torch.ones(1, 4, 2, 2)
    )
    assert torch.equal(
        sample_latents(parameters, torch.ones(1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), 1.5)
    )


def test_the_vae_identity_follows_its_weights_and_dtype(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    vae_dir = shutil.copytree(tiny_model_dir / "vae", tmp_path / "vae")
    before = vae_identity(vae_dir, torch.float32)
    assert vae_identity(vae_dir, torch.float16) != before
    weights = next(vae_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    assert vae_identity(vae_dir, torch.float32) != before


def sd1_caption_encoder(pipeline, *, cache: bool = True) -> CaptionEncoder:
    """SD 1.x's caption encoder: one CLIP, its last hidden states, no pooled embedding."""
    return CaptionEncoder(
        [pipeline.tokenizer], [pipeline.text_encoder], penultimate=False, pooled=False, cache=cache
    )


def test_cached_captions_are_encoded_once_and_match_uncached(pipeline) -> None:
    calls = []

    def counting_encoder(input_ids: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor]:
        calls.append(len(input_ids))
        return pipeline.text_encoder(input_ids, **kwargs)

    counting_encoder.parameters = pipeline.text_encoder.parameters  # type: ignore[attr-defined]
    cached = CaptionEncoder(
        [pipeline.tokenizer], [counting_encoder], penultimate=False, pooled=False, cache=True
    )
    first = cached(["a red circle", "a cat", "a red circle"])
    second = cached(["a cat", ""])
    assert calls == [2, 1]
    plain = sd1_caption_encoder(pipeline, cache=False)
    with torch.no_grad():
        torch.testing.assert_close(
            first.hidden_states, plain(["a red circle", "a cat", "a red circle"]).hidden_states
        )
        torch.testing.assert_close(second.hidden_states, plain(["a cat", ""]).hidden_states)
    assert first.pooled is None


def test_sdxl_captions_concatenate_both_encoders_penultimate_states_and_keep_the_pooled(
    tiny_sdxl_dir: Path,
) -> None:
    sdxl = load_base_model(str(tiny_sdxl_dir))
    encoder = CaptionEncoder(
        [sdxl.tokenizer, sdxl.tokenizer_2],
        [sdxl.text_encoder, sdxl.text_encoder_2],
        penultimate=True,
        pooled=True,
        cache=True,
    )
    encoded = encoder(["a red circle", "a cat"])
    assert encoded.hidden_states.shape == (2, 77, 64) and encoded.pooled.shape == (2, 32)
    with torch.no_grad():
        (reference, _, reference_pooled, _) = sdxl.encode_prompt(
            ["a red circle", "a cat"], do_classifier_free_guidance=False
        )
    torch.testing.assert_close(encoded.hidden_states, reference)
    torch.testing.assert_close(encoded.pooled, reference_pooled)
