"""``index.parquet``: every image with its parameters and metrics; and the mean metrics per
negative preset x size x LoRA scale x CFG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapipe import image_metrics
from lorapipe.generation.grid import Cell, group_by
from lorapipe.generation.layout import IMAGES_DIR

if TYPE_CHECKING:
    from lorapipe.generation.infotext import ParameterContext


def index_row(
    cell: Cell, context: ParameterContext, parameters: str, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "file": f"{IMAGES_DIR}/{cell.file_name}",
        "prompt_index": cell.prompt_index + 1,
        "prompt": cell.prompt,
        "negative_preset": cell.negative_preset,
        "negative_prompt": cell.negative.text,
        "lora_scale": cell.lora_scale,
        "loras": [asdict(tag) for tag in cell.loras],
        "cfg_scale": cell.cfg_scale,
        "seed": cell.seed,
        "sampler": cell.sampler,
        "steps": cell.steps,
        "checkpoint": cell.checkpoint,
        "width": cell.width,
        "height": cell.height,
        "guidance_rescale": context.guidance_rescale,
        "clip_skip": context.clip_skip,
        "model_hash": context.model_hash,
        "parameters": parameters,
        **metrics,
    }


def index_schema() -> Any:
    import pyarrow as pa

    lora = pa.struct(
        [("name", pa.string()), ("te_weight", pa.float64()), ("unet_weight", pa.float64())]
    )
    return pa.schema(
        [
            ("file", pa.string()),
            ("prompt_index", pa.int32()),
            ("prompt", pa.string()),
            ("negative_preset", pa.string()),
            ("negative_prompt", pa.string()),
            ("lora_scale", pa.float64()),
            ("loras", pa.list_(lora)),
            ("cfg_scale", pa.float64()),
            ("seed", pa.int64()),
            ("sampler", pa.string()),
            ("steps", pa.int32()),
            ("checkpoint", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("guidance_rescale", pa.float64()),
            ("clip_skip", pa.int32()),
            ("model_hash", pa.string()),
            ("parameters", pa.string()),
            *[(name, pa.float64()) for name in (*image_metrics.METRIC_NAMES, "clip_score")],
        ]
    )


def write_index(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows), schema=index_schema()), path)


def metrics_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean metrics per negative preset x size x checkpoint x sampler x steps x LoRA scale x
    CFG (over prompts and seeds), in grid order."""
    names = [*image_metrics.METRIC_NAMES, "clip_score"]
    table = []
    for (preset, width, height, checkpoint, sampler, steps, scale, cfg), group in group_by(
        rows,
        lambda row: (
            row["negative_preset"],
            row["width"],
            row["height"],
            row["checkpoint"],
            row["sampler"],
            row["steps"],
            row["lora_scale"],
            row["cfg_scale"],
        ),
    ):
        entry: dict[str, Any] = {
            "negative_preset": preset,
            "size": f"{width}x{height}",
            "checkpoint": checkpoint,
            "sampler": sampler,
            "steps": steps,
            "lora_scale": "as tagged" if scale is None else scale,
            "cfg_scale": cfg,
            "images": len(group),
        }
        for name in names:
            values = [row[name] for row in group if row[name] is not None]
            entry[name] = sum(values) / len(values) if values else None
        table.append(entry)
    return table
