"""``lorapipe train``: a LoRA for a Stable Diffusion model (SD 1.x, SD 2.x, SDXL), on one
process or many.

``run`` is the whole training, top to bottom: the models with LoRA adapters, the data (split,
latents cached), the optimizer, then the loop (micro-batches -> UNet -> loss -> optimizer step ->
log -> now and then a checkpoint with its validation loss and sample images, until the last step
or early stopping), then the report.
The machinery is in ``lorapipe.training``: ``data`` (examples, order, random draws), ``encoders``
(latent and caption caches), ``batches`` (samples to tensors), ``objective``, ``lora``,
``validation``, ``early_stopping``, ``samples`` (sample images), ``checkpoints`` (save, mirror,
prune, resume) and ``progress`` (bar, loss_log.csv, TensorBoard); ``published`` measures the
LoRA published now on this run's validation images at the end (``compare_with``), for select
to compare with.
The config and its checks are in ``lorapipe.train_config``.

Processes: ``lorapipe train --num-processes N`` starts N processes with accelerate (one per GPU;
on a machine without one, N CPU processes over gloo). Under ``torchrun`` or a Kubeflow
TrainJob, which set ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``, the same command joins their
process group. Each optimizer step trains on a global batch of batch_size x processes x
gradient_accumulation_steps samples; only the main process writes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lorapipe import config as config_options
from lorapipe import store, writer_lock
from lorapipe.checkpoint_layout import PUBLISHED_VALIDATION_KEY, TRAINING_REPORT_NAME
from lorapipe.errors import ConfigError, TrainingError
from lorapipe.train_config import TrainConfig, check_values, load_config

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import CLIPTokenizer

    from lorapipe.models import ModelFamily
    from lorapipe.train_config import TargetModules
    from lorapipe.training.batches import TrainingBatches
    from lorapipe.training.data import Example, SamplePlan
    from lorapipe.training.encoders import EncodeEveryStep, LatentCache
    from lorapipe.training.validation import ValidationLoss, Validator
    from lorapipe.writer_lock import WriterLock

log = logging.getLogger(__name__)


def run(train_data: str, output_dir: str, config: TrainConfig) -> dict[str, Any]:
    """Train a LoRA on ``train_data`` (a lorapipe dataset or a folder with metadata.csv) into
    ``output_dir`` (local or s3://) and return the training report.

    In a multi-process launch every process calls this; see the module docstring. The main
    process holds ``output_dir`` and ``checkpoint_mirror`` throughout (``hold_outputs``).
    """
    config = dataclasses.replace(config, train_data_dir=train_data, output_dir=output_dir)
    check_values(config)
    accelerator = _accelerator(config)
    with hold_outputs(config, writer=accelerator.is_main_process) as locks:
        return _train_holding_outputs(config, accelerator, locks)


def _train_holding_outputs(
    config: TrainConfig, accelerator: Accelerator, locks: list[WriterLock]
) -> dict[str, Any]:
    """``run`` once this run's outputs are held (``locks``: by this process, if main)."""
    import torch
    from accelerate.utils import set_seed

    from lorapipe.training import published as published_lora
    from lorapipe.training.buckets import bucket_table
    from lorapipe.training.checkpoints import Checkpointer
    from lorapipe.training.early_stopping import EarlyStopping
    from lorapipe.training.lora import lora_config_record
    from lorapipe.training.objective import per_sample_mse
    from lorapipe.training.progress import RunningLoss, TrainingLog
    from lorapipe.training.samples import TrainingSamples, prompts_for_run
    from lorapipe.training.validation import eval_mode

    started_at = _now()
    paths = OutputPaths.for_config(config)
    # what is published now, before a publish while this run trains can move it
    published = (
        published_lora.resolve_for_run(config.compare_with, accelerator)
        if config.compare_with
        else None
    )
    set_seed(config.seed)  # the same LoRA initialisation in every process
    models = load_models(config, accelerator)
    config = dataclasses.replace(config, resolution=models.resolution)
    data = load_data(config, models, paths, accelerator)
    optimizer, lr_scheduler = make_optimizer(config, models, data.total_steps)
    unet, text_encoders, optimizer = prepare_models(accelerator, models, optimizer)
    trained = [unet, *(text_encoders[name] for name in models.trained_text_encoders)]
    trainable_parameters = [p for model in trained for p in model.parameters() if p.requires_grad]
    batches, validate = batch_makers(config, models, data, text_encoders, accelerator)
    running_loss = RunningLoss()
    early_stopping = EarlyStopping(config.early_stopping_patience, config.early_stopping_epsilon)
    checkpointer = Checkpointer(
        output=paths.local,
        mirrors=paths.mirrors,
        keep_last_n=config.keep_last_n,
        accelerator=accelerator,
        unet=models.unet,
        text_encoders=models.trained_text_encoders,
        pipeline_class=models.family.pipeline_class,
        lora_record=lora_config_record(config, models.targets),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        running_loss=running_loss,
        early_stopping=early_stopping,
        plan=data.plan.signature,
        writer_locks=locks,
    )
    start_step = checkpointer.resume(config.resume)
    sample_images = TrainingSamples(
        config, models, prompts_for_run(config, data), enabled=accelerator.is_main_process
    )

    with TrainingLog(
        paths, start_step, data.total_steps, enabled=accelerator.is_main_process
    ) as progress:
        progress.text("buckets", bucket_table(data.buckets))
        for step in range(start_step, data.total_steps):
            if early_stopping.stopped:
                break  # at the last checkpoint, or the one this run resumed from
            micro_batches = data.plan.micro_batches(step, accelerator.process_index)
            step_samples = data.plan.step_samples(step)  # fewer for a bucket's remainder
            step_loss = torch.zeros((), device=accelerator.device)
            for index, samples in enumerate(micro_batches):
                with _sync_gradients(accelerator, trained, last=index == len(micro_batches) - 1):
                    batch = batches(samples)
                    with accelerator.autocast():
                        prediction = unet(
                            batch.noisy_latents,
                            batch.timesteps,
                            batch.hidden_states,
                            added_cond_kwargs=batch.added_conditioning,
                        ).sample
                    losses = per_sample_mse(prediction, batch.target) * batch.loss_weights
                    loss_share = losses.sum() / step_samples  # of the step's mean loss
                    # gradients are averaged over processes: scale so they sum instead
                    accelerator.backward(loss_share * accelerator.num_processes)
                step_loss += loss_share.detach()
            mean_loss = accelerator.reduce(step_loss, reduction="sum").item()
            _stop_if_diverged(mean_loss, step + 1, checkpointer.last)
            accelerator.clip_grad_norm_(trainable_parameters, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done, epoch = step + 1, data.plan.epoch_of(step) + 1
            running_loss.update(mean_loss)
            progress.step(done, epoch, mean_loss, lr_scheduler.get_last_lr()[0], step_samples)
            if done == data.total_steps or (config.save_steps and done % config.save_steps == 0):
                with eval_mode(*[accelerator.unwrap_model(model) for model in trained]):
                    validation = validate(models.unet, accelerator)
                progress.validation(done, validation)
                stop = early_stopping.update(done, validation.mean if validation else None)
                images = sample_images.render(done, last=stop or done == data.total_steps)
                progress.sample_images(images)
                checkpointer.save(done, epoch, data.plan.samples_seen(done), validation, images)

    report = training_report(
        config,
        models,
        data,
        started_at,
        throughput=progress.throughput,
        sample_seconds=progress.sample_seconds,
        stopped_early=early_stopping.record(data.total_steps),
    )
    if published is not None:  # by every process: the validator gathers
        _, fresh_validator = batch_makers(config, models, data, models.text_encoders, accelerator)
        report[PUBLISHED_VALIDATION_KEY] = published_lora.measure(
            published,
            models=models,
            validator=fresh_validator,
            accelerator=accelerator,
            base_model_hash=report["base_model_hash"],
        )
    if accelerator.is_main_process:
        for lock in locks:
            lock.check()  # taken over meanwhile: the report must not go over the new holder's
        if published is not None:
            published_lora.write_record(
                report[PUBLISHED_VALIDATION_KEY], paths.local, paths.mirrors
            )
        write_report(report, paths)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def _accelerator(config: TrainConfig) -> Accelerator:
    """accelerate's view of the processes (from accelerate launch or torchrun's environment);
    CPU processes talk over gloo. Only the main process logs and shows progress bars."""
    import torch
    from accelerate import Accelerator
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if not accelerator.is_main_process:
        logging.getLogger("lorapipe").setLevel(logging.WARNING)
    return accelerator


def _sync_gradients(
    accelerator: Accelerator, models: list[torch.nn.Module], *, last: bool
) -> ExitStack:
    """Gradients are all-reduced between processes only on the last micro-step of a step."""
    stack = ExitStack()
    if not last:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def _stop_if_diverged(loss: float, step: int, last_checkpoint: str | None) -> None:
    """A NaN or infinite loss ends training before the optimizer applies it."""
    if math.isfinite(loss):
        return
    then = (
        f"resume from the last good checkpoint, {last_checkpoint}"
        if last_checkpoint
        else "start again"
    )
    raise TrainingError(
        f"step {step}: the training loss is {loss}; training stopped. Lower learning_rate (or use "
        f"mixed_precision bf16 rather than fp16) and {then}"
    )


# --------------------------------------------------------------------------- where a run writes


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """Where a run writes. An s3:// output_dir is trained into a local work directory and
    mirrored; ``checkpoint_mirror`` is one more mirror. Mirrors get everything, checkpoints as
    they are written."""

    local: Path  # checkpoints, loss_log.csv, training_report.json
    logs: Path  # TensorBoard event files
    cache: Path  # latents and dataset images, shared by runs
    mirrors: list[str]

    @classmethod
    def for_config(cls, config: TrainConfig) -> OutputPaths:
        from lorapipe.models import model_cache_root

        cache = (
            Path(config.cache_dir).expanduser() if config.cache_dir else model_cache_root().parent
        )
        mirrors = [config.checkpoint_mirror] if config.checkpoint_mirror else []
        if store.is_s3(config.output_dir):
            work_id = hashlib.sha256(config.output_dir.encode()).hexdigest()[:16]
            local = cache / "train" / work_id
            mirrors.insert(0, config.output_dir)
        else:
            local = Path(config.output_dir.removeprefix("file://")).expanduser()
        if config.log_dir and store.is_s3(config.log_dir):
            raise ConfigError(
                f"log_dir '{config.log_dir}' is on S3; leave it empty to keep the logs in "
                "output_dir (mirrored there), or give a local path"
            )
        logs = Path(config.log_dir).expanduser() if config.log_dir else local / "logs"
        return cls(local=local, logs=logs, cache=cache, mirrors=list(dict.fromkeys(mirrors)))


# --------------------------------------------------------------------------- models and data


@dataclasses.dataclass
class Models:
    """The base model's parts (frozen) with LoRA adapters added."""

    family: ModelFamily  # SD 1.x, SD 2.x or SDXL: what differs between them
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: dict[str, torch.nn.Module]  # by diffusers component name, in family order
    tokenizers: list[CLIPTokenizer]
    noise_scheduler: DDPMScheduler  # with the base model's schedule and prediction type
    model_dir: Path
    targets: TargetModules  # what got adapters
    resolution: int
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel, on each side
    latent_scale: float
    weight_dtype: torch.dtype  # of the frozen weights: float16/bfloat16 under mixed precision

    @property
    def trained_text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders with adapters (none unless ``train_text_encoder``)."""
        return self.text_encoders if self.targets.text_encoder else {}


def load_models(config: TrainConfig, accelerator: Accelerator) -> Models:
    """The base model (local or s3://) on the accelerator's device, frozen, with adapters."""
    import torch
    from diffusers.training_utils import cast_training_params

    from lorapipe.models import load_base_model, model_family, resolve_model_dir
    from lorapipe.training.lora import add_adapters

    if not config.base_model:
        raise ConfigError("base_model is not set; give a diffusers-format model directory")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        config.mixed_precision, torch.float32
    )
    model_dir = resolve_model_dir(config.base_model, config_dir=config.base_model_config)
    family = model_family(str(model_dir))
    pipeline = load_base_model(str(model_dir), torch_dtype=weight_dtype)
    unet, vae = pipeline.unet, pipeline.vae
    text_encoders = {name: getattr(pipeline, name) for name in family.text_encoders}
    if family.vae_overflows_in_fp16 and weight_dtype == torch.float16:
        vae.to(torch.float32)  # kohya's no_half_vae: SDXL's VAE gives NaNs in float16
    vae.requires_grad_(False)
    targets = add_adapters(config, unet, text_encoders, unused_last_layer=family.unused_last_layer)
    for model in (unet, vae, *text_encoders.values()):
        model.to(accelerator.device)
    trained = [unet, *text_encoders.values()] if targets.text_encoder else [unet]
    cast_training_params(trained, dtype=torch.float32)  # LoRA weights train in float32
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for text_encoder in text_encoders.values() if targets.text_encoder else ():
            text_encoder.gradient_checkpointing_enable()
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = config.resolution or unet.config.sample_size * vae_scale
    return Models(
        family=family,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=[getattr(pipeline, name) for name in family.tokenizers],
        noise_scheduler=training_noise_scheduler(config, pipeline.scheduler.config),
        model_dir=model_dir,
        targets=targets,
        resolution=resolution,
        latent_channels=unet.config.in_channels,
        vae_scale_factor=vae_scale,
        latent_scale=vae.config.scaling_factor,
        weight_dtype=weight_dtype,
    )


def training_noise_scheduler(config: TrainConfig, scheduler_config: Any) -> DDPMScheduler:
    """DDPM with the base model's schedule and prediction type; ``v_parameterization`` makes
    it v-prediction and ``zero_terminal_snr`` rescales the betas (kohya's keys)."""
    from diffusers import DDPMScheduler

    changes: dict[str, Any] = {}
    if config.v_parameterization:
        changes["prediction_type"] = "v_prediction"
    if config.zero_terminal_snr:
        changes["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(scheduler_config, **changes)


@dataclasses.dataclass
class TrainingData:
    train_examples: list[Example]  # each with its bucket
    val_examples: list[Example]
    latents: LatentCache | EncodeEveryStep
    plan: SamplePlan
    total_steps: int
    buckets: dict[str, Any]  # training_report.json's bucket part (``buckets.bucket_report``)


def load_data(
    config: TrainConfig, models: Models, paths: OutputPaths, accelerator: Accelerator
) -> TrainingData:
    """The examples in their buckets, split into training and held-out, their latents cached,
    and the plan of which process trains on which samples at each step."""
    from lorapipe.training.buckets import (
        BucketRule,
        Placed,
        bucket_report,
        bucket_table,
        crop_warning,
    )
    from lorapipe.training.data import SamplePlan, load_examples, split_validation, with_buckets

    rule = BucketRule.for_training(
        models.resolution,
        enable_bucket=config.enable_bucket,
        min_bucket_reso=config.min_bucket_reso,
        max_bucket_reso=config.max_bucket_reso,
        bucket_reso_steps=config.bucket_reso_steps,
        bucket_no_upscale=config.bucket_no_upscale,
    )
    with accelerator.main_process_first():
        examples = with_buckets(load_examples(config, paths.cache / "images"), rule)
    train_examples, val_examples = split_validation(examples, config.validation_split)
    buckets = bucket_report(rule, [Placed(e.name, e.size, e.bucket) for e in train_examples])
    latents = latent_source(config, models, train_examples, val_examples, paths.cache, accelerator)
    plan = SamplePlan(
        buckets=tuple(e.bucket for e in train_examples),
        batch_size=config.batch_size,
        num_processes=accelerator.num_processes,
        accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
    )
    total_steps = config.max_train_steps or config.epochs * plan.steps_per_epoch
    log.info(
        "%d training images, %d held out; global batch %d = batch_size %d x %d processes x %d "
        "accumulation steps; %d steps, %d per epoch (%d of them shorter: a bucket's remainder)",
        len(train_examples), len(val_examples), plan.global_batch, config.batch_size,
        accelerator.num_processes, config.gradient_accumulation_steps, total_steps,
        plan.steps_per_epoch, plan.short_batches_per_epoch,
    )  # fmt: skip
    log.info(
        "%s at resolution %d, %.1f%% of pixels cropped (square training: %.1f%%):\n%s",
        "aspect-ratio buckets" if rule.enabled else "square crops", rule.resolution,
        100 * buckets["mean_crop_fraction"], 100 * buckets["square_crop_fraction"],
        bucket_table(buckets),
    )  # fmt: skip
    if warning := crop_warning(buckets):
        log.warning(warning)
    return TrainingData(train_examples, val_examples, latents, plan, total_steps, buckets)


def latent_source(
    config: TrainConfig,
    models: Models,
    train_examples: list[Example],
    val_examples: list[Example],
    cache_root: Path,
    accelerator: Accelerator,
) -> LatentCache | EncodeEveryStep:
    """A filled ``LatentCache`` (each image, and each training image's mirror if flip_aug may use
    it, encoded once; the processes share the work), or the per-step encoder when caching is off
    or crops are random."""
    from lorapipe.training.encoders import EncodeEveryStep, LatentCache, vae_identity

    if not config.cache_latents or config.crop == "random":
        if config.cache_latents:
            log.info("latent cache off: random crops differ every time (crop: center caches them)")
        return EncodeEveryStep(models.vae)
    cache = LatentCache(
        directory=cache_root / "latents",
        vae=models.vae,
        vae_id=vae_identity(models.model_dir / "vae", models.weight_dtype),
    )
    wanted = [(e, False) for e in train_examples + val_examples]
    wanted += [(e, True) for e in train_examples if config.flip_aug and e.mirrorable]
    cache.fill(wanted, accelerator.process_index, accelerator.num_processes)
    accelerator.wait_for_everyone()
    cache.fill(wanted, 0, 1)  # what processes on another machine cached there
    log.info("latent cache %s: %d latents ready", cache.directory, len(wanted))
    return cache


def batch_makers(
    config: TrainConfig,
    models: Models,
    data: TrainingData,
    text_encoders: dict[str, torch.nn.Module],
    accelerator: Accelerator,
) -> tuple[TrainingBatches, Validator]:
    """(``TrainingBatches``, ``Validator``) sharing one caption encoder over ``text_encoders``
    (as this process runs them). Captions are encoded once each when the text encoders are
    frozen and captions are fixed (no shuffle; dropout only adds the empty caption)."""
    from lorapipe.training.batches import TrainingBatches
    from lorapipe.training.encoders import CaptionEncoder
    from lorapipe.training.validation import Validator

    cache = (
        config.cache_text_encoder_outputs
        and not models.targets.text_encoder
        and not config.shuffle_caption
    )
    log.info("text-encoder outputs %s", "cached per caption" if cache else "computed every step")
    encode_captions = CaptionEncoder(
        models.tokenizers,
        list(text_encoders.values()),
        penultimate=models.family.penultimate_hidden_states,
        pooled=models.family.added_conditioning,
        cache=cache,
    )
    batches = TrainingBatches(
        config=config,
        examples=data.train_examples,
        latent_parameters=data.latents.latent_parameters,
        encode_captions=encode_captions,
        noise_scheduler=models.noise_scheduler,
        added_conditioning=models.family.added_conditioning,
        latent_channels=models.latent_channels,
        vae_scale_factor=models.vae_scale_factor,
        latent_scale=models.latent_scale,
        accelerator=accelerator,
    )
    validator = Validator(
        examples=data.val_examples,
        timesteps=config.validation_timesteps,
        latent_parameters=data.latents.latent_parameters,
        encode_captions=encode_captions,
        noise_scheduler=models.noise_scheduler,
        latent_scale=models.latent_scale,
        added_conditioning=models.family.added_conditioning,
    )
    return batches, validator


# --------------------------------------------------------------------------- optimisation


def make_optimizer(
    config: TrainConfig, models: Models, total_steps: int
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """(optimizer, learning-rate scheduler) over the LoRA parameters: AdamW, AdamW8bit
    (bitsandbytes) or SGD with momentum 0.9; the text encoder's at ``text_encoder_lr`` (SDXL's
    second at ``learning_rate_te2``)."""
    import torch
    from diffusers.optimization import get_scheduler

    groups = [{"params": _trainable(models.unet), "lr": config.learning_rate}]
    text_encoder_lr = config.text_encoder_lr or config.learning_rate
    rates = {"text_encoder": text_encoder_lr, "text_encoder_2": config.learning_rate_te2}
    for name, text_encoder in models.trained_text_encoders.items():
        groups.append({"params": _trainable(text_encoder), "lr": rates[name] or text_encoder_lr})
    if config.optimizer == "adamw":
        # fused: one kernel for every parameter's update on a GPU (torch leaves it off)
        on_gpu = models.unet.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=on_gpu)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=config.weight_decay)
    else:
        optimizer = _adamw_8bit(groups, config.weight_decay)
    schedule = config.scheduler
    if schedule == "constant" and config.lr_warmup_steps:
        schedule = "constant_with_warmup"  # diffusers' "constant" ignores warmup steps
    lr_scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=config.lr_num_cycles,
    )
    return optimizer, lr_scheduler


def _adamw_8bit(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes; CUDA only); "
            "or use optimizer: adamw"
        ) from None
    return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def prepare_models(
    accelerator: Accelerator, models: Models, optimizer: torch.optim.Optimizer
) -> tuple[torch.nn.Module, dict[str, torch.nn.Module], torch.optim.Optimizer]:
    """(unet, text encoders by name, optimizer) as this process runs them: the trained models
    wrapped for gradient all-reduce when there are several processes."""
    trained_names = list(models.trained_text_encoders)
    unet, *prepared, optimizer = accelerator.prepare(
        models.unet, *(models.text_encoders[name] for name in trained_names), optimizer
    )
    text_encoders = dict(models.text_encoders) | dict(zip(trained_names, prepared, strict=True))
    return unet, text_encoders, optimizer


