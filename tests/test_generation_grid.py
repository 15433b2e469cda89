"""The grid: every combination in order, LoRA scales in the tags, negatives per cell, and
the LoRA tag checks."""

from __future__ import annotations

import pytest
from generation_helpers import grid

from lorapipe.errors import PromptError
from lorapipe.generation.grid import check_lora_tags, grid_summary, scaled_lora_tags
from lorapipe.prompts.syntax import LoraTag, parse_prompt
from lorapipe.stages.generate import GenerateConfig

# --------------------------------------------------------------------------- the grid


def test_the_grid_is_every_combination_in_order() -> None:
    cells = grid(
        prompts=["a <lora:film_style:0.7>", "b <lora:film_style:0.7>"],
        negative_presets=["portrait", "landscape"],
        lora_scales=[0.5, 1.0],
        cfg_scales=[7, 9],
        seeds=[1, 2, 3],
    )
    assert len(cells) == 2 * 2 * 2 * 2 * 3
    first = cells[0]
    assert (first.prompt_index, first.negative_preset, first.lora_scale) == (0, "portrait", 0.5)
    assert (first.cfg_scale, first.seed) == (7, 1)
    assert [c.seed for c in cells[:4]] == [1, 2, 3, 1]
    assert cells[-1].file_name == "p02_landscape_64x64_lora1_cfg9_seed3.png"


def test_the_plan_says_each_axis_and_how_many_images_and_batches_it_makes() -> None:
    values = {
        "prompts": ["a", "b", "c"],
        "negative_presets": ["portrait", "landscape"],
        "sizes": ["64x96", "96x64"],
        "seeds": [1, 2, 3, 4],
        "batch_size": 4,
    }
    cells = grid(**values)
    assert grid_summary(GenerateConfig(**values), len(cells), 12) == (
        "3 prompts x 2 negative presets x 2 sizes x 4 seeds = 48 images in 12 batches of up to 4"
    )
    one = GenerateConfig(prompts=["a"], sizes=["64x64"], lora_scales=[0.5, 1])
    assert grid_summary(one, 2, 2) == "1 prompt x 2 LoRA scales = 2 images in 2 batches of up to 8"


def test_sizes_are_an_axis_of_the_grid_inside_prompt_and_preset() -> None:
    cells = grid(
        prompts=["a street"], sizes=["64x96", "96x64"], cfg_scales=[7, 9], negative_presets=["base"]
    )
    assert [(c.width, c.height, c.cfg_scale) for c in cells] == [
        (64, 96, 7),
        (64, 96, 9),
        (96, 64, 7),
        (96, 64, 9),
    ]
    portrait = cells[0]
    assert portrait.size == "64x96"
    assert portrait.file_name == "p01_base_64x96_lora-tagged_cfg7_seed1.png"
    assert portrait.label == "prompt 1 / base / 64x96 / LoRA as tagged / CFG 7"
    assert portrait.negative is cells[2].negative  # the negative does not depend on the size


def test_several_samplers_and_step_counts_are_axes_named_in_the_files() -> None:
    cells = grid(
        prompts=["a street"], samplers=["Euler a", "DPM++ 2M"], steps=[10, 30], seeds=[1, 2]
    )
    assert [(c.sampler, c.steps, c.seed) for c in cells] == [
        ("Euler a", 10, 1),
        ("Euler a", 10, 2),
        ("Euler a", 30, 1),
        ("Euler a", 30, 2),
        ("DPM++ 2M", 10, 1),
        ("DPM++ 2M", 10, 2),
        ("DPM++ 2M", 30, 1),
        ("DPM++ 2M", 30, 2),
    ]
    assert cells[-1].file_name == "p01_base_64x64_lora-tagged_cfg7_seed2_DPM-2M_steps30.png"
    assert len({cell.file_name for cell in cells}) == len(cells)
    # one sampler and one step count, as every job had before: no suffix
    (one,) = grid(prompts=["a street"], samplers=["Euler a"], steps=[10])
    assert (one.sampler, one.steps) == ("Euler a", 10)
    assert one.file_name == "p01_base_64x64_lora-tagged_cfg7_seed1.png"
    summary = grid_summary(
        GenerateConfig(
            prompts=["a"], sizes=["64x64"], samplers=["Euler a", "DDIM"], steps=[10, 20, 30]
        ),
        6,
        1,
    )
    assert summary == "1 prompt x 2 samplers x 3 step counts = 6 images in 1 batch of up to 8"


def test_width_and_height_make_the_one_size_of_a_grid_without_sizes() -> None:
    (cell,) = grid(prompts=["a street"], width=128, height=64)
    assert (cell.width, cell.height) == (128, 64)
    (native,) = grid(prompts=["a street"])
    assert native.size == "64x64"  # the model's native size


def test_a_grid_lora_scale_replaces_the_tag_weight_and_keeps_a_split_ratio() -> None:
    assert scaled_lora_tags([LoraTag("a", 0.7, 0.7)], 0.5) == (LoraTag("a", 0.5, 0.5),)
    assert scaled_lora_tags([LoraTag("a", 0.5, 1.0)], 0.6) == (LoraTag("a", 0.3, 0.6),)
    assert scaled_lora_tags([LoraTag("a", 0.8, 0.0)], 0.4) == (LoraTag("a", 0.4, 0.0),)
    assert scaled_lora_tags([LoraTag("a", 0.5, 1.0)], None) == (LoraTag("a", 0.5, 1.0),)
    (cell,) = grid(prompts=["rain, <lora:film_style:0.7>"], lora_scales=[0.4])
    assert cell.prompt == "rain, <lora:film_style:0.4>"
    assert cell.loras == (LoraTag("film_style", 0.4, 0.4),)


def test_each_cells_negative_follows_its_lora_scale() -> None:
    cells = grid(
        prompts=["city <lora:film_style:1>"],
        negative_presets=["landscape"],
        lora_scales=[0.5, 0.7, 1.0],
    )
    lean, normal, strong = (cell.negative for cell in cells)
    assert "anime" not in lean.terms and "anime" in normal.terms
    assert strong.terms == (*normal.terms, "garish colors")
    no_lora = grid(prompts=["city"], negative_presets=["landscape"], lora_scales=[0.5])
    assert no_lora[0].negative.terms == normal.terms  # no LoRA in the prompt: no adjustment


def test_lora_tags_must_name_a_loaded_lora_and_unused_loras_are_flagged() -> None:
    prompts = [parse_prompt("a <lora:film_style:1>")]
    with pytest.raises(PromptError, match="prompt 1: <lora:film_style:...> names a LoRA the job"):
        check_lora_tags(prompts, [])
    (lint,) = check_lora_tags(prompts, ["film_style", "other"])
    assert "LoRA 'other' is loaded but no prompt has <lora:other:...>" in lint.message
