"""The training config: the seed article's YAML keys, unchanged, plus lorapipe's own.

A config comes from a YAML file (``lorapipe train --config my_film_config.yaml``, the way the
seed article runs lora-scripts' ``train.py``) and from flags that override single keys
(``--learning-rate 5e-5``). Every key is checked before anything heavy is loaded:

- an unknown key is an error naming the closest valid key (``learning_rat`` -> ``learning_rate``);
- a value of the wrong type is an error naming the key, its line and the expected type. Numbers
  may be written as strings, because PyYAML reads ``learning_rate: 1e-4`` as the string "1e-4";
- named choices (``optimizer: "AdamW"``) are case-insensitive.

``target_modules`` takes UNet names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``proj_in``,
``ff.net.0.proj``, ...) and CLIP text-encoder names (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``, ``fc1``, ...). The four attention projections are one concept spelled two ways,
so they map onto each other (``TEXT_ENCODER_TO_UNET``): the seed's ``["q_proj", "v_proj"]``
trains ``to_q`` and ``to_v`` in the UNet's attention layers, which is what its author, training
a UNet LoRA, meant. With ``train_text_encoder`` on, the same names also adapt the text encoder's
``q_proj``/``v_proj``. Any other name applies to whichever model has a layer by that name; a
name that matches no layer at all is an error listing the names that exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorapipe.errors import ConfigError

SEED_KEYS = (
    "train_data_dir",
    "metadata_path",
    "base_model",
    "lora_rank",
    "lora_alpha",
    "target_modules",
    "batch_size",
    "epochs",
    "learning_rate",
    "optimizer",
    "scheduler",
    "output_dir",
    "save_steps",
    "log_dir",
)
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
# diffusers.optimization.SchedulerType names that need no extra arguments
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
CROPS = ("center", "random")
NUM_TRAIN_TIMESTEPS = 1000

CHOICE_KEYS = ("optimizer", "scheduler", "mixed_precision", "crop")

# CLIP text-encoder attention names -> the same projections in the UNet's attention layers
TEXT_ENCODER_TO_UNET = {
    "q_proj": "to_q",
    "k_proj": "to_k",
    "v_proj": "to_v",
    "out_proj": "to_out.0",
}
UNET_TO_TEXT_ENCODER = {unet: clip for clip, unet in TEXT_ENCODER_TO_UNET.items()}


@dataclass
class TrainConfig:
    """Every training option, with its default. The README's config table documents each."""

    # --- the seed article's keys (lora-scripts' my_film_config.yaml), accepted unchanged
    # a folder of images with metadata.csv, or a lorapipe dataset (local or s3://)
    train_data_dir: str = ""
    # lora-scripts' CSV (filename,text) for a folder; default <train_data_dir>/metadata.csv
    metadata_path: str = ""
    # a diffusers-format SD 1.x directory, local or s3://
    base_model: str = ""
    lora_rank: int = 16
    # scale of the LoRA update is lora_alpha / lora_rank
    lora_alpha: float = 16.0
    # layers that get adapters; see the module docstring for the name mapping
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # images per process per micro-step
    batch_size: int = 1
    epochs: int = 10
    learning_rate: float = 1e-4
    # adamw, adamw8bit (needs bitsandbytes) or sgd; case-insensitive
    optimizer: str = "adamw"
    # a diffusers learning-rate schedule name (SCHEDULERS)
    scheduler: str = "constant"
    # local directory or s3:// prefix (trained locally in a work dir, then mirrored)
    output_dir: str = "./output"
    # a checkpoint every this many optimizer steps (and always at the end); 0: only at the end
    save_steps: int = 100
    # TensorBoard event files; default <output_dir>/logs
    log_dir: str = ""

    # --- the LoRA and the model
    # the LoRA's name in WebUI prompts (<lora:NAME:0.7>), read by `lorapipe select`
    output_name: str = "lora"
    train_text_encoder: bool = False
    # learning rate of the text encoder's LoRA; null: learning_rate
    text_encoder_lr: float | None = None
    # square training size in pixels; null: the base model's native size (512 for SD 1.5)
    resolution: int | None = None
    # "center" or "random" (random crops disable the latent cache)
    crop: str = "center"
    # mirror each training image with probability 0.5 (for datasets that `augment` did not flip)
    flip_aug: bool = False

    # --- captions (kohya sd-scripts' names)
    shuffle_caption: bool = False
    # comma-separated parts at the start of a caption that shuffling never moves
    keep_tokens: int = 0
    # probability of training a sample with an empty caption
    caption_dropout_rate: float = 0.0

    # --- validation
    # held-out images: a fraction below 1 (0.1 = 10%) or a whole number of images; 0: none
    validation_split: float = 0.1
    # fixed timesteps at which validation loss is measured and reported
    validation_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])

    # --- optimisation
    # stop after this many optimizer steps; 0: epochs decide
    max_train_steps: int = 0
    gradient_accumulation_steps: int = 1
    lr_warmup_steps: int = 0
    # cycles of cosine_with_restarts
    lr_num_cycles: int = 1
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    # noise offset (0.05-0.1 helps very dark/bright images); 0: off
    noise_offset: float = 0.0
    # min-SNR loss weighting gamma (5.0 is the paper's value); null: off
    snr_gamma: float | None = None
    # training timesteps are drawn from [min_timestep, max_timestep)
    min_timestep: int = 0
    max_timestep: int = NUM_TRAIN_TIMESTEPS
    # "no", "fp16" or "bf16" (autocast; the LoRA weights stay float32)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0

    # --- caches
    # VAE-encode each image (and its mirror) once; reused across epochs and runs
    cache_latents: bool = True
    # encode each caption once when the text encoder is frozen and captions never change
    cache_text_encoder_outputs: bool = True
    # root of the caches (latents/, dataset images/, train/ work dirs of s3:// outputs);
    # default $LORAPIPE_CACHE (~/.cache/lorapipe)
    cache_dir: str = ""

    # --- checkpoints and processes
    # keep only the newest N checkpoints (never deleting the best by validation loss); 0: all
    keep_last_n: int = 0
    # an s3:// prefix every checkpoint is copied to
    checkpoint_mirror: str = ""
    # "latest", a checkpoint directory, or an s3:// checkpoint prefix; empty: start fresh
    resume: str = ""
    # processes (one per GPU) that `lorapipe train` launches with accelerate
    num_processes: int = 1

    def __post_init__(self) -> None:
        for key in CHOICE_KEYS:  # named choices are case-insensitive: "AdamW" is adamw
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, value.strip().lower())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
CHOICES = {
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "mixed_precision": MIXED_PRECISION,
    "crop": CROPS,
}


