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
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lorapipe import config, store
from lorapipe.config import Where, option, options
from lorapipe.errors import ConfigError, PromptError, StorageError
from lorapipe.generation.samplers import SAMPLERS
from lorapipe.prompts.syntax import parse_prompt
from lorapipe.selection_rule import DEFAULT_EPSILON

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

# CLIP text-encoder attention names -> the same projections in the UNet's attention layers
TEXT_ENCODER_TO_UNET = {
    "q_proj": "to_q",
    "k_proj": "to_k",
    "v_proj": "to_v",
    "out_proj": "to_out.0",
}
UNET_TO_TEXT_ENCODER = {unet: clip for clip, unet in TEXT_ENCODER_TO_UNET.items()}
PROMPT_FILE_SUFFIX = ".txt"  # one such entry in sample_prompts names a file of prompts
DEFAULT_SAMPLE_PROMPTS = 2  # validation (else training) captions sampled by default
SAMPLE_SAMPLER = "DPM++ 2M Karras"  # generate's default, so samples look like its grids


@functools.cache
def base_negative_prompt() -> str:
    """The shipped ``base`` negative layer as one prompt: what generate's ``base`` preset
    writes, the default negative of sample images."""
    from lorapipe.prompts.negatives import NegativeLibrary

    return NegativeLibrary.load().build("base", adapt_to_lora=False).text


