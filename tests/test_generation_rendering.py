"""Batched rendering that matches the diffusers pipeline image for image."""

from __future__ import annotations

import generation_helpers
import numpy as np
import pytest
import torch
from PIL import Image

from lorapipe.generation.grid import Cell, group_by
from lorapipe.generation.rendering import GridRenderer
from lorapipe.generation.samplers import make_scheduler
from lorapipe.models import SD1
from lorapipe.prompts.encoding import Conditioning

# Images are compared as 8-bit pixels: batched and one-off runs may differ by float rounding in
# the UNet's matrix products, which moves a pixel by at most one level.
PIXEL_TOLERANCE = 1
STEPS = 4


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def grid(**values) -> list[Cell]:
    """The cells of ``values``, at ``STEPS`` steps unless they say."""
    return generation_helpers.grid(**{"steps": STEPS, **values})


def renderer(pipe, batch_size: int = 8) -> GridRenderer:
    return GridRenderer(pipe, family=SD1, adapters={"film_style": "lora_0"}, batch_size=batch_size)


def render_all(grid_renderer: GridRenderer, cells: list[Cell]) -> dict[Cell, Image.Image]:
    return {
        cell: image
        for batch, images in grid_renderer.render(cells)
        for cell, image in zip(batch, images, strict=True)
    }


# --------------------------------------------------------------------------- rendering


def one_off(pipe, grid_renderer: GridRenderer, cell: Cell) -> Image.Image:
    """``cell`` rendered alone by a plain diffusers pipeline call, with the same conditioning."""
    grid_renderer.apply_loras(cell.loras)
    positive, negative = grid_renderer.conditioning(cell)
    pipe.scheduler = make_scheduler("DPM++ 2M Karras", pipe.scheduler.config)
    return pipe(
        prompt_embeds=positive.embeds,
        negative_prompt_embeds=negative.embeds,
        guidance_scale=cell.cfg_scale,
        num_inference_steps=STEPS,
        height=cell.height,
        width=cell.width,
        generator=torch.Generator().manual_seed(cell.seed),
    ).images[0]


def test_each_image_equals_a_one_off_diffusers_pipeline_call(pipe) -> None:
    cells = grid(
        prompts=["red dog, <lora:film_style:0.7>", "(blue:1.3) sky BREAK star"],
        negative_presets=["portrait"],
        cfg_scales=[7, 9.5],
        seeds=[1, 2],
        samplers=["DPM++ 2M Karras"],
    )
    grid_renderer = renderer(pipe)
    batched = render_all(grid_renderer, cells)
    for cell in cells:
        alone = one_off(pipe, grid_renderer, cell)
        assert max_difference(batched[cell], alone) <= PIXEL_TOLERANCE, cell.label


def test_an_image_does_not_depend_on_its_batch_even_with_an_ancestral_sampler(pipe) -> None:
    cells = grid(
        prompts=["red dog, <lora:film_style:0.7>", "blue sky <lora:film_style:0.7>"],
        cfg_scales=[7, 11],
        seeds=[1, 2],
        samplers=["Euler a"],
    )
    all_at_once = render_all(renderer(pipe, batch_size=8), cells)
    one_by_one = render_all(renderer(pipe, batch_size=1), cells)
    in_threes = render_all(renderer(pipe, batch_size=3), cells)
    for cell in cells:
        assert max_difference(all_at_once[cell], one_by_one[cell]) <= PIXEL_TOLERANCE
        assert max_difference(all_at_once[cell], in_threes[cell]) <= PIXEL_TOLERANCE
    assert max_difference(all_at_once[cells[0]], all_at_once[cells[1]]) > 10  # seeds differ


def test_batches_mix_prompts_and_cfg_but_not_lora_weights(pipe) -> None:
    cells = grid(
        prompts=["red dog <lora:film_style:1>", "blue sky <lora:film_style:1>"],
        lora_scales=[0.5, 1.0],
        cfg_scales=[7, 9],
        seeds=[1],
    )
    sizes = [len(batch) for batch, _ in renderer(pipe, batch_size=3).render(cells)]
    assert sizes == [3, 1, 3, 1]  # 4 images at LoRA 0.5, then 4 at LoRA 1


def test_a_batch_holds_one_image_size_and_each_image_has_its_cells_size(pipe) -> None:
    cells = grid(
        prompts=["red dog <lora:film_style:1>", "blue sky <lora:film_style:1>"],
        sizes=["64x96", "96x64"],
        seeds=[1],
    )
    batches = list(renderer(pipe, batch_size=8).render(cells))
    assert [[cell.size for cell in batch] for batch, _ in batches] == [
        ["64x96", "64x96"],
        ["96x64", "96x64"],
    ]
    for batch, images in batches:
        assert [image.size for image in images] == [(c.width, c.height) for c in batch]
    portrait = cells[0]
    assert (portrait.width, portrait.height) == (64, 96)
    alone = one_off(pipe, renderer(pipe), portrait)
    assert max_difference(batches[0][1][0], alone) <= PIXEL_TOLERANCE


def test_a_batch_holds_one_sampler_and_step_count(pipe) -> None:
    cells = grid(prompts=["red dog"], samplers=["Euler", "DDIM"], steps=[1, 2], seeds=[1, 2])
    batches = renderer(pipe).batches(cells)
    assert [[(cell.sampler, cell.steps) for cell in batch] for batch in batches] == [
        [("Euler", 1)] * 2,
        [("Euler", 2)] * 2,
        [("DDIM", 1)] * 2,
        [("DDIM", 2)] * 2,
    ]


