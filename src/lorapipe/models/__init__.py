"""Base models: families (SD 1.x, SD 2.x, SDXL) and loading them offline from disk or S3."""

from lorapipe.models.families import FAMILIES, SD1, SD2, SDXL, ModelFamily
from lorapipe.models.loading import (
    SINGLE_FILE_SUFFIXES,
    load_base_model,
    model_cache_root,
    model_family,
    resolve_model_dir,
)

__all__ = [
    "FAMILIES",
    "SD1",
    "SD2",
    "SDXL",
    "SINGLE_FILE_SUFFIXES",
    "ModelFamily",
    "load_base_model",
    "model_cache_root",
    "model_family",
    "resolve_model_dir",
]
