"""The machinery behind ``lorapipe.stages.train``: data, caches, validation, checkpoints, logs."""
