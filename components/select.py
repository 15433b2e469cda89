from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Model, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def select(
    training: Input[Model],
    epsilon: float,
    publish_uri: str,
    run_id: str,
    lora: Output[Model],
    report: Output[Markdown],
    metrics: Output[Metrics],
):
    """The earliest checkpoint within epsilon of the lowest validation loss, as diffusers and
    kohya (WebUI/ComfyUI) LoRA files; published under publish_uri/<run id>/ when given."""
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
