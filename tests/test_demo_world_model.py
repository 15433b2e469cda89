"""The world model's pretraining script: a few steps give a complete, loadable SD pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.demo.world_model import PretrainConfig, pretrain
from lorapipe.models import load_base_model


def test_pretraining_writes_a_diffusers_model_with_its_measured_latent_scale(
    tmp_path: Path,
) -> None:
    config = PretrainConfig(scenes=8, vae_steps=2, unet_steps=2, batch_size=4)
    model = pretrain(tmp_path / "world-sd", config)

    vae_config = json.loads((model / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured on the rendered scenes
    pipeline = load_base_model(str(model))
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 64
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    image = pipeline(
        "a red circle on the left, white background", num_inference_steps=2, output_type="pil"
    ).images[0]
    assert image.size == (64, 64)


def test_the_vae_sees_the_scenes_under_random_colour_casts_and_light() -> None:
    """So the VAE can draw colour grades the UNet never saw (the LoRA's style among them)."""
    import torch

    from lorapipe.demo.world_model import random_colour_and_light

    grey = torch.zeros(64, 3, 16, 16)
    cast = random_colour_and_light(grey, torch.Generator().manual_seed(0))
    assert cast.shape == grey.shape and cast.abs().max() <= 1.0
    channel_means = cast.mean(dim=(2, 3))
    warm = (channel_means[:, 0] - channel_means[:, 2]) > 0.15
    cool = (channel_means[:, 2] - channel_means[:, 0]) > 0.15
    assert warm.any() and cool.any()
    corners = cast[:, :, [0, -1]][:, :, :, [0, -1]].mean(dim=(1, 2, 3))
    assert (corners < cast[:, :, 6:10, 6:10].mean(dim=(1, 2, 3))).float().mean() > 0.5


def test_only_some_captions_name_their_defects() -> None:
    """Like web captions: a negative prompt naming a defect has something to remove."""
    from lorapipe.demo.world_model import render_scenes

    config = PretrainConfig(
        scenes=200, defect_rate=1.0, watermark_rate=0.0, defect_caption_rate=0.5
    )
    _, captions = render_scenes(config)
    named = sum(
        caption.endswith(("blurry", "grainy", "overexposed", "watermark")) for caption in captions
    )
    assert 70 <= named <= 130


def test_a_share_of_scenes_carries_a_stock_photo_watermark_often_unnamed() -> None:
    """The base model must draw the watermark unasked at times, as web-trained models do, so
    that "watermark" in a negative prompt removes something."""
    from lorapipe.demo import world
    from lorapipe.demo.world_model import render_scenes

    config = PretrainConfig(scenes=200, defect_rate=0.0, watermark_rate=0.3)
    images, captions = render_scenes(config)
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    marked = [world.watermark_score(image) > 0.02 for image in pixels]  # clean: <= 0.002
    named = ["watermark" in caption for caption in captions]
    assert 45 <= sum(marked) <= 75
    assert all(is_marked for is_marked, is_named in zip(marked, named, strict=True) if is_named)
    assert 0.3 * sum(marked) <= sum(named) <= 0.7 * sum(marked)


def test_the_vae_loss_weighs_objects_above_the_plain_background() -> None:
    """Objects cover a few percent of a scene; unweighted, the VAE learns the background
    first and the shapes and colours much later."""
    import numpy as np
    import torch

    from lorapipe.demo import world
    from lorapipe.demo.world_model import detail_weights

    scene = world.Scene("square", "red", 1, "middle", "grey")
    pixels = np.array(world.render(scene, 64, seed=0))
    batch = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    weights = detail_weights(batch)[0, 0]
    is_red = torch.from_numpy((pixels[..., 0] > 180) & (pixels[..., 1] < 90))
    assert weights[is_red].mean() > 9.0
    assert weights[:8, :8].eq(1.0).all()  # the empty top-left corner
    assert 0.02 < (weights > 1).float().mean() < 0.3