# --------------------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config from a YAML file (local or s3://) and/or ``{key: value}`` flag overrides.

    Raises ConfigError, one line naming the file, line and key, for anything wrong.
    """
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path:
        raw, origins = _read_yaml(path)
    for key, value in (overrides or {}).items():
        check_known_key(key, f"--{key.replace('_', '-')}")
        raw[key] = value
        origins[key] = f"--{key.replace('_', '-')}"
    hints = typing.get_type_hints(TrainConfig)
    values = {key: coerce(value, hints[key], origins[key]) for key, value in raw.items()}
    config = TrainConfig(**values)
    check_values(config, lambda key: origins.get(key, f"key '{key}'"))
    return config


def _read_yaml(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """({key: value}, {key: "FILE line N: key 'k'"}) of a YAML mapping."""
    text = _read_text(path)
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML; fix the syntax there") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict) or not isinstance(document, yaml.MappingNode):
        raise ConfigError(f"{path}: expected 'key: value' lines, e.g. 'learning_rate: 1e-4'")
    origins = {}
    for key_node, _ in document.value:
        key = key_node.value
        origin = f"{path} line {key_node.start_mark.line + 1}: key '{key}'"
        check_known_key(key, origin)
        origins[key] = origin
    return values, origins


def _read_text(path: str) -> str:
    if path.startswith("s3://"):
        from lorapipe import store

        return store.read_text(path)
    file = Path(path.removeprefix("file://")).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    return file.read_text(encoding="utf-8-sig")


def check_known_key(key: Any, origin: str) -> None:
    """Raise ConfigError naming the closest valid key when ``key`` is not a config key."""
    if key in FIELD_NAMES:
        return
    closest = difflib.get_close_matches(str(key), FIELD_NAMES, n=1, cutoff=0.6)
    hint = (
        f"did you mean '{closest[0]}'?" if closest else "see `lorapipe train --help` for the keys"
    )
    origin = origin.replace(f": key '{key}'", "")
    raise ConfigError(f"{origin}: unknown key '{key}'; {hint}")


# --------------------------------------------------------------------------- types


def coerce(value: Any, hint: Any, origin: str) -> Any:
    """``value`` as the type ``hint`` (int, float, bool, str, list[str], list[int], X | None).

    Numbers and booleans may come as strings: from flags, and from YAML, which reads ``1e-4``
    as a string.
    """
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{origin} must be a list, e.g. [a, b], got {value!r}")
        return [coerce(v.strip() if isinstance(v, str) else v, item, origin) for v in items]
    converter = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}[hint]
    converted = converter(value)
    if converted is None:
        raise ConfigError(f"{origin} must be {_TYPE_WORDS[hint]}, got {value!r}")
    return converted


_TYPE_WORDS = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
}


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
            value.strip().lower()
        )
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = _as_float(value)
    if number is None or not math.isfinite(number) or number != int(number):
        return None
    return int(number)


def _as_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


# --------------------------------------------------------------------------- values


def check_values(config: TrainConfig, origin: Any = None) -> None:
    """Raise ConfigError for values of the right type that make no sense (rank 0, ...).

    ``origin(key)`` says where a key was set; by default just the key's name.
    """
    where = origin or (lambda key: f"key '{key}'")
    for key, choices in CHOICES.items():
        value = getattr(config, key)
        if value not in choices:
            closest = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"did you mean '{closest[0]}'? " if closest else ""
            raise ConfigError(f"{where(key)} is '{value}'; {hint}use one of {', '.join(choices)}")
    at_least = {
        "lora_rank": 1,
        "batch_size": 1,
        "epochs": 1,
        "save_steps": 0,
        "keep_tokens": 0,
        "max_train_steps": 0,
        "gradient_accumulation_steps": 1,
        "lr_warmup_steps": 0,
        "lr_num_cycles": 1,
        "keep_last_n": 0,
        "num_processes": 1,
        "min_timestep": 0,
    }
    for key, minimum in at_least.items():
        if getattr(config, key) < minimum:
            raise ConfigError(
                f"{where(key)} must be at least {minimum}, got {getattr(config, key)}"
            )
    positive = ("lora_alpha", "learning_rate", "max_grad_norm")
    for key in positive + ("text_encoder_lr", "snr_gamma"):
        value = getattr(config, key)
        if value is not None and not value > 0:
            raise ConfigError(f"{where(key)} must be above 0, got {value}")
    for key in ("noise_offset", "weight_decay"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{where(key)} must not be negative, got {getattr(config, key)}")
    if not 0 <= config.caption_dropout_rate < 1:
        raise ConfigError(
            f"{where('caption_dropout_rate')} must be in [0, 1), got {config.caption_dropout_rate}"
        )
    if config.resolution is not None and (config.resolution < 64 or config.resolution % 8):
        raise ConfigError(
            f"{where('resolution')} must be a multiple of 8 of at least 64, got {config.resolution}"
        )
    if not config.min_timestep < config.max_timestep <= NUM_TRAIN_TIMESTEPS:
        raise ConfigError(
            f"{where('max_timestep')} must be above min_timestep ({config.min_timestep}) "
            f"and at most {NUM_TRAIN_TIMESTEPS}, got {config.max_timestep}"
        )
    split = config.validation_split
    if split < 0 or (split >= 1 and split != int(split)):
        raise ConfigError(
            f"{where('validation_split')} must be a fraction below 1 (0.1 = 10%) or a whole "
            f"number of images, got {split}"
        )
    if not config.validation_timesteps or not all(
        0 <= t < NUM_TRAIN_TIMESTEPS for t in config.validation_timesteps
    ):
        raise ConfigError(
            f"{where('validation_timesteps')} must list timesteps in [0, {NUM_TRAIN_TIMESTEPS}), "
            f"got {config.validation_timesteps}"
        )
    if not config.target_modules:
        raise ConfigError(f"{where('target_modules')} is empty; name layers, e.g. [to_q, to_v]")
    if config.checkpoint_mirror and not config.checkpoint_mirror.startswith("s3://"):
        raise ConfigError(
            f"{where('checkpoint_mirror')} must be an s3:// prefix, got '{config.checkpoint_mirror}'"
        )


# --------------------------------------------------------------------------- target modules


@dataclass(frozen=True)
class TargetModules:
    """The LoRA target names for each model, in PEFT's ``target_modules`` form."""

    unet: list[str]
    text_encoder: list[str]


