"""LoRA files in the two formats SD tools read: diffusers/PEFT and kohya, for SD 1.x, 2.x, SDXL.

- **diffusers/PEFT** (``pytorch_lora_weights.safetensors``): keys as the pipelines'
  ``save_lora_weights`` writes them, ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight``,
  ``text_encoder.<module path>...`` (SDXL also ``text_encoder_2.``). The LoRA scale
  (alpha / rank) is not in the tensors: it travels as PEFT ``LoraConfig`` arguments in the header
  key ``lora_adapter_metadata``, which diffusers' ``load_lora_weights`` reads. A file without it
  loads with alpha = rank (scale 1).
- **kohya** (what A1111 WebUI's ``models/Lora`` and ComfyUI load; they ignore diffusers keys):
  ``<kohya module name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, module names as
  kohya sd-scripts writes them for the model family (``lorapipe.kohya_names``: SD 1.x/2.x
  ``lora_unet_down_blocks_0_...`` and ``lora_te_...``; SDXL the original LDM UNet names,
  ``lora_unet_input_blocks_4_1_...``, and ``lora_te1_`` / ``lora_te2_``). ``alpha`` is the
  trained ``lora_alpha`` as a 0-d float32 tensor, so every reader applies alpha / rank exactly
  as trained. The header carries kohya's ``ss_*`` and ModelSpec's ``modelspec.*`` keys with the
  family's values.

Both formats convert through one neutral form, ``{"unet.<diffusers path>": LoraModule}``; every
conversion is a pure function over state dicts and header metadata, told the model family. A LoRA
for another family than the base model's is refused in one line naming both. Files are read only
after their safetensors header checks out: a pickle or zip offered as weights is refused, never
unpickled.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapipe import store
from lorapipe.errors import LoraFormatError
from lorapipe.kohya_names import (
    LDM_ROOTS,
    TEXT_MODEL_PREFIX,
    UNET_PREFIX,
    KohyaNames,
    kohya_names,
    modelspec_implementation,
    neutral_name,
    numbers_unet_blocks,
)
from lorapipe.models.families import FAMILIES, SD1, SD2, ModelFamily

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for LoraConfig arguments
DIFFUSERS = "diffusers"
KOHYA = "kohya"

# every pipeline component a LoRA can adapt, over all families
COMPONENTS = ("unet", *dict.fromkeys(c for family in FAMILIES for c in family.text_encoders))
TEXT_ENCODER_PREFIXES = tuple(
    dict.fromkeys(prefix for family in FAMILIES for prefix in family.kohya_text_encoder_prefixes)
)
SD2_TEXT_WIDTH = 1024  # SD 2.x's OpenCLIP text encoder; SD 1.x's CLIP is 768 wide

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
HASH_LEGACY_OFFSET = 0x100000
HASH_LEGACY_LENGTH = 0x10000


@dataclass
class LoraModule:
    """One adapted layer: ``W + (alpha / rank) * up @ down``.

    ``down`` is (rank, in_features) or (rank, in_channels, kh, kw); ``up`` is (out_features, rank)
    or (out_channels, rank, 1, 1). ``source_key`` names the key it was read from, for messages.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    source_key: str = field(default="", compare=False)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" -> LoraModule
LoraModules = dict[str, LoraModule]


@dataclass
class TrainingFacts:
    """What kohya's ``ss_*`` header keys describe about a LoRA's training (None -> "None")."""

    output_name: str
    network_dim: int
    network_alpha: float
    steps: int | None = None
    epoch: int | None = None
    learning_rate: float | None = None
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    num_train_images: int | None = None
    resolution: tuple[int, int] = (512, 512)
    # aspect-ratio buckets, as kohya records them; bucket_info in ``ss_bucket_info``'s shape
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_no_upscale: bool = False
    bucket_info: Mapping[str, Any] | None = None
    seed: int | None = None
    # kohya's shape: {dataset folder name: {tag: count}}
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    training_started_at: float | None = None  # unix seconds
    training_finished_at: float | None = None  # unix seconds
    base_model_name: str | None = None
    family: ModelFamily = SD1  # the base model's: ss_base_model_version, modelspec.architecture
    prediction_type: str = "epsilon"  # what the UNet was trained to predict: or "v_prediction"
    # lorapipe's own keys, written as "lorapipe.<key>"
    lorapipe: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- diffusers/PEFT


