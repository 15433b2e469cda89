"""Single-file checkpoints (one ``.safetensors``, as WebUI, ComfyUI and kohya write them) as
diffusers directories.

The family comes from the file's tensor names, read from its header (for s3:// by a ranged
read), so an unsupported one fails before anything heavy loads. The file is converted once,
with diffusers' single-file loader and the component configs lorapipe ships for the family
(``lorapipe/data/model_configs/<family>``), or the user's ``base_model_config``, into the model
cache under its sha256; every later run loads the converted directory. Nothing reaches a model
hub. Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused and never unpickled.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapipe import store
from lorapipe.errors import ModelError, ObjectNotFoundError
from lorapipe.models.families import SDXL, ModelFamily, family_of_keys
from lorapipe.models.file_hash import file_sha256

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLED_SUFFIXES)
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model_configs"
MODEL_INDEX = "model_index.json"
SOURCE_RECORD = "lorapipe_single_file.json"  # in a converted directory: the file it came from
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
# ModelSpec's prediction_type values -> the diffusers scheduler's
PREDICTION_TYPES = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon"}
HALF_DTYPES = {"F16": "float16", "BF16": "bfloat16"}  # safetensors' names -> torch's
UNET_PREFIX = "model.diffusion_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1."


@dataclass(frozen=True)
class Header:
    """What a safetensors header says without a tensor being read."""

    keys: list[str]
    dtypes: dict[str, str]  # tensor name -> safetensors dtype ("F16", ...)
    metadata: dict[str, str]


def is_single_file(uri: str) -> bool:
    return uri.lower().endswith(SINGLE_FILE_SUFFIXES)


def converted_model_dir(uri: str, *, config_dir: str, cache_root: Path) -> Path:
    """The diffusers directory holding the weights of the single file at ``uri`` (local or
    s3://), converted on first use and reused while the file's sha256 and the configs stay."""
    suffix = Path(uri).suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise ModelError(
            f"base model '{uri}' is a pickled checkpoint ({suffix}), which lorapipe never "
            "unpickles (loading one can run code): convert it to .safetensors with a tool you "
            "trust, or give a diffusers directory"
        )
    header = read_header(uri)
    family = family_of_keys(header.keys, uri)
    configs = _config_dir(config_dir, family, uri)
    path = _local_copy(uri, cache_root)
    sha256 = file_sha256(path, cache_root)
    directory = cache_root / "single-file" / f"{sha256[:32]}-{_fingerprint(configs)}"
    if not (directory / MODEL_INDEX).is_file():
        log.info("converting %s (%s) once into %s", uri, family.label, directory)
        pipeline = _from_single_file(path, uri, family, configs, header, config_dir)
        record = {
            "source": uri,
            "sha256": sha256,
            "family": family.name,
            "configs": config_dir or f"lorapipe's {family.name}",
        }
        _save(pipeline, record, directory)
    return directory


def single_file_sha256(model_dir: Path) -> str | None:
    """The sha256 of the single file a converted directory was made from; None for any other
    directory."""
    record = model_dir / SOURCE_RECORD
    return json.loads(record.read_text())["sha256"] if record.is_file() else None


def read_header(uri: str) -> Header:
    """The tensor names, dtypes and metadata of a safetensors file, local or s3://, from its
    first bytes only."""
    try:
        length = int.from_bytes(store.read_range(uri, 0, 8), "little")
        raw = store.read_range(uri, 8, length) if 0 < length <= MAX_HEADER_BYTES else b""
    except ObjectNotFoundError:
        raise ModelError(
            f"base model '{uri}' does not exist; give a .safetensors checkpoint or a diffusers "
            "directory"
        ) from None
    try:
        header = json.loads(raw) if len(raw) == length else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ModelError(
            f"base model '{uri}' is not a safetensors file (its header does not parse); give a "
            ".safetensors checkpoint or a diffusers directory"
        )
    metadata = header.pop("__metadata__", None) or {}
    dtypes = {key: str(entry.get("dtype", "")) for key, entry in header.items()}
    return Header(keys=list(header), dtypes=dtypes, metadata=metadata)


def _config_dir(config_dir: str, family: ModelFamily, uri: str) -> Path:
    """The user's ``base_model_config``, checked to be a directory of the file's family, or the
    shipped configs of the family."""
    if not config_dir:
        return SHIPPED_CONFIGS / family.name
    directory = Path(config_dir).expanduser()
    if not (directory / MODEL_INDEX).is_file():
        raise ModelError(
            f"base_model_config '{config_dir}' is not a diffusers directory (no {MODEL_INDEX}); "
            f"give one whose configs fit '{uri}'"
        )
    class_name = json.loads((directory / MODEL_INDEX).read_text()).get("_class_name")
    if class_name != family.pipeline_class:
        raise ModelError(
            f"base_model_config '{config_dir}' is a {class_name} directory but '{uri}' is "
            f"{family.label}; give a {family.pipeline_class} directory whose configs fit it"
        )
    return directory


def _local_copy(uri: str, cache_root: Path) -> Path:
    """``uri`` as a local file: itself, or an s3:// object downloaded once into the cache
    (keyed by its ETag, so a replaced object is fetched again)."""
    if not store.is_s3(uri):
        return Path(uri.removeprefix("file://")).expanduser()
    info = store.object_info(uri)
    key = hashlib.sha256(f"{uri}\0{info.etag}\0{info.size}".encode()).hexdigest()[:24]
    path = cache_root / "downloads" / key / Path(store.split_s3(uri)[1]).name
    if not path.is_file():
        log.info("downloading base model %s to %s", uri, path)
        store.download_file(uri, path)
    return path


def _fingerprint(configs: Path) -> str:
    """A short digest of every config file, so that other configs make another conversion."""
    digest = hashlib.sha256()
    for file in sorted(p for p in configs.rglob("*") if p.suffix in (".json", ".txt")):
        digest.update(f"{file.relative_to(configs)}\0".encode() + file.read_bytes())
    return digest.hexdigest()[:8]


def _from_single_file(
    path: Path, uri: str, family: ModelFamily, configs: Path, header: Header, config_dir: str
) -> DiffusionPipeline:
    """The file's pipeline, every weight of it from the file, with the prediction type the file
    states."""
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    dtype = _weights_dtype(header)  # None: float32, what diffusers builds in anyway
    components: dict[str, Any] = (
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if family.has_safety_checker
        else {}
    )
    try:
        if family is SDXL:
            components["text_encoder_2"] = _open_clip_text_encoder(path, configs, dtype)
        pipeline = getattr(diffusers, family.pipeline_class).from_single_file(
            str(path), config=str(configs), local_files_only=True, torch_dtype=dtype, **components
        )
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as error:
        raise _misfit(uri, family, config_dir, _first_sentence(error)) from error
    missing = _missing_weights(pipeline)
    if missing:
        raise _misfit(uri, family, config_dir, f"no weights for {missing}")
    stated = header.metadata.get("modelspec.prediction_type", "")
    prediction_type = PREDICTION_TYPES.get(stated.lower())
    if prediction_type:
        scheduler = pipeline.scheduler
        pipeline.scheduler = type(scheduler).from_config(
            scheduler.config, prediction_type=prediction_type
        )
    return pipeline


def _open_clip_text_encoder(path: Path, configs: Path, dtype: torch.dtype | None) -> Any:
    """SDXL's second text encoder converted from its own tensors only: diffusers tells a file's
    text encoders apart by their width, so two of one width would both get the first's."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection

    with safe_open(str(path), framework="pt") as file:
        tensors = {
            key: file.get_tensor(key)
            for key in file.keys()  # noqa: SIM118 - safe_open is not a mapping
            if key.startswith(SDXL_OPEN_CLIP_PREFIX)
        }
    return create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection,
        checkpoint=tensors,
        config=str(configs),
        subfolder="text_encoder_2",
        local_files_only=True,
        torch_dtype=dtype,
    )


def _weights_dtype(header: Header) -> torch.dtype | None:
    """The UNet's stored half-precision dtype, so the converted copy takes the file's size on
    disk; None for float32."""
    import torch

    counts = collections.Counter(
        dtype for key, dtype in header.dtypes.items() if key.startswith(UNET_PREFIX)
    )
    stored = counts.most_common(1)[0][0] if counts else ""
    return getattr(torch, HALF_DTYPES[stored]) if stored in HALF_DTYPES else None


def _missing_weights(pipeline: DiffusionPipeline) -> str:
    """The first weight the file did not fill ("unet: conv_in.weight"), or ""."""
    import torch

    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            for weight, tensor in component.state_dict().items():
                if tensor.is_meta:
                    return f"{name}: {weight}"
    return ""


def _misfit(uri: str, family: ModelFamily, config_dir: str, reason: str) -> ModelError:
    configs = (
        f"base_model_config '{config_dir}'" if config_dir else f"lorapipe's {family.label} configs"
    )
    return ModelError(
        f"base model '{uri}' does not fit {configs} ({reason}); give base_model_config: DIR, a "
        "diffusers directory whose configs fit it"
    )


def _first_sentence(error: BaseException) -> str:
    """The error's first sentence, without the advice diffusers appends (which does not apply)."""
    sentence = " ".join(str(error).split()).split(". ")[0].rstrip(".")
    return re.sub(r"^Cannot load \S* ?because ", "", sentence) or type(error).__name__


def _save(pipeline: DiffusionPipeline, record: dict[str, str], directory: Path) -> None:
    """Write the converted directory under a temporary name and rename it into place, so it
    is whole or absent; a process that lost the race to another keeps the other's."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".converting-"))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.replace(staging, directory)
        except OSError:
            if not (directory / MODEL_INDEX).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
