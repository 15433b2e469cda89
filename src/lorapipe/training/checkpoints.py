"""Checkpoints: never half-written, mirrored to S3, pruned without losing the best, resumable.

The layout (what ``lorapipe select`` reads) is ``lorapipe.checkpoint_layout``'s.

A checkpoint is assembled in a hidden directory next to the others, given ``_COMPLETE``, then
renamed into place, so a crash at any moment leaves either a complete checkpoint or none. A
mirror (an s3:// prefix) receives every other file first and ``_COMPLETE`` last.

``training_state/`` holds the trainable (LoRA) parameters by their own names
(``trainable.safetensors``), the optimizer state (``optimizer.pt``, loaded with
``weights_only=True``: no pickled code), and ``state.json``: step, epoch, the data plan, the
learning-rate scheduler, the fp16 gradient scaler, the running loss, the early-stopping state,
and every process's torch, numpy and Python random states.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorapipe import store
from lorapipe.checkpoint_layout import (
    COMPLETE_MARKER,
    LORA_CONFIG_NAME,
    OPTIMIZER_NAME,
    RECORD_NAME,
    SAMPLES_DIR,
    STAGING_PREFIX,
    STATE_DIR,
    STATE_NAME,
    TRAINABLE_NAME,
    checkpoint_name,
    complete_checkpoints,
    read_losses,
)
from lorapipe.errors import TrainingError
from lorapipe.selection_rule import DEFAULT_EPSILON, steps_to_keep
from lorapipe.training.lora import lora_parameters, save_lora_weights
from lorapipe.training.progress import LOSS_LOG_NAME

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from torch.optim.lr_scheduler import LRScheduler

    from lorapipe.training.early_stopping import EarlyStopping
    from lorapipe.training.progress import RunningLoss
    from lorapipe.training.samples import RenderedSamples
    from lorapipe.training.validation import ValidationLoss
    from lorapipe.writer_lock import WriterLock

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- writing


def staging_dir(output: Path, step: int) -> Path:
    """A fresh hidden directory to assemble checkpoint ``step`` in."""
    output.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=output, prefix=f"{STAGING_PREFIX}{step}-"))


def publish(staging: Path, output: Path, step: int) -> Path:
    """Mark the assembled checkpoint complete and move it into place (replacing an older
    checkpoint of the same step, e.g. from a run that was resumed from an earlier one)."""
    (staging / COMPLETE_MARKER).write_text("")
    destination = output / checkpoint_name(step)
    if destination.exists():
        _remove_checkpoint(destination)
    staging.rename(destination)
    return destination


def remove_stale_staging(output: Path) -> None:
    """Delete checkpoints a crash left half-assembled."""
    for leftover in output.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def mirror(checkpoint: Path, mirror_uri: str) -> None:
    """Copy a complete local checkpoint to ``mirror_uri/checkpoint-<step>``, marker last."""
    destination = store.join(mirror_uri, checkpoint.name)
    with tempfile.TemporaryDirectory(prefix="lorapipe-mirror-") as tmp:
        unmarked = Path(tmp) / checkpoint.name
        shutil.copytree(checkpoint, unmarked, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
        store.put_dir(unmarked, destination)
    store.write_bytes(store.join(destination, COMPLETE_MARKER), b"")


def _remove_checkpoint(directory: Path) -> None:
    (directory / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(directory)


def _remove_mirrored(mirror_uri: str, step: int) -> None:
    prefix = store.join(mirror_uri, checkpoint_name(step))
    store.delete(store.join(prefix, COMPLETE_MARKER))
    for uri in store.list_uris(prefix):
        store.delete(uri)


# --------------------------------------------------------------------------- pruning


def prune(output: Path, keep_last_n: int, mirrors: Iterable[str]) -> list[int]:
    """Delete all but the newest ``keep_last_n`` checkpoints, locally and on the mirrors, never
    one that ``lorapipe select`` could choose at its default epsilon (``selection_rule``).
    Returns the deleted steps."""
    checkpoints = {step: Path(uri) for step, uri in complete_checkpoints(str(output)).items()}
    if keep_last_n <= 0 or len(checkpoints) <= keep_last_n:
        return []
    losses = [read_losses(path, step) for step, path in checkpoints.items()]
    keep = set(list(checkpoints)[-keep_last_n:]) | steps_to_keep(losses, epsilon=DEFAULT_EPSILON)
    deleted = [step for step in checkpoints if step not in keep]
    for step in deleted:
        _remove_checkpoint(checkpoints[step])
        for mirror_uri in mirrors:
            _remove_mirrored(mirror_uri, step)
    return deleted


# --------------------------------------------------------------------------- resuming


def find_resume_point(resume: str, output: Path, mirrors: Iterable[str]) -> Path | None:
    """The local directory of the checkpoint ``resume`` names: ``latest`` (the newest complete
    one here or on a mirror, downloaded if needed; None when there is none yet), a local
    checkpoint directory, or an s3:// checkpoint prefix (downloaded). Without ``resume``, the
    output must hold no checkpoints: another run's would be mixed with this one's."""
    candidates: dict[int, str | Path] = {}
    if resume in ("", "latest"):
        for mirror_uri in mirrors:
            candidates.update(complete_checkpoints(mirror_uri))
        candidates.update(
            {step: Path(uri) for step, uri in complete_checkpoints(str(output)).items()}
        )
    if not resume:
        if candidates:
            raise TrainingError(
                f"{output} already holds checkpoints (the newest is {checkpoint_name(max(candidates))}); "
                "continue that run with --resume latest, or give a new output_dir"
            )
        return None
    if resume == "latest":
        if not candidates:
            log.info("resume latest: no complete checkpoint yet; starting from step 0")
            return None
        step = max(candidates)
        source = candidates[step]
        if isinstance(source, Path):
            return source
        return _download(source, output, output / checkpoint_name(step))
    if store.is_s3(resume):
        if not store.exists(store.join(resume, COMPLETE_MARKER)):
            raise TrainingError(
                f"resume: '{resume}' is not a complete checkpoint (no {COMPLETE_MARKER})"
            )
        name = resume.rstrip("/").rsplit("/", 1)[-1]
        return _download(resume, output, output / ".resume" / name)
    directory = Path(resume.removeprefix("file://")).expanduser()
    if not (directory / COMPLETE_MARKER).is_file():
        raise TrainingError(
            f"resume: '{resume}' is not a complete checkpoint (no {COMPLETE_MARKER}); "
            "give a checkpoint-<step> directory or 'latest'"
        )
    return directory


def _download(uri: str, output: Path, destination: Path) -> Path:
    """Download a checkpoint into a hidden directory of ``output``, then rename it into place."""
    log.info("downloading checkpoint %s", uri)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output, prefix=f"{STAGING_PREFIX}download-"))
    try:
        store.get_dir(uri, staging)
        if destination.exists():
            shutil.rmtree(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


# --------------------------------------------------------------------------- training state


def save_training_state(
    directory: Path,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: t.detach().contiguous().cpu() for name, t in trainable.items()},
        directory / TRAINABLE_NAME,
    )
    torch.save(optimizer_state, directory / OPTIMIZER_NAME)
    (directory / STATE_NAME).write_text(json.dumps(state, indent=1))


def load_training_state(
    directory: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable parameters, optimizer state, state.json) of a checkpoint's training_state/."""
    state_dir = directory / STATE_DIR
    if not (state_dir / STATE_NAME).is_file():
        raise TrainingError(
            f"resume: {directory} has no {STATE_DIR}/{STATE_NAME}; it was not written by "
            "`lorapipe train`, so it cannot be resumed"
        )
    trainable = load_file(state_dir / TRAINABLE_NAME)
    optimizer_state = torch.load(state_dir / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
    state = json.loads((state_dir / STATE_NAME).read_text())
    return trainable, optimizer_state, state


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python random states, as JSON values."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": _bytes_to_text(torch.get_rng_state()),
        "cuda": [_bytes_to_text(s) for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gauss],
        "python": [version, list(python_state), gauss_next],
    }


