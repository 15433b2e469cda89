"""README's config reference is the fields' help text, table for table."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapipe import config, config_reference
from lorapipe.errors import ConfigError

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.parametrize("command", sorted(config_reference.stage_configs()))
def test_readme_config_reference_is_the_help_text(command: str) -> None:
    tables = config_reference.readme_tables(README.read_text(encoding="utf-8"))
    assert command in tables, f"README has no <!-- config:{command} --> table"
    expected = config.reference_table(config_reference.stage_configs()[command])
    assert tables[command] == expected, "run `python -m lorapipe.config_reference README.md`"


def test_rewriting_fills_the_marked_tables_and_refuses_a_readme_without_them() -> None:
    marked = "".join(
        f"<!-- config:{command} -->\nSTALE ROW\n<!-- /config:{command} -->\n"
        for command in config_reference.stage_configs()
    )
    rewritten = config_reference.rewrite_readme(marked)
    assert (
        "STALE ROW" not in rewritten
        and "| `lora_rank` | `16` | LoRA rank r (at least 1) |" in rewritten
    )
    with pytest.raises(ConfigError, match="README has no <!-- config:ingest --> section"):
        config_reference.rewrite_readme("# no tables here\n")
