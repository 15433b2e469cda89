"""A1111's ``parameters`` PNG text (WebUI's PNG Info reads it): written for a cell, read back."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lorapipe.generation.grid import Cell


@dataclass(frozen=True)
class ParameterContext:
    """What every image's parameters text shares (size, sampler and steps are the cell's)."""

    model_hash: str
    model_name: str
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    lora_hashes: Mapping[str, str] = field(default_factory=dict)  # LoRA name -> 12 hex
    version: str = ""


def a1111_parameters(cell: Cell, context: ParameterContext) -> str:
    """The ``parameters`` text WebUI writes into its PNGs (and reads back in PNG Info)."""
    lines = [cell.prompt]
    if cell.negative.text:
        lines.append(f"Negative prompt: {cell.negative.text}")
    used_hashes = ", ".join(
        f"{re.sub('[:,]', '', tag.name)}: {context.lora_hashes[tag.name]}"
        for tag in cell.loras
        if tag.name in context.lora_hashes
    )
    fields = {
        "Steps": cell.steps,
        "Sampler": cell.sampler,
        "CFG scale": f"{cell.cfg_scale:g}",
        "Seed": cell.seed,
        "Size": cell.size,
        "Model hash": context.model_hash,
        "Model": context.model_name,
        "Clip skip": context.clip_skip if context.clip_skip > 1 else None,
        "Guidance rescale": f"{context.guidance_rescale:g}" if context.guidance_rescale else None,
        "Lora hashes": used_hashes or None,
        "Version": context.version or None,
    }
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def _quote(value: Any) -> str:
    """WebUI quotes a value that holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if re.search(r"[,:\n]", text) else text


_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Read a ``parameters`` text back: ``prompt``, ``negative_prompt`` and every field."""
    lines = text.strip().split("\n")
    result: dict[str, str] = {}
    if len(_PARAMETER.findall(lines[-1])) >= 3:
        for key, value in _PARAMETER.findall(lines.pop()):
            result[key] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result["prompt"] = "\n".join(prompt)
    result["negative_prompt"] = "\n".join(negative)
    return result


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    path.write_bytes(png_bytes(image, parameters))


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """The PNG file of ``image`` with its ``parameters`` text."""
    info = PngInfo()
    info.add_text("parameters", parameters)  # Pillow falls back to iTXt for non-Latin-1 text
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
