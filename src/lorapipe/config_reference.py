"""README's config reference: one table per stage, made from the fields' help text.

``python -m lorapipe.config_reference README.md`` rewrites the tables between the
``<!-- config:COMMAND -->`` markers in place; a test checks README agrees with the fields, so
``--help``, README and the Kubeflow UI say the same thing.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from lorapipe.config import reference_table
from lorapipe.errors import ConfigError


def stage_configs() -> dict[str, type]:
    """Each stage's config class, by command name (what README documents)."""
    from lorapipe.stages.augment import AugmentConfig
    from lorapipe.stages.generate import GenerateConfig
    from lorapipe.stages.ingest import IngestConfig
    from lorapipe.stages.select import SelectConfig
    from lorapipe.stages.tag import TagConfig
    from lorapipe.train_config import TrainConfig

    return {
        "ingest": IngestConfig,
        "tag": TagConfig,
        "augment": AugmentConfig,
        "train": TrainConfig,
        "select": SelectConfig,
        "generate": GenerateConfig,
    }


def _marker(command: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- config:{command} -->\n)(.*?)(<!-- /config:{command} -->)", flags=re.DOTALL
    )


def readme_tables(readme: str) -> dict[str, str]:
    """{command: the table README holds between its ``<!-- config:COMMAND -->`` markers}."""
    found = {}
    for command in stage_configs():
        match = _marker(command).search(readme)
        if match:
            found[command] = match.group(2)
    return found


def rewrite_readme(readme: str) -> str:
    """README with every config table regenerated from the fields' help text."""
    for command, config_class in stage_configs().items():
        table = reference_table(config_class)
        readme, count = _marker(command).subn(
            lambda m, t=table: m.group(1) + t + m.group(3), readme
        )
        if not count:
            raise ConfigError(f"README has no <!-- config:{command} --> section; add the markers")
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorapipe.config_reference README.md``: rewrite README's config tables in place."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    path = Path(arguments[0] if arguments else "README.md")
    path.write_text(rewrite_readme(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"rewrote the config tables of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
