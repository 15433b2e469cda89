"""Pipeline stages: each a config dataclass, a ``run(...)`` function and a CLI command."""
