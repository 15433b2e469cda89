"""The DAG: fingerprint -> ingest -> [tag] -> augment -> train (one per run of the sweep) ->
select -> generate -> run report.

The first step fingerprints every input (``lorapipe.retraining``); when nothing changed since
the LoRA ``latest.json`` records, the run stops there (``dsl.If`` on its ``retrain`` output)
unless ``force_retrain``. Its digests are inputs of ingest and tag, so their KFP cache key
changes exactly when the files under ``data_uri``/``metadata_uri``/``tagger_uri`` do.

Tagging runs only when a DeepDanbooru project is given (``dsl.If``). KFP cannot yet hand one
of two conditional artifacts to a later task when running locally (``dsl.OneOf`` of
artifacts), so the stages after tagging form one sub-pipeline, ``augment_train_review``,
that each branch calls with its dataset; exactly one branch runs.

Cluster wiring lives here and nowhere else: images come from ``components.images``; S3
credentials from the ``lorapipe-s3`` Secret and the endpoint from the ``lorapipe-s3``
ConfigMap (``k8s/``), both as environment variables, never as parameters; train gets the GPUs,
a memory-backed /dev/shm for its data-loader workers and retries that resume from mirrored
checkpoints; the deterministic data stages are cached, on their inputs' fingerprints; the
fingerprint step never is.
"""

import os
from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input

from components import (
    augment,
    fingerprint,
    generate,
    ingest,
    plan_sweep,
    run_report,
    select,
    tag,
    train,
)
from components.images import TORCH_IMAGE
from pipelines import parameters

PIPELINE_NAME = "lorapipe-lora-training"
PIPELINE_YAML = Path(__file__).with_name("lora_training.yaml")
S3_SECRET = "lorapipe-s3"
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
S3_CONFIG_MAP = "lorapipe-s3"
S3_CONFIG_KEYS = {
    "LORAPIPE_S3_ENDPOINT": "LORAPIPE_S3_ENDPOINT",
    "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
}

# The seed article's keys as one line of YAML (KFP writes parameter defaults into a comment
# header, which a multi-line default would break). The pipeline itself sets train_data_dir,
# metadata_path, base_model, output_dir and log_dir.
DEFAULT_TRAINING_CONFIG = (
    "{output_name: my_lora, lora_rank: 16, lora_alpha: 16, "
    "target_modules: [to_q, to_k, to_v, to_out.0], batch_size: 4, epochs: 10, "
    "learning_rate: 1e-4, optimizer: AdamW, scheduler: cosine, lr_warmup_steps: 50, "
    "save_steps: 100, resolution: 512, mixed_precision: bf16, validation_split: 0.1}"
)
DEFAULT_PROMPTS = ["a photo of a street at dusk, film grain"]
# trainings of a sweep at once; KFP takes a ParallelFor's parallelism when it compiles, not as
# a run parameter: `LORAPIPE_MAX_PARALLEL_TRAINS=8 make compile`
MAX_PARALLEL_TRAINS = int(os.environ.get("LORAPIPE_MAX_PARALLEL_TRAINS", "4"))


