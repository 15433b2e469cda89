"""The one config mechanism of every stage: typed dataclass fields with help text.

A stage's config is a dataclass whose fields are made with :func:`option`: a default, the help
text, and optionally choices, bounds and extra flag spellings. From that one declaration come

- loading from YAML (``--config FILE``, local or s3://) and from ``{key: value}`` overrides,
  checked before any work: an unknown key names the closest valid key and its YAML line, a
  key written twice names both lines, an empty file says so, a value of the wrong type names
  the key, where it was set and the type it needs (numbers may be strings: PyYAML reads
  ``1e-4`` as one), named choices and bounds are checked;
- the command-line flags, in both spellings (``--train-data-dir`` and ``--train_data_dir``, as
  kohya and lora-scripts users type them), whose ``--help`` says what each means, its default
  and its allowed values;
- README's config reference tables (:func:`reference_table`; ``lorapipe.config_reference``
  writes them into README, and a test checks they agree with the fields).

A config class may define ``validate(where)`` for rules across fields; ``where(key)`` says where
the key was set ("config.yaml line 3: key 'epochs'", "--epochs" or "key 'epochs'").
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lorapipe.errors import ConfigError

C = TypeVar("C")
Where = Callable[[str], str]

_META_KEY = "lorapipe"


@dataclass(frozen=True)
class OptionSpec:
    """What :func:`option` records about a field, beside its type and default."""

    help: str
    choices: tuple[str, ...] = ()
    # named choices compare case-insensitively and are stored lower-case ("AdamW" is adamw)
    ignore_case: bool = False
    minimum: float | None = None
    maximum: float | None = None
    # exclusive lower bound ("must be above 0")
    above: float | None = None
    # more flag names for the same key (e.g. "prompt" for prompts), without dashes
    aliases: tuple[str, ...] = ()
    # names the key had before (e.g. "sampler" for samplers): files and flags that use them
    # still work
    former_names: tuple[str, ...] = ()
    # a list key given as one string is split on this ("to_q,to_v"); None: never split
    separator: str | None = ","
    # False: a config-file key only (nested mappings), no flag
    flag: bool = True
    # the default as README and --help say it, when the value alone does not explain it
    default_text: str | None = None


def option(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    choices: Sequence[str] = (),
    ignore_case: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    aliases: Sequence[str] = (),
    former_names: Sequence[str] = (),
    separator: str | None = ",",
    flag: bool = True,
    default_text: str | None = None,
) -> Any:
    """A config field: ``lora_rank: int = option(16, help="rank r of the LoRA", minimum=1)``."""
    spec = OptionSpec(
        help=help,
        choices=tuple(choices),
        ignore_case=ignore_case,
        minimum=minimum,
        maximum=maximum,
        above=above,
        aliases=tuple(aliases),
        former_names=tuple(former_names),
        separator=separator,
        flag=flag,
        default_text=default_text,
    )
    metadata = {_META_KEY: spec}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One config key: its name, type, default and :class:`OptionSpec`."""

    name: str
    type: Any
    default: Any
    spec: OptionSpec


def flag(key: str) -> str:
    """The flag of a config key, as errors name it: ``train_data_dir`` -> ``--train-data-dir``."""
    return "--" + key.replace("_", "-")


def options(config_class: type) -> list[Option]:
    """The keys of a config class, in declaration order."""
    hints = typing.get_type_hints(config_class)
    found = []
    for field in dataclasses.fields(config_class):
        spec = field.metadata.get(_META_KEY) or OptionSpec(help="")
        if field.default is not MISSING:
            default = field.default
        elif field.default_factory is not MISSING:
            default = field.default_factory()
        else:
            default = MISSING
        found.append(Option(field.name, hints[field.name], default, spec))
    return found


# --------------------------------------------------------------------------- loading


