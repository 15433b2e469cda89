from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def run_report(
    inputs: Input[Artifact],
    ingested: Input[Dataset],
    dataset: Input[Dataset],
    augmented: Input[Dataset],
    trainings: Input[list[Model]],
    lora: Input[Model],
    images: Input[Artifact],
    report: Output[HTML],
):
    """The whole run on one page: a section per stage, in DAG order.

    Args:
        inputs: The fingerprint step's output: what the run read.
        ingested: Ingest's dataset.
        dataset: What augment read: the tagged dataset, or ingest's when no tagger ran.
        augmented: Augment's dataset.
        trainings: Each train step's checkpoints, loss log and training report; the page
            shows the one select chose from.
        lora: Select's output.
        images: Generate's images, contact sheets and report.
        report: The run report.
    """
    from lorapipe import pipeline_steps

    pipeline_steps.run_report(
        report.path,
        inputs=inputs.path,
        ingested=ingested.path,
        dataset=dataset.path,
        augmented=augmented.path,
        trainings=[training.path for training in trainings],
        lora=lora.path,
        images=images.path,
    )
