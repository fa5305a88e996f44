"""Config files: a TOML file read by path or a shipped config's name, ``--set dotted.key=value``
overrides merged into its table, a validation error as one line per problem, and the resolved
config written back as TOML. What a config may hold is :mod:`clevrgen.config`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from clevrgen.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: Path) -> dict[str, Any]:
    from clevrgen.inputs import input_file

    if not input_file(path).is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.toml"))


def find_config(path: Path | str) -> Path:
    """A config file: ``path`` itself when it exists, else the shipped config of that name
    (``base``, ``base.toml`` or ``configs/base.toml`` from any folder)."""
    path = Path(path)
    if path.exists():
        return path
    name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    shipped = SHIPPED_CONFIGS / name
    if shipped.is_file() and (path.parent == Path(".") or path.parent.name == "configs"):
        return shipped
    raise ConfigError([f"{path}: no such config file; the shipped configs are {', '.join(shipped_config_names())} "
                       "(give one by name, e.g. --config base)"])


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=2e-4`` -> (["train", "lr"], 2e-4); the value is a TOML literal (bare words
    are taken as strings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"{text}: expected section.key=value"], source="override")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def _merge_table(node: dict[str, Any], key: str, value: Any) -> None:
    """Set ``node[key] = value``, but a table given for a table merges into it, key by key: ``--set
    'train={steps=2}'`` changes train.steps and keeps every other [train] value of the file."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for k, v in value.items():
            _merge_table(node[key], k, v)
    else:
        node[key] = value


def merge_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"{'.'.join(path)}: {part} is not a section"], source="override")
            node = child
        _merge_table(node, path[-1], value)
    return raw


def override_origins(overrides: list[str]) -> dict[str, str]:
    """Which ``--set`` gave each dotted key, for messages that blame the right thing."""
    return {".".join(parse_override(text)[0]): f"--set {text}" for text in overrides}



def problem_lines(exc: ValidationError, origins: dict[str, str]) -> tuple[list[str], bool]:
    """One line per problem, each named by where its value came from (an option, a ``--set``, or
    the config's dotted path); and whether any came from the config file itself."""
    lines, from_file = [], False
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "finite_number":
            value = err.get("input")
            message = ("must be a number (got nan)" if isinstance(value, float) and value != value
                       else f"must be finite (got {value})")
        origin = next((o for key, o in origins.items()
                       if where == key or where.startswith(key + ".") or key.startswith(where + ".")), None)
        from_file = from_file or origin is None
        lines.append(f"{where}: {message}" + (f" (given by {origin})" if origin else ""))
    return lines, from_file


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def to_toml(config: BaseModel) -> str:
    """The resolved config as TOML (None values are left out: they are the defaults)."""
    out = []
    for section, values in config.model_dump(mode="json").items():
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        out.append("")
    return "\n".join(out)
