from kfp import dsl
from kfp.dsl import HTML, Input, Metrics, Model, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def select(
    trainings: Input[list[Model]],
    epsilon: float,
    publish_uri: str,
    run_id: str,
    promote: str,
    fingerprint: str,
    lora: Output[Model],
    report: Output[HTML],
    metrics: Output[Metrics],
    promotion_epsilon: float = -1.0,
):
    """The earliest checkpoint within epsilon of the lowest validation loss (of any run, when a
    sweep trained several), as diffusers and kohya (WebUI/ComfyUI) LoRA files; published under
    publish_uri/<run id>/ when given.

    Args:
        trainings: Each train step's output (one per run of the sweep).
        epsilon: Relative tolerance over the lowest validation loss.
        publish_uri: Where the LoRA is published with latest.json; empty: not published.
        run_id: The pipeline run's id, in the LoRA's metadata and the published folder.
        promote: better (latest.json moves only to a LoRA not worse than the published one
            on this run's validation images) or always.
        fingerprint: The run's input fingerprint, recorded in latest.json.
        promotion_epsilon: Relative tolerance of promote better; below 0: epsilon's.
        lora: Both LoRA files, the selection, the loss curve and the report.
        report: The choice and why: the rule, the table, the loss curve and a row of
            samples per checkpoint.
        metrics: The chosen checkpoint's numbers.
    """
    from lorapipe import pipeline_steps

    values = pipeline_steps.select(
        [training.path for training in trainings],
        lora.path,
        report.path,
        epsilon=epsilon,
        publish_uri=publish_uri,
        run_id=run_id,
        promote=promote,
        promotion_epsilon=promotion_epsilon,
        fingerprint=fingerprint,
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
