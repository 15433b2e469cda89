"""The published LoRA, measured on this run's validation images (``compare_with``).

Scheduled retraining moves ``latest.json`` to a new LoRA only if it is not worse than the one
published now, judged on the same images with the same deterministic validation loss
(``training.validation``). select decides on a CPU without the base model, so train, which has
the models, the latent cache and the held-out images loaded, does the measuring: at the end of
training it writes ``published_validation.json`` (``checkpoint_layout``) and select compares.

**Resolution**, once at the start of training, so that a publish while this run trains does
not change what is measured: ``<compare_with>/latest.json`` (select's pointer) names the
published run and its folder; else ``compare_with`` is itself such a folder (holding
``pytorch_lora_weights.safetensors``) or a ``.safetensors`` file. Nothing there is a first run
(``none_published``); a ``.safetensors`` file that does not exist is a config error. The file is
read at the end from the run folder the pointer named then (select never writes into another
run's folder). The main process resolves and tells the others, so every process measures the
same LoRA.

**Measuring**, after the last checkpoint, by all processes together (the validator gathers):
the published LoRA is loaded into the run's own models as a second PEFT adapter,
``"published"`` beside the trained ``"default"`` (``lora_format.load_into_pipeline``: family and
shapes checked first), made the only active adapter of every adapted layer, measured by a
validator over the run's validation examples with a fresh caption cache (the training one holds
conditioning of the run's text encoders, which a published text-encoder LoRA changes), and
removed. A LoRA trained on another base model (select's ``lorapipe.base_model_hash`` differs),
one that does not load (``LoraFormatError``) or a run without validation images is
``incomparable``: a warning and the reason recorded, never a failed training.

Why in the models in memory rather than a fresh load once training has freed them: no second
load of the base model (an SDXL checkpoint is gigabytes, read again by every process), and
exactly the modules, dtypes, latents and noise the run's own validation used, so a LoRA gets the
number its own run recorded for it. Loading does touch the trained models: diffusers casts a
text encoder to its base dtype after loading a LoRA into it (the trained float32 adapter weights
become fp16/bf16 under mixed precision), transformers puts it in eval mode, and PEFT switches
active adapters and ``requires_grad``. So ``AdapterState`` records every adapter weight, every
flag and mode, each layer's active adapters and the models' PEFT bookkeeping before, and puts
them back after, giving layers that only the published LoRA adapts their own module back.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lorapipe import store
from lorapipe.checkpoint_layout import PUBLISHED_VALIDATION_NAME, read_json
from lorapipe.errors import ConfigError, InputError, LoraFormatError
from lorapipe.lora_format import DIFFUSERS_WEIGHT_NAME, load_into_pipeline, load_lora_header
from lorapipe.train_config import SAMPLE_SAMPLER
from lorapipe.training.validation import ValidationLoss, eval_mode

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lorapipe.stages.train import Models
    from lorapipe.training.validation import Validator

log = logging.getLogger(__name__)

ADAPTER_NAME = "published"  # beside training's "default"
POINTER_NAME = "latest.json"  # what select's publish_uri points at: {"run_id", "uri"}
BASE_MODEL_HASH_KEY = "lorapipe.base_model_hash"  # in the header of select's LoRA files
Status = Literal["measured", "none_published", "incomparable"]
MEASURED: Status = "measured"
NONE_PUBLISHED: Status = "none_published"  # compare_with names nothing yet: a first run
INCOMPARABLE: Status = "incomparable"  # another base model, does not load, no validation images


@dataclass(frozen=True)
class PublishedLora:
    """What ``compare_with`` named at the start of training."""

    compare_with: str
    weights_uri: str | None = None  # the LoRA file to measure; None: nothing to measure
    run_id: str | None = None  # latest.json's
    uri: str | None = None  # latest.json's folder, else the folder or file given
    status: Status | None = None  # none_published or incomparable when decided already
    reason: str = ""  # why, for those


def resolve_for_run(compare_with: str, accelerator: Accelerator) -> PublishedLora:
    """``resolve`` on the main process, the same answer on every process."""
    from accelerate.utils import broadcast_object_list

    resolved = [resolve(compare_with) if accelerator.is_main_process else None]
    return broadcast_object_list(resolved)[0]


def resolve(compare_with: str) -> PublishedLora:
    """The LoRA ``compare_with`` names now (see the module docstring); logs what it found."""
    pointer_uri = store.join(compare_with, POINTER_NAME)
    folder_weights = store.join(compare_with, DIFFUSERS_WEIGHT_NAME)
    if store.exists(pointer_uri):
        published = _from_pointer(compare_with, pointer_uri)
    elif store.exists(folder_weights):
        published = PublishedLora(compare_with, weights_uri=folder_weights, uri=compare_with)
    elif compare_with.endswith(".safetensors"):
        if not store.exists(compare_with):
            raise ConfigError(
                f"compare_with '{compare_with}' does not exist; give a publish_uri, a LoRA "
                "folder or an existing .safetensors file"
            )
        published = PublishedLora(compare_with, weights_uri=compare_with, uri=compare_with)
    else:
        published = PublishedLora(
            compare_with,
            status=NONE_PUBLISHED,
            reason=f"no LoRA is published at {compare_with} yet (no {POINTER_NAME} there)",
        )
    if published.weights_uri:
        run = f"run {published.run_id}'s " if published.run_id else ""
        log.info("compare_with: %sLoRA %s is measured at the end", run, published.weights_uri)
    else:
        log.warning("compare_with: %s; nothing will be measured", published.reason)
    return published


def _from_pointer(compare_with: str, pointer_uri: str) -> PublishedLora:
    """The LoRA select's ``latest.json`` points at; ``incomparable`` when it points nowhere."""
    try:
        pointer = read_json(pointer_uri)
    except InputError as error:
        return PublishedLora(compare_with, status=INCOMPARABLE, reason=str(error))
    run_id, uri = pointer.get("run_id"), pointer.get("uri")
    if not (isinstance(run_id, str) and isinstance(uri, str) and uri):
        return PublishedLora(
            compare_with,
            status=INCOMPARABLE,
            reason=f"{pointer_uri} is not select's pointer (it needs 'run_id' and 'uri')",
        )
    weights_uri = store.join(uri, DIFFUSERS_WEIGHT_NAME)
    if not store.exists(weights_uri):
        return PublishedLora(
            compare_with,
            run_id=run_id,
            uri=uri,
            status=INCOMPARABLE,
            reason=f"{pointer_uri} points at {uri}, which holds no {DIFFUSERS_WEIGHT_NAME}",
        )
    return PublishedLora(compare_with, weights_uri=weights_uri, run_id=run_id, uri=uri)


