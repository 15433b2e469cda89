from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest(
    data_uri: str,
    metadata_uri: str,
    min_size: int,
    quality_policy: str,
    inputs_fingerprint: str,
    dataset: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
):
    """Decode, clean and dedupe the raw images (folder, archive or s3:// prefix).

    Args:
        data_uri: Raw images: a folder, a .zip/.tar archive or an s3:// prefix.
        metadata_uri: lora-scripts metadata.csv (filename,text); empty: the one beside the images.
        min_size: Drop images whose shorter side is below this many pixels.
        quality_policy: report or drop the images the quality audit flags (blurry, upscaled,
            over-compressed, clipped, low contrast).
        inputs_fingerprint: The digest of data_uri's and metadata_uri's files (the
            fingerprint step's); not read, it makes KFP's cache key change with the content.
        dataset: The cleaned dataset (lorapipe's Parquet format).
        report: Every dropped file and why, and every image the quality audit flags.
        metrics: Images kept, dropped and flagged.
    """
    from lorapipe import pipeline_steps

    values = pipeline_steps.ingest(
        data_uri,
        dataset.path,
        report.path,
        metadata_uri=metadata_uri,
        min_size=min_size,
        quality=quality_policy,
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
