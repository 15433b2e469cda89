"""The one config mechanism: a dataclass field with help text becomes a checked YAML key, a
flag in both spellings with its ``--help``, and a row of README's config reference."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from lorapipe import cli, config, config_reference
from lorapipe.config import option
from lorapipe.errors import ConfigError


@dataclass
class ToyConfig:
    """A stage's config in miniature."""

    COMMAND: ClassVar[str] = "toy"

    source: str = option(help="where the images come from")
    learning_rate: float = option(1e-4, help="how fast it learns", above=0)
    optimizer: str = option(
        "adamw", help="the optimizer", choices=("adamw", "sgd"), ignore_case=True
    )
    epochs: int = option(10, help="passes over the data", minimum=1)
    target_modules: list[str] = option(
        default_factory=lambda: ["to_q"], help="layers that get adapters"
    )
    prompts: list[str] = option(
        default_factory=list, help="prompts, commas and all", aliases=("prompt",), separator=None
    )
    loras: dict[str, str] = option(default_factory=dict, help="name -> file")
    flip_aug: bool = option(False, help="mirror images at random")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def parse(argv: list[str]) -> ToyConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    config.add_arguments(parser, ToyConfig)
    args = parser.parse_args(argv)
    return config.load(ToyConfig, args.config, config.overrides_from_args(args, ToyConfig))


# --------------------------------------------------------------------------- YAML


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "source: a\nlearning_rate: 1e-4\nepochs: 3\nlearning_rate: 1e-1\n")
    with pytest.raises(ConfigError) as error:
        config.load(ToyConfig, path)
    assert str(error.value) == (
        f"{path} line 4: key 'learning_rate' is set twice (also on line 2); keep one"
    )


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_file_says_it_is_empty(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: the file is empty")):
        config.load(ToyConfig, path)


def test_an_unknown_key_names_its_line_and_the_closest_key(tmp_path: Path) -> None:
    path = write(tmp_path, "source: a\nepoch: 3\n")
    with pytest.raises(ConfigError) as error:
        config.load(ToyConfig, path)
    assert str(error.value) == f"{path} line 2: unknown key 'epoch'; did you mean 'epochs'?"


def test_values_are_typed_choices_folded_and_bounds_checked(tmp_path: Path) -> None:
    loaded = config.load(ToyConfig, write(tmp_path, "source: a\nlearning_rate: 1e-4\n"))
    assert loaded.learning_rate == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string
    assert config.load(ToyConfig, overrides={"source": "a", "optimizer": "SGD"}).optimizer == "sgd"
    with pytest.raises(ConfigError, match=r"^--epochs must be at least 1, got 0$"):
        config.load(ToyConfig, overrides={"source": "a", "epochs": 0})
    with pytest.raises(ConfigError, match=r"^--learning-rate must be above 0, got 0.0$"):
        config.load(ToyConfig, overrides={"source": "a", "learning_rate": "0"})
    with pytest.raises(ConfigError, match="did you mean 'adamw'"):
        config.load(ToyConfig, overrides={"source": "a", "optimizer": "adam"})


def test_a_required_key_that_is_missing_names_its_flag() -> None:
    with pytest.raises(ConfigError, match=r"^source is not set; give --source$"):
        config.load(ToyConfig, overrides={"epochs": 2})


# --------------------------------------------------------------------------- flags


def test_every_flag_has_both_spellings_and_lists_take_either_form() -> None:
    dashes = parse(["--source", "s", "--target-modules", "to_q,to_v", "--flip-aug"])
    underscores = parse(["--source", "s", "--target_modules", "to_q", "to_v", "--flip_aug"])
    assert dashes.target_modules == underscores.target_modules == ["to_q", "to_v"]
    assert dashes.flip_aug and underscores.flip_aug


def test_repeated_and_aliased_flags_collect_and_mappings_take_name_value() -> None:
    parsed = parse(
        ["--source", "s", "--prompt", "a cat, sitting", "--prompts", "a dog", "--loras", "x=a.st"]
    )
    assert parsed.prompts == ["a cat, sitting", "a dog"]
    assert parsed.loras == {"x": "a.st"}


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "source: a\nepochs: 3\n")
    assert parse(["--config", path, "--epochs", "5"]).epochs == 5
    assert parse(["--config", path]).epochs == 3


def test_help_says_meaning_default_and_allowed_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the optimizer (default: adamw; one of: adamw, sgd)" in text
    assert "passes over the data (default: 10; at least 1)" in text
    assert "where the images come from (default: (required))" in text


# --------------------------------------------------------------------------- every stage


@pytest.mark.parametrize("command", sorted(config_reference.stage_configs()))
def test_every_stage_help_describes_every_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for item in config.options(config_reference.stage_configs()[command]):
        if not item.spec.flag:
            continue
        assert item.spec.help, f"{command}: {item.name} has no help text"
        assert f"--{item.name.replace('_', '-')}" in text
        assert f"--{item.name}" in text
        assert " ".join(config.flag_help(item).split()) in text, item.name


def test_kohya_spellings_reach_the_training_config(tmp_path: Path) -> None:
    from lorapipe.stages import train

    parser = argparse.ArgumentParser()
    train.configure_parser(parser)
    args = parser.parse_args(
        ["--train_data_dir", "D", "--flip_aug", "--learning_rate", "5e-5", "--lora-rank", "8"]
    )
    loaded = train.load_config(args.config, config.overrides_from_args(args, train.TrainConfig))
    assert (loaded.train_data_dir, loaded.flip_aug, loaded.lora_rank) == ("D", True, 8)
    assert loaded.learning_rate == pytest.approx(5e-5)