def restore_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(_text_to_bytes(saved["torch"]))
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_bytes(s) for s in saved["cuda"]])
    kind, keys, position, has_gauss, cached_gauss = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, python_state, gauss_next = saved["python"]
    random.setstate((version, tuple(python_state), gauss_next))


def _bytes_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# --------------------------------------------------------------------------- one run's checkpoints


@dataclass
class Checkpointer:
    """Saves this run's checkpoints and resumes it from one. Every process calls both: random
    states are gathered from all of them, and only the main process writes."""

    output: Path
    mirrors: list[str]
    keep_last_n: int
    accelerator: Accelerator
    unet: UNet2DConditionModel  # unwrapped, with adapters
    # the trained text encoders, unwrapped, with adapters, by component name (empty: none)
    text_encoders: dict[str, torch.nn.Module]
    pipeline_class: str  # the family's diffusers pipeline: it writes the LoRA file
    lora_record: dict[str, Any]  # lora_config.json
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    running_loss: RunningLoss
    early_stopping: EarlyStopping
    plan: dict[str, int | str]  # data.SamplePlan.signature
    # this run's outputs, held by this process (main) or none: checked before each upload
    writer_locks: Sequence[WriterLock] = ()
    last: str | None = None  # the newest complete checkpoint of this run
    elapsed_before: float = 0.0  # training seconds of earlier attempts
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def resume(self, resume: str) -> int:
        """Restore the checkpoint ``resume`` names (see ``find_resume_point``): LoRA parameters,
        optimizer, scheduler, running loss, early-stopping state and this process's random
        states. Returns the step to continue from (0 when there is nothing to resume)."""
        if self.accelerator.is_main_process:
            remove_stale_staging(self.output)
        with self.accelerator.main_process_first():
            checkpoint = find_resume_point(resume, self.output, self.mirrors)
        if checkpoint is None:
            return 0
        trainable, optimizer_state, state = load_training_state(checkpoint)
        if state["plan"] != self.plan:
            raise TrainingError(
                f"resume: {checkpoint} was trained with {state['plan']} but this run has "
                f"{self.plan}; resume with the same data, seed and global batch"
            )
        parameters = lora_parameters(self.unet, self.text_encoders)
        if set(parameters) != set(trainable):
            raise TrainingError(
                f"resume: {checkpoint} has LoRA parameters for other layers than this run; "
                "resume with the same target_modules and train_text_encoder"
            )
        for name, parameter in parameters.items():
            parameter.data.copy_(trainable[name])
        self.optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.running_loss.load_state_dict(state["running_loss"])
        if "early_stopping" in state:  # checkpoints of earlier versions start it afresh
            self.early_stopping.load_state_dict(state["early_stopping"])
        if state["grad_scaler"] and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self._restore_random_states(checkpoint, state["rng"])
        self.last, self.elapsed_before, self.started = (
            str(checkpoint),
            state["elapsed"],
            time.perf_counter(),
        )
        log.info("resumed from %s at step %d", checkpoint, state["step"])
        return state["step"]

    def _restore_random_states(self, checkpoint: Path, saved: list[dict[str, Any]]) -> None:
        if len(saved) == self.accelerator.num_processes:
            restore_rng_state(saved[self.accelerator.process_index])
            return
        log.warning(
            "resume: %s was written by %d processes, this run has %d; global random states are "
            "not restored (each sample's own draws do not depend on them)",
            checkpoint,
            len(saved),
            self.accelerator.num_processes,
        )

    def save(
        self,
        step: int,
        epoch: int,
        samples_seen: int,
        validation: ValidationLoss | None,
        samples: RenderedSamples | None = None,
    ) -> None:
        """Write ``checkpoint-<step>`` with a record of the losses since the last one, the
        ``ValidationLoss`` (or None) and its sample images (if rendered, in ``samples/``),
        mirror it and prune old ones."""
        from accelerate.utils import gather_object

        rng_states = gather_object([rng_state()])
        record = {
            "step": step,
            "epoch": epoch,
            "train_loss_mean": self.running_loss.take_mean(),
            "train_loss_ema": self.running_loss.ema,
            "val_loss": validation.mean if validation else None,
            "val_loss_by_timestep": validation.by_timestep if validation else {},
            "learning_rate": self.lr_scheduler.get_last_lr()[0],
            "samples_seen": samples_seen,
            "wall_time": self.elapsed,
        }
        self.last = str(self.output / checkpoint_name(step))
        if self.accelerator.is_main_process:
            self._write(step, record, rng_states, samples)
        self.accelerator.wait_for_everyone()

    def _write(
        self,
        step: int,
        record: dict[str, Any],
        rng_states: list[dict[str, Any]],
        samples: RenderedSamples | None,
    ) -> None:
        staging = staging_dir(self.output, step)
        try:
            save_lora_weights(staging, self.unet, self.text_encoders, self.pipeline_class)
            (staging / LORA_CONFIG_NAME).write_text(json.dumps(self.lora_record, indent=1))
            (staging / RECORD_NAME).write_text(json.dumps(record, indent=1))
            if samples:
                samples.write(staging / SAMPLES_DIR)
            state = {
                "step": step,
                "epoch": record["epoch"],
                "plan": self.plan,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "running_loss": self.running_loss.state_dict(),
                "early_stopping": self.early_stopping.state_dict(),
                "grad_scaler": self.accelerator.scaler.state_dict()
                if self.accelerator.scaler
                else None,
                "elapsed": record["wall_time"],
                "rng": rng_states,
            }
            trainable = lora_parameters(self.unet, self.text_encoders)
            save_training_state(staging / STATE_DIR, trainable, self.optimizer.state_dict(), state)
            published = publish(staging, self.output, step)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # e.g. disk full: no half checkpoint
            raise
        for lock in self.writer_locks:
            lock.check()  # a run whose lease was taken over must not upload into the new run's
        for mirror_uri in self.mirrors:
            mirror(published, mirror_uri)
            store.upload_file(self.output / LOSS_LOG_NAME, store.join(mirror_uri, LOSS_LOG_NAME))
        has_validation = record["val_loss"] is not None
        validation = f", validation loss {record['val_loss']:.5f}" if has_validation else ""
        log.info("saved %s (EMA loss %.5f%s)", published, record["train_loss_ema"], validation)
        deleted = prune(self.output, self.keep_last_n, self.mirrors)
        if deleted:
            log.info("keep_last_n %d: deleted checkpoints %s", self.keep_last_n, deleted)