def validate_checkpoint(checkpoint: str | Path, config: TrainConfig) -> ValidationLoss | None:
    """Compute the validation loss of a checkpoint again (``ValidationLoss``, or None without
    held-out images): the number in its record.json, to the last bit, for the same config."""
    from lorapipe.training.checkpoints import load_training_state
    from lorapipe.training.lora import lora_parameters
    from lorapipe.training.validation import eval_mode

    accelerator = _accelerator(config)
    paths = OutputPaths.for_config(config)
    models = load_models(config, accelerator)
    config = dataclasses.replace(config, resolution=models.resolution)
    data = load_data(config, models, paths, accelerator)
    trainable, _, _ = load_training_state(Path(checkpoint))
    for name, parameter in lora_parameters(models.unet, models.trained_text_encoders).items():
        parameter.data.copy_(trainable[name])
    _, validate = batch_makers(config, models, data, models.text_encoders, accelerator)
    with eval_mode(models.unet, *models.text_encoders.values()):
        return validate(models.unet, accelerator)


# --------------------------------------------------------------------------- report


def training_report(
    config: TrainConfig,
    models: Models,
    data: TrainingData,
    started_at: str,
    *,
    throughput: float | None,
    sample_seconds: float,
    stopped_early: dict[str, Any] | None,
) -> dict[str, Any]:
    """``training_report.json``: the resolved config and what the run trained on; the training
    throughput and the seconds spent on sample images are this attempt's. ``steps`` are the
    steps trained: fewer than planned when the run ``stopped_early`` (``EarlyStopping.record``)."""
    from lorapipe.captions import split_caption
    from lorapipe.training.lora import lora_config_record

    tags = collections.Counter(
        tag for e in data.train_examples for tag in (e.tags or split_caption(e.caption))
    )
    steps = stopped_early["step"] if stopped_early else data.total_steps
    return {
        "config": config.to_dict(),
        "base_model": config.base_model,
        "model_family": models.family.name,
        "prediction_type": models.noise_scheduler.config.prediction_type,
        "base_model_hash": _unet_weights_hash(models.model_dir),
        "num_train_images": len(data.train_examples),
        "num_val_images": len(data.val_examples),
        "resolution": models.resolution,
        "tag_frequency": dict(tags.most_common()),
        "started_at": started_at,
        "finished_at": _now(),
        "global_batch_size": data.plan.global_batch,
        "num_processes": data.plan.num_processes,
        "steps": steps,
        "stopped_early": stopped_early,
        "short_batches": data.plan.short_batches(steps),
        **data.buckets,
        "epochs": math.ceil(steps / data.plan.steps_per_epoch),
        "lora": lora_config_record(config, models.targets),
        "samples_per_second": throughput,
        "sample_seconds": round(sample_seconds, 3),
    }


