"""Helpers of the generate tests: a grid of cells from config values."""

from __future__ import annotations

from lorapipe.generation.grid import Cell, plan_grid
from lorapipe.prompts.negatives import NegativeLibrary
from lorapipe.prompts.syntax import parse_prompt
from lorapipe.stages.generate import GenerateConfig


def grid(**values) -> list[Cell]:
    config = GenerateConfig(**values)
    prompts = [parse_prompt(p) for p in config.prompts]
    return plan_grid(config, prompts, NegativeLibrary.load())
