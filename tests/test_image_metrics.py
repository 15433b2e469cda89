"""Model-free image metrics on images whose answers are known, and the optional CLIP score."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lorapipe.errors import ModelError
from lorapipe.image_metrics import (
    METRIC_NAMES,
    ClipScorer,
    colorfulness,
    compute_metrics,
    highlight_clipping,
    mean_luminance,
    shadow_clipping,
    sharpness,
)


def solid(rgb: tuple[int, int, int], size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), rgb, dtype=np.uint8)


def checkerboard(size: int = 32) -> np.ndarray:
    board = (np.indices((size, size)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return np.repeat(board[..., None], 3, axis=2)


def test_a_flat_image_has_no_sharpness_and_a_checkerboard_the_most() -> None:
    assert sharpness(solid((120, 80, 40))) == 0.0
    # every interior pixel's Laplacian is +-4 * 255
    assert sharpness(checkerboard()) == pytest.approx((4 * 255) ** 2)


def test_blur_lowers_sharpness() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    blurred = image.filter(ImageFilter.GaussianBlur(2))
    assert sharpness(blurred) < sharpness(image) / 10


def test_clipping_counts_blown_highlights_and_crushed_shadows() -> None:
    image = solid((128, 128, 128), size=10)
    image[0, :] = (255, 255, 255)  # 10 blown white pixels
    image[1, :] = (255, 40, 0)  # 10 pixels with the red channel at the limit
    image[2, :5] = (0, 0, 0)  # 5 black pixels
    image[3, :5] = (0, 0, 30)  # not crushed: one channel still has light
    assert highlight_clipping(image) == pytest.approx(0.20)
    assert shadow_clipping(image) == pytest.approx(0.05)


def test_mean_luminance_runs_from_black_to_white() -> None:
    assert mean_luminance(solid((0, 0, 0))) == 0.0
    assert mean_luminance(solid((255, 255, 255))) == pytest.approx(1.0)
    assert mean_luminance(solid((0, 255, 0))) == pytest.approx(0.7152)


def test_colorfulness_is_zero_for_grey_and_large_for_saturated_colour() -> None:
    assert colorfulness(solid((90, 90, 90))) == 0.0
    half = solid((255, 0, 0))
    half[:, 16:] = (0, 0, 255)
    # rg is 255 / 0 and yb 127.5 / -255 over equal halves
    expected = np.hypot(127.5, 191.25) + 0.3 * np.hypot(127.5, 63.75)
    assert colorfulness(half) == pytest.approx(expected)


def test_colorfulness_uses_signed_arithmetic_not_uint8_wraparound() -> None:
    # green > red: R - G is negative, which uint8 arithmetic would wrap to a large number
    greenish = solid((10, 200, 10))
    assert colorfulness(greenish) == pytest.approx(0.3 * np.hypot(-190, 95))


def test_compute_metrics_gives_every_metric_for_pil_and_arrays() -> None:
    array = checkerboard()
    from_array = compute_metrics(array)
    assert list(from_array) == list(METRIC_NAMES)
    assert compute_metrics(Image.fromarray(array)) == from_array


@pytest.fixture(scope="module")
def tiny_clip(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIP model saved like a real one, with the tiny model's tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    directory = tmp_path_factory.mktemp("clip")
    vocabulary = (tiny_model_dir / "tokenizer" / "vocab.json").read_text().count('":')
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=vocabulary,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / "tokenizer" / name, directory)
    return directory


def test_clip_score_is_100_times_a_floored_cosine_per_image(tiny_clip: Path) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a red dog", "film grain", "blue sky"]
    scorer = ClipScorer(tiny_clip)
    scores = scorer.score(images, texts)
    assert len(scores) == 3 and all(0 <= s <= 100 for s in scores)
    assert scorer.score(images[1:2], texts[1:2]) == pytest.approx(scores[1:2], abs=1e-4)


def test_a_missing_clip_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="could not be loaded"):
        ClipScorer(tmp_path / "no-clip")
