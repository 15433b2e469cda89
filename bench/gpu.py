"""GPU benchmark: lorapipe's training and generation on full-size SD 1.5 and SDXL with random
weights, each against its naive counterpart measured in the same run, as one table.

    python bench/gpu.py            # a CUDA GPU: an estimated 4-6 minutes, never yet run on one
    python bench/gpu.py --smoke    # the same code on the tiny test models, on CPU, in seconds

- Models: the architectures of ``lorapipe/data/model_configs`` (SD 1.5: UNet 860M; SDXL base
  1.0: UNet 2.6B and two text encoders), built there with random weights (no hub) and saved
  as diffusers folders in float16; ``--smoke`` builds the tests' tiny models instead.
- Training: ``lorapipe.stages.train.run``, what users run, at bf16 with LoRA rank 16 on the
  UNet's attention, square crops, no checkpoints but the last, no validation, no samples:
  caches on (latents and text-encoder outputs computed once, before the loop) against the
  per-step-encoding loop (``cache_latents`` and ``cache_text_encoder_outputs`` off: every
  step decodes its images, VAE-encodes them and runs the text encoders). Samples/s is
  train's own (the loop; the caches' one pass is not in it), peak memory is
  ``torch.cuda.max_memory_allocated`` of each run, achieved TFLOP/s is the UNet's forward and
  backward FLOPs per sample (counted on the meta device, ``flops.count_flops``) times
  samples/s, and its share of the GPU's bf16 dense peak (``BF16_DENSE_PEAK_TFLOPS``). The
  notes say how train's AdamW ran (fused, foreach or a loop), as train made it.
- Generation: ``lorapipe.stages.generate.run`` on a 16-image grid at batch 8 against one
  pipeline call per image (``generate_throughput.naive_loop``), same LoRA and sampler, bf16;
  images/s over the rendering only, and the largest pixel difference between the two.

Every variant runs in this process, one after the other; peak memory is reset between them.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flops import count_flops, human

RANK = 16
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
LEARNING_RATE = 1e-4
SEED = 0
TOKENS = 77  # CLIP's caption length
# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) by device name, most specific first:
# NVIDIA's data sheets (SXM parts unless named)
BF16_DENSE_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)


@dataclass(frozen=True)
class TrainCase:
    """One model trained both ways."""

    label: str
    model: str  # a shipped config family (sd1, sdxl) or, for --smoke, a tiny preset
    resolution: int
    batch_size: int
    steps: int


@dataclass(frozen=True)
class GenerateCase:
    """One model's grid (``generate_throughput``'s: prompts x 2 LoRA scales x 2 CFG scales x
    2 seeds), rendered both ways."""

    label: str
    model: str
    size: int
    steps: int
    batch_size: int
    prompts: int  # how many of generate_throughput's prompts


@dataclass(frozen=True)
class Plan:
    train: tuple[TrainCase, ...]
    generate: GenerateCase
    images: int  # training images (each at the case's resolution)
    mixed_precision: str  # training's; bf16 on a GPU (a CPU emulates it slowly)
    dtype: str  # generation's


FULL = Plan(
    train=(
        TrainCase("SD 1.5, 512 px, batch 4", "sd1", 512, 4, 40),
        TrainCase("SDXL, 1024 px, batch 2", "sdxl", 1024, 2, 30),
    ),
    generate=GenerateCase("SD 1.5, 512 px, 20 steps", "sd1", 512, 20, 8, prompts=2),
    images=16,
    mixed_precision="bf16",
    dtype="bfloat16",
)
SMOKE = Plan(
    train=(
        TrainCase("tiny SD 1.x, 64 px, batch 2", "tiny", 64, 2, 1),
        TrainCase("tiny SDXL, 64 px, batch 2", "tiny-sdxl", 64, 2, 1),
    ),
    generate=GenerateCase("tiny SD 1.x, 64 px, 2 steps", "tiny", 64, 2, 8, prompts=1),
    images=2,
    mixed_precision="no",
    dtype="float32",
)


@dataclass
class Row:
    """One line of the table."""

    run: str
    variant: str
    rate: float  # samples/s or images/s
    unit: str
    peak_gib: float | None = None
    flops_per_second: float | None = None
    peak_share: float | None = None
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the tiny models on CPU: the same code, in seconds"
    )
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorapipe-bench-gpu-") as tmp:
        rows = benchmark(plan, Path(tmp), smoke=args.smoke)
    print(table(rows))
    print(f"finished in {time.perf_counter() - started:.0f} s")


def benchmark(plan: Plan, workdir: Path, *, smoke: bool) -> list[Row]:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = bf16_dense_peak(device)
    print(
        f"device: {device}; bf16 dense peak: {f'{peak:g} TFLOP/s' if peak else 'not known'}; "
        f"torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
    )
    if not smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU; --smoke runs the same code on CPU")
    rows: list[Row] = []
    models: dict[str, Path] = {}
    for case in plan.train:
        if case.model not in models:
            models[case.model] = make_model(case.model, workdir, smoke=smoke)
        rows += train_rows(case, models[case.model], workdir, plan, peak)
    case = plan.generate
    if case.model not in models:
        models[case.model] = make_model(case.model, workdir, smoke=smoke)
    rows += generate_rows(case, models[case.model], workdir, plan.dtype)
    return rows


# --------------------------------------------------------------------------- models


def make_model(name: str, workdir: Path, *, smoke: bool) -> Path:
    """The model folder: a tiny preset for --smoke, else a shipped architecture."""
    started = time.perf_counter()
    directory = workdir / f"model-{name}"
    if smoke:
        from lorapipe.demo.tiny_model import build_model

        build_model(directory, seed=SEED, preset=name)
    else:
        build_random_model(name, directory)
    print(f"built {name} in {time.perf_counter() - started:.0f} s")
    return directory


def build_random_model(family: str, directory: Path, device: str = "cuda") -> Path:
    """A diffusers folder of the shipped ``family`` configs with random weights, initialised
    on ``device`` (the GPU takes seconds where the CPU takes minutes for SDXL's 2.6B) and saved
    in float16."""
    import diffusers
    import torch
    import transformers

    from lorapipe.models.single_file import SHIPPED_CONFIGS

    configs = SHIPPED_CONFIGS / family
    directory.mkdir(parents=True)
    shutil.copy(configs / "model_index.json", directory / "model_index.json")
    index = json.loads((configs / "model_index.json").read_text())
    torch.manual_seed(SEED)
    for component, entry in index.items():
        if not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        source = configs / component
        if component.startswith("tokenizer") or component == "scheduler":
            shutil.copytree(source, directory / component)
            continue
        model_class = getattr(
            {"diffusers": diffusers, "transformers": transformers}[library], class_name
        )
        with torch.device(device):
            if library == "diffusers":
                model = model_class.from_config(model_class.load_config(source))
            else:
                model = model_class(model_class.config_class.from_pretrained(source))
        model.to(torch.float16).save_pretrained(directory / component)
        del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return directory


# --------------------------------------------------------------------------- training


def train_rows(
    case: TrainCase, model: Path, workdir: Path, plan: Plan, peak: float | None
) -> list[Row]:
    """lorapipe with its caches on, then the per-step-encoding loop, on the same images."""
    from train_throughput import write_images

    folder = workdir / f"images-{case.resolution}"
    if not folder.exists():
        write_images(folder, plan.images, [(case.resolution, case.resolution)])
    sample_flops = unet_train_flops(model, case) / case.batch_size
    rows = []
    for variant, cached in (("lorapipe, caches on", True), ("per-step encoding", False)):
        output = workdir / f"train-{case.model}-{cached}"
        result = train_once(case, model, folder, output, cached, plan.mixed_precision)
        achieved = sample_flops * result["samples_per_second"]
        rows.append(
            Row(
                case.label,
                variant,
                result["samples_per_second"],
                "samples/s",
                result["peak_gib"],
                achieved,
                achieved / (peak * 1e12) if peak else None,
                f"AdamW {result['adamw']}",
            )
        )
    rows[1].note += f"; lorapipe {rows[0].rate / rows[1].rate:.2f}x"
    return rows


def train_once(
    case: TrainCase, model: Path, images: Path, output: Path, cached: bool, mixed_precision: str
) -> dict[str, Any]:
    """One ``train.run``: its samples/s, the peak memory and how its AdamW ran."""

    from lorapipe.stages import train
    from lorapipe.train_config import TrainConfig

    config = TrainConfig(
        base_model=str(model),
        batch_size=case.batch_size,
        max_train_steps=case.steps,
        resolution=case.resolution,
        lora_rank=RANK,
        lora_alpha=float(RANK),
        target_modules=TARGET_MODULES,
        learning_rate=LEARNING_RATE,
        save_steps=0,
        validation_split=0,
        sample_prompts=[],
        mixed_precision=mixed_precision,
        seed=SEED,
        cache_dir=str(output.parent / f"{output.name}-cache"),
        cache_latents=cached,
        cache_text_encoder_outputs=cached,
        enable_bucket=False,
    )
    optimizers = []
    make_optimizer = train.make_optimizer

    def observed(*args: Any, **kwargs: Any) -> Any:
        made = make_optimizer(*args, **kwargs)
        optimizers.append(made[0])
        return made

    reset_peak_memory()
    started = time.perf_counter()
    train.make_optimizer = observed  # only watched: the optimizer is train's own
    try:
        report = train.run(str(images), str(output), config)
    finally:
        train.make_optimizer = make_optimizer
    caches = "caches on" if cached else "per-step encoding"
    print(f"trained {case.label}, {caches}, in {time.perf_counter() - started:.0f} s")
    return {
        "samples_per_second": report["samples_per_second"],
        "peak_gib": peak_memory_gib(),
        "adamw": adamw_kind(optimizers[0]) if optimizers else "?",
    }


def adamw_kind(optimizer: Any) -> str:
    """How torch's AdamW steps as train made it: ``fused``, ``foreach`` or ``for-loop`` (left
    to torch, it picks foreach for CUDA parameters and the loop for CPU ones, never fused)."""
    defaults = getattr(optimizer, "defaults", {})
    if defaults.get("fused"):
        return "fused"
    if defaults.get("foreach") is not None:
        return "foreach" if defaults["foreach"] else "for-loop"
    on_cuda = optimizer.param_groups[0]["params"][0].is_cuda
    return "foreach, not fused" if on_cuda else "for-loop, not fused"


def unet_train_flops(model: Path, case: TrainCase) -> int:
    """FLOPs of one UNet forward and backward with the LoRA on a batch, on the meta device
    (shapes only: instant, for any size)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model / "unet"))
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGET_MODULES
        )
    )
    unet.train()
    inputs = unet_inputs(unet, case.batch_size, case.resolution)

    def step() -> None:
        latents, timesteps, hidden, added = inputs
        prediction = unet(latents, timesteps, hidden, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(prediction, torch.zeros_like(prediction)).backward()

    return count_flops(step)


def unet_inputs(unet: Any, batch: int, resolution: int) -> tuple[Any, Any, Any, dict | None]:
    """Meta tensors of a training step's shapes; SDXL's pooled text and time ids too."""
    import torch

    side = resolution // 8
    with torch.device("meta"):
        latents = torch.empty(batch, unet.config.in_channels, side, side)
        timesteps = torch.zeros(batch, dtype=torch.long)
        hidden = torch.empty(batch, TOKENS, unet.config.cross_attention_dim)
        added = None
        if unet.config.addition_embed_type == "text_time":
            time_ids = 6 * unet.config.addition_time_embed_dim
            pooled = unet.config.projection_class_embeddings_input_dim - time_ids
            added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
    return latents, timesteps, hidden, added


# --------------------------------------------------------------------------- generation


def generate_rows(case: GenerateCase, model: Path, workdir: Path, dtype: str) -> list[Row]:
    """lorapipe's grid at batch ``case.batch_size`` against one pipeline call per image."""
    from generate_throughput import (
        CFG_SCALES,
        LORA_SCALES,
        PROMPTS,
        SEEDS,
        naive_loop,
        write_random_lora,
    )
    from PIL import Image

    from lorapipe.stages.generate import GenerateConfig, run

    lora = write_random_lora(model, workdir / "lora")
    config = GenerateConfig(
        prompts=PROMPTS[: case.prompts],
        loras={"bench_style": str(lora)},
        negative_presets=["portrait"],
        lora_scales=LORA_SCALES,
        cfg_scales=CFG_SCALES,
        seeds=SEEDS,
        samplers=["DPM++ 2M Karras"],
        steps=case.steps,
        width=case.size,
        height=case.size,
        batch_size=case.batch_size,
        dtype=dtype,
    )
    reset_peak_memory()
    report = run(str(model), str(workdir / "generated"), config)
    lorapipe_peak = peak_memory_gib()
    reset_peak_memory()
    naive_seconds, naive_images = naive_loop(model, lora, config, report)
    naive_peak = peak_memory_gib()
    worst = 0
    for name, image in naive_images.items():
        with Image.open(workdir / "generated" / "images" / name) as ours:
            difference = np.abs(np.asarray(ours, np.int16) - np.asarray(image, np.int16))
            worst = max(worst, int(difference.max()))
    lorapipe_rate = report["images"] / report["render_seconds"]
    naive_rate = len(naive_images) / naive_seconds
    label = f"generation, {case.label}, {report['images']} images"
    return [
        Row(label, f"lorapipe, batch {case.batch_size}", lorapipe_rate, "images/s", lorapipe_peak),
        Row(
            label,
            "one pipeline call per image",
            naive_rate,
            "images/s",
            naive_peak,
            note=f"lorapipe {lorapipe_rate / naive_rate:.2f}x; max pixel difference {worst}/255",
        ),
    ]


# --------------------------------------------------------------------------- the table


def bf16_dense_peak(device: str) -> float | None:
    """The device's bf16 dense peak in TFLOP/s, from the table, or None for another device."""
    return next((peak for name, peak in BF16_DENSE_PEAK_TFLOPS if name in device), None)


def reset_peak_memory() -> None:
    """Free what the last variant left (its models sit in reference cycles until collected)
    and start counting the peak again."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """``max_memory_allocated`` since the last reset; None on CPU (no per-run peak there)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (README's Performance section takes it as it is)."""
    lines = [
        "| run | variant | throughput | peak memory | achieved | of bf16 peak | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        achieved = "-" if row.flops_per_second is None else f"{human(row.flops_per_second)}FLOP/s"
        lines.append(
            f"| {row.run} | {row.variant} | {row.rate:.2f} {row.unit} "
            f"| {_or_dash(row.peak_gib, '{:.1f} GiB')} | {achieved} "
            f"| {_or_dash(row.peak_share, '{:.0%}')} | {row.note} |"
        )
    return "\n".join(lines)


def _or_dash(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


if __name__ == "__main__":
    main()