def modules_from_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    default_alpha: float | None = None,
) -> LoraModules:
    """Read a diffusers/PEFT state dict. Each module's alpha comes from the header's
    ``lora_adapter_metadata`` when present, else ``default_alpha``, else its rank (what diffusers
    itself assumes for such a file)."""
    adapter_configs = _parse_adapter_metadata(metadata or {})
    pairs = _pair_keys(state_dict, _split_diffusers_key)
    modules: LoraModules = {}
    for name, (down_key, up_key) in pairs.items():
        component, path = name.split(".", 1)
        down, up = state_dict[down_key], state_dict[up_key]
        alpha = _configured_alpha(adapter_configs.get(component), path)
        if alpha is None:
            alpha = default_alpha if default_alpha is not None else float(down.shape[0])
        modules[neutral_name(component, path)] = LoraModule(
            down=down, up=up, alpha=float(alpha), source_key=down_key
        )
    return modules


def modules_to_diffusers(modules: LoraModules) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The diffusers/PEFT state dict and header metadata (``format`` and
    ``lora_adapter_metadata`` with rank and alpha per module) for ``modules``.

    Text-encoder keys keep the ``text_model.`` prefix (what every transformers version loads);
    the LoraConfig module names drop it, so PEFT's suffix match finds the layers whether or not
    the installed CLIP is flattened."""
    state_dict: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        state_dict[f"{name}.lora_A.weight"] = modules[name].down
        state_dict[f"{name}.lora_B.weight"] = modules[name].up
    adapter_metadata: dict[str, Any] = {}
    for component in sorted({name.split(".", 1)[0] for name in modules}):
        config = _lora_config_kwargs(
            {
                name.split(".", 1)[1].removeprefix(TEXT_MODEL_PREFIX): module
                for name, module in modules.items()
                if name.startswith(f"{component}.")
            }
        )
        adapter_metadata.update({f"{component}.{key}": value for key, value in config.items()})
    header = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, sort_keys=True)}
    return state_dict, header


def _split_diffusers_key(key: str) -> tuple[str, str | None]:
    """Split ``unet.<path>.lora_A.weight`` into ("unet.<path>", "down")."""
    for suffix, role in (
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
    ):
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            component = name.split(".", 1)[0]
            if component not in COMPONENTS or "." not in name:
                raise LoraFormatError(
                    f"LoRA key '{key}' starts with none of "
                    f"{', '.join(repr(c + '.') for c in COMPONENTS)}; only UNet and "
                    "text-encoder LoRAs are supported"
                )
            return name, role
    raise LoraFormatError(f"LoRA key '{key}' is not a LoRA weight ({_unsupported_hint(key)})")


def _parse_adapter_metadata(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{"unet": LoraConfig kwargs, ...} from diffusers' flattened ``lora_adapter_metadata``."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraFormatError(
            f"header key '{ADAPTER_METADATA_KEY}' is not JSON ({error.msg}); re-save the LoRA"
        ) from error
    configs: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for key, value in flat.items():
        component, _, argument = key.partition(".")
        configs[component][argument] = value
    return dict(configs)


def _configured_alpha(config: Mapping[str, Any] | None, path: str) -> float | None:
    if not config:
        return None
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path):
            return float(alpha)
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def _lora_config_kwargs(modules: Mapping[str, LoraModule]) -> dict[str, Any]:
    """PEFT LoraConfig arguments that give every module exactly its rank and alpha: the most
    common rank/alpha as defaults, the others as per-module patterns (full paths)."""
    rank = _most_common(m.rank for m in modules.values())
    alpha = _most_common(m.alpha for m in modules.values())
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {path: m.rank for path, m in sorted(modules.items()) if m.rank != rank},
        "alpha_pattern": {path: m.alpha for path, m in sorted(modules.items()) if m.alpha != alpha},
    }


def _most_common(values: Iterable[float]) -> Any:
    """The most frequent value; the smallest among equally frequent ones (order-independent)."""
    counts = collections.Counter(values)
    return max(counts, key=lambda value: (counts[value], -value))


# --------------------------------------------------------------------------- kohya


def modules_from_kohya(
    state_dict: Mapping[str, torch.Tensor],
    *,
    family: ModelFamily = SD1,
    module_names: Iterable[str] | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> LoraModules:
    """Read a kohya state dict made for ``family``. Names are resolved against ``module_names``
    ("unet.<path>", e.g. from a pipeline) when given, else by their segment names (SDXL's LDM
    block numbers by ``unet_config``, see ``kohya_names``). A module without ``.alpha`` gets
    alpha = rank, as kohya, A1111 and ComfyUI do."""
    check_family(state_dict, {}, family, "the LoRA")
    names = kohya_names(family, unet_config)
    lookup = names.lookup(module_names) if module_names is not None else None
    modules: LoraModules = {}
    pairs = _pair_keys(state_dict, lambda key: _split_kohya_key(key, names))
    for kohya_name, (down_key, up_key) in pairs.items():
        name = lookup.get(kohya_name) if lookup is not None else names.neutral_name(kohya_name)
        if name is None:
            raise LoraFormatError(
                f"LoRA key '{down_key}' names a module this {family.label} model does not have; "
                "the LoRA was made for another model architecture"
            )
        down = state_dict[down_key]
        alpha_tensor = state_dict.get(f"{kohya_name}.alpha")
        alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(down.shape[0])
        modules[name] = LoraModule(
            down=down, up=state_dict[up_key], alpha=alpha, source_key=down_key
        )
    return modules


def modules_to_kohya(
    modules: LoraModules,
    *,
    family: ModelFamily = SD1,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The kohya state dict for ``modules`` under ``family``'s names; ``alpha`` as a 0-d float32
    tensor."""
    import torch

    names = kohya_names(family, unet_config)
    state_dict: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        module = modules[name]
        kohya_name = names.kohya_name(name)
        state_dict[f"{kohya_name}.lora_down.weight"] = module.down
        state_dict[f"{kohya_name}.lora_up.weight"] = module.up
        state_dict[f"{kohya_name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    return state_dict


def _split_kohya_key(key: str, names: KohyaNames) -> tuple[str, str | None]:
    """Split ``lora_unet_x.lora_down.weight`` into ("lora_unet_x", "down"); role None for ``.alpha``."""
    name, _, suffix = key.partition(".")
    if names.component(name) is None:
        raise LoraFormatError(
            f"LoRA key '{key}' starts with {_none_of(names.prefixes.values())}; "
            f"it is not an {names.family.label} kohya LoRA"
        )
    roles = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": None}
    if suffix not in roles:
        raise LoraFormatError(f"LoRA key '{key}' is not a LoRA weight ({_unsupported_hint(key)})")
    return name, roles[suffix]


def _none_of(prefixes: Iterable[str]) -> str:
    quoted = [f"'{prefix}'" for prefix in prefixes]
    if len(quoted) == 2:
        return f"neither {quoted[0]} nor {quoted[1]}"
    return f"none of {', '.join(quoted)}"


def _unsupported_hint(key: str) -> str:
    if "dora_scale" in key or "lora_magnitude_vector" in key:
        return "DoRA is not supported; export a plain LoRA"
    if re.search(r"hada_|lokr_", key):
        return "LyCORIS LoHa/LoKr is not supported; export a plain LoRA"
    if key.endswith(".bias"):
        return "LoRA bias terms are not supported"
    return "expected lora_A/lora_B (diffusers) or lora_down/lora_up/alpha (kohya) keys"


def _pair_keys(
    state_dict: Mapping[str, Any], split: Callable[[str], tuple[str, str | None]]
) -> dict[str, tuple[str, str]]:
    """{module name: (down key, up key)}; a half pair or a stray alpha is an error naming it."""
    downs: dict[str, str] = {}
    ups: dict[str, str] = {}
    alphas: list[tuple[str, str]] = []
    for key in state_dict:
        name, role = split(key)
        if role == "down":
            downs[name] = key
        elif role == "up":
            ups[name] = key
        else:
            alphas.append((name, key))
    for name, key in downs.items():
        if name not in ups:
            raise LoraFormatError(
                f"LoRA key '{key}' has no matching up weight; the file is incomplete"
            )
    for name, key in ups.items():
        if name not in downs:
            raise LoraFormatError(
                f"LoRA key '{key}' has no matching down weight; the file is incomplete"
            )
    for name, key in alphas:
        if name not in downs:
            raise LoraFormatError(
                f"LoRA key '{key}' is an alpha without weights; the file is incomplete"
            )
    if not downs:
        raise LoraFormatError("the LoRA file holds no LoRA weights")
    return {name: (downs[name], ups[name]) for name in sorted(downs)}


# --------------------------------------------------------------------------- conversions


def diffusers_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    family: ModelFamily = SD1,
    default_alpha: float | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT state dict (+ its header metadata) as a kohya state dict for ``family``."""
    return modules_to_kohya(
        modules_from_diffusers(state_dict, metadata, default_alpha=default_alpha),
        family=family,
        unet_config=unet_config,
    )


def kohya_to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    *,
    family: ModelFamily = SD1,
    module_names: Iterable[str] | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya state dict as a diffusers/PEFT state dict and the header metadata carrying alpha."""
    return modules_to_diffusers(
        modules_from_kohya(
            state_dict, family=family, module_names=module_names, unet_config=unet_config
        )
    )


def modules_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    lora_format: str,
    *,
    family: ModelFamily = SD1,
    module_names: Iterable[str] | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> LoraModules:
    """The neutral form of a state dict in either format (as ``load_lora_state_dict`` returns it)."""
    if lora_format == KOHYA:
        return modules_from_kohya(
            state_dict, family=family, module_names=module_names, unet_config=unet_config
        )
    return modules_from_diffusers(state_dict, metadata)


def detect_format(state_dict: Mapping[str, Any], source: str = "the LoRA") -> str:
    """``"kohya"`` or ``"diffusers"``; one key that fits neither (or a mix) is an error naming it."""
    keys = list(state_dict)
    if not keys:
        raise LoraFormatError(f"{source} holds no tensors; it is not a LoRA")
    lora_format = KOHYA if keys[0].startswith("lora_") else DIFFUSERS
    for key in keys:
        if key.startswith("lora_") != (lora_format == KOHYA):
            raise LoraFormatError(
                f"{source}: key '{key}' mixes kohya (lora_unet_/lora_te_) and diffusers "
                "(unet./text_encoder.) names; export the LoRA in one format"
            )
    return lora_format


# --------------------------------------------------------------------------- families

# kohya UNet names under the original LDM module tree (what kohya writes for SDXL)
LDM_UNET_KEY = re.compile(rf"{UNET_PREFIX}({'|'.join(LDM_ROOTS)})_\d")


def lora_families(
    keys: Iterable[str], metadata: Mapping[str, str]
) -> tuple[tuple[ModelFamily, ...], str]:
    """(the families a LoRA can be for, the evidence in words). The header decides when it names
    a family (kohya's ``ss_base_model_version``, ModelSpec's architecture), else the first key
    that only some families have: a text encoder's kohya prefix or diffusers component, a UNet
    under LDM names. A UNet-only file with diffusers names fits every family."""
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "").split("/")[0]
    for family in FAMILIES:
        if version == family.base_model_version:
            return (family,), f"its ss_base_model_version is '{version}'"
        if architecture == family.modelspec_architecture:
            return (family,), f"its modelspec.architecture is '{architecture}'"
    for key in keys:
        fitting = tuple(family for family in FAMILIES if _key_fits(key, family))
        if len(fitting) < len(FAMILIES):
            evidence = f"key '{key}'"
            if LDM_UNET_KEY.match(key):
                evidence += " uses the original LDM module names"
            return fitting, evidence
    return FAMILIES, "its keys fit every family"


