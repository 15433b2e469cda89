from kfp import dsl
from kfp.dsl import HTML, Input, Metrics, Model, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def select(
    training: Input[Model],
    epsilon: float,
    publish_uri: str,
    run_id: str,
    lora: Output[Model],
    report: Output[HTML],
    metrics: Output[Metrics],
):
    """The earliest checkpoint within epsilon of the lowest validation loss, as diffusers and
    kohya (WebUI/ComfyUI) LoRA files; published under publish_uri/<run id>/ when given.

    Args:
        training: Train's output.
        epsilon: Relative tolerance over the lowest validation loss.
        publish_uri: Where the LoRA is published with latest.json; empty: not published.
        run_id: The pipeline run's id, in the LoRA's metadata and the published folder.
        lora: Both LoRA files, the selection, the loss curve and the report.
        report: The choice and why: the rule, the table, the loss curve and a row of
            samples per checkpoint.
        metrics: The chosen checkpoint's numbers.
    """
    from lorapipe import pipeline_steps

    values = pipeline_steps.select(
        training.path,
        lora.path,
        report.path,
        epsilon=epsilon,
        publish_uri=publish_uri,
        run_id=run_id,
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