def test_conditioning_is_encoded_once_per_distinct_text(pipe, monkeypatch) -> None:
    grid_renderer = renderer(pipe)
    encoded: list[str] = []
    encode = grid_renderer.encoder.encode
    monkeypatch.setattr(
        grid_renderer.encoder, "encode", lambda p: encoded.append(p.source) or encode(p)
    )
    cells = grid(
        prompts=["red dog", "blue sky"],
        negative_presets=["portrait", "landscape"],
        cfg_scales=[7, 9],
        seeds=[1, 2, 3],
    )
    render_all(grid_renderer, cells)
    assert len(cells) == 24
    assert sorted(encoded) == sorted(
        ["red dog", "blue sky", ""] + [cells[0].negative.text, cells[6].negative.text]
    )


def test_lora_weights_reach_unet_and_text_encoder_separately(pipe) -> None:
    cells = grid(
        prompts=[
            "red dog",
            "red dog <lora:film_style:0>",
            "red dog <lora:film_style:1>",
            "red dog <lora:film_style:0:1>",
            "red dog <lora:film_style:1:0>",
        ],
        negative_presets=["none"],
    )
    images = list(render_all(renderer(pipe), cells).values())
    no_lora, zero, full, unet_only, text_only = images
    assert max_difference(no_lora, zero) <= PIXEL_TOLERANCE
    for a, b in [(no_lora, full), (full, unet_only), (full, text_only), (unet_only, text_only)]:
        assert max_difference(a, b) > 10


# --------------------------------------------------------------------------- streaming

LONG_PROMPT = ", ".join(["street"] * 50)  # 100 tokens or more: two chunks or more


def rendered_as_before_streaming(
    grid_renderer: GridRenderer, cells: list[Cell]
) -> dict[Cell, Image.Image]:
    """The grid as generate rendered it before it streamed: per LoRA group, every cell's
    conditioning encoded first, then batches by size and conditioning length."""
    images: dict[Cell, Image.Image] = {}
    size = grid_renderer.batch_size
    for loras, group in group_by(cells, lambda cell: cell.loras):
        grid_renderer.apply_loras(loras)
        conditioned = {cell: grid_renderer.conditioning(cell) for cell in group}
        shapes = [
            (cell, (cell.width, cell.height, conditioned[cell][0].embeds.shape[1]))
            for cell in group
        ]
        for _, same_shape in group_by(shapes, lambda item: item[1]):
            for start in range(0, len(same_shape), size):
                batch = [cell for cell, _ in same_shape[start : start + size]]
                positive, negative = (
                    Conditioning(torch.cat([conditioned[cell][side].embeds for cell in batch]))
                    for side in (0, 1)
                )
                rendered = grid_renderer.denoise(batch, positive, negative)
                images.update(zip(batch, rendered, strict=True))
    return images


def test_streaming_renders_the_same_batches_and_the_same_pixels_as_encoding_everything_first(
    pipe,
) -> None:
    cells = grid(
        prompts=["red dog, <lora:film_style:0.7>", f"{LONG_PROMPT}, <lora:film_style:0.7>"],
        negative_presets=["portrait", "none"],
        sizes=["64x64", "64x96"],
        lora_scales=[0.5, 1.0],
        seeds=[1],
        samplers=["Euler a"],
        steps=2,
    )
    streamed = render_all(renderer(pipe, batch_size=3), cells)
    before = rendered_as_before_streaming(renderer(pipe, batch_size=3), cells)
    assert list(streamed) == list(before)  # the same cells in the same order
    for cell in cells:
        assert np.array_equal(pixels(streamed[cell]), pixels(before[cell])), cell.label


def test_batches_are_planned_from_tokens_before_anything_is_encoded(pipe, monkeypatch) -> None:
    grid_renderer = renderer(pipe)
    monkeypatch.setattr(grid_renderer.encoder, "encode", lambda p: pytest.fail(p.source))
    cells = grid(
        prompts=["red dog", LONG_PROMPT, "blue sky"], negative_presets=["none"], seeds=[1, 2]
    )
    batches = grid_renderer.batches(cells)
    # the long prompt's conditioning is longer, so it never shares a UNet call with the others
    assert [[cell.prompt_index for cell in batch] for batch in batches] == [[0, 0, 2, 2], [1, 1]]


def test_each_batch_encodes_only_its_own_texts_so_the_first_image_comes_at_once(
    pipe, monkeypatch
) -> None:
    grid_renderer = renderer(pipe, batch_size=2)
    encoded: list[str] = []
    encode = grid_renderer.encoder.encode
    monkeypatch.setattr(
        grid_renderer.encoder, "encode", lambda p: encoded.append(p.source) or encode(p)
    )
    monkeypatch.setattr(grid_renderer, "denoise", lambda cells, *_: [None] * len(cells))  # fast
    cells = grid(prompts=[f"prompt {i}" for i in range(30)], negative_presets=["none"])
    encoded_per_batch, held_per_batch = [], []
    for _batch, _images in grid_renderer.render(cells):
        encoded_per_batch.append(sorted(encoded))
        encoded.clear()
        held_per_batch.append(len(grid_renderer.recent_conditioning))
    assert encoded_per_batch[0] == ["", "prompt 0", "prompt 1"]  # not the other 28 prompts
    assert encoded_per_batch[1:] == [[f"prompt {i}", f"prompt {i + 1}"] for i in range(2, 30, 2)]
    # four batches' texts at most (a prompt and a negative per image, the empty prompt)
    assert max(held_per_batch) == 4 * (2 * 2 + 1)