# --------------------------------------------------------------------------- measuring


def measure(
    published: PublishedLora,
    *,
    models: Models,
    validator: Validator,
    accelerator: Accelerator,
    base_model_hash: str,
) -> dict[str, Any]:
    """``published_validation.json``: the published LoRA's validation loss on this run's
    images, or why there is none. Every process calls it (the validator gathers); ``validator``
    must be a fresh one (an empty caption cache); the models are left as they were."""
    if published.weights_uri is None:
        return _record(published, published.status or NONE_PUBLISHED, published.reason, validator)
    lora_hash = loss = None
    try:
        lora_hash = _recorded_base_model_hash(published.weights_uri)
        reason = _incomparable(published, validator, lora_hash, base_model_hash)
        if not reason:
            loss = _validation_loss(published.weights_uri, models, validator, accelerator)
    except LoraFormatError as error:
        reason = f"the published LoRA does not load into this run's model: {error}"
    if loss is None:
        log.warning("compare_with: %s; the published LoRA is not measured", reason)
        return _record(published, INCOMPARABLE, reason, validator, lora_hash=lora_hash)
    log.info(
        "compare_with: the published LoRA's validation loss on this run's %d images is %.6g",
        len(validator.examples),
        loss.mean,
    )
    return _record(published, MEASURED, "", validator, loss=loss, lora_hash=lora_hash)


def _validation_loss(
    weights_uri: str, models: Models, validator: Validator, accelerator: Accelerator
) -> ValidationLoss | None:
    """The validation loss of the run's models with the LoRA at ``weights_uri`` instead of
    the trained one, in eval mode as validation always is."""
    modules = (models.unet, *models.text_encoders.values())
    with published_adapter(models, weights_uri), eval_mode(*modules):
        return validator(models.unet, accelerator)


def _recorded_base_model_hash(weights_uri: str) -> str | None:
    """The base model hash select recorded in the LoRA's header; None without one."""
    _, metadata = load_lora_header(weights_uri)
    value = metadata.get(BASE_MODEL_HASH_KEY)
    return value if value and value != "None" else None


def _incomparable(
    published: PublishedLora, validator: Validator, lora_hash: str | None, base_model_hash: str
) -> str:
    """Why the published LoRA's loss would not compare with this run's; "" when it would."""
    if not validator.examples:
        return "this run holds out no validation images to measure it on (validation_split)"
    if lora_hash is not None and lora_hash != base_model_hash:
        return (
            f"the published LoRA {published.uri} was trained on another base model "
            f"(base_model_hash {lora_hash[:12]}..., this run's {base_model_hash[:12]}...)"
        )
    return ""


