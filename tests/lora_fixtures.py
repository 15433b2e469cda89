"""LoRAs and training outputs built the way train builds them, for tests of the stages after it.

A LoRA is a PEFT adapter on the tiny pipeline's UNet (and text encoders: SDXL's both) with
random, non-zero weights, saved with the pipeline class's ``save_lora_weights(dir,
unet_lora_layers=get_peft_model_state_dict(unet), ...)``; a training output is
``checkpoint-<step>/`` directories with that file, ``lora_config.json``, ``record.json`` and
``_COMPLETE``, plus ``training_report.json`` (see "Training output layout" in the contracts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lorapipe.training.buckets import BucketRule, Placed, bucket_report

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# every layer kind kohya's LoCon touches in an SD 1.x UNet: attention, feed-forward,
# projections, resnet convs and time embeddings, down/upsampler convs
UNET_ALL_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv",
)  # fmt: skip
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def add_random_lora(
    pipeline: Any,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    unet_targets: Sequence[str] = UNET_ATTENTION_TARGETS,
    text_encoder_targets: Sequence[str] = (),
    seed: int = 0,
) -> None:
    """Give ``pipeline`` a LoRA adapter named "default" with random non-zero weights, as if
    trained (a fresh PEFT adapter has lora_B = 0 and would change nothing)."""
    from peft import LoraConfig, inject_adapter_in_model

    pipeline.unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(unet_targets)),
        adapter_name="default",
    )
    if text_encoder_targets:
        # peft directly: transformers' own add_adapter wants a newer peft than is installed
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(text_encoder_targets))
        for text_encoder in _text_encoders(pipeline):
            inject_adapter_in_model(config, text_encoder, adapter_name="default")
            text_encoder.peft_config = {"default": config}
    randomize_lora(pipeline, seed=seed)


def _text_encoders(pipeline: Any) -> list[Any]:
    return [
        model
        for model in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None))
        if model is not None
    ]


def randomize_lora(pipeline: Any, *, seed: int) -> None:
    """New random values for every LoRA weight of ``pipeline`` (a different "training step")."""
    generator = torch.Generator().manual_seed(seed)
    for model in (pipeline.unet, *_text_encoders(pipeline)):
        for name, parameter in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                with torch.no_grad():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def lora_state_dicts(pipeline: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The ``*_lora_layers`` arguments of ``save_lora_weights``, as train passes them."""
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": get_peft_model_state_dict(pipeline.unet)}
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(getattr(pipeline, component, None), "peft_config", None):
            layers[f"{component}_lora_layers"] = get_peft_model_state_dict(
                getattr(pipeline, component)
            )
    return layers


def save_lora(pipeline: Any, directory: Path) -> Path:
    """``pytorch_lora_weights.safetensors`` in ``directory``, exactly as train saves it."""
    type(pipeline).save_lora_weights(directory, **lora_state_dicts(pipeline))
    return directory / "pytorch_lora_weights.safetensors"


def record(
    step: int,
    *,
    val_loss: float | None,
    train_loss_ema: float,
    epoch: int = 1,
    by_timestep: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """A checkpoint's ``record.json`` contents."""
    if by_timestep is None and val_loss is not None:
        by_timestep = {"100": val_loss * 1.5, "500": val_loss, "900": val_loss * 0.5}
    return {
        "step": step,
        "epoch": epoch,
        "train_loss_mean": train_loss_ema * 1.1,
        "train_loss_ema": train_loss_ema,
        "val_loss": val_loss,
        "val_loss_by_timestep": dict(by_timestep or {}),
        "learning_rate": 1e-4,
        "samples_seen": step * 4,
        "wall_time": 10.0 * step,
    }


def training_report(model_dir: Path, *, output_name: str | None = "film_style") -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_data_dir": "data/film_street",
        "base_model": str(model_dir),
        "lora_rank": 4,
        "lora_alpha": 8.0,
        "learning_rate": 1e-4,
        "seed": 42,
        "save_steps": 100,
    }
    if output_name:
        config["output_name"] = output_name
    return {
        "config": config,
        "base_model": str(model_dir),
        "base_model_hash": "ab" * 32,
        "num_train_images": 12,
        "num_val_images": 2,
        "resolution": 64,
        "tag_frequency": {"film grain": 12, "street": 9, "night": 4},
        "started_at": "2025-01-02T03:04:05Z",
        "finished_at": "2025-01-02T04:04:05Z",
        "global_batch_size": 4,
        "steps": 300,
        "epochs": 3,
        # what train reports about its buckets: 8 portraits and 4 squares
        **bucket_report(
            BucketRule(resolution=64, min_reso=32, max_reso=128, step=8),
            [Placed(f"p{i}.png", (512, 768), (48, 72)) for i in range(8)]
            + [Placed(f"s{i}.png", (512, 512), (64, 64)) for i in range(4)],
        ),
    }


def write_training_output(
    root: Path,
    pipeline: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    incomplete_steps: Sequence[int] = (),
    report: Mapping[str, Any] | None = None,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
) -> dict[int, dict[str, torch.Tensor]]:
    """Write a training output with one complete checkpoint per record (each with its own
    random LoRA weights, seeded by ``seed`` + step: another seed, another run) and the
    incomplete ones; return {step: LoRA layers}."""
    saved: dict[int, dict[str, torch.Tensor]] = {}
    for step in [r["step"] for r in records] + list(incomplete_steps):
        checkpoint = root / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        randomize_lora(pipeline, seed=seed + step)
        save_lora(pipeline, checkpoint)
        saved[step] = {
            key: value.clone()
            for layers in lora_state_dicts(pipeline).values()
            for key, value in layers.items()
        }
        (checkpoint / "lora_config.json").write_text(
            json.dumps(
                {
                    "rank": rank,
                    "alpha": alpha,
                    "unet_target_modules": list(
                        pipeline.unet.peft_config["default"].target_modules
                    ),
                    "text_encoder_target_modules": [],
                }
            )
        )
        (checkpoint / "training_state").mkdir()
        (checkpoint / "training_state" / "optimizer.bin").write_bytes(b"optimizer state")
        matching = [r for r in records if r["step"] == step]
        if matching:
            (checkpoint / "record.json").write_text(json.dumps(matching[0]))
            (checkpoint / "_COMPLETE").write_text("")
    if report is not None:
        (root / "training_report.json").write_text(json.dumps(report))
    (root / "loss_log.csv").write_text("step,epoch,loss,lr\n1,1,0.5,0.0001\n")
    return saved


def selected_lora_folder(folder: Path) -> Path:
    """A folder laid out as ``lorapipe select`` writes it (the files' bytes are stand-ins)."""
    folder.mkdir()
    (folder / "filmstyle.safetensors").write_bytes(b"kohya")
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"diffusers")
    files = {"kohya": "filmstyle.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}
    (folder / "report.json").write_text(json.dumps({"files": files}))
    return folder


def publish_folder(lora_dir: Path | str, publish_uri: str, run_id: str):
    """Publish ``lora_dir`` under ``publish_uri/<run_id>/`` and point latest.json at it, as
    select does with ``promote: always``; the run's ``publication.RunRecord``."""
    from lorapipe.publication import Candidate, publishing

    candidate = Candidate(
        run_id, fingerprint="", checkpoint_step=0, val_loss=None, base_model_hash=None
    )
    with publishing(publish_uri) as published:
        record = published.record(candidate, None, promote="always", epsilon=0.0)
        published.publish(lora_dir, record)
    return record
