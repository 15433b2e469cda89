from kfp import dsl

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_sweep(training_config: str, sweep: str) -> list:
    """The trainings of a sweep: one per training config, checked before any GPU is asked for.

    Args:
        training_config: The base training config (YAML).
        sweep: A YAML list of overrides, or a grid of lists expanded to its product; empty:
            one training of training_config.

    Returns:
        One {run_name, training_config, overrides} per training; run_name is empty for a run
        without a sweep.
    """
    from lorapipe import pipeline_steps

    return pipeline_steps.plan_sweep(training_config, sweep)
