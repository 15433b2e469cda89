from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def augment(
    dataset: Input[Dataset],
    augmented: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
):
    """Mirrored copies with left/right swapped in their captions, unless tags forbid it.

    Args:
        dataset: The (tagged) dataset.
        augmented: The dataset with its mirrored copies.
        report: What was mirrored and what was skipped, and why.
        metrics: Mirrored copies added and images out.
    """
    from lorapipe import pipeline_steps

    values = pipeline_steps.augment(dataset.path, augmented.path, report.path)
    for name, value in values.items():
        metrics.log_metric(name, value)
