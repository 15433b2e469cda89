from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from components.images import TORCH_IMAGE


@dsl.component(base_image=TORCH_IMAGE, install_kfp_package=False)
def generate(
    base_model_uri: str,
    lora: Input[Model],
    prompts: list,
    negative_presets: list,
    lora_scales: list,
    cfg_scales: list,
    seeds: list,
    steps: int,
    job_yaml: str,
    images: Output[Artifact],
    report: Output[HTML],
    metrics: Output[Metrics],
):
    """The review grid: prompts x negative presets x LoRA scales x CFG scales x seeds.

    Args:
        base_model_uri: A diffusers directory or a .safetensors checkpoint (local or s3://).
        lora: Select's output; every prompt uses its LoRA.
        prompts: A1111-syntax prompts.
        negative_presets: Negative-prompt presets or layers.
        lora_scales: LoRA scales of the grid.
        cfg_scales: CFG scales of the grid.
        seeds: Seeds of the grid.
        steps: Sampling steps.
        job_yaml: YAML of any other lorapipe generate keys.
        images: PNGs, contact sheets, index and report.
        report: The review page.
        metrics: Images and throughput.
    """
    from lorapipe import pipeline_steps

    values = pipeline_steps.generate(
        base_model_uri,
        lora.path,
        images.path,
        report.path,
        prompts=prompts,
        negative_presets=negative_presets,
        lora_scales=lora_scales,
        cfg_scales=cfg_scales,
        seeds=seeds,
        steps=steps,
        job_yaml=job_yaml,
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
