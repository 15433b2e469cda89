"""Base models: load a diffusers-format pipeline (SD 1.x, SD 2.x, SDXL) from disk or S3.

Real weights come from the user as a diffusers directory (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), local or under an s3:// prefix,
or as one ``.safetensors`` checkpoint, local or s3://, which ``lorapipe.models.single_file``
converts once into such a directory. Nothing here reaches a model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lorapipe import store
from lorapipe.errors import ModelError
from lorapipe.models.families import (
    ModelFamily,
    check_pipeline_class,
    family_of_directory,
    family_of_keys,
)
from lorapipe.models.single_file import (
    SAFETENSORS_SUFFIX,
    converted_model_dir,
    is_single_file,
    read_header,
)

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"


def resolve_model_dir(uri: str, *, config_dir: str = "") -> Path:
    """A local diffusers directory for ``uri``. An s3:// prefix is downloaded once into a cache
    keyed by its objects' ETags, so a changed model is fetched again and an unchanged one is not;
    a single ``.safetensors`` file is converted once, with the component configs of
    ``config_dir`` (``base_model_config``) or those lorapipe ships for its family."""
    if is_single_file(uri):
        return converted_model_dir(uri, config_dir=config_dir, cache_root=model_cache_root())
    if config_dir:
        log.warning("base_model_config '%s' is ignored: '%s' is a directory", config_dir, uri)
    if store.is_s3(uri):
        return _cached_s3_model(uri)
    directory = Path(uri.removeprefix("file://")).expanduser()
    _check_diffusers_dir(directory, uri)
    return directory


def _check_diffusers_dir(directory: Path, uri: str) -> None:
    if directory.is_file():
        raise ModelError(
            f"base model '{uri}' is a file lorapipe cannot read; give a .safetensors checkpoint "
            "or a diffusers-format model directory"
        )
    if not directory.is_dir():
        raise ModelError(
            f"base model '{uri}' does not exist; give a diffusers-format model directory"
        )
    if not (directory / MODEL_INDEX).is_file():
        raise ModelError(
            f"base model '{uri}' has no {MODEL_INDEX}; give a diffusers-format model directory "
            "(as written by save_pretrained)"
        )


def model_cache_root() -> Path:
    """Where downloaded base models live (``LORAPIPE_CACHE``, default ~/.cache/lorapipe)."""
    return Path(os.environ.get("LORAPIPE_CACHE", Path.home() / ".cache" / "lorapipe")) / "models"


def _cached_s3_model(uri: str) -> Path:
    objects = store.list_objects(uri)
    if not objects:
        raise ModelError(
            f"base model '{uri}' has no objects; upload a diffusers-format model there"
        )
    fingerprint = hashlib.sha256()
    for obj in objects:
        fingerprint.update(f"{obj.uri}\0{obj.etag}\0{obj.size}\n".encode())
    directory = model_cache_root() / fingerprint.hexdigest()[:24]
    if not (directory / MODEL_INDEX).is_file():
        index_uri = store.join(uri, MODEL_INDEX)
        if any(obj.uri == index_uri for obj in objects):  # another family: refused undownloaded
            check_pipeline_class(json.loads(store.read_text(index_uri)).get("_class_name", ""), uri)
        log.info("downloading base model %s to %s", uri, directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".download-"))
        try:
            store.get_dir(uri, download)
            _check_diffusers_dir(download, uri)
            os.replace(download, directory)
        finally:
            shutil.rmtree(download, ignore_errors=True)
    return directory


def model_family(uri: str) -> ModelFamily:
    """The family of the base model at ``uri``: read from a directory's ``model_index.json``, or
    from a single file's tensor names (without converting it)."""
    if uri.lower().endswith(SAFETENSORS_SUFFIX):
        return family_of_keys(read_header(uri).keys, uri)
    return family_of_directory(resolve_model_dir(uri))


def load_base_model(
    uri: str, *, torch_dtype: torch.dtype | None = None, config_dir: str = ""
) -> DiffusionPipeline:
    """Load the diffusers pipeline of ``uri`` (its family's class) from a local directory, an
    s3:// prefix or a single file (``config_dir``: see ``resolve_model_dir``), offline."""
    import diffusers
    import torch

    directory = resolve_model_dir(uri, config_dir=config_dir)
    family = family_of_directory(directory)
    pipeline_class = getattr(diffusers, family.pipeline_class)
    extra = (
        {"safety_checker": None, "requires_safety_checker": False}
        if family.has_safety_checker
        else {}
    )
    try:
        return pipeline_class.from_pretrained(
            directory,
            dtype=torch_dtype or torch.float32,
            local_files_only=True,
            use_safetensors=True,  # never unpickle a .bin/.ckpt from a model directory
            **extra,
        )
    except (OSError, ValueError, KeyError) as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise ModelError(f"base model '{uri}' could not be loaded: {first_line}") from error