def _with_s3_access(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Credentials and endpoint as env vars; optional, so IAM roles (IRSA) work too."""
    kubernetes.use_secret_as_env(task, S3_SECRET, S3_SECRET_KEYS, optional=True)
    kubernetes.use_config_map_as_env(task, S3_CONFIG_MAP, S3_CONFIG_KEYS, optional=True)
    return task


def _data_stage(task: dsl.PipelineTask, *, cpu: str, memory: str) -> dsl.PipelineTask:
    """Deterministic: cached on identical inputs, retried on storage hiccups."""
    task.set_caching_options(True)
    task.set_retry(num_retries=2, backoff_duration="10s", backoff_factor=2)
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    return _with_s3_access(task)


def _train_task(arguments: dict, *, gpus: Any) -> dsl.PipelineTask:
    """The train step: it trains on its own ``gpus`` (the num_gpus parameter), or, with None,
    only coordinates a TrainJob whose nodes hold them."""
    trained = train(**arguments)
    trained.set_display_name("train LoRA")
    trained.set_caching_options(False)
    trained.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2)
    if gpus is not None:
        trained.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        trained.set_cpu_request("8").set_memory_request("32Gi").set_memory_limit("64Gi")
    else:
        trained.set_cpu_request("1").set_memory_request("2Gi").set_memory_limit("8Gi")
    return _with_s3_access(trained)


def _select_and_review(
    trained: dsl.PipelineTask,  # the train task in the sweep's ParallelFor
    data: dict[str, Any],
    *,
    base_model_uri: str,
    epsilon: float,
    publish_uri: str,
    promote: str,
    promotion_epsilon: float,
    run_fingerprint: str,
    prompts: list,
    negative_presets: list,
    lora_scales: list,
    cfg_scales: list,
    seeds: list,
    steps: int,
    job_yaml: str,
) -> None:
    selected = select(
        trainings=dsl.Collected(trained.outputs["training"]),
        epsilon=epsilon,
        publish_uri=publish_uri,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        promote=promote,
        promotion_epsilon=promotion_epsilon,
        fingerprint=run_fingerprint,
    )
    selected.set_display_name("select checkpoint")
    selected.set_caching_options(False)
    selected.set_retry(num_retries=2, backoff_duration="30s")
    selected.set_cpu_request("1").set_memory_request("4Gi").set_memory_limit("8Gi")
    _with_s3_access(selected)

    review = generate(
        base_model_uri=base_model_uri,
        lora=selected.outputs["lora"],
        prompts=prompts,
        negative_presets=negative_presets,
        lora_scales=lora_scales,
        cfg_scales=cfg_scales,
        seeds=seeds,
        steps=steps,
        job_yaml=job_yaml,
    )
    review.set_display_name("generate review grid")
    review.set_caching_options(False)
    review.set_retry(num_retries=1, backoff_duration="60s")
    review.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    review.set_cpu_request("4").set_memory_request("16Gi").set_memory_limit("32Gi")
    _with_s3_access(review)

    page = run_report(
        **data,
        # a Collected of its own: the compiler refuses one shared by two tasks
        trainings=dsl.Collected(trained.outputs["training"]),
        lora=selected.outputs["lora"],
        images=review.outputs["images"],
    )
    page.set_display_name("run report")
    page.set_caching_options(False)
    page.set_cpu_request("1").set_memory_request("2Gi").set_memory_limit("4Gi")
    _with_s3_access(page)


def _sweep_run(run: Any) -> dict[str, Any]:
    """The train step's arguments that come from one item of plan_sweep's list."""
    return dict(
        training_config=run.training_config,
        sweep_run=run.run_name,
        sweep_overrides=run.overrides,
    )


@dsl.pipeline(name="augment-train-review")
def augment_train_review(
    inputs: Input[Artifact],
    ingested: Input[Dataset],
    dataset: Input[Dataset],
    base_model_uri: str,
    runs: list,
    num_gpus: int,
    num_nodes: int,
    checkpoint_mirror_uri: str,
    epsilon: float,
    publish_uri: str,
    promote: str,
    promotion_epsilon: float,
    run_fingerprint: str,
    prompts: list,
    negative_presets: list,
    lora_scales: list,
    cfg_scales: list,
    seeds: list,
    steps: int,
    job_yaml: str,
):
    """flip-augment -> train (one task per run of the sweep, ``MAX_PARALLEL_TRAINS`` at a
    time) -> select over all runs -> generate -> run report; train runs in its own pod, or
    with num_nodes > 1 coordinates a TrainJob (and then holds no GPU itself). ``runs`` is
    plan_sweep's list; ``ingested`` is ingest's dataset and ``inputs`` the fingerprint step's
    output, for the run report; ``dataset`` is what augment reads."""
    augmented = _data_stage(augment(dataset=dataset), cpu="2", memory="4Gi")
    augmented.set_display_name("flip-augment")

    training = dict(
        dataset=augmented.outputs["augmented"],
        base_model_uri=base_model_uri,
        num_gpus=num_gpus,
        checkpoint_mirror_uri=checkpoint_mirror_uri,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        num_nodes=num_nodes,
        trainer_image=TORCH_IMAGE,
        publish_uri=publish_uri,
    )
    data = dict(
        inputs=inputs,
        ingested=ingested,
        dataset=dataset,
        augmented=augmented.outputs["augmented"],
    )
    review = dict(
        base_model_uri=base_model_uri,
        epsilon=epsilon,
        publish_uri=publish_uri,
        promote=promote,
        promotion_epsilon=promotion_epsilon,
        run_fingerprint=run_fingerprint,
        prompts=prompts,
        negative_presets=negative_presets,
        lora_scales=lora_scales,
        cfg_scales=cfg_scales,
        seeds=seeds,
        steps=steps,
        job_yaml=job_yaml,
    )
    with dsl.If(num_nodes == 1, name="one pod"):
        with dsl.ParallelFor(runs, parallelism=MAX_PARALLEL_TRAINS, name="sweep") as run:
            trained = _train_task({**training, **_sweep_run(run)}, gpus=num_gpus)
            kubernetes.empty_dir_mount(
                trained, volume_name="dshm", mount_path="/dev/shm", medium="Memory"
            )
        _select_and_review(trained, data, **review)
    with dsl.Else(name="multi-node TrainJob"):
        with dsl.ParallelFor(runs, parallelism=MAX_PARALLEL_TRAINS, name="sweep") as run:
            trained = _train_task({**training, **_sweep_run(run)}, gpus=None)
            trained.set_display_name("train LoRA (TrainJob)")
        _select_and_review(trained, data, **review)


def _ingest_onwards(
    checked: dsl.PipelineTask,
    *,
    data_uri: str,
    metadata_uri: str,
    tagger_uri: str,
    min_size: int,
    quality_policy: str,
    threshold: float,
    trigger_word: str,
    merge: str,
    defect_policy: str,
    after_data: dict[str, Any],
) -> None:
    """ingest -> [tag] -> augment_train_review, the data stages keyed on the fingerprints."""
    ingested = _data_stage(
        ingest(
            data_uri=data_uri,
            metadata_uri=metadata_uri,
            min_size=min_size,
            quality_policy=quality_policy,
            inputs_fingerprint=checked.outputs["data"],
        ),
        cpu="4",
        memory="8Gi",
    )
    ingested.set_display_name("ingest / clean")
    reports = dict(inputs=checked.outputs["inputs"], ingested=ingested.outputs["dataset"])
    with dsl.If(tagger_uri != "", name="tagger given"):
        tagged = _data_stage(
            tag(
                dataset=ingested.outputs["dataset"],
                tagger_uri=tagger_uri,
                threshold=threshold,
                trigger_word=trigger_word,
                merge=merge,
                defect_policy=defect_policy,
                tagger_fingerprint=checked.outputs["tagger"],
            ),
            cpu="4",
            memory="16Gi",
        )
        tagged.set_display_name("auto-tag (DeepDanbooru)")
        augment_train_review(**reports, dataset=tagged.outputs["tagged"], **after_data)
    with dsl.Else(name="no tagger"):
        augment_train_review(**reports, dataset=ingested.outputs["dataset"], **after_data)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Clean, tag and flip-augment images; train a LoRA on N GPUs; keep the "
    "checkpoint with the lowest validation loss; review it in a CFG x LoRA-scale grid.",
)
@parameters.described
def lora_training(
    data_uri: str,
    base_model_uri: str,
    tagger_uri: str = "",
    metadata_uri: str = "",
    min_size: int = 512,
    quality_policy: str = "report",
    threshold: float = 0.5,
    trigger_word: str = "",
    merge: str = "keep",
    defect_policy: str = "caption",
    training_config: str = DEFAULT_TRAINING_CONFIG,
    sweep: str = "",
    num_gpus: int = 1,
    num_nodes: int = 1,
    checkpoint_mirror_uri: str = "",
    epsilon: float = 0.01,
    publish_uri: str = "",
    promote: str = "better",
    promotion_epsilon: float = -1.0,
    force_retrain: bool = False,
    prompts: list = DEFAULT_PROMPTS,
    negative_presets: list = ["landscape"],  # noqa: B006 - KFP reads defaults from the signature
    lora_scales: list = [0.6, 0.8, 1.0],  # noqa: B006
    cfg_scales: list = [7.0, 9.0],  # noqa: B006
    seeds: list = [1, 2],  # noqa: B006
    steps: int = 25,
    job_yaml: str = "",
):
    checked = fingerprint(
        data_uri=data_uri,
        metadata_uri=metadata_uri,
        tagger_uri=tagger_uri,
        base_model_uri=base_model_uri,
        training_config=training_config,
        sweep=sweep,
        min_size=min_size,
        quality_policy=quality_policy,
        threshold=threshold,
        trigger_word=trigger_word,
        merge=merge,
        defect_policy=defect_policy,
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        epsilon=epsilon,
        publish_uri=publish_uri,
        force_retrain=force_retrain,
    )
    checked.set_display_name("fingerprint inputs")
    checked.set_caching_options(False)  # it reads what is under the URIs now
    checked.set_retry(num_retries=2, backoff_duration="10s", backoff_factor=2)
    checked.set_cpu_request("1").set_memory_request("1Gi").set_memory_limit("2Gi")
    _with_s3_access(checked)
    planned = plan_sweep(training_config=training_config, sweep=sweep)
    planned.set_display_name("plan sweep")
    planned.set_caching_options(False)
    planned.set_cpu_request("1").set_memory_request("1Gi").set_memory_limit("2Gi")
    _with_s3_access(planned)  # a sweep may be a file on S3

    with dsl.If(checked.outputs["Output"] == True, name="inputs changed"):  # noqa: E712
        _ingest_onwards(
            checked,
            data_uri=data_uri,
            metadata_uri=metadata_uri,
            tagger_uri=tagger_uri,
            min_size=min_size,
            quality_policy=quality_policy,
            threshold=threshold,
            trigger_word=trigger_word,
            merge=merge,
            defect_policy=defect_policy,
            after_data=dict(
                base_model_uri=base_model_uri,
                runs=planned.output,
                num_gpus=num_gpus,
                num_nodes=num_nodes,
                checkpoint_mirror_uri=checkpoint_mirror_uri,
                epsilon=epsilon,
                publish_uri=publish_uri,
                promote=promote,
                promotion_epsilon=promotion_epsilon,
                run_fingerprint=checked.outputs["run"],
                prompts=prompts,
                negative_presets=negative_presets,
                lora_scales=lora_scales,
                cfg_scales=cfg_scales,
                seeds=seeds,
                steps=steps,
                job_yaml=job_yaml,
            ),
        )


def compile_pipeline(path: Path | None = None) -> Path:
    """Compile ``lora_training`` to ``path`` (default: the committed pipelines/lora_training.yaml)."""
    from kfp import compiler

    path = path or PIPELINE_YAML
    compiler.Compiler().compile(lora_training, str(path))
    return path
