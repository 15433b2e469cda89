"""The training output's on-disk contract, owned here: what train writes and select reads.

Layout of a training output (a local directory or an s3:// prefix)::

    checkpoint-<step>/
      pytorch_lora_weights.safetensors   the LoRA, as StableDiffusionPipeline.save_lora_weights writes it
      lora_config.json                   rank, alpha, target modules per model
      record.json                        step, epoch, training and validation losses
      training_state/                    what resuming needs (see ``training.checkpoints``)
      samples/                           sample images, if rendered (see ``training.samples``):
        p<NN>_seed<S>.png                  prompt NN (1-based) at seed S, A1111 `parameters` text
        samples.json                       step, seconds and each image's parameters
      _COMPLETE                          written last: without it a checkpoint does not count
    .staging-checkpoint-<step>-*/        a checkpoint being assembled (never read)
    loss_log.csv, training_report.json
    published_validation.json            with ``compare_with``: the published LoRA's validation
                                         loss on this run's images (``training.published``)

Torch-free on purpose: ``lorapipe select`` runs in the CPU image and reads this layout too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapipe import store
from lorapipe.errors import InputError, ObjectNotFoundError

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
COMPLETE_MARKER = "_COMPLETE"
RECORD_NAME = "record.json"
LORA_CONFIG_NAME = "lora_config.json"
STATE_DIR = "training_state"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
STATE_NAME = "state.json"
STAGING_PREFIX = ".staging-checkpoint-"
TRAINING_REPORT_NAME = "training_report.json"
LOSS_LOG_NAME = "loss_log.csv"  # step, epoch, loss, lr of every step
# the published LoRA measured on this run's validation images; also the training report's key
PUBLISHED_VALIDATION_NAME = "published_validation.json"
PUBLISHED_VALIDATION_KEY = "published_validation"
# a pipeline sweep's run: its name and overrides (``lorapipe sweep`` writes sweep.json instead)
SWEEP_RUN_NAME = "sweep_run.json"
# sample images rendered at a checkpoint, and their index (what each is: prompt, seed, ...)
SAMPLES_DIR = "samples"
SAMPLES_INDEX_NAME = "samples.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


# --------------------------------------------------------------------------- finding


def find_checkpoints(output_uri: str) -> tuple[dict[int, str], dict[int, str]]:
    """({step: uri} of complete checkpoints, {step: uri} of those holding files but no
    ``_COMPLETE``), sorted by step, under a local directory or an s3:// prefix."""
    if store.is_s3(output_uri):
        files_by_step = _s3_files_by_step(output_uri)
    else:
        files_by_step = _local_files_by_step(Path(output_uri.removeprefix("file://")))
    complete, incomplete = {}, {}
    for step, (name, has_marker, has_files) in sorted(files_by_step.items()):
        if has_marker:
            complete[step] = store.join(output_uri, name)
        elif has_files:
            incomplete[step] = store.join(output_uri, name)
    return complete, incomplete


def complete_checkpoints(output_uri: str) -> dict[int, str]:
    """{step: uri} of the complete checkpoints, sorted by step."""
    return find_checkpoints(output_uri)[0]


def _s3_files_by_step(output_uri: str) -> dict[int, tuple[str, bool, bool]]:
    base = output_uri.rstrip("/") + "/"
    try:
        uris = store.list_uris(output_uri)
    except ObjectNotFoundError as error:
        raise InputError(f"training output '{output_uri}' does not exist") from error
    found: dict[int, tuple[str, bool, bool]] = {}
    for uri in uris:
        top, _, rest = uri.removeprefix(base).partition("/")
        match = CHECKPOINT_DIR.fullmatch(top)
        if match and rest:
            step = int(match.group(1))
            has_marker = found.get(step, (top, False, True))[1] or rest == COMPLETE_MARKER
            found[step] = (top, has_marker, True)
    return found


def _local_files_by_step(output: Path) -> dict[int, tuple[str, bool, bool]]:
    """The marker is looked up directly rather than by a recursive listing, which could race
    with a checkpoint being renamed into place."""
    found: dict[int, tuple[str, bool, bool]] = {}
    for directory in output.glob("checkpoint-*") if output.is_dir() else ():
        match = CHECKPOINT_DIR.fullmatch(directory.name)
        if not match or not directory.is_dir():
            continue
        has_marker = (directory / COMPLETE_MARKER).is_file()
        has_files = has_marker or any(path.is_file() for path in directory.rglob("*"))
        found[int(match.group(1))] = (directory.name, has_marker, has_files)
    return found


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CheckpointLosses:
    """The losses train recorded for one complete checkpoint."""

    step: int
    epoch: int | None = None
    train_loss_mean: float | None = None
    train_loss_ema: float | None = None
    val_loss: float | None = None
    val_loss_by_timestep: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        """The metric if it was recorded and is finite."""
        value = getattr(self, metric)
        return value if value is not None and math.isfinite(value) else None


def read_json(uri: str) -> dict[str, Any]:
    """A JSON object of the layout (record, LoRA config, training report); a damaged one is a
    one-line InputError."""
    try:
        value = json.loads(store.read_text(uri))
    except ObjectNotFoundError as error:
        raise InputError(
            f"{uri} is missing; the checkpoint is damaged, retrain or delete it"
        ) from error
    except json.JSONDecodeError as error:
        raise InputError(f"{uri} line {error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(value, dict):
        raise InputError(f"{uri}: expected a JSON object")
    return value


def read_record(checkpoint_uri: str | Path) -> dict[str, Any]:
    """A checkpoint's ``record.json`` as written."""
    return read_json(store.join(checkpoint_uri, RECORD_NAME))


def read_losses(checkpoint_uri: str | Path, step: int) -> CheckpointLosses:
    """The losses in a checkpoint's ``record.json``; the step is the directory's."""
    record_uri = store.join(checkpoint_uri, RECORD_NAME)
    record = read_json(record_uri)
    try:
        return CheckpointLosses(
            step=step,
            epoch=None if record.get("epoch") is None else int(record["epoch"]),
            train_loss_mean=_optional_float(record.get("train_loss_mean")),
            train_loss_ema=_optional_float(record.get("train_loss_ema")),
            val_loss=_optional_float(record.get("val_loss")),
            val_loss_by_timestep={
                str(t): float(v) for t, v in (record.get("val_loss_by_timestep") or {}).items()
            },
        )
    except (TypeError, ValueError, AttributeError) as error:
        raise InputError(
            f"{record_uri}: {error}; expected numbers (or null) for the losses"
        ) from error


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_samples(checkpoint_uri: str | Path) -> dict[str, Any] | None:
    """A checkpoint's ``samples/samples.json`` (``{"step", "seconds", "samples": [...]}``),
    or None when training rendered none there."""
    index_uri = store.join(checkpoint_uri, SAMPLES_DIR, SAMPLES_INDEX_NAME)
    if not store.exists(index_uri):
        return None
    return read_json(index_uri)


def read_published_validation(training_uri: str | Path) -> dict[str, Any] | None:
    """A training output's ``published_validation.json`` (the published LoRA measured on the
    run's validation images, see ``training.published``), or None when the run measured
    nothing (``compare_with`` empty)."""
    uri = store.join(training_uri, PUBLISHED_VALIDATION_NAME)
    if not store.exists(uri):
        return None
    return read_json(uri)