def load(
    config_class: type[C],
    path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """The config from a YAML file (local or s3://) and/or ``{key: value}`` flag overrides.

    Raises ConfigError, one line naming the file, line and key, for anything wrong.
    """
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path:
        raw, origins = read_mapping(path)
    return with_overrides(config_class, raw, origins, overrides)


def load_text(
    config_class: type[C], text: str, label: str, overrides: Mapping[str, Any] | None = None
) -> C:
    """:func:`load` of YAML text (a pipeline parameter) named ``label`` in errors; an empty
    text means the defaults."""
    raw, origins = parse_mapping(text, label) if text.strip() else ({}, {})
    return with_overrides(config_class, raw, origins, overrides)


def with_overrides(
    config_class: type[C],
    raw: dict[str, Any],
    origins: dict[str, str],
    overrides: Mapping[str, Any] | None,
) -> C:
    """The config of ``raw`` with ``overrides`` (flags, or the pipeline's own keys) on top."""
    for key, value in (overrides or {}).items():
        raw[key] = value
        origins[key] = flag(str(key))
    return from_mapping(config_class, raw, origins)


def from_mapping(
    config_class: type[C], raw: Mapping[str, Any], origins: Mapping[str, str] | None = None
) -> C:
    """``config_class(**raw)`` after every check; ``origins[key]`` says where a key was set."""
    origins = dict(origins or {})

    def where(key: str) -> str:
        return origins.get(key, f"key '{key}'")

    values = checked_values(config_class, raw, where)
    missing = [
        o.name for o in options(config_class) if o.default is MISSING and o.name not in values
    ]
    if missing:
        raise ConfigError(f"{missing[0]} is not set; give {flag(missing[0])}")
    config = config_class(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate(where)
    else:
        check_fields(config, where)
    return config


def checked_values(config_class: type, raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    """``raw`` with every key known to ``config_class`` and every value of its key's type; a
    key's former name (``sampler`` for ``samplers``) is that key, so older files still load."""
    known = {item.name: item for item in options(config_class)}
    names = {former: item.name for item in known.values() for former in item.spec.former_names}
    values = {}
    given: dict[str, str] = {}
    for key, value in raw.items():
        name = names.get(key, key)
        if name not in known:
            raise unknown_key(key, known, where(key), config_class)
        if name in given:
            raise ConfigError(
                f"{where(key)}: '{key}' and '{given[name]}' are the same key; keep one"
            )
        given[name] = key
        values[name] = check_value(known[name], value, where(key))
    return values


def unknown_key(key: Any, known: Mapping[str, Any], origin: str, config_class: type) -> ConfigError:
    """The error for a key that is not one: the closest valid key, or where to look."""
    closest = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    command = getattr(config_class, "COMMAND", None)
    look = f"see `lorapipe {command} --help` for the keys" if command else "see --help"
    hint = f"did you mean '{closest[0]}'?" if closest else look
    origin = origin.replace(f": key '{key}'", "")
    return ConfigError(f"{origin}: unknown key '{key}'; {hint}")


def read_mapping(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """({key: value}, {key: "FILE line N: key 'k'"}) of a YAML (or JSON) mapping file."""
    return parse_mapping(_read_text(path), path)


def parse_mapping(text: str, label: str) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`read_mapping` of YAML text that came from ``label`` (a file, a parameter).

    A key written twice is an error naming both lines (YAML itself keeps the last silently);
    an empty text is an error saying so.
    """
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{label}{where}: not valid YAML; fix the syntax there") from None
    if document is None:
        raise ConfigError(
            f"{label}: the file is empty; write 'key: value' lines, e.g. 'epochs: 10'"
        )
    if not isinstance(values, dict) or not isinstance(document, yaml.MappingNode):
        raise ConfigError(
            f"{label}: expected 'key: value' lines (a mapping), e.g. 'learning_rate: 1e-4'"
        )
    origins: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for key_node, _ in document.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(
                f"{label} line {line}: key '{key}' is set twice (also on line {first_line[key]}); "
                "keep one"
            )
        first_line[key] = line
        origins[key] = f"{label} line {line}: key '{key}'"
    return values, origins


def _read_text(path: str) -> str:
    if path.startswith("s3://"):
        from lorapipe import store

        return store.read_text(path)
    file = Path(path.removeprefix("file://")).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    return file.read_text(encoding="utf-8-sig")


# --------------------------------------------------------------------------- values


def check_value(item: Option, value: Any, origin: str) -> Any:
    """``value`` as the key's type; a named choice of a case-insensitive key in lower case."""
    value = coerce(value, item.type, origin, separator=item.spec.separator)
    if item.spec.ignore_case and isinstance(value, str):
        value = value.strip().lower()
    return value


def plain(source: str | Where) -> Where:
    """``where`` for messages that read "<where> KEY ...": "job.yaml line 3: seeds", "--seeds"."""
    if isinstance(source, str):
        return lambda key: f"{source}: {key}"
    return lambda key: source(key).replace(f"key '{key}'", key)


def check_fields(config: object, where: Where | None = None) -> None:
    """Raise ConfigError for a value outside its key's choices or bounds.

    Config classes call this first in their ``validate``, so a config built in Python is
    checked like one loaded from a file.
    """
    where = where or (lambda key: f"key '{key}'")
    for item in options(type(config)):
        value = getattr(config, item.name)
        for single in value if isinstance(value, list | tuple) else [value]:
            if single is None:
                continue
            if item.spec.choices and isinstance(single, str):
                _check_choice(single, item.spec, where(item.name))
            if isinstance(single, int | float) and not isinstance(single, bool):
                _check_bounds(single, item.spec, where(item.name))


def _check_choice(value: str, spec: OptionSpec, origin: str) -> str:
    normal = value.strip().lower() if spec.ignore_case else value
    choices = [c.lower() for c in spec.choices] if spec.ignore_case else list(spec.choices)
    if normal in choices:
        return normal
    closest = difflib.get_close_matches(normal, choices, n=1, cutoff=0.5)
    hint = f"did you mean '{closest[0]}'? " if closest else ""
    raise ConfigError(f"{origin} is '{value}'; {hint}use one of {', '.join(spec.choices)}")


def _check_bounds(value: float, spec: OptionSpec, origin: str) -> None:
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"{origin} must be at least {_number(spec.minimum)}, got {value}")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigError(f"{origin} must be at most {_number(spec.maximum)}, got {value}")
    if spec.above is not None and not value > spec.above:
        raise ConfigError(f"{origin} must be above {_number(spec.above)}, got {value}")


def coerce(value: Any, hint: Any, origin: str, *, separator: str | None = ",") -> Any:
    """``value`` as the type ``hint``: int, float, bool, str, list/tuple of those, a mapping of
    str to str or to a list of str, or any of them ``| None``.

    Numbers and booleans may come as strings: from flags, and from YAML, which reads ``1e-4``
    as a string. A mapping may come from flags as ``NAME=VALUE`` strings.
    """
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    container = typing.get_origin(hint)
    if container in (list, tuple):
        item = typing.get_args(hint)[0]
        single_number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(value, list | tuple):
            items = value
        elif isinstance(value, str) or (single_number and item in (int, float)):
            items = [value]  # one value for a list of them: `seeds: 4`, `prompts: a cat`
        else:
            raise ConfigError(f"{origin} must be a list, e.g. [a, b], got {value!r}")
        if separator:
            items = [
                part.strip() if isinstance(part, str) else part
                for entry in items
                for part in (entry.split(separator) if isinstance(entry, str) else [entry])
                if not (isinstance(part, str) and not part.strip())
            ]
        converted = [coerce(entry, item, origin) for entry in items]
        return tuple(converted) if container is tuple else converted
    if container is dict:
        return _coerce_mapping(value, typing.get_args(hint)[1], origin)
    if hint is Any:
        return value
    converter = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}[hint]
    converted = converter(value)
    if converted is None:
        raise ConfigError(f"{origin} must be {_TYPE_WORDS[hint]}, got {value!r}")
    return converted


def _coerce_mapping(value: Any, item: Any, origin: str) -> dict[str, Any]:
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        pairs = [text.partition("=") for text in value]
        if not all(separator for _, separator, _ in pairs):
            raise ConfigError(f"{origin} takes NAME=VALUE, got {value!r}")
        value = {name.strip(): text.strip() for name, _, text in pairs}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{origin} must be a mapping of name: value")
    return {str(key): coerce(entry, item, origin, separator=None) for key, entry in value.items()}


_TYPE_WORDS = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
}


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
            value.strip().lower()
        )
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = _as_float(value)
    if number is None or not math.isfinite(number) or number != int(number):
        return None
    return int(number)


