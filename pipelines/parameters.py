"""What every pipeline parameter means, for the Kubeflow UI, ``make submit`` and README.

kfp reads a pipeline parameter's description from the pipeline function's ``Args:`` docstring;
:func:`described` writes that docstring. A parameter that sets a stage's config key has the
key's name (or, where the key alone would be unclear among the DAG's, a name saying which
stage's: ``quality_policy`` is ingest's ``quality``) and takes its help text from the stage's config (``lorapipe.config``), the same
text ``lorapipe <stage> --help`` prints; the rest are the pipeline's own and described here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from lorapipe import config, config_reference
from lorapipe.errors import ConfigError

F = TypeVar("F", bound=Callable[..., object])

# parameters of the pipeline's own (the data, the cluster, the DAG's wiring)
PIPELINE_HELP = {
    "data_uri": "Raw images: a folder, a .zip/.tar.gz archive or an s3:// prefix.",
    "base_model_uri": "The base model (SD 1.x, SD 2.x, SDXL): a diffusers directory or a "
    ".safetensors checkpoint, local or s3://.",
    "tagger_uri": "A DeepDanbooru project folder (local or s3://); empty skips tagging.",
    "metadata_uri": "A lora-scripts metadata.csv (filename,text) elsewhere than beside the "
    "images; empty: the one beside them, if any.",
    "training_config": "YAML of any `lorapipe train` config keys (the seed article's "
    "my_film_config.yaml keys); the pipeline sets the data, model, output and log paths.",
    "sweep": "Train several configs and ship the best: a YAML list of training_config "
    "overrides ([{lora_rank: 8}, {lora_rank: 32, lora_alpha: 16}]) or a grid expanded to its "
    "product ({lora_rank: [8, 16], learning_rate: [1e-4, 5e-5]}); one train step per config, "
    "in parallel; empty: one training.",
    "num_gpus": "GPUs of the train pod, one training process each (per node with num_nodes > 1).",
    "num_nodes": "Nodes to train on; above 1, training runs as a Kubeflow Trainer TrainJob of "
    "num_nodes x num_gpus and needs an S3 checkpoint_mirror_uri.",
    "checkpoint_mirror_uri": "An s3:// prefix: checkpoints are mirrored to <this>/<run id>/ as "
    "they are written, and a retried train pod resumes from there.",
    "job_yaml": "YAML of any other `lorapipe generate` keys (sampler, sizes, clip_skip, ...).",
    "promotion_epsilon": "Relative tolerance of promote better: the new LoRA is promoted when "
    "its validation loss <= the published LoRA's x (1 + promotion_epsilon), both on the new "
    "run's validation images; below 0 (the default): the same as epsilon (lorapipe select "
    "--promotion-epsilon).",
    "force_retrain": "Train even when the inputs' fingerprint equals that of the LoRA "
    "latest.json records (or of the last run published there); otherwise such a run stops "
    "after its first step, with nothing trained.",
}

# parameters that are a stage's config key: (stage command, key)
STAGE_KEYS = {
    "min_size": ("ingest", "min_size"),
    "quality_policy": ("ingest", "quality"),
    "threshold": ("tag", "threshold"),
    "trigger_word": ("tag", "trigger_word"),
    "merge": ("tag", "merge"),
    "defect_policy": ("tag", "defects"),
    "epsilon": ("select", "epsilon"),
    "publish_uri": ("select", "publish_uri"),
    "promote": ("select", "promote"),
    "prompts": ("generate", "prompts"),
    "negative_presets": ("generate", "negative_presets"),
    "lora_scales": ("generate", "lora_scales"),
    "cfg_scales": ("generate", "cfg_scales"),
    "seeds": ("generate", "seeds"),
    "steps": ("generate", "steps"),
}

# names of the release before, accepted by `make submit`/`schedule`/`run` for this release only
RENAMED = {
    "min_image_size": "min_size",
    "tag_threshold": "threshold",
    "caption_merge": "merge",
    "selection_epsilon": "epsilon",
    "generate_job": "job_yaml",
}

SUMMARY = (
    "Clean, tag and flip-augment images; train a LoRA on N GPUs; keep the checkpoint with the "
    "lowest validation loss; review it in a grid of LoRA scales, CFG scales and seeds."
)


def parameter_help(name: str) -> str:
    """One parameter's description, as the Kubeflow UI shows it."""
    if name in PIPELINE_HELP:
        return PIPELINE_HELP[name]
    if name not in STAGE_KEYS:
        raise ConfigError(f"pipeline parameter '{name}' has no description; add it to {__name__}")
    command, key = STAGE_KEYS[name]
    (item,) = [
        o for o in config.options(config_reference.stage_configs()[command]) if o.name == key
    ]
    text = item.spec.help.replace("`", "")
    return f"{text[0].upper()}{text[1:]} (lorapipe {command} {config.flag(key)})."


def described(function: F) -> F:
    """``function`` with an ``Args:`` docstring describing each of its parameters."""
    import inspect

    lines = [SUMMARY, "", "Args:"]  # one line a parameter: the UI shows line breaks as they are
    lines += [
        f"    {name}: {parameter_help(name)}" for name in inspect.signature(function).parameters
    ]
    function.__doc__ = "\n".join(lines) + "\n"
    return function
