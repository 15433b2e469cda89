"""The random-weight SD pipelines (``lorapipe tiny-model``): deterministic, loadable, usable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lorapipe.cli import main as cli
from lorapipe.demo.tiny_model import build_sd
from lorapipe.models import load_base_model


def _weight_digests(model_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(model_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(model_dir.rglob("*.safetensors"))
    }


def test_same_seed_builds_identical_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    rebuilt = build_sd(tmp_path / "again", seed=0, preset="tiny")
    assert _weight_digests(rebuilt) == _weight_digests(tiny_model_dir)
    assert len(_weight_digests(rebuilt)) == 3  # unet, vae, text encoder


def test_other_seed_builds_other_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = build_sd(tmp_path / "other", seed=1, preset="tiny")
    assert _weight_digests(other) != _weight_digests(tiny_model_dir)


def test_tiny_model_loads_with_diffusers_and_generates(tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    image = pipeline(
        "a photo of a red cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    assert pipeline.vae_scale_factor == 8


def test_tokenizer_wraps_captions_in_bos_and_eos(tiny_model_dir: Path) -> None:
    tokenizer = load_base_model(str(tiny_model_dir)).tokenizer
    ids = tokenizer("street photography, film grain").input_ids
    assert ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["street</w>", "photogra"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "street photography , film grain"
    assert (tiny_model_dir / "tokenizer" / "vocab.json").is_file()
    assert (tiny_model_dir / "tokenizer" / "merges.txt").is_file()


def test_cli_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["tiny-model", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert load_base_model(str(tmp_path / "m")).unet.config.sample_size == 8
