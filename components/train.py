from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import TORCH_IMAGE


@dsl.component(base_image=TORCH_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    base_model_uri: str,
    training_config: str,
    num_gpus: int,
    checkpoint_mirror_uri: str,
    run_id: str,
    num_nodes: int,
    trainer_image: str,
    publish_uri: str,
    sweep_run: str,
    sweep_overrides: str,
    training: Output[Model],
    report: Output[HTML],
    metrics: Output[Metrics],
):
    """LoRA training, one process per GPU; resumes from the mirrored checkpoints on retry.
    With num_nodes > 1 it runs as a Kubeflow Trainer TrainJob and waits for it.

    Args:
        dataset: The augmented dataset.
        base_model_uri: A diffusers directory or a .safetensors checkpoint (local or s3://).
        training_config: YAML of lorapipe train keys (the seed's my_film_config.yaml keys).
        num_gpus: GPUs of this pod (of each node with num_nodes > 1).
        checkpoint_mirror_uri: s3:// prefix; checkpoints go to <prefix>/<run_id>/.
        run_id: The pipeline run's id: names its checkpoint folder and TrainJob.
        num_nodes: Nodes; above 1, a TrainJob.
        trainer_image: The torch image the TrainJob's nodes run.
        publish_uri: Where latest.json is: its LoRA is measured on this run's validation
            images, so that select promotes only a LoRA that is not worse.
        sweep_run: The sweep run's name (empty without a sweep): its run id and checkpoint
            folder get it, and select reads it beside the training report.
        sweep_overrides: JSON of the sweep run's overrides of the base training config.
        training: Checkpoints (with the samples rendered at each), loss log and training
            report.
        report: Loss and validation-by-timestep charts, throughput and buckets.
        metrics: Steps, images, throughput and processes.
    """
    from lorapipe import pipeline_steps

    values = pipeline_steps.train(
        dataset.path,
        training.path,
        report.path,
        base_model_uri=base_model_uri,
        training_config=training_config,
        num_gpus=num_gpus,
        checkpoint_mirror_uri=checkpoint_mirror_uri,
        run_id=run_id,
        num_nodes=num_nodes,
        trainer_image=trainer_image,
        publish_uri=publish_uri,
        sweep_run=sweep_run,
        sweep_overrides=sweep_overrides,
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