def _record(
    published: PublishedLora,
    status: Status,
    reason: str,
    validator: Validator,
    *,
    loss: ValidationLoss | None = None,
    lora_hash: str | None = None,
) -> dict[str, Any]:
    return {
        "compare_with": published.compare_with,
        "status": status,
        "reason": reason,
        "run_id": published.run_id,
        "uri": published.uri,
        "val_loss": None if loss is None else loss.mean,
        "val_loss_by_timestep": None if loss is None else dict(loss.by_timestep),
        "validation_images": len(validator.examples),
        "base_model_hash": lora_hash,  # the published LoRA's, as select recorded it
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_record(record: dict[str, Any], local: Path, mirrors: Sequence[str]) -> None:
    """``published_validation.json`` into the training output and every mirror."""
    text = json.dumps(record, indent=2) + "\n"
    for output in [str(local), *mirrors]:
        store.write_text(store.join(output, PUBLISHED_VALIDATION_NAME), text)


# --------------------------------------------------------------------------- the adapter


@contextmanager
def published_adapter(models: Models, weights_uri: str) -> Iterator[None]:
    """The LoRA at ``weights_uri`` as the only active adapter of the run's UNet and text
    encoders for the block (its weights in float32, as training keeps LoRA weights); then the
    models exactly as they were, also when loading fails half way."""
    from lorapipe.training.samples import sampling_pipeline

    adapted = [models.unet, *models.text_encoders.values()]
    states = [AdapterState.of(model) for model in adapted]
    try:
        with _second_adapter_expected():
            load_into_pipeline(
                sampling_pipeline(models, SAMPLE_SAMPLER), weights_uri, adapter_name=ADAPTER_NAME
            )
        for model in adapted:
            _activate_only(model, ADAPTER_NAME)
        yield
    finally:
        for model, state in zip(adapted, states, strict=True):
            state.restore(model)


@contextmanager
def _second_adapter_expected() -> Iterator[None]:
    """Loading beside the trained adapter is what PEFT warns about ("multiple adapters") and
    transformers reports as the trained adapter's weights "missing" from the file: both
    expected here, and misleading in a training log."""
    report = logging.getLogger("transformers.integrations.peft")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        report.setLevel(level)


def _activate_only(model: torch.nn.Module, adapter_name: str) -> None:
    """``adapter_name`` the one active adapter of every adapted layer (a layer without it
    computes its base output), its weights float32 and frozen."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(adapter_name, inference_mode=True)
    for name, parameter in model.named_parameters():
        if f".{adapter_name}." in name:
            parameter.data = parameter.data.float()


@dataclass
class AdapterState:
    """What loading and switching adapters can change in one model, to put back."""

    adapter_weights: dict[str, torch.Tensor]  # every adapter parameter's value, by name
    requires_grad: dict[str, bool]  # of every parameter
    training: dict[str, bool]  # of every module (transformers puts a loaded model in eval mode)
    active: dict[str, list[str]]  # each adapted layer's active adapters, by module path
    # the model's own peft_config (the dict and its items) and _hf_peft_config_loaded, if set
    peft_config: tuple[dict[str, Any], dict[str, Any]] | None
    peft_loaded: bool | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> AdapterState:
        from peft.tuners.tuners_utils import BaseTunerLayer

        parameters = dict(model.named_parameters())
        peft_config = vars(model).get("peft_config")
        return cls(
            adapter_weights={
                name: parameter.detach().clone()
                for name, parameter in parameters.items()
                if ".lora_" in name
            },
            requires_grad={name: parameter.requires_grad for name, parameter in parameters.items()},
            training={path: module.training for path, module in model.named_modules()},
            active={
                path: list(module.active_adapters)
                for path, module in model.named_modules()
                if isinstance(module, BaseTunerLayer)
            },
            peft_config=None if peft_config is None else (peft_config, dict(peft_config)),
            peft_loaded=vars(model).get("_hf_peft_config_loaded"),
        )

    def restore(self, model: torch.nn.Module) -> None:
        """The published adapter gone, the wrappers it added unwrapped, and the recorded
        weights, flags, modes, active adapters and PEFT attributes back."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [
            (path, module)
            for path, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
        ]
        for path, layer in layers:
            layer.set_adapter(self.active.get(path, []))  # first: deleting never picks one
            layer.delete_adapter(ADAPTER_NAME)
            if path not in self.active:
                _unwrap(model, path, layer.get_base_layer())
        for name, parameter in model.named_parameters():
            if name in self.adapter_weights:
                parameter.data = self.adapter_weights[name]
            parameter.requires_grad_(self.requires_grad[name])
        for path, module in model.named_modules():
            module.training = self.training[path]
        _restore_attribute(model, "peft_config", self._peft_config())
        _restore_attribute(model, "_hf_peft_config_loaded", self.peft_loaded)

    def _peft_config(self) -> dict[str, Any] | None:
        """The recorded peft_config dict, with its recorded items again."""
        if self.peft_config is None:
            return None
        config, items = self.peft_config
        config.clear()
        config.update(items)
        return config


def _restore_attribute(model: torch.nn.Module, name: str, value: Any) -> None:
    """``model.<name> = value``; None: the instance attribute removed (the class's shows)."""
    if value is not None:
        setattr(model, name, value)
    elif name in vars(model):
        delattr(model, name)


def _unwrap(model: torch.nn.Module, path: str, base_layer: torch.nn.Module) -> None:
    """Put ``base_layer`` back where a PEFT wrapper replaced it."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, base_layer)
