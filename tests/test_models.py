"""Base models: the tiny offline SD pipeline, and loading models from disk and S3."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from lorapipe import store
from lorapipe.cli import main as cli
from lorapipe.errors import ModelError
from lorapipe.models import build_sd, load_base_model, model_cache_root, resolve_model_dir


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


def test_single_file_checkpoint_is_refused_with_the_fix(tmp_path: Path) -> None:
    checkpoint = tmp_path / "v1-5-pruned.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="single-file checkpoint.*save_pretrained"):
        resolve_model_dir(str(checkpoint))


def test_missing_or_foreign_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="no model_index.json"):
        load_base_model(str(tmp_path))


def test_cli_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["tiny-model", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert load_base_model(str(tmp_path / "m")).unet.config.sample_size == 8


def test_model_on_s3_is_downloaded_once_and_refetched_when_it_changes(
    tiny_model_dir: Path, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    uri = store.join(s3_bucket, "models", "tiny-sd")
    store.put_dir(tiny_model_dir, uri)

    first = resolve_model_dir(uri)
    assert first.parent == model_cache_root()
    assert _weight_digests(first) == _weight_digests(tiny_model_dir)
    assert resolve_model_dir(uri) == first  # same ETags: the cache answers

    changed_model = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed_model)
    scheduler_config = changed_model / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(
        scheduler_config.read_text().replace('"beta_end": 0.012', '"beta_end": 0.0125')
    )
    store.put_dir(changed_model, uri)
    changed = resolve_model_dir(uri)
    assert changed != first
    assert load_base_model(uri).scheduler.config.beta_end == 0.0125