def matches(target: str, layer_path: str) -> bool:
    """PEFT's rule: a target names a layer by its full path or by a dotted suffix of it."""
    return layer_path == target or layer_path.endswith(f".{target}")


def short_name(layer_path: str) -> str:
    """What a user writes for a layer: its last path segment, or the last two when the last is
    an index (``to_out.0``)."""
    parts = layer_path.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]


def resolve_target_modules(
    names: Sequence[str],
    unet_layers: Sequence[str],
    text_encoder_layers: Sequence[str] | None = None,
) -> TargetModules:
    """Split configured ``target_modules`` between the UNet and, when it is trained (its layer
    paths given), the text encoder, translating the attention names between the two spellings.

    Raises ConfigError for a name that matches no layer, listing the names that exist.
    """
    unet: list[str] = []
    text_encoder: list[str] = []
    for name in names:
        unet_name = TEXT_ENCODER_TO_UNET.get(name, name)
        text_name = UNET_TO_TEXT_ENCODER.get(name, name)
        found = False
        if any(matches(unet_name, layer) for layer in unet_layers):
            unet.append(unet_name)
            found = True
        if text_encoder_layers is not None and any(
            matches(text_name, layer) for layer in text_encoder_layers
        ):
            text_encoder.append(text_name)
            found = True
        if not found:
            models = "UNet or text encoder" if text_encoder_layers is not None else "UNet"
            available = dict.fromkeys(map(short_name, [*unet_layers, *(text_encoder_layers or [])]))
            available.update(dict.fromkeys(TEXT_ENCODER_TO_UNET))
            raise ConfigError(
                f"target_modules: '{name}' matches no layer of the {models}; "
                f"available: {', '.join(available)}"
            )
    return TargetModules(
        unet=list(dict.fromkeys(unet)), text_encoder=list(dict.fromkeys(text_encoder))
    )
