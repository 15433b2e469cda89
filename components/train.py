from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TORCH_IMAGE


@dsl.component(base_image=TORCH_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    base_model_uri: str,
    config_yaml: str,
    num_gpus: int,
    checkpoint_mirror_uri: str,
    run_id: str,
    num_nodes: int,
    trainer_image: str,
    training: Output[Model],
    metrics: Output[Metrics],
):
    """LoRA training, one process per GPU; resumes from the mirrored checkpoints on retry.
    With num_nodes > 1 it runs as a Kubeflow Trainer TrainJob and waits for it."""
    from lorapipe import pipeline_steps

    values = pipeline_steps.train(
        dataset.path,
        training.path,
        base_model_uri=base_model_uri,
        config_yaml=config_yaml,
        num_gpus=num_gpus,
        checkpoint_mirror_uri=checkpoint_mirror_uri,
        run_id=run_id,
        num_nodes=num_nodes,
        trainer_image=trainer_image,
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
