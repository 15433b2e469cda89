"""The container image each component runs in; built from ``images/`` by ``make images``.

Override the registry or tag at compile time, e.g.
``LORAPIPE_REGISTRY=registry.example.com/ml LORAPIPE_IMAGE_TAG=2026-11 make compile``.
"""

import os

from lorapipe import __version__

REGISTRY = os.environ.get("LORAPIPE_REGISTRY", "ghcr.io/lorapipe")
TAG = os.environ.get("LORAPIPE_IMAGE_TAG", __version__)

# ingest, augment, select: pillow, pyarrow, boto3, safetensors (torch CPU for select)
BASE_IMAGE = f"{REGISTRY}/lorapipe-base:{TAG}"
# tag: TensorFlow + deepdanbooru
TAGGER_IMAGE = f"{REGISTRY}/lorapipe-tagger:{TAG}"
# train, generate: CUDA torch, diffusers, peft, accelerate
TORCH_IMAGE = f"{REGISTRY}/lorapipe-torch:{TAG}"