def _as_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _number(value: float) -> str:
    return f"{value:g}"


# --------------------------------------------------------------------------- flags


def add_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """A flag per key of ``config_class`` in both spellings, with its help text.

    Flags default to "not given", so only the flags a user types override the config file.
    """
    group = parser.add_argument_group(f"{getattr(config_class, 'COMMAND', 'config')} options")
    for item in options(config_class):
        if not item.spec.flag:
            continue
        kwargs: dict[str, Any] = {
            "dest": item.name,
            "default": argparse.SUPPRESS,
            "help": flag_help(item).replace("%", "%%"),
        }
        base = _base_type(item.type)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) in (list, tuple):
            kwargs.update(nargs="+", action="extend", metavar=_metavar(item))
        elif typing.get_origin(base) is dict:
            kwargs.update(action="append", metavar="NAME=VALUE")
        else:
            kwargs["metavar"] = _metavar(item)
        group.add_argument(*flag_names(item), **kwargs)


def flag_names(item: Option) -> list[str]:
    """``--train-data-dir`` and ``--train_data_dir`` (and the aliases' and former names',
    likewise)."""
    names: list[str] = []
    for name in (item.name, *item.spec.aliases, *item.spec.former_names):
        names += [flag(name), "--" + name]
    return list(dict.fromkeys(names))


