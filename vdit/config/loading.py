"""Loading configs: YAML and dotted `key=value` overrides -> typed, validated `Config`; and back
(`to_dict`, `dump_yaml`, `diff`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vdit.config.sections import Config, ConfigError


def shipped_path(relative: str | Path) -> Path:
    """Where a file shipped with vdit lives (`experiments/default.yaml`,
    `checkpoints/autoencoder-4x8x8`): in an installed wheel, the package's data
    (`vdit/_shipped/`, copied there by setup.py's build); in a source checkout, the checkout."""
    from importlib.resources import files

    packaged = Path(str(files("vdit"))) / "_shipped" / relative
    if packaged.exists():
        return packaged
    return Path(__file__).resolve().parents[2] / relative


def find_config_file(path: str | Path) -> Path:
    """A config path as the user gave it (absolute, or relative to the working directory); a
    relative path found in neither place is looked up among the shipped configs, so
    `vdit train experiments/bench_cpu.yaml` works from any directory and from a wheel."""
    given = Path(path).expanduser()
    if given.is_file() or given.is_absolute():
        return given
    shipped = shipped_path(given)
    return shipped if shipped.is_file() else given


DEFAULT_CONFIG = shipped_path("experiments/default.yaml")
AUTOENCODER_CONFIG = shipped_path("experiments/autoencoder.yaml")  # `vdit train-ae` default


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"{key}: unsupported annotation {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; allowed: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.depth=6", "train.lr=3e-4"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict) -> Config:
    """Build and validate a Config; raises ConfigError naming every bad key."""
    config = _build(Config, data, "")
    problems = config.validate()
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def section_from_dict(cls: type, data: dict, prefix: str) -> Any:
    """One section (e.g. RewriteConfig as "sample.rewrite") built and validated on its own, its
    problems named under the dotted `prefix` as `from_dict` names them: for a command that
    takes a section's keys as arguments (`vdit sample --rewrite KEY=VALUE`)."""
    section = _build(cls, data, prefix)
    problems = section.validate()
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"{prefix}.{p}" for p in problems))
    return section


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (default: experiments/default.yaml) + dotted overrides -> validated Config."""
    path = find_config_file(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} " + ("is a folder, not a YAML file"
                                                    if path.is_dir() else "does not exist"))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:  # a video or a checkpoint given where the config goes
        raise ConfigError(f"{path}: not a text file, so not a YAML config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return from_dict(_merge(data, parse_overrides(overrides or [])))


def load_from_command_line(config: str | None, overrides: list[str]) -> Config:
    """`vdit train [CONFIG] [key=value ...]`: a first argument that is an override and not a
    file (`vdit train model.depth=6`) is an override on the embedded default."""
    overrides = list(overrides)
    if config is not None and "=" in config and not find_config_file(config).exists():
        overrides.insert(0, config)
        config = None
    return load_config(config, overrides)


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML and JSON."""

    def plain(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
