"""Recipe configs: a dataclass, a YAML file (``--config``), command-line overrides.

Parsing is transformers' ``HfArgumentParser`` (every field becomes a flag, ``--help`` shows
defaults); this module adds the YAML layer with type and key checks, and one error type for
everything a user can get wrong, which the entry points turn into a one-line message and
exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = ["UserError", "ConfigError", "parse_config", "load_yaml", "config_to_dict", "exit_on_user_error"]


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, launch): reported in one line, exit 2."""


class ConfigError(UserError):
    """A config file or flag that does not fit the recipe's config dataclass."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def _coerce(path: Path, key: str, value: Any, action: Any) -> Any:
    """Check a YAML value against the flag argparse would have built for the field."""
    if value is None:
        return None
    if (action.type is str and action.nargs is None and isinstance(value, list) and value
            and all(isinstance(v, dict) for v in value)):
        return json.dumps(value)  # a list of mappings for a text field (pretrain's dataset mixture) travels as JSON
    convert = action.type
    values = value if isinstance(value, list) else [value]
    if action.nargs in ("+", "*") and not isinstance(value, list):
        values = [value]
    out = []
    for v in values:
        if convert is not None:
            try:
                if convert is int and isinstance(v, float) and not v.is_integer():
                    raise ValueError(v)
                v = convert(v)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{path}: {key}: expected {getattr(convert, '__name__', 'a value')}, got {v!r}"
                ) from None
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"{path}: {key}: {v!r} is not one of {list(action.choices)}")
        out.append(v)
    return out if action.nargs in ("+", "*") or isinstance(value, list) else out[0]


def parse_config(cls: type[T], argv: Sequence[str] | None = None, *, prog: str | None = None,
                 extra_keys: Sequence[str] = ("recipe",)) -> T:
    """Build ``cls`` from ``--config FILE.yaml`` and command-line flags (flags win).

    Args:
        cls: A dataclass whose fields carry ``metadata={"help": ...}``.
        argv: Arguments (default ``sys.argv[1:]``).
        prog: Program name for ``--help``.
        extra_keys: YAML keys that are allowed but are not fields (``recipe`` names the recipe
            for ``acceltrain train --config``).

    Raises:
        ConfigError: an unreadable file, an unknown key, or a value of the wrong type.

    Example:
        >>> cfg = parse_config(PretrainConfig, ["--config", "recipes/configs/pretrain_tiny.yaml", "--max_steps", "50"])
    """
    from transformers import HfArgumentParser  # here: `import acceltrain` stays free of transformers

    aliases: dict[str, str] = dict(getattr(cls, "config_aliases", None) or {})
    argv = _canonical_flags(list(sys.argv[1:] if argv is None else argv), aliases)
    epilog = ("Also accepted: " + ", ".join(f"--{a} for --{c}" for a, c in aliases.items()) + ".") if aliases else None
    parser = HfArgumentParser(cls, prog=prog, description=(cls.__doc__ or "").strip().split("\n")[0], epilog=epilog)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file of field: value pairs; command-line flags override it")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        values = load_yaml(path)
        actions = {a.dest: a for a in parser._actions}
        fields = {f.name for f in dataclasses.fields(cls)}
        defaults = {}
        for key, value in values.items():
            if key in extra_keys:
                continue
            if key in aliases:
                if aliases[key] in values:
                    raise ConfigError(f"{path}: {key} and {aliases[key]} are one setting ({aliases[key]}); give one")
                key = aliases[key]
            if key not in fields:
                close = [f for f in fields if f.split("_")[0] == str(key).split("_")[0]]
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                raise ConfigError(f"{path}: unknown key {key!r}{hint}")
            defaults[key] = _coerce(path, key, value, actions[key])
        parser.set_defaults(**defaults)
    cfg, _ = _parse(parser, argv)
    return cfg


def _canonical_flags(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """``argv`` with each alias flag (``--learning_rate 0.1``, ``--learning_rate=0.1``) spelled as its
    field; a field given under two spellings is a ConfigError naming both."""
    if not aliases:
        return argv
    seen: dict[str, str] = {}
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name is not None and (name in aliases or name in aliases.values()):
            field = aliases.get(name, name)
            if seen.setdefault(field, name) != name:
                raise ConfigError(f"--{seen[field]} and --{name} are one setting ({field}); give one")
            arg = f"--{field}{eq}{value}"
        out.append(arg)
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[Any, list[str]]:
    outputs = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    cfg, remaining = outputs[0], outputs[-1]
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return cfg, remaining


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML/JSON-able values (paths become strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point: a ``UserError`` prints ``error: ...`` on one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
