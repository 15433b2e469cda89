"""The PNG parameters WebUI reads."""

from __future__ import annotations

from pathlib import Path

from generation_helpers import grid
from PIL import Image

from lorapipe.generation.infotext import (
    ParameterContext,
    a1111_parameters,
    parse_parameters,
    save_png,
)

# --------------------------------------------------------------------------- PNG parameters


def test_png_parameters_are_webui_infotext_and_parse_back(tmp_path: Path) -> None:
    (cell,) = grid(
        prompts=["vintage (street:1.2), 東京, <lora:film_style:0.7>"],
        negative_presets=["base"],
        lora_scales=[0.5],
        cfg_scales=[7.5],
        seeds=[42],
        sizes=["512x768"],
        samplers=["DPM++ 2M Karras"],
        steps=20,
    )
    context = ParameterContext(
        model_hash="0123456789",
        model_name="tiny-sd",
        clip_skip=2,
        lora_hashes={"film_style": "abcdef012345"},
        version="lorapipe 0.1.0",
    )
    text = a1111_parameters(cell, context)
    assert text == (
        "vintage (street:1.2), 東京, <lora:film_style:0.5>\n"
        "Negative prompt: low quality, worst quality, blurry, noisy, grainy, overexposed, "
        "underexposed\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        'Model hash: 0123456789, Model: tiny-sd, Clip skip: 2, Lora hashes: "film_style: '
        'abcdef012345", Version: lorapipe 0.1.0'
    )
    path = tmp_path / "image.png"
    save_png(Image.new("RGB", (8, 8)), path, text)
    parsed = parse_parameters(Image.open(path).info["parameters"])
    assert parsed["prompt"] == cell.prompt
    assert parsed["negative_prompt"] == cell.negative.text
    assert parsed["Seed"] == "42" and parsed["CFG scale"] == "7.5" and parsed["Size"] == "512x768"
    assert parsed["Lora hashes"] == "film_style: abcdef012345"


def test_each_image_carries_its_own_size() -> None:
    portrait, landscape = grid(prompts=["a street"], sizes=["512x768", "768x512"])
    context = ParameterContext(model_hash="0123456789", model_name="tiny-sd")
    assert "Size: 512x768," in a1111_parameters(portrait, context)
    assert "Size: 768x512," in a1111_parameters(landscape, context)


def test_each_image_carries_its_own_sampler_and_steps() -> None:
    cells = grid(prompts=["a street"], samplers=["Euler a", "DDIM"], steps=[10, 30])
    context = ParameterContext(model_hash="0123456789", model_name="tiny-sd")
    parameters = [parse_parameters(a1111_parameters(cell, context)) for cell in cells]
    assert [(p["Sampler"], p["Steps"]) for p in parameters] == [
        ("Euler a", "10"),
        ("Euler a", "30"),
        ("DDIM", "10"),
        ("DDIM", "30"),
    ]
