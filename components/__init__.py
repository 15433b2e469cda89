"""Kubeflow Pipelines components, one per lorapipe stage.

Each is a lightweight Python component with an ``Args:`` docstring whose body makes one call
into ``lorapipe.pipeline_steps``, which maps its artifacts to local paths and its parameters (the
stage's config keys) to the stage's config and calls the stage's ``run``; the same source runs
as a subprocess under ``kfp.local`` and in the stage's image (``images/``) on a cluster.
"""

from components.augment import augment
from components.fingerprint import fingerprint
from components.generate import generate
from components.ingest import ingest
from components.plan_sweep import plan_sweep
from components.report import run_report
from components.select import select
from components.tag import tag
from components.train import train

__all__ = [
    "augment",
    "fingerprint",
    "generate",
    "ingest",
    "plan_sweep",
    "run_report",
    "select",
    "tag",
    "train",
]