def _key_fits(key: str, family: ModelFamily) -> bool:
    name = key.split(".", 1)[0]
    if name.startswith(UNET_PREFIX):
        return not LDM_UNET_KEY.match(name) or numbers_unet_blocks(family)
    if name.startswith(TEXT_ENCODER_PREFIXES):
        return name.startswith(family.kohya_text_encoder_prefixes)
    if name in COMPONENTS and name != "unet":
        return name in family.text_encoders
    return True  # not a LoRA key: the format's reader names it


def check_family(
    keys: Iterable[str], metadata: Mapping[str, str], family: ModelFamily, source: str
) -> None:
    """Raise LoraFormatError, in one line naming ``source`` and both families, when the LoRA
    was made for another family than ``family``."""
    fitting, evidence = lora_families(keys, metadata)
    if family not in fitting:
        made_for = " or ".join(f.label for f in fitting)
        raise LoraFormatError(
            f"{source} is for {made_for} ({evidence}), but the base model is {family.label}; "
            f"give a LoRA made for {family.label}"
        )


# --------------------------------------------------------------------------- kohya metadata


def kohya_metadata(facts: TrainingFacts) -> dict[str, str]:
    """Header metadata as kohya sd-scripts writes it for a LoRA of ``facts.family`` (all values
    strings), with ModelSpec keys and lorapipe's own. The ``sshs_*`` hashes are added by
    ``save_kohya``."""
    finished = facts.training_finished_at
    width, height = facts.resolution
    family = facts.family
    metadata = {
        "ss_output_name": facts.output_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": facts.network_dim,
        "ss_network_alpha": float(facts.network_alpha),
        "ss_base_model_version": family.base_model_version,
        "ss_v2": family == SD2,
        "ss_steps": facts.steps,
        "ss_epoch": facts.epoch,
        "ss_learning_rate": facts.learning_rate,
        "ss_unet_lr": facts.unet_lr,
        "ss_text_encoder_lr": facts.text_encoder_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_resolution": (width, height),
        "ss_enable_bucket": facts.enable_bucket,
        "ss_min_bucket_reso": facts.min_bucket_reso,
        "ss_max_bucket_reso": facts.max_bucket_reso,
        "ss_bucket_no_upscale": facts.bucket_no_upscale,
        "ss_bucket_info": json.dumps(facts.bucket_info),
        "ss_seed": facts.seed,
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_training_started_at": facts.training_started_at,
        "ss_training_finished_at": finished,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": modelspec_implementation(family),
        "modelspec.title": facts.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if facts.prediction_type == "v_prediction" else "epsilon",
    }
    if facts.base_model_name:
        metadata["ss_sd_model_name"] = facts.base_model_name
    if finished is not None:
        metadata["modelspec.date"] = dt.datetime.fromtimestamp(
            int(finished), dt.timezone.utc
        ).isoformat()
    metadata.update({f"lorapipe.{key}": value for key, value in facts.lorapipe.items()})
    return {key: str(value) for key, value in metadata.items()}