def write_report(report: dict[str, Any], paths: OutputPaths) -> None:
    """Write the report locally, then send the report, loss log and logs to every mirror."""
    from lorapipe.training.progress import LOSS_LOG_NAME

    path = paths.local / TRAINING_REPORT_NAME
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)
    for mirror_uri in paths.mirrors:
        store.upload_file(paths.local / LOSS_LOG_NAME, store.join(mirror_uri, LOSS_LOG_NAME))
        if paths.logs.is_dir():
            store.put_dir(paths.logs, store.join(mirror_uri, "logs"))
        store.upload_file(path, store.join(mirror_uri, TRAINING_REPORT_NAME))
    log.info(
        "wrote %s%s", path, f" (mirrored to {', '.join(paths.mirrors)})" if paths.mirrors else ""
    )


def _unet_weights_hash(model_dir: Path) -> str:
    digest = hashlib.sha256()
    weights = sorted((model_dir / "unet").glob("*.safetensors")) or sorted(
        (model_dir / "unet").glob("*.bin")
    )
    for path in weights:
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="YAML file of config keys (the seed's my_film_config.yaml works as is)"
    )
    config_options.add_arguments(parser, TrainConfig)
    parser.epilog = "Every config key is also a flag, which overrides the file."


def main(args: argparse.Namespace) -> int:
    train_config = load_config(args.config, config_options.overrides_from_args(args, TrainConfig))
    code = train(train_config)
    if code == 0 and os.environ.get("RANK", "0") == "0":
        print(train_config.output_dir)
    return code


