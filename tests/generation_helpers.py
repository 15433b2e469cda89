"""Helpers of the generate tests: a grid of cells from config values."""

from __future__ import annotations

from lorapipe.generation.grid import Cell, plan_grid
from lorapipe.prompts.negatives import NegativeLibrary
from lorapipe.prompts.syntax import parse_prompt
from lorapipe.stages.generate import GenerateConfig, with_sizes_resolved

TINY_MODEL_SIZE = 64  # the tiny test model's native size, what an unsized grid renders at


def grid(**values) -> list[Cell]:
    config = with_sizes_resolved(GenerateConfig(**values), TINY_MODEL_SIZE)
    prompts = [parse_prompt(p) for p in config.prompts]
    return plan_grid(config, prompts, NegativeLibrary.load())
