"""Where settings come from and go: a TOML file, ``WSGATE_*`` variables and command-line
overrides in, validated into :class:`~wsgate.config.Settings` (every problem reported at
once, each naming its setting); and settings out as TOML (``wsgate config``)."""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from .config import Settings
from .errors import ConfigError

# -- loading ------------------------------------------------------------------

ENV_PREFIX = "WSGATE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from the file, the environment and dotted overrides.

    Raises :class:`ConfigError` listing every problem, each naming its setting.
    """
    layered: dict[str, Any] = {}
    problems: list[str] = []
    if config_file is not None:
        try:
            with open(config_file, "rb") as f:
                _merge(layered, tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"--config: cannot read {config_file}: {exc}"]) from None
    known = {env_name(dotted): dotted for dotted in setting_names(Settings)}
    for name, value in (os.environ if env is None else env).items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            if name not in known and not name.startswith(f"{ENV_PREFIX}AUTH__KEYS"):
                nearest = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {nearest[0]}?)" if nearest else ""
                problems.append(f"{name}: unknown setting{hint}")
                continue
            path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
            _merge(layered, _nest(path, value))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _merge(layered, _nest(dotted.split("."), value))
    settings: Settings | None = _build(Settings, layered, "", problems)
    if settings is None or problems:
        raise ConfigError(problems)
    problems.extend(settings.problems())
    if problems:
        raise ConfigError(problems)
    return settings


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


class _Reported(Exception):
    """A nested problem that has already been recorded."""


def _build(cls: type[Any], data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, Mapping):
        problems.append(f"{prefix.rstrip('.') or 'settings'}: must be a table")
        return None
    hints = typing.get_type_hints(cls)
    fields = {a.name: a for a in attrs.fields(cls)}
    for unknown in sorted(set(data) - set(fields)):
        nearest = difflib.get_close_matches(str(unknown), fields, n=1)
        hint = f" (did you mean {prefix}{nearest[0]}?)" if nearest else ""
        problems.append(f"{prefix}{unknown}: unknown setting{hint}")
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for name, attribute in fields.items():
        if name not in data:
            continue
        full = prefix + name
        try:
            value = _coerce(data[name], hints[name], full, problems)
            if attribute.validator is not None:
                attribute.validator(None, attribute, value)
        except _Reported:
            continue
        except (TypeError, ValueError) as exc:
            problems.append(f"{full}: {exc} (got {_shown(attribute, data[name])})")
            continue
        kwargs[name] = value
    if len(problems) > before:
        return None
    return cls(**kwargs)


def _shown(attribute: attrs.Attribute[Any], value: Any) -> str:
    return "***" if attribute.metadata.get("secret") else repr(value)


def _coerce(value: Any, hint: Any, name: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if attrs.has(hint):
        built = _build(hint, value, name + ".", problems)
        if built is None:
            raise _Reported
        return built
    if origin in (types.UnionType, typing.Union):
        if value is None or (isinstance(value, str) and value == ""):
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(value, inner, name, problems)
    if origin is tuple:
        inner = args[0]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise TypeError("must be a list")
        if attrs.has(inner):
            out = []
            for i, item in enumerate(items):
                built = _build(inner, item, f"{name}[{i}].", problems)
                if built is None:
                    raise _Reported
                out.append(built)
            return tuple(out)
        return tuple(_coerce(i.strip() if isinstance(i, str) else i, inner, name, problems) for i in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise TypeError("must be true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError("must be an integer")
        try:
            return int(value)
        except ValueError:
            raise ValueError("must be an integer") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError("must be a number")
        try:
            return float(value)
        except ValueError:
            raise ValueError("must be a number") from None
    if hint is str:
        if not isinstance(value, str):
            raise TypeError("must be a string")
        return value
    raise TypeError(f"unsupported setting type {hint!r}")


def setting_names(cls: type[Any], prefix: str = "") -> list[str]:
    """Every setting's dotted name (``server.port``); a list of tables counts as one."""
    names: list[str] = []
    hints = typing.get_type_hints(cls)
    for attribute in attrs.fields(cls):
        hint = hints[attribute.name]
        if attrs.has(hint):
            names += setting_names(hint, f"{prefix}{attribute.name}.")
        else:
            names.append(prefix + attribute.name)
    return names


def env_name(dotted: str) -> str:
    """The environment variable of a setting: ``server.port`` -> ``WSGATE_SERVER__PORT``."""
    return ENV_PREFIX + dotted.replace(".", "__").upper()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(settings: Any, *, commented: bool = False) -> str:
    """The settings as a TOML file ``--config`` reads back to the same settings.

    Unset values and secrets are written as comments (secrets masked). ``commented``:
    every value line is a comment (a sample file showing the defaults).
    """
    out: list[str] = []
    mark = "# " if commented else ""

    def table(obj: Any, path: str, header: str) -> None:
        """Write ``obj``'s settings under ``header``, then its sub-tables (``path``: its dotted name)."""
        tables: list[tuple[str, Any, str]] = []  # (dotted path, value, header)
        if header:
            out.extend(("", header))
        for attribute in attrs.fields(type(obj)):
            value = getattr(obj, attribute.name)
            dotted = f"{path}.{attribute.name}" if path else attribute.name
            if attrs.has(type(value)):
                tables.append((dotted, value, f"[{dotted}]"))
            elif isinstance(value, tuple) and value and attrs.has(type(value[0])):
                tables += [(dotted, item, f"[[{dotted}]]") for item in value]  # an array of tables
            elif attribute.metadata.get("secret") and value is not None:
                out.append(f'# {attribute.name} = "***"  (set; masked)')
            elif value is None:
                out.append(f"# {attribute.name} =  (not set)")
            else:
                out.append(f"{mark}{attribute.name} = {_toml_value(value)}")
        for dotted, value, sub_header in tables:
            table(value, dotted, sub_header)

    table(settings, "", "")
    return "\n".join(out).lstrip("\n") + "\n"


EXAMPLE_HEADER = """\
# wsgate.example.toml: every setting wsgate has, with its default, commented out.
# Uncomment what you change; docs/configuration.md says what each one does, and
# each is also an environment variable (server.port: WSGATE_SERVER__PORT).
# Check a file with: wsgate check-config --config wsgate.toml
"""


def example_toml() -> str:
    """The text of the shipped ``wsgate.example.toml`` (a test holds the file to it)."""
    return EXAMPLE_HEADER + "\n" + to_toml(Settings(), commented=True)