def train(train_config: TrainConfig) -> int:
    """What ``lorapipe train`` and the pipeline's train step do with a loaded config: train on
    ``num_nodes`` nodes through a TrainJob, in ``num_processes`` processes launched here, or in
    this process (also when a launcher started it). Returns the launched processes' exit code.
    """
    train_config = with_run_folder(train_config)
    if train_config.num_nodes > 1:
        from lorapipe import trainjob

        trainjob.train_on_nodes(train_config)  # each node's main process holds the output
        return 0
    # held before anything slow, so that a second run into the same output stops at once
    with hold_outputs(train_config, writer=os.environ.get("RANK", "0") == "0"):
        if train_config.num_processes > 1 and "WORLD_SIZE" not in os.environ:
            return launch(train_config)  # its processes share this process's locks
        run(train_config.train_data_dir, train_config.output_dir, train_config)
    return 0


@contextlib.contextmanager
def hold_outputs(config: TrainConfig, *, writer: bool) -> Iterator[list[WriterLock]]:
    """``output_dir`` and ``checkpoint_mirror`` held for the block (``writer_lock.hold``) when
    this process is the one that writes; none held by the others (a launch's workers other than
    the main one), so that they never wait for their own run's lock."""
    outputs = [config.output_dir, config.checkpoint_mirror] if writer else []
    with ExitStack() as stack:
        yield [stack.enter_context(writer_lock.hold(uri)) for uri in dict.fromkeys(outputs) if uri]