@dataclass
class TrainConfig:
    """Every training option, with its default and help text (``--help`` and README show it)."""

    COMMAND: ClassVar[str] = "train"

    # --- the seed article's keys (lora-scripts' my_film_config.yaml), accepted unchanged
    train_data_dir: str = option(
        "",
        help="lorapipe dataset or folder with `metadata.csv`, local or `s3://`",
        default_text="(required)",
    )
    metadata_path: str = option(
        "",
        help="lora-scripts CSV (`filename,text`) for a folder",
        default_text="<train_data_dir>/metadata.csv",
    )
    base_model: str = option(
        "",
        help="SD 1.x, SD 2.x or SDXL: a diffusers directory or a `.safetensors` checkpoint, local "
        "or `s3://` (see Bring your model)",
        default_text="(required)",
    )
    base_model_config: str = option(
        "",
        help="for a `.safetensors` `base_model` of another architecture: a local diffusers "
        "directory whose component configs fit it",
        default_text="lorapipe's configs of the file's family",
    )
    lora_rank: int = option(16, help="LoRA rank r", minimum=1)
    lora_alpha: float = option(
        16.0, help="LoRA alpha; the update is scaled by alpha / rank", above=0
    )
    target_modules: list[str] = option(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        help="layers that get adapters: UNet names (`to_q`, `proj_in`, `ff.net.0.proj`, ...) or "
        "CLIP names (`q_proj`, `fc1`, ...); the attention names translate between the two "
        "(see `target_modules` above)",
    )
    batch_size: int = option(1, help="images per process per micro-step", minimum=1)
    epochs: int = option(
        10, help="passes over the training images (unless `max_train_steps`)", minimum=1
    )
    learning_rate: float = option(1e-4, help="LoRA learning rate (UNet)", above=0)
    optimizer: str = option(
        "adamw",
        help="`adamw`, `adamw8bit` (needs bitsandbytes, CUDA) or `sgd` (momentum 0.9); "
        "case-insensitive",
        choices=OPTIMIZERS,
        ignore_case=True,
    )
    scheduler: str = option(
        "constant",
        help="diffusers learning-rate schedule (`constant` with warmup steps becomes "
        "`constant_with_warmup`)",
        choices=SCHEDULERS,
        ignore_case=True,
    )
    output_dir: str = option(
        "./output",
        help="local directory or `s3://` prefix (trained locally in `<cache_dir>/train/`, "
        "mirrored)",
    )
    save_steps: int = option(
        100,
        help="a checkpoint every N optimizer steps, and always at the end; `0`: only at the end",
        minimum=0,
    )
    log_dir: str = option(
        "", help="TensorBoard event files (local)", default_text="<output_dir>/logs"
    )

    # --- the LoRA and the model
    output_name: str = option(
        "lora",
        help="the LoRA's name in prompts (`<lora:NAME:0.7>`); `lorapipe select` uses it",
    )
    train_text_encoder: bool = option(
        False, help="also train a LoRA on the CLIP text encoder (on both of SDXL's)"
    )
    text_encoder_lr: float | None = option(
        None,
        help="learning rate of the text encoder's LoRA (SDXL: the first encoder's)",
        above=0,
        default_text="null (= learning_rate)",
    )
    learning_rate_te2: float | None = option(
        None,
        help="SDXL: learning rate of the second text encoder's LoRA (kohya's sdxl_train key)",
        above=0,
        default_text="null (= text_encoder_lr)",
    )
    v_parameterization: bool = option(
        False,
        help="train the model as a v-prediction model whatever its scheduler config says (SD 2.x "
        "768-v and v-prediction SDXL checkpoints whose single file does not say so)",
    )
    zero_terminal_snr: bool = option(
        False,
        help="rescale the noise schedule to zero terminal SNR (for v-prediction models trained "
        "that way, e.g. NoobAI-XL v-pred)",
    )
    resolution: int | None = option(
        None,
        help="training size in pixels, a multiple of 8 of at least 64: buckets hold at most "
        "resolution x resolution pixels; the square size with enable_bucket false",
        default_text="null (= the model's native size, 512 for SD 1.5)",
    )
    enable_bucket: bool = option(
        True,
        help="train each image at the aspect ratio closest to its own (aspect-ratio buckets), "
        "cropped only by the rounding to bucket_reso_steps; false: every image is scaled and "
        "cropped to a square",
    )
    min_bucket_reso: int | None = option(
        None,
        help="shortest bucket side in pixels",
        minimum=8,
        default_text="null (= 256; resolution / 2 below 512)",
    )
    max_bucket_reso: int | None = option(
        None,
        help="longest bucket side in pixels",
        minimum=8,
        default_text="null (= 2 x resolution: 1024 for SD 1.x)",
    )
    bucket_reso_steps: int | None = option(
        None,
        help="bucket sides are multiples of this many pixels, itself a multiple of 8",
        minimum=8,
        default_text="null (= 64; resolution / 8 below 512)",
    )
    bucket_no_upscale: bool = option(
        False,
        help="never enlarge an image: one with fewer than resolution x resolution pixels trains "
        "at its own size rounded down to bucket_reso_steps",
    )
    crop: str = option(
        "center",
        help="where the crop sits when an image is scaled to cover its bucket (random disables "
        "the latent cache)",
        choices=CROPS,
        ignore_case=True,
    )
    flip_aug: bool = option(
        False,
        help="mirror each image with probability 0.5 (swapping left/right in its caption); for "
        "datasets `augment` did not flip. Images with text/logo/asymmetry tags, mirrored copies "
        "and images that have one are never flipped",
    )

    # --- captions (kohya sd-scripts' names)
    shuffle_caption: bool = option(
        False, help="shuffle the comma-separated parts of each caption every time"
    )
    keep_tokens: int = option(
        0, help="leading caption parts that shuffling never moves (a trigger word)", minimum=0
    )
    caption_dropout_rate: float = option(
        0.0, help="probability of training an image with an empty caption, in [0, 1)"
    )

    # --- validation
    validation_split: float = option(
        0.1,
        help="held-out images: a fraction below 1, or a whole number of images; `0`: no "
        "validation. An image and its mirrored copy are held out together; the choice depends "
        "only on image ids",
    )
    validation_timesteps: list[int] = option(
        default_factory=lambda: [100, 300, 500, 700, 900],
        help="fixed timesteps of the validation loss, each reported",
    )
    compare_with: str = option(
        "",
        help="a published LoRA to measure on this run's validation images, so that select "
        "promotes the new LoRA only if it is not worse: a `publish_uri` (its `latest.json` is "
        "followed) or a LoRA folder/file (select's output), local or `s3://`; empty: nothing is "
        "measured",
    )
    early_stopping_patience: int = option(
        0,
        help="stop after this many checkpoints in a row without a validation loss below the "
        "best so far by more than early_stopping_epsilon; `0`: off",
        minimum=0,
    )
    early_stopping_epsilon: float = option(
        DEFAULT_EPSILON,
        help="the improvement early stopping asks for, relative to the best validation loss "
        "(0.01: 1% lower); the same measure as select's epsilon",
        minimum=0,
    )

    # --- sample images (kohya's sample_prompts), rendered into each checkpoint
    sample_prompts: list[str] | None = option(
        None,
        help="A1111-syntax prompts rendered into each checkpoint's `samples/` (`<lora:>` tags "
        "are ignored: the LoRA being trained is applied at weight 1), or one "
        f"`{PROMPT_FILE_SUFFIX}` file, local or `s3://`, of one prompt a line (blank and `#` "
        "lines skipped); `[]` (a flag: `--sample-prompts ''`): no sample images",
        separator=None,
        default_text=f"null (= the captions of the first {DEFAULT_SAMPLE_PROMPTS} validation "
        "images, else training images)",
    )
    sample_seeds: list[int] = option(
        default_factory=lambda: [1, 2],
        help="seeds of the sample images: each prompt is rendered once per seed",
        minimum=0,
    )
    sample_sampler: str = option(
        SAMPLE_SAMPLER, help="an A1111 sampler name", choices=tuple(SAMPLERS)
    )
    sample_steps: int = option(20, help="sampling steps of a sample image", minimum=1, maximum=1000)
    sample_every_n_steps: int = option(
        0,
        help="render samples at the checkpoints whose step is a multiple of N (and always at "
        "the last one, also where early stopping ends the run); `0`: at every checkpoint",
        minimum=0,
    )
    sample_cfg_scale: float = option(
        7.0, help="classifier-free guidance scale of the sample images", minimum=1.0, maximum=100.0
    )
    sample_negative_prompt: str = option(
        default_factory=base_negative_prompt,
        help="negative prompt of the sample images (A1111 syntax); the default is generate's "
        "`base` layer",
    )

    # --- optimisation
    max_train_steps: int = option(
        0, help="stop after N optimizer steps; `0`: `epochs` decide", minimum=0
    )
    gradient_accumulation_steps: int = option(1, help="micro-steps per optimizer step", minimum=1)
    lr_warmup_steps: int = option(0, help="linear warmup steps", minimum=0)
    lr_num_cycles: int = option(1, help="cycles of `cosine_with_restarts`", minimum=1)
    weight_decay: float = option(1e-2, help="AdamW / SGD weight decay", minimum=0)
    max_grad_norm: float = option(1.0, help="gradient clipping", above=0)
    noise_offset: float = option(
        0.0, help="noise offset (0.05-0.1 helps very dark or bright images)", minimum=0
    )
    snr_gamma: float | None = option(
        None,
        help="min-SNR loss weighting (5.0 is the paper's value); epsilon and v-prediction models",
        above=0,
    )
    min_timestep: int = option(
        0, help="training timesteps are drawn from [min_timestep, max_timestep)", minimum=0
    )
    max_timestep: int = option(
        NUM_TRAIN_TIMESTEPS,
        help=f"upper end (exclusive) of the training timesteps, at most {NUM_TRAIN_TIMESTEPS}",
    )
    mixed_precision: str = option(
        "no",
        help="frozen weights in that dtype and autocast; LoRA weights stay float32",
        choices=MIXED_PRECISION,
        ignore_case=True,
    )
    gradient_checkpointing: bool = option(False, help="trade compute for memory")
    seed: int = option(0, help="LoRA initialisation, data order and every random draw")

    # --- caches
    cache_latents: bool = option(
        True,
        help="VAE-encode each image (and mirror) once, reused across epochs and runs; `false` "
        "encodes every step (diffusers' example loop)",
    )
    cache_text_encoder_outputs: bool = option(
        True,
        help="encode each caption once when the text encoder is frozen and captions are not "
        "shuffled",
    )
    cache_dir: str = option(
        "",
        help="latents (keyed by image hash, VAE files, bucket, crop, mirroring), dataset "
        "images, S3 work dirs",
        default_text="$LORAPIPE_CACHE (~/.cache/lorapipe)",
    )

    # --- checkpoints and processes
    keep_last_n: int = option(
        0,
        help="keep the newest N checkpoints (plus the best by validation loss and the one "
        "`select`'s rule would choose, never deleted); `0`: all",
        minimum=0,
    )
    checkpoint_mirror: str = option(
        "", help="an `s3://` prefix that receives a copy of the output as it is written"
    )
    run_id: str = option(
        "",
        help="names this run under `checkpoint_mirror` (`<checkpoint_mirror>/<run_id>/`), so a "
        "retried run resumes its own checkpoints and two runs never share them; the pipeline "
        "passes its run id",
    )
    resume: str = option(
        "",
        help="`latest` (newest complete checkpoint here or on a mirror; fresh start if none), a "
        "checkpoint directory, or an `s3://` checkpoint; empty: start fresh",
    )
    num_processes: int = option(
        1,
        help="processes to launch, one per GPU (CPU processes over gloo without one); per node "
        "with `num_nodes` > 1",
        minimum=1,
    )
    num_nodes: int = option(
        1,
        help="nodes to train on: above 1, a Kubeflow Trainer TrainJob of `num_nodes` x "
        "`num_processes` GPUs, sharing data and checkpoints through `checkpoint_mirror` on S3",
        minimum=1,
    )
    trainer_image: str = option(
        "",
        help="the torch image a multi-node TrainJob's nodes run (needed with `num_nodes` > 1)",
    )

    def __post_init__(self) -> None:
        for item in options(type(self)):  # named choices are case-insensitive: "AdamW" is adamw
            value = getattr(self, item.name)
            if item.spec.ignore_case and isinstance(value, str):
                setattr(self, item.name, value.strip().lower())

    def validate(self, where: Where | None = None) -> None:
        """Raise ConfigError for values that make no sense (rank 0, ...)."""
        check_values(self, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config from a YAML file (local or s3://) and/or ``{key: value}`` flag overrides.

    Raises ConfigError, one line naming the file, line and key, for anything wrong.
    """
    return config.load(TrainConfig, path, overrides)


def load_config_text(text: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config from YAML text (a pipeline parameter), checked like a file; empty: defaults."""
    return config.load_text(TrainConfig, text, "training_config", overrides)


# --------------------------------------------------------------------------- values


def check_values(train: TrainConfig, origin: Where | None = None) -> None:
    """Raise ConfigError for values of the right type that make no sense (rank 0, ...).

    ``origin(key)`` says where a key was set; by default just the key's name.
    """
    where = origin or (lambda key: f"key '{key}'")
    config.check_fields(train, where)
    if not 0 <= train.caption_dropout_rate < 1:
        raise ConfigError(
            f"{where('caption_dropout_rate')} must be in [0, 1), got {train.caption_dropout_rate}"
        )
    if train.resolution is not None and (train.resolution < 64 or train.resolution % 8):
        raise ConfigError(
            f"{where('resolution')} must be a multiple of 8 of at least 64, got {train.resolution}"
        )
    if train.bucket_reso_steps is not None and train.bucket_reso_steps % 8:
        raise ConfigError(
            f"{where('bucket_reso_steps')} must be a multiple of 8 (the VAE's pixels per latent), "
            f"got {train.bucket_reso_steps}"
        )
    if (train.min_bucket_reso or 0) > (train.max_bucket_reso or float("inf")):
        raise ConfigError(
            f"{where('min_bucket_reso')} ({train.min_bucket_reso}) is above max_bucket_reso "
            f"({train.max_bucket_reso}); swap them"
        )
    if not train.min_timestep < train.max_timestep <= NUM_TRAIN_TIMESTEPS:
        raise ConfigError(
            f"{where('max_timestep')} must be above min_timestep ({train.min_timestep}) "
            f"and at most {NUM_TRAIN_TIMESTEPS}, got {train.max_timestep}"
        )
    split = train.validation_split
    if split < 0 or (split >= 1 and split != int(split)):
        raise ConfigError(
            f"{where('validation_split')} must be a fraction below 1 (0.1 = 10%) or a whole "
            f"number of images, got {split}"
        )
    if not train.validation_timesteps or not all(
        0 <= t < NUM_TRAIN_TIMESTEPS for t in train.validation_timesteps
    ):
        raise ConfigError(
            f"{where('validation_timesteps')} must list timesteps in [0, {NUM_TRAIN_TIMESTEPS}), "
            f"got {train.validation_timesteps}"
        )
    if train.early_stopping_patience and not train.validation_split:
        raise ConfigError(
            f"{where('early_stopping_patience')} needs validation images to watch; set "
            "validation_split above 0 (e.g. 0.1), or early_stopping_patience: 0"
        )
    if not train.target_modules:
        raise ConfigError(f"{where('target_modules')} is empty; name layers, e.g. [to_q, to_v]")
    if train.checkpoint_mirror and not train.checkpoint_mirror.startswith("s3://"):
        raise ConfigError(
            f"{where('checkpoint_mirror')} must be an s3:// prefix, got '{train.checkpoint_mirror}'"
        )
    _check_sampling(train, where)


def _check_sampling(train: TrainConfig, where: Where) -> None:
    """The sample-image keys: seeds given, every prompt (from the file too) and the negative
    parse as A1111 syntax."""
    prompts = sample_prompts(train, where)
    if prompts == [] and prompt_file(train.sample_prompts):
        raise ConfigError(
            f"{where('sample_prompts')}: '{train.sample_prompts[0]}' holds no prompts; write one "
            "a line, or give `sample_prompts: []` for no sample images"
        )
    if prompts != [] and not train.sample_seeds:
        raise ConfigError(f"{where('sample_seeds')} is empty; give at least one seed, e.g. [1]")
    seeds = train.sample_seeds
    repeated = next((seed for i, seed in enumerate(seeds) if seed in seeds[:i]), None)
    if repeated is not None:
        raise ConfigError(f"{where('sample_seeds')} lists {repeated} twice; keep one")
    texts = [(f"{where('sample_prompts')} prompt {i + 1}", p) for i, p in enumerate(prompts or [])]
    texts.append((where("sample_negative_prompt"), train.sample_negative_prompt))
    for label, text in texts:
        try:
            parse_prompt(text, where=label)
        except PromptError as error:
            raise ConfigError(str(error)) from None


def prompt_file(prompts: Sequence[str] | None) -> str | None:
    """The file ``sample_prompts`` names (its single entry ending in ``.txt``), or None."""
    if prompts and len(prompts) == 1 and prompts[0].strip().endswith(PROMPT_FILE_SUFFIX):
        return prompts[0].strip()
    return None


def sample_prompts(train: TrainConfig, origin: Where | None = None) -> list[str] | None:
    """The sample prompts as configured: the list, or the lines of the prompt file (blank
    prompts, and ``#`` lines of the file, skipped); None: the default, validation captions."""
    uri = prompt_file(train.sample_prompts)
    if uri is None:
        given = train.sample_prompts
        return None if given is None else [prompt for prompt in given if prompt.strip()]
    where = origin or (lambda key: f"key '{key}'")
    try:
        text = store.read_text(uri)
    except StorageError as error:
        raise ConfigError(f"{where('sample_prompts')}: cannot read '{uri}' ({error})") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


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
