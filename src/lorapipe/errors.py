"""One error hierarchy for every stage.

Each error's message is a single line that says what went wrong, where (file, key, line,
URI) and how to fix it. The CLI prints exactly that line and exits non-zero; a traceback is
shown only with ``--debug``.
"""


class LorapipeError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 2


class ConfigError(LorapipeError):
    """A config file, key, value or CLI flag is wrong."""


class InputError(LorapipeError):
    """User-provided input data (images, CSV, archives, job files) is unusable."""


class ImageBytesError(InputError):
    """An image file's encoded bytes cannot be kept as they are: malformed, or not what a
    dataset row may hold unchanged (8-bit RGB without metadata)."""


class StorageError(LorapipeError):
    """Object storage or the local filesystem refused an operation."""


class BucketNotFoundError(StorageError):
    """The S3 bucket does not exist."""


class AccessDeniedError(StorageError):
    """Credentials are missing, wrong or lack permission."""


class EndpointUnreachableError(StorageError):
    """The S3 endpoint cannot be reached."""


class ObjectNotFoundError(StorageError):
    """A key or local file does not exist."""


class OutputBusyError(StorageError):
    """Another run holds the output (its lock or S3 lease), or took this run's lease over."""


class ClusterError(LorapipeError):
    """The Kubeflow Pipelines server cannot be reached or refused a request."""


class PipelineRunError(LorapipeError):
    """A task of a local pipeline run failed (its own error is in its log)."""


class DatasetError(LorapipeError):
    """A lorapipe Parquet dataset is missing, empty or has the wrong schema."""


class ModelError(LorapipeError):
    """A base model, LoRA or tagger model cannot be loaded."""


class LoraFormatError(ModelError):
    """A LoRA file has unknown, missing or mis-shaped keys, or is not safetensors."""


class TrainingError(LorapipeError):
    """Training cannot continue (diverged, no data, bad resume point)."""


class PromptError(LorapipeError):
    """A prompt or negative-prompt preset is malformed."""