def kohya_hashes(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) the way kohya sd-scripts precomputes them for
    sd-webui-additional-networks: the file is serialized with only its ``ss_*`` metadata; the
    model hash is the sha256 of everything after the header (the tensor data, so later metadata
    edits do not change it), the legacy hash the first 8 hex digits of the sha256 of the 64 KiB
    at offset 1 MiB (empty, for files that small)."""
    from safetensors.torch import save

    training_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save(dict(state_dict), metadata=training_metadata)
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    legacy = data[HASH_LEGACY_OFFSET : HASH_LEGACY_OFFSET + HASH_LEGACY_LENGTH]
    return model_hash, hashlib.sha256(legacy).hexdigest()[:8]


# --------------------------------------------------------------------------- files


def save_diffusers(
    path: str | os.PathLike, modules: LoraModules, extra_metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``modules`` as a diffusers/PEFT safetensors file that ``load_lora_weights`` loads
    with the trained alpha."""
    state_dict, metadata = modules_to_diffusers(modules)
    return _write_safetensors(Path(path), state_dict, {**(extra_metadata or {}), **metadata})


def save_kohya(
    path: str | os.PathLike,
    modules: LoraModules,
    metadata: Mapping[str, str],
    *,
    family: ModelFamily = SD1,
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``modules`` as a kohya safetensors file under ``family``'s names, with ``metadata``
    plus kohya's hashes."""
    state_dict = modules_to_kohya(modules, family=family, unet_config=unet_config)
    model_hash, legacy_hash = kohya_hashes(state_dict, metadata)
    header = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    return _write_safetensors(Path(path), state_dict, header)


def _write_safetensors(
    path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.detach().contiguous().cpu() for key, tensor in state_dict.items()}
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        temporary = Path(tmp.name)
    try:
        save_file(tensors, temporary, metadata=dict(metadata))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_lora_state_dict(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(state dict, header metadata, ``"kohya"`` | ``"diffusers"``) of a LoRA safetensors file,
    local or s3://. The header is checked before any tensor is read; anything that is not
    safetensors (a pickled .bin/.ckpt/.pt in particular) is refused without being unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with store.local_file(uri) as path:
        header = _safetensors_header(Path(path), uri)
        try:
            state_dict = load_file(path)
        except SafetensorError as error:
            raise LoraFormatError(
                f"'{uri}' is a damaged safetensors file ({error}); export it again"
            ) from error
    return state_dict, _header_metadata(header), detect_format(state_dict, f"'{uri}'")


def load_lora_header(uri: str) -> tuple[list[str], dict[str, str]]:
    """(tensor names, header metadata) of a LoRA safetensors file, without reading a tensor."""
    with store.local_file(uri) as path:
        header = _safetensors_header(Path(path), uri)
    return [key for key in header if key != "__metadata__"], _header_metadata(header)


def _header_metadata(header: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}


def _safetensors_header(path: Path, uri: str) -> dict[str, Any]:
    """The JSON header of the safetensors file at ``path``, read without touching the tensors;
    anything else is refused, saying what it is."""
    size = path.stat().st_size
    with path.open("rb") as file:
        start = file.read(8)
        header_length = int.from_bytes(start, "little") if len(start) == 8 else 0
        header: Any = None
        if 2 <= header_length <= min(size - 8, SAFETENSORS_MAX_HEADER):
            try:
                header = json.loads(file.read(header_length))
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
    if isinstance(header, dict):
        return header
    if start[:4] == b"PK\x03\x04" or start[:1] == b"\x80":
        raise LoraFormatError(
            f"'{uri}' is a pickled PyTorch checkpoint (.bin/.pt/.ckpt), which can run code when "
            "loaded; lorapipe never unpickles: give the LoRA as .safetensors"
        )
    raise LoraFormatError(f"'{uri}' is not a safetensors file; give the LoRA as .safetensors")


# --------------------------------------------------------------------------- pipelines


def pipeline_family(pipeline: Any) -> ModelFamily:
    """The family of a loaded pipeline: the one with the most text encoders the pipeline has
    (SDXL's two), SD 2.x told from SD 1.x by its text encoder's width as
    ``models.families`` tells them apart on disk."""
    fitting = [
        family
        for family in FAMILIES
        if all(getattr(pipeline, component, None) is not None for component in family.text_encoders)
    ]
    most = max(len(family.text_encoders) for family in fitting)
    fitting = [family for family in fitting if len(family.text_encoders) == most]
    if len(fitting) > 1:
        width = pipeline.text_encoder.config.hidden_size
        return SD2 if width == SD2_TEXT_WIDTH else SD1
    return fitting[0]


def pipeline_module_names(pipeline: StableDiffusionPipeline) -> list[str]:
    """Every layer a LoRA can adapt, as "unet.<path>" / "text_encoder.<path>" / ..."""
    return [name for name, _ in _adaptable_layers(pipeline)]


def check_against_pipeline(modules: LoraModules, pipeline: StableDiffusionPipeline) -> None:
    """Raise LoraFormatError naming the first key whose module the pipeline lacks or whose
    shapes do not fit that module."""
    layers = dict(_adaptable_layers(pipeline))
    label = pipeline_family(pipeline).label
    for name, module in sorted(modules.items()):
        layer = layers.get(name)
        key = module.source_key or name
        if layer is None:
            raise LoraFormatError(
                f"LoRA key '{key}' targets '{name}', which the base model does not have; "
                f"the LoRA was made for another architecture than this {label} model"
            )
        expected_down, expected_up = _expected_shapes(layer, module.rank)
        if tuple(module.down.shape) != expected_down or tuple(module.up.shape) != expected_up:
            raise LoraFormatError(
                f"LoRA key '{key}' has shapes {list(module.down.shape)}/{list(module.up.shape)} "
                f"but '{name}' needs {list(expected_down)}/{list(expected_up)}; "
                f"the LoRA was made for another base model size or family than this {label} one"
            )


def load_into_pipeline(
    pipeline: StableDiffusionPipeline, uri: str, *, adapter_name: str
) -> LoraModules:
    """Load a LoRA file in either format (local or s3://) into ``pipeline`` as ``adapter_name``,
    with its trained alpha, after checking it against the pipeline: its family, then every
    module's name and shapes."""
    state_dict, metadata, lora_format = load_lora_state_dict(uri)
    family = pipeline_family(pipeline)
    check_family(state_dict, metadata, family, f"LoRA '{uri}'")
    modules = modules_from_state_dict(
        state_dict,
        metadata,
        lora_format,
        family=family,
        module_names=pipeline_module_names(pipeline),
        unet_config=pipeline.unet.config,
    )
    check_against_pipeline(modules, pipeline)
    with tempfile.TemporaryDirectory(prefix="lorapipe-lora-") as directory:
        save_diffusers(Path(directory) / DIFFUSERS_WEIGHT_NAME, modules)
        pipeline.load_lora_weights(
            directory, weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=adapter_name
        )
    log.info("loaded %s LoRA %s (%d modules) as '%s'", lora_format, uri, len(modules), adapter_name)
    return modules


def _adaptable_layers(pipeline: StableDiffusionPipeline) -> list[tuple[str, Any]]:
    """("unet.<path>", layer) for every Linear/Conv2d; a layer PEFT already wrapped counts once,
    under its own path, and the adapters' own layers not at all."""
    import torch

    layers = []
    for component in COMPONENTS:
        model = getattr(pipeline, component, None)
        if model is None:
            continue
        for path, layer in model.named_modules():
            if ".lora_" in path or path.endswith(".base_layer"):
                continue
            layer = getattr(layer, "base_layer", layer)
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                layers.append((neutral_name(component, path), layer))
    return layers


def _expected_shapes(layer: Any, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    import torch

    if isinstance(layer, torch.nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)