def with_run_folder(train_config: TrainConfig) -> TrainConfig:
    """``checkpoint_mirror`` joined with ``run_id``: this run's own folder on the mirror."""
    if not (train_config.run_id and train_config.checkpoint_mirror):
        return train_config
    return dataclasses.replace(
        train_config,
        checkpoint_mirror=store.join(
            train_config.checkpoint_mirror, store.safe_name(train_config.run_id)
        ),
        run_id="",
    )


def processes_for_gpus(num_gpus: int) -> int:
    """Processes for a pod given ``num_gpus`` GPUs: one per GPU it can see, else one."""
    import torch

    return min(max(num_gpus, 1), torch.cuda.device_count()) or 1


def metrics(training_output: str) -> dict[str, Any]:
    """The values the KFP UI shows for a finished training (from its report)."""
    report = json.loads(store.read_text(store.join(training_output, TRAINING_REPORT_NAME)))
    return {
        "steps": report["steps"],
        "train_images": report["num_train_images"],
        "validation_images": report["num_val_images"],
        "samples_per_second": report["samples_per_second"],
        "processes": report["num_processes"],
    }


def launch(config: TrainConfig) -> int:
    """Run this command again in ``num_processes`` processes with accelerate: one per GPU, or
    CPU processes over gloo on a machine without one. (``accelerate launch --cpu`` would start
    only one; ``--multi_gpu`` with a CPU Accelerator in the script starts them all.)"""
    import torch

    from lorapipe.models import resolve_model_dir

    # a wrong model fails here, in one line
    resolve_model_dir(config.base_model or "", config_dir=config.base_model_config)
    if torch.cuda.is_available() and config.num_processes > torch.cuda.device_count():
        raise ConfigError(
            f"num_processes {config.num_processes} is more than the {torch.cuda.device_count()} GPUs here"
        )
    with tempfile.TemporaryDirectory(prefix="lorapipe-train-") as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(config.num_processes), "--num_machines", "1",
            "--mixed_precision", config.mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()),
            "-m", "lorapipe.cli", "train", "--config", str(resolved),
        ]  # fmt: skip
        log.info("launching %d processes: %s", config.num_processes, " ".join(command))
        return subprocess.call(command)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
