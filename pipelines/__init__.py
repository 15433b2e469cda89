"""The lorapipe Kubeflow pipeline (``lora_training``) and how to run it: locally, compiled,
submitted to a cluster or scheduled (``python -m pipelines --help``)."""