def overrides_from_args(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The keys given as flags, ``{key: value}`` for :func:`load`."""
    return {
        item.name: getattr(args, item.name)
        for item in options(config_class)
        if hasattr(args, item.name)
    }


def _base_type(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _metavar(item: Option) -> str:
    if item.spec.choices and len(item.spec.choices) <= 6:
        return "{" + ",".join(item.spec.choices) + "}"
    base = _base_type(item.type)
    if typing.get_origin(base) in (list, tuple):
        base = typing.get_args(base)[0]
    return {int: "N", float: "X", str: "TEXT"}.get(base, "VALUE")


def flag_help(item: Option) -> str:
    """What ``--help`` says: the meaning, the default, the allowed values."""
    parts = [f"default: {default_text(item)}"]
    allowed = allowed_text(item)
    if allowed:
        parts.append(allowed)
    return f"{item.spec.help} ({'; '.join(parts)})"


def default_text(item: Option) -> str:
    """The default as a person reads it."""
    if item.spec.default_text is not None:
        return item.spec.default_text
    value = item.default
    if value is MISSING:
        return "(required)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "(empty)"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "[]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def allowed_text(item: Option) -> str:
    """ "one of: a, b", "at least 1", "above 0", or empty."""
    spec = item.spec
    if spec.choices:
        return "one of: " + ", ".join(spec.choices)
    bounds = []
    if spec.minimum is not None and spec.maximum is not None:
        return f"{_number(spec.minimum)} to {_number(spec.maximum)}"
    if spec.minimum is not None:
        bounds.append(f"at least {_number(spec.minimum)}")
    if spec.maximum is not None:
        bounds.append(f"at most {_number(spec.maximum)}")
    if spec.above is not None:
        bounds.append(f"above {_number(spec.above)}")
    return ", ".join(bounds)


# --------------------------------------------------------------------------- README


def reference_table(config_class: type) -> str:
    """README's config reference for ``config_class``: key, default, meaning."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for item in options(config_class):
        meaning = item.spec.help
        allowed = allowed_text(item)
        if allowed:
            meaning += f" ({allowed})"
        default = default_text(item)
        default = default if item.spec.default_text else f"`{default}`"
        rows.append(f"| `{item.name}` | {default} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
