from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components.images import TAGGER_IMAGE


@dsl.component(base_image=TAGGER_IMAGE, install_kfp_package=False)
def tag(
    dataset: Input[Dataset],
    tagger_uri: str,
    threshold: float,
    trigger_word: str,
    merge: str,
    defect_policy: str,
    tagger_fingerprint: str,
    tagged: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
):
    """DeepDanbooru tags and captions; the dataset also gets a lora-scripts metadata.csv.

    Args:
        dataset: The cleaned dataset.
        tagger_uri: DeepDanbooru project folder (local or s3://).
        threshold: A tag is kept when the model's score is at least this.
        trigger_word: Written first in every caption.
        merge: keep, append or replace a hand-written caption.
        defect_policy: caption, drop or report images whose tags name a defect (watermark,
            signature, text, ...) or whose style is not the set's.
        tagger_fingerprint: The digest of tagger_uri's files (the fingerprint step's); not
            read, it makes KFP's cache key change with the tagger.
        tagged: The captioned dataset, with metadata.csv.
        report: Tag frequencies, what changed, and the flagged images.
        metrics: Images tagged, distinct tags and flagged images.
    """
    from lorapipe import pipeline_steps

    values = pipeline_steps.tag(
        dataset.path,
        tagged.path,
        report.path,
        tagger_uri=tagger_uri,
        threshold=threshold,
        trigger_word=trigger_word,
        merge=merge,
        defects=defect_policy,
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
