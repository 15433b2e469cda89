"""The LoRAs of a generate job: located (a file or select's output), named as prompts tag them,
hashed as WebUI hashes them and checked against the base model's family; and the base model's
short hash."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorapipe import lora_format, store
from lorapipe.errors import ModelError
from lorapipe.models import single_file_sha256

if TYPE_CHECKING:
    from lorapipe.models import ModelFamily

HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoraSource:
    """A LoRA of the job: the name prompts use, the file loaded, the hash WebUI shows."""

    name: str
    uri: str  # as given
    weights_uri: str  # the .safetensors file loaded
    webui_hash: str  # 12 hex: A1111's "Lora hashes" value for this LoRA
    adapter: str  # adapter name inside the pipeline


def parse_lora_flag(text: str) -> tuple[str, str]:
    """``NAME=URI`` or a bare URI (named after its file stem / directory)."""
    name, separator, uri = text.partition("=")
    if separator and "/" not in name and not name.startswith("s3:"):
        return name.strip(), uri.strip()
    return "", text.strip()


def locate_lora(uri: str) -> tuple[str, str, str]:
    """(default name, file to load, file WebUI would hash) of a LoRA given as a .safetensors
    file or a directory. select's output holds ``pytorch_lora_weights.safetensors`` and a kohya
    ``<name>.safetensors``: the diffusers file is loaded, the kohya file names and hashes the
    LoRA, as WebUI sees it."""
    located = store.resolve(uri)
    if located.rstrip("/").endswith(".safetensors"):
        return _stem(located), located, located
    files = [u for u in store.list_uris(located) if u.endswith(".safetensors")]
    diffusers = [u for u in files if basename(u) == lora_format.DIFFUSERS_WEIGHT_NAME]
    others = [u for u in files if u not in diffusers]
    if not files:
        raise ModelError(
            f"LoRA '{uri}' has no .safetensors file; give a LoRA file or select's output"
        )
    if not diffusers and len(others) > 1:
        raise ModelError(
            f"LoRA '{uri}' holds {len(others)} .safetensors files; give the LoRA file itself"
        )
    weights = diffusers[0] if diffusers else others[0]
    if len(others) == 1:
        return _stem(others[0]), weights, others[0]
    return basename(uri), weights, weights


def resolve_lora(name: str, uri: str, *, adapter: str) -> LoraSource:
    """The LoRA of the job called ``name`` (or its default name) at ``uri``."""
    default_name, weights, hash_file = locate_lora(uri)
    return LoraSource(
        name=name or default_name,
        uri=uri,
        weights_uri=weights,
        webui_hash=webui_lora_hash(hash_file),
        adapter=adapter,
    )


def check_lora_family(lora: LoraSource, family: ModelFamily) -> None:
    """A LoRA made for another family than the base model's (an SD 1.x LoRA on SDXL, or the
    reverse) fails in one line naming both, from the file's header alone, before the model
    loads."""
    keys, metadata = lora_format.load_lora_header(lora.weights_uri)
    lora_format.check_family(keys, metadata, family, f"LoRA '{lora.name}' ({lora.weights_uri})")


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1].removeprefix("file://")


def _stem(uri: str) -> str:
    return basename(uri).rsplit(".", 1)[0]


def webui_lora_hash(uri: str) -> str:
    """A1111's LoRA short hash: the first 12 hex digits of the sha256 of a safetensors file's
    tensor data (everything after the header), kohya's ``sshs_model_hash``."""
    digest = hashlib.sha256()
    with store.local_file(uri) as path, path.open("rb") as file:
        lora_format._safetensors_header(path, uri)  # not safetensors: one line, never unpickled
        header_length = int.from_bytes(file.read(8), "little")
        file.seek(8 + header_length)
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def model_short_hash(model_dir: Path) -> str:
    """The PNG's ``Model hash``: for a base model given as a single file, WebUI's own (the
    first 10 hex digits of the file's sha256), so its PNG Info finds the model; for a diffusers
    directory, which has no single file, 10 hex digits of the sha256 of the UNet weights (the
    start of training's ``base_model_hash``)."""
    file_sha256 = single_file_sha256(model_dir)
    if file_sha256:
        return file_sha256[:10]
    digest = hashlib.sha256()
    weights = sorted((model_dir / "unet").glob("*.safetensors")) or sorted(
        (model_dir / "unet").glob("*.bin")
    )
    for path in weights:
        with path.open("rb") as file:
            while chunk := file.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:10]
