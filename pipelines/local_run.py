"""``make run``: the whole DAG on this machine through kfp.local's SubprocessRunner.

Each component runs as a Python subprocess of this interpreter, so lorapipe must be installed
here (``make run`` does that). KFP ignores resources, retries, caching and Kubernetes settings
locally; everything else (artifacts, conditions, the sub-pipeline) runs as on a cluster.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from lorapipe import store
from lorapipe.errors import PipelineRunError
from pipelines.lora_training import PIPELINE_NAME


def run_local(out: Path, arguments: dict[str, Any], s3_prefix: str | None = None) -> Path:
    """Run the DAG on this machine; returns the review report's path.

    Without ``data_uri``/``base_model_uri`` the sample images and the tiny model are used
    (``lorapipe.demo``). With ``s3_prefix`` (``s3://bucket/path``), they are uploaded there and
    checkpoints and the LoRA are mirrored and published there, through the S3 endpoint and
    credentials in the environment (LORAPIPE_S3_ENDPOINT, AWS_ACCESS_KEY_ID, ...).
    """
    from kfp import local

    from lorapipe import demo
    from pipelines.lora_training import lora_training

    if "data_uri" not in arguments or "base_model_uri" not in arguments:
        data_dir, model_dir = demo.prepare_inputs(out / "inputs")
        defaults = {
            "data_uri": str(data_dir),
            "base_model_uri": str(model_dir),
            "training_config": demo.DEMO_TRAINING_CONFIG,
            "publish_uri": str(out / "published"),
            **demo.DEMO_REVIEW,
        }
        if s3_prefix:
            prefix = s3_prefix.rstrip("/")
            store.put_dir(data_dir, f"{prefix}/inputs/raw-images")
            store.put_dir(model_dir, f"{prefix}/inputs/tiny-sd")
            defaults.update(
                data_uri=f"{prefix}/inputs/raw-images",
                base_model_uri=f"{prefix}/inputs/tiny-sd",
                checkpoint_mirror_uri=f"{prefix}/checkpoints",
                publish_uri=f"{prefix}/loras",
            )
        arguments = {**defaults, **arguments}

    root = out / "pipeline-root"
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    before = set(root.glob(f"{PIPELINE_NAME}-*"))
    try:
        lora_training(**arguments)
    except RuntimeError as error:
        raise PipelineRunError(_failure_line(str(error), root)) from None
    (run_dir,) = set(root.glob(f"{PIPELINE_NAME}-*")) - before
    return collect_outputs(run_dir, out)


def _failure_line(kfp_message: str, root: Path) -> str:
    """kfp.local's failure ("... Inner task failed: 'ingest'.", with colour codes) as one line
    that names the task and where its log and artifacts are."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", kfp_message)
    task = re.search(r"Inner task failed: '([^']+)'", plain)
    name = task.group(1) if task else "a task"
    return (
        f"the pipeline stopped at task '{name}'; the last line of its log above is the "
        f"lorapipe error, its artifacts are under {root}"
    )


def collect_outputs(run_dir: Path, out: Path) -> Path:
    """Copy the review report next to the run (as report.html) and return its path."""
    (html,) = run_dir.glob("generate*/report")
    report = out / "report.html"
    shutil.copyfile(html, report)
    return report
