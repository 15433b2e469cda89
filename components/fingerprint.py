from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics, Output, OutputPath

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def fingerprint(
    data_uri: str,
    metadata_uri: str,
    tagger_uri: str,
    base_model_uri: str,
    training_config: str,
    sweep: str,
    min_size: int,
    quality_policy: str,
    threshold: float,
    trigger_word: str,
    merge: str,
    defect_policy: str,
    num_gpus: int,
    num_nodes: int,
    epsilon: float,
    publish_uri: str,
    force_retrain: bool,
    run: OutputPath(str),
    data: OutputPath(str),
    tagger: OutputPath(str),
    inputs: Output[Artifact],
    report: Output[HTML],
    metrics: Output[Metrics],
) -> bool:
    """Fingerprint every input the run reads; train only if they changed since latest.json's.
    Returns whether to train (the DAG's condition on it reads the single ``Output``).

    Args:
        data_uri: Raw images: a folder, a .zip/.tar archive or an s3:// prefix.
        metadata_uri: lora-scripts metadata.csv; empty: the one beside the images.
        tagger_uri: DeepDanbooru project folder; empty: no tagging.
        base_model_uri: The base model.
        training_config: YAML of train keys, in the run's digest by value.
        sweep: The sweep's YAML, in the run's digest.
        min_size: Ingest's, in the run's digest.
        quality_policy: Ingest's, in the run's digest.
        threshold: The tagger's, in the run's digest.
        trigger_word: The tagger's, in the run's digest.
        merge: The tagger's, in the run's digest.
        defect_policy: The tagger's, in the run's digest.
        num_gpus: In the run's digest: the global batch depends on it.
        num_nodes: In the run's digest: the global batch depends on it.
        epsilon: Select's, in the run's digest.
        publish_uri: Where latest.json is; empty: always train.
        force_retrain: Train even when nothing changed.
        run: The run's digest (inputs and settings), recorded with the LoRA.
        data: The digest of data_uri and metadata_uri: ingest's cache key.
        tagger: The digest of tagger_uri: tag's cache key.
        inputs: The fingerprints and the decision (report.json).
        report: Each input's digest and whether the run trains, and why.
        metrics: Files and bytes read, and whether the run trains.
    """
    from lorapipe import pipeline_steps

    found = pipeline_steps.fingerprint(
        inputs.path,
        report.path,
        uris={
            "data_uri": data_uri,
            "metadata_uri": metadata_uri,
            "tagger_uri": tagger_uri,
            "base_model_uri": base_model_uri,
        },
        settings={
            "training_config": training_config,
            "sweep": sweep,
            "min_size": min_size,
            "quality_policy": quality_policy,
            "threshold": threshold,
            "trigger_word": trigger_word,
            "merge": merge,
            "defect_policy": defect_policy,
            "num_gpus": num_gpus,
            "num_nodes": num_nodes,
            "epsilon": epsilon,
        },
        publish_uri=publish_uri,
        force_retrain=force_retrain,
    )
    for name, value in found["metrics"].items():
        metrics.log_metric(name, value)
    for path, digest in ((run, found["run"]), (data, found["data"]), (tagger, found["tagger"])):
        with open(path, "w") as file:
            file.write(digest)
    return found["retrain"]
