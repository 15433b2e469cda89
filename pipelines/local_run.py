"""``make run``: the whole DAG on this machine through kfp.local's SubprocessRunner.

Each component runs as a Python subprocess of this interpreter, so lorapipe must be installed
here (``make run`` does that). KFP ignores resources, retries, caching and Kubernetes settings
locally; everything else (artifacts, conditions, the sub-pipeline) runs as on a cluster.
"""

from __future__ import annotations

import builtins
import json
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lorapipe import store
from lorapipe.demo.claims import Claim, RunOutputs, check_run
from lorapipe.errors import PipelineRunError
from lorapipe.report.run_report import StageOutputs, write_run_report
from pipelines.lora_training import PIPELINE_NAME

# each train task's output, in its sweep iteration's folder (kfp.local's layout)
TRAININGS = "for-loop-*/train*/training"


@dataclass(frozen=True)
class LocalRun:
    """A finished local run: its run report and, for the demo, what the run showed; or, when
    the inputs had not changed since the published LoRA's, why nothing was trained (``report``
    is then the last training's, if any)."""

    report: Path
    claims: list[Claim] = field(default_factory=list)
    trained: bool = True
    reason: str = ""


def run_local(
    out: Path,
    arguments: dict[str, Any],
    s3_prefix: str | None = None,
    *,
    compare_scraped: bool = True,
) -> LocalRun:
    """Run the DAG on this machine.

    Without ``data_uri``/``base_model_uri`` the demo runs (``lorapipe.demo.inputs``): the
    world's sample images, base model and tagger; with the tagger and ``compare_scraped``, the
    DAG runs a second time under ``out/scraped`` on the captions as scraped
    (``demo.DEMO_SCRAPED_RUN``), to measure cleaning against the negative preset. Afterwards
    the claims are measured (``lorapipe.demo.claims``), written to ``demo_checks.json`` and
    shown in the run report (``out/report.html``). The LoRA is published to ``out/published``,
    so a second run on unchanged inputs stops after the fingerprint step, trains nothing and
    leaves the report as it was (``force_retrain`` trains anyway). With ``s3_prefix`` (``s3://bucket/path``), the inputs are
    uploaded there and checkpoints and the LoRA are mirrored and published there, through the
    S3 endpoint and credentials in the environment (LORAPIPE_S3_ENDPOINT, AWS_ACCESS_KEY_ID,
    ...).
    """
    from lorapipe.demo import inputs as demo

    demo_folder = None
    if "data_uri" not in arguments or "base_model_uri" not in arguments:
        demo_folder, model_dir, tagger_dir = demo.prepare_inputs(out / "inputs")
        defaults = {
            "data_uri": str(demo_folder),
            "base_model_uri": str(model_dir),
            "tagger_uri": str(tagger_dir),
            "training_config": demo.DEMO_TRAINING_CONFIG,
            "publish_uri": str(out / "published"),
            **demo.DEMO_REVIEW,
        }
        if s3_prefix:
            prefix = s3_prefix.rstrip("/")
            inputs = {
                "data_uri": demo_folder,
                "base_model_uri": model_dir,
                "tagger_uri": tagger_dir,
            }
            for name, directory in inputs.items():
                store.put_dir(directory, f"{prefix}/inputs/{directory.name}")
                defaults[name] = f"{prefix}/inputs/{directory.name}"
            defaults.update(
                checkpoint_mirror_uri=f"{prefix}/checkpoints", publish_uri=f"{prefix}/loras"
            )
        arguments = {**defaults, **arguments}

    run_dir = _run_pipeline(out / "pipeline-root", arguments)
    checked = json.loads((run_dir / "fingerprint" / "inputs" / "report.json").read_text())
    if not checked["retrain"]:
        return LocalRun(out / "report.html", trained=False, reason=checked["reason"])
    report = collect_outputs(run_dir, out)
    if demo_folder is None:
        return LocalRun(report)
    outputs = demo_outputs(run_dir, demo.truth_file(demo_folder))
    if compare_scraped and arguments.get("tagger_uri"):
        scraped_run = {**arguments, **demo.DEMO_SCRAPED_RUN}
        scraped_dir = _run_pipeline(out / "scraped" / "pipeline-root", scraped_run)
        collect_outputs(scraped_dir, out / "scraped")
        (scraped_generated,) = scraped_dir.glob("generate*/images")
        outputs = replace(outputs, scraped_generated=scraped_generated)
    claims = check_run(outputs)
    store.write_text(
        str(out / "demo_checks.json"), json.dumps([asdict(c) for c in claims], indent=1) + "\n"
    )
    write_run_report(stage_outputs(run_dir), report, claims)
    return LocalRun(report, claims)


def _run_pipeline(root: Path, arguments: dict[str, Any]) -> Path:
    """Run the DAG with ``arguments`` under the pipeline root ``root``; its run directory."""
    from kfp import local

    from pipelines.lora_training import lora_training

    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    before = set(root.glob(f"{PIPELINE_NAME}-*"))
    # kfp.local indents a task's output by swapping builtins.print and back; tasks of a
    # ParallelFor run in threads, whose swaps interleave and can leave print indented for good
    original_print = builtins.print
    try:
        lora_training(**arguments)
    except RuntimeError as error:
        raise PipelineRunError(_failure_line(str(error), root)) from None
    finally:
        builtins.print = original_print
    (run_dir,) = set(root.glob(f"{PIPELINE_NAME}-*")) - before
    return run_dir


def demo_outputs(run_dir: Path, truth: Path) -> RunOutputs:
    """The artifacts of a kfp.local run directory that the demo's claims read."""

    def artifact(pattern: str) -> Path:
        (path,) = run_dir.glob(pattern)
        return path

    tagged = list(run_dir.glob("tag*/tagged"))
    return RunOutputs(
        ingest_report=artifact("ingest/dataset/report.json"),
        tagged_dataset=tagged[0] if tagged else None,
        training=Path(_winning_training(run_dir)),
        selection_report=artifact("select*/lora/report.json"),
        generated=artifact("generate*/images"),
        truth=truth,
    )


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


def stage_outputs(run_dir: Path) -> StageOutputs:
    """Each stage's output folder in a kfp.local run directory (the tag stage's only when the
    tagger ran)."""

    def artifact(pattern: str) -> str | None:
        found = sorted(run_dir.glob(pattern))
        return str(found[0]) if found else None

    return StageOutputs(
        fingerprint=artifact("fingerprint/inputs"),
        ingest=artifact("ingest/dataset"),
        tag=artifact("tag*/tagged"),
        augment=artifact("augment*/augmented"),
        train=_winning_training(run_dir) if list(run_dir.glob(TRAININGS)) else None,
        select=artifact("select*/lora"),
        generate=artifact("generate*/images"),
    )


def _winning_training(run_dir: Path) -> str:
    """The training select chose from: of a sweep's, the winner's."""
    from lorapipe.pipeline_steps import winning_training

    trainings = [str(path) for path in sorted(run_dir.glob(TRAININGS))]
    (selection,) = run_dir.glob("select*/lora/report.json")
    return winning_training(trainings, json.loads(selection.read_text()))


def collect_outputs(run_dir: Path, out: Path) -> Path:
    """Write the run report next to the run (``out/report.html``, full-size images linked
    into the run directory) and return its path."""
    return write_run_report(stage_outputs(run_dir), out / "report.html")
